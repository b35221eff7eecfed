"""params.yaml parsed into frozen dataclasses, one per section.

`load_params()` is the only reader of params.yaml. Every section becomes a frozen dataclass whose
fields carry their own documentation; an unknown key, a missing key or a value out of range fails
with one sentence that names the dotted key (`ConfigError`).

With `VISUAL_ECHOES_PARAM_READS` set to a folder, `load_params()` returns recording copies of the
sections (subclasses, so isinstance, `dataclasses.asdict` and `replace` behave as usual): every
leaf value the process reads is noted by its dotted key and written to
`<folder>/<entry>-<pid>.txt` at exit (`<entry>`: the script's name, e.g. `sweep` for
`python -m stages.sweep`). A section pickled to another process (Ray workers) counts as read
whole. The tests compare these keys with what dvc.yaml declares for each stage.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from pipeline.errors import PipelineError

T = TypeVar("T")

PARAMS_FILE = "params.yaml"
PARAM_READS_ENV = "VISUAL_ECHOES_PARAM_READS"


class ConfigError(PipelineError, ValueError):
    """A params.yaml problem a user can fix; the message is one sentence naming the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation kept in the metadata."""
    return field(metadata={"doc": text}, **kwargs)


# --------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class BaseConfig:
    seed: int = doc("Seed for every random choice in the pipeline.")
    experiment: str = doc("MLflow experiment that every stage logs its run into.")
    cluster_wait_s: float = doc(
        "Seconds a stage waits for an autoscaling Ray cluster to add what it asks for, after "
        "asking its autoscaler: GPUs (tokenize, train, sweep, evaluate), download.ray.nodes "
        "nodes, a CPU for extract's tasks; 0: fail at once when they are not there (a fixed "
        "cluster, a laptop). It changes no result, so no stage declares it in dvc.yaml."
    )

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", "must be a non-negative integer")
        _check(bool(self.experiment.strip()), "experiment", "must not be empty")
        _check(0 <= self.cluster_wait_s <= 86_400, "cluster_wait_s", "must be between 0 and 86400")


@dataclass(frozen=True)
class PathsConfig:
    clips: str = doc("download output: videos in shard folders plus manifest.parquet.")
    extract: str = doc("extract output: Parquet shards of frames and mels per split, meta.json.")
    tokenizers: str = doc("tokenizers output: image/ and audio/ checkpoint folders (+ vocoder/).")
    tokens: str = doc("tokenize output: {train,test}/part-NNNNN.parquet of ids + meta.json.")
    transformer: str = doc(
        "train output: the transformer's model.safetensors + config.json + README.md (card)."
    )
    evaluator: str = doc(
        "evaluator output: the offline evaluator's model.safetensors + config.json."
    )
    cache: str = doc("Scratch space for resumable work; never a DVC output.")
    reports: str = doc("Per-stage reports (summaries, plots) that DVC tracks as metrics/plots.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check(
                bool(value) and not Path(value).is_absolute(),
                f.name,
                "must be a relative path inside the repository",
            )
            _check(".." not in Path(value).parts, f.name, "must not leave the repository")


@dataclass(frozen=True)
class SyntheticConfig:
    num_classes: int = doc("Number of audio-visual classes, at most 8.")
    train_per_class: int = doc("Training clips per class.")
    test_per_class: int = doc("Test clips per class.")
    width: int = doc("Video width in pixels.")
    height: int = doc("Video height in pixels.")
    fps: int = doc("Video frame rate.")
    sample_rate: int = doc("Audio sample rate of the written AAC track.")
    duration_s: float = doc("Clip length in seconds (VGGSound clips are 10 s).")

    def __post_init__(self) -> None:
        _check(1 <= self.num_classes <= 8, "num_classes", "must be between 1 and 8")
        _check(self.train_per_class >= 1, "train_per_class", "must be at least 1")
        _check(self.test_per_class >= 1, "test_per_class", "must be at least 1")
        _check(
            32 <= self.width <= 1920 and self.width % 2 == 0,
            "width",
            "must be an even number between 32 and 1920",
        )
        _check(
            32 <= self.height <= 1080 and self.height % 2 == 0,
            "height",
            "must be an even number between 32 and 1080",
        )
        _check(1 <= self.fps <= 60, "fps", "must be between 1 and 60")
        _check(8000 <= self.sample_rate <= 48000, "sample_rate", "must be between 8000 and 48000")
        _check(1.0 <= self.duration_s <= 30.0, "duration_s", "must be between 1 and 30 seconds")


@dataclass(frozen=True)
class VGGSoundConfig:
    csv: str = doc(
        "List file: vggsound.csv (id,start,label,split) or train.csv/test.csv (<id>_<start>.mp4,label)."
    )
    split: str = doc("Split assigned to rows of a train.csv/test.csv list (they carry none).")
    url_template: str = doc("Video URL; {id} is replaced by the validated YouTube id.")
    format: str = doc("yt-dlp format selector: a small MP4 of at least 256 px.")
    workers: int = doc("Concurrent downloads.")
    sleep_requests: float = doc("Seconds yt-dlp sleeps between extraction requests.")
    sleep_interval: float = doc("Seconds yt-dlp sleeps before each download.")
    max_sleep_interval: float = doc("Upper bound of the random sleep before each download.")
    socket_timeout: float = doc("Seconds before a stalled connection counts as a timeout.")
    retries: int = doc("Attempts per clip for transient errors (timeouts, dropped connections).")
    backoff_s: float = doc(
        "First back-off pause after a rate limit or bot check; doubles each time."
    )
    max_backoff_s: float = doc("Longest back-off pause.")
    cookiefile: str = doc("Optional Netscape cookie file for yt-dlp; never logged.")

    def __post_init__(self) -> None:
        _check(
            bool(self.csv.strip()), "csv", "must name a list file (default sources/vggsound.csv)"
        )
        _check("{id}" in self.url_template, "url_template", "must contain {id}")
        _check(self.split in ("train", "test"), "split", "must be 'train' or 'test'")
        _check(1 <= self.workers <= 64, "workers", "must be between 1 and 64")
        for name in ("sleep_requests", "sleep_interval", "max_sleep_interval"):
            _check(getattr(self, name) >= 0, name, "must not be negative")
        _check(
            self.max_sleep_interval >= self.sleep_interval,
            "max_sleep_interval",
            "must be at least sleep_interval",
        )
        _check(self.socket_timeout > 0, "socket_timeout", "must be positive")
        _check(1 <= self.retries <= 20, "retries", "must be between 1 and 20")
        _check(
            0 < self.backoff_s <= self.max_backoff_s,
            "backoff_s",
            "must be positive and at most max_backoff_s",
        )


@dataclass(frozen=True)
class LocalConfig:
    videos_dir: str = doc("Folder of the user's own videos (a dependency of the download stage).")
    labels_csv: str = doc("CSV with header 'file,label[,split]'; file is relative to videos_dir.")

    def __post_init__(self) -> None:
        # dvc.yaml lists both as dependencies, and DVC refuses an empty one.
        _check(
            bool(self.videos_dir.strip()),
            "videos_dir",
            "must name a folder (default sources/videos)",
        )
        _check(
            bool(self.labels_csv.strip()),
            "labels_csv",
            "must name a file (default sources/labels.csv)",
        )


@dataclass(frozen=True)
class DownloadRayConfig:
    """How `executor: ray` spreads the vggsound download over the cluster's nodes."""

    nodes: int = doc(
        "Nodes that download, one downloader actor (1 CPU, its own yt-dlp sessions, pacing and "
        "back-off: its own IP) on each (0: every node with a free CPU)."
    )
    shard_clips: int = doc(
        "Clips handed to a node at a time; a lost node's unfinished shard goes to the others."
    )

    def __post_init__(self) -> None:
        _check(self.nodes >= 0, "nodes", "must be 0 (every node) or positive")
        _check(1 <= self.shard_clips <= 10_000, "shard_clips", "must be between 1 and 10000")


@dataclass(frozen=True)
class DownloadConfig:
    source: Literal["synthetic", "vggsound", "local"] = doc("Where the clips come from.")
    limit: int = doc("Take at most this many clips (0: all).")
    splits: tuple[str, ...] = doc("Splits to keep.")
    classes: tuple[str, ...] = doc("Labels to keep (empty: all).")
    retry_failed: bool = doc("Retry clips a previous run recorded as failed.")
    synthetic: SyntheticConfig = doc("Settings of the procedural dataset.")
    vggsound: VGGSoundConfig = doc("Settings of the YouTube download.")
    local: LocalConfig = doc("Settings of a folder of the user's own videos.")
    # The two below have defaults for code that builds a section itself (params.yaml must still
    # name them); the values are params.yaml's.
    executor: Literal["local", "ray"] = doc(
        "local: `vggsound.workers` threads on this machine; ray: that many on each of "
        "`ray.nodes` nodes of the Ray cluster (vggsound only).",
        default="local",
    )
    ray: DownloadRayConfig = doc(
        "Settings of `executor: ray`.", default_factory=lambda: DownloadRayConfig(0, 16)
    )

    def __post_init__(self) -> None:
        _check(self.limit >= 0, "limit", "must be 0 (all) or positive")
        _check(
            self.executor == "local" or self.source == "vggsound",
            "executor",
            f"'ray' fans out the vggsound source only; use 'local' for source {self.source!r}",
        )
        _check(
            bool(self.splits) and set(self.splits) <= {"train", "test"},
            "splits",
            "must be a non-empty list of 'train' and 'test'",
        )


@dataclass(frozen=True)
class ExtractConfig:
    num_frames: int = doc("Frames sampled uniformly over each clip (10 in the paper).")
    image_size: int = doc("Frames are resized on the short side and centre-cropped to this.")
    jpeg_quality: int = doc("JPEG quality of the stored frames.")
    sample_rate: int = doc("Audio rate of the mel transform (SpecVQGAN: 22050).")
    clip_seconds: float = doc("Audio length the mel covers (10 s).")
    n_fft: int = doc("STFT size (SpecVQGAN: 1024).")
    hop_length: int = doc("STFT hop (SpecVQGAN: 256).")
    n_mels: int = doc("Mel bands (SpecVQGAN: 80).")
    fmin: float = doc("Lowest mel frequency in Hz (SpecVQGAN: 125).")
    fmax: float = doc("Highest mel frequency in Hz (SpecVQGAN: 7600).")
    mel_frames: int = doc("Mel frames kept after the centre crop (SpecVQGAN VGGSound: 848).")
    rows_per_shard: int = doc("Clips per Parquet shard.")
    workers: int = doc("Parallel clip workers of `executor: local` (0: one per core).")
    executor: Literal["local", "ray"] = doc(
        "local: a process pool on this machine; ray: one Ray task (1 CPU) per clip over the "
        "cluster's nodes, the same code and byte-identical shards. Neither changes the data "
        "(the default is for sections saved before it existed: tokenizers' vocoder meta.json).",
        default="local",
    )

    def __post_init__(self) -> None:
        _check(1 <= self.num_frames <= 64, "num_frames", "must be between 1 and 64")
        _check(16 <= self.image_size <= 1024, "image_size", "must be between 16 and 1024")
        _check(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be between 1 and 100")
        _check(8000 <= self.sample_rate <= 48000, "sample_rate", "must be between 8000 and 48000")
        _check(1.0 <= self.clip_seconds <= 30.0, "clip_seconds", "must be between 1 and 30")
        _check(
            self.n_fft >= 64 and self.n_fft & (self.n_fft - 1) == 0,
            "n_fft",
            "must be a power of two of at least 64",
        )
        _check(0 < self.hop_length <= self.n_fft, "hop_length", "must be between 1 and n_fft")
        _check(1 <= self.n_mels <= 256, "n_mels", "must be between 1 and 256")
        _check(
            0 <= self.fmin < self.fmax <= self.sample_rate / 2,
            "fmax",
            "must be above fmin and at most half the sample rate",
        )
        full = 1 + int(self.sample_rate * self.clip_seconds) // self.hop_length
        _check(
            1 <= self.mel_frames <= full,
            "mel_frames",
            f"must be between 1 and the {full} STFT frames of the clip",
        )
        _check(
            1 <= self.rows_per_shard <= 100_000, "rows_per_shard", "must be between 1 and 100000"
        )
        _check(self.workers >= 0, "workers", "must be 0 (one per core) or positive")


@dataclass(frozen=True)
class VQGANArch:
    """A VQGAN architecture (taming's ddconfig + codebook); input size comes from `extract`."""

    ch: int = doc("Channels of the first level (official: 128).")
    ch_mult: tuple[int, ...] = doc("Channel multiplier per level; len-1 = number of halvings.")
    num_res_blocks: int = doc("Residual blocks per encoder level (decoder: one more).")
    attn_resolutions: tuple[int, ...] = doc(
        "Widths at which attention blocks sit (official: 16 / 53)."
    )
    z_channels: int = doc("Latent channels.")
    embed_dim: int = doc("Codebook vector size.")
    n_embed: int = doc("Codebook size C (official: 1024).")
    dropout: float = doc("Dropout in residual blocks.")
    norm_groups: int = doc("GroupNorm groups (official: 32; fewer allows narrow CPU models).")
    # A default for code that builds an arch itself; params.yaml must still name it.
    temporal: bool = doc(
        "Mels only, not an official layout: a 1-D codec over time whose input channels are the "
        "mel bands, so each id covers every band of 2^(len(ch_mult) - 1) frames (the demo's, "
        "docs/experiments.md#a-codec-that-keeps-the-rhythm); official: false.",
        default=False,
    )

    def __post_init__(self) -> None:
        _check(self.norm_groups >= 1, "norm_groups", "must be positive")
        _check(
            self.ch >= 1 and self.ch % self.norm_groups == 0,
            "ch",
            "must be a positive multiple of norm_groups",
        )
        _check(
            len(self.ch_mult) >= 1 and all(m >= 1 for m in self.ch_mult),
            "ch_mult",
            "must be a non-empty list of positive integers",
        )
        _check(
            all((self.ch * m) % self.norm_groups == 0 for m in self.ch_mult),
            "ch_mult",
            "must keep every level's channels a multiple of norm_groups",
        )
        _check(self.num_res_blocks >= 0, "num_res_blocks", "must not be negative")
        _check(
            self.z_channels >= 1 and self.z_channels % self.norm_groups == 0,
            "z_channels",
            "must be a positive multiple of norm_groups",
        )
        _check(self.embed_dim >= 1, "embed_dim", "must be positive")
        _check(
            2 <= self.n_embed <= 65535, "n_embed", "must be between 2 and 65535 (ids are uint16)"
        )
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class VQGANTrain:
    """How the `tokenizers` stage trains a VQGAN when no pretrained checkpoint is given."""

    steps: int = doc("Optimiser steps.")
    batch_size: int = doc("Examples per step (images: one random frame per clip).")
    lr: float = doc("Adam learning rate (betas 0.5, 0.9 as in taming).")
    beta: float = doc("Commitment weight (0.25 in taming).")
    codebook_weight: float = doc("Weight of the codebook + commitment loss.")
    disc_start: int = doc("Step from which the patch discriminator joins (steps or more: never).")
    disc_weight: float = doc("Weight of the adversarial term.")
    lpips_vgg16: str = doc("Local VGG16/LPIPS checkpoint for a perceptual loss (empty: none).")
    perceptual_weight: float = doc("Weight of the LPIPS term when a checkpoint is given.")
    dead_code_every: int = doc("Restart codes unused over this many steps (0: never).")
    kmeans_init: bool = doc("Initialise the codebook with k-means on the first batches' latents.")
    eval_examples: int = doc("Test examples used for the reconstruction report (0: all).")
    crop: tuple[int, ...] = doc(
        "[height, width] of the random window each example trains on ([]: the whole input); "
        "both must divide by the VQGAN's downsampling factor. Evaluation uses whole inputs."
    )

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "steps", "must be at least 1")
        _check(
            len(self.crop) in (0, 2) and all(c >= 1 for c in self.crop),
            "crop",
            "must be [] (whole inputs) or [height, width] with positive sizes",
        )
        _check(self.batch_size >= 1, "batch_size", "must be at least 1")
        _check(0 < self.lr < 1, "lr", "must be in (0, 1)")
        _check(self.beta >= 0 and self.codebook_weight >= 0, "beta", "weights must not be negative")
        _check(
            self.disc_start >= 0 and self.disc_weight >= 0,
            "disc_start",
            "and disc_weight must not be negative",
        )
        _check(self.perceptual_weight >= 0, "perceptual_weight", "must not be negative")
        _check(self.dead_code_every >= 0, "dead_code_every", "must be 0 (never) or positive")
        _check(self.eval_examples >= 0, "eval_examples", "must be 0 (all) or positive")


@dataclass(frozen=True)
class ModalityTokenizerConfig:
    pretrained: str = doc("Local official checkpoint to import (empty: train one on our data).")
    arch: VQGANArch = doc("Architecture; must match the checkpoint when `pretrained` is set.")
    train: VQGANTrain = doc("Training settings, used when `pretrained` is empty.")


@dataclass(frozen=True)
class VocoderConfig:
    melgan: str = doc("Local SpecVQGAN VGGSound MelGAN `best_netG.pt` (empty: Griffin-Lim).")
    griffin_lim_iters: int = doc("Griffin-Lim iterations when no MelGAN is configured.")

    def __post_init__(self) -> None:
        _check(
            1 <= self.griffin_lim_iters <= 1000, "griffin_lim_iters", "must be between 1 and 1000"
        )


@dataclass(frozen=True)
class TokenizersConfig:
    device: Literal["auto", "cpu", "cuda"] = doc(
        "Where tokenizers train: auto picks cuda if present."
    )
    image: ModalityTokenizerConfig = doc("The image VQGAN (paper: taming vqgan_imagenet_f16_1024).")
    audio: ModalityTokenizerConfig = doc("The mel VQGAN (paper: SpecVQGAN vggsound_codebook).")
    vocoder: VocoderConfig = doc("Mel -> waveform.")

    def __post_init__(self) -> None:
        _check(not self.image.arch.temporal, "image.arch.temporal", "is for mels: must be false")


@dataclass(frozen=True)
class TokenizeConfig:
    batch_size: int = doc("Examples per Ray Data batch.")
    num_actors: int = doc("Tokenizer actors (each loads both tokenizers once).")
    num_gpus_per_actor: float = doc("GPUs per actor (0 on CPU; never more than the cluster has).")
    precision: Literal["fp32", "tf32", "bf16"] = doc("Encoder precision (fp32: exact reference).")
    rows_per_file: int = doc("Clips per output Parquet file.")
    output_uri: str = doc(
        "Where Ray workers write before compaction on a cluster: a shared path or s3:// (empty: local)."
    )

    def __post_init__(self) -> None:
        _check(1 <= self.batch_size <= 4096, "batch_size", "must be between 1 and 4096")
        _check(1 <= self.num_actors <= 1024, "num_actors", "must be between 1 and 1024")
        _check(0 <= self.num_gpus_per_actor <= 16, "num_gpus_per_actor", "must be between 0 and 16")
        _check(
            1 <= self.rows_per_file <= 1_000_000, "rows_per_file", "must be between 1 and 1000000"
        )


@dataclass(frozen=True)
class ModelConfig:
    """The unified masked generative transformer (paper: ViT-L encoder, 1024-wide decoder)."""

    embed_dim: int = doc("Encoder width (paper: 1024).")
    depth: int = doc("Encoder blocks (paper: 24).")
    num_heads: int = doc("Encoder attention heads (paper: 16).")
    decoder_embed_dim: int = doc("Decoder width (paper, as MAGE: 1024).")
    decoder_depth: int = doc("Decoder blocks (paper: 8).")
    decoder_num_heads: int = doc("Decoder attention heads (paper: 16).")
    mlp_ratio: float = doc("MLP hidden size over width (4).")
    dropout: float = doc("Dropout on embeddings, projections and MLPs (MAGE: 0.1).")
    attn_dropout: float = doc("Dropout on attention weights (MAGE: 0.1).")
    detach_head_embedding: bool = doc(
        "Tie the output to the embedding table without a gradient through it, as MAGE does."
    )
    activation_checkpointing: bool = doc(
        "Recompute block activations in the backward pass (less memory, ~30% more compute)."
    )

    def __post_init__(self) -> None:
        for width, heads, name in (
            (self.embed_dim, self.num_heads, "num_heads"),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder_num_heads"),
        ):
            _check(
                heads >= 1 and width >= heads and width % heads == 0,
                name,
                "must divide the width it belongs to",
            )
        _check(self.depth >= 1 and self.decoder_depth >= 1, "depth", "blocks must be at least 1")
        _check(self.mlp_ratio > 0, "mlp_ratio", "must be positive")
        _check(0 <= self.dropout < 1 and 0 <= self.attn_dropout < 1, "dropout", "must be in [0, 1)")


@dataclass(frozen=True)
class MaskingConfig:
    """Training-time masking (paper §3.3): a ratio per sample and modality, then a random drop."""

    mean: float = doc("Location of the truncated Gaussian of mask ratios (paper mu: 0.7).")
    std: float = doc("Its scale (not in the paper; MAGE: 0.25).")
    low: float = doc("Smallest mask ratio (paper: 0.2).")
    high: float = doc("Largest mask ratio (1.0).")
    drop_ratio: float = doc(
        "Fraction of each modality's positions removed before the encoder, masked or not (0.5)."
    )
    conditional: float = doc(
        "Not in the paper (0 there): fraction of samples trained as pure conditional generation,"
        " one modality (audio or image, evenly) fully masked and the other fully visible.",
        default=0.0,
    )

    def __post_init__(self) -> None:
        _check(0 <= self.conditional <= 1, "conditional", "must be in [0, 1]")
        _check(0 < self.low < self.high <= 1, "low", "must satisfy 0 < low < high <= 1")
        _check(self.std > 0, "std", "must be positive")
        _check(0 <= self.drop_ratio < 1, "drop_ratio", "must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """The `train` stage: Ray Train TorchTrainer around a plain PyTorch step."""

    run_name: str = doc(
        "Ray Train run name; rerunning with the same name resumes (auto: derived from params)."
    )
    storage_path: str = doc("RunConfig.storage_path: checkpoints (local folder, NFS or s3://).")
    num_workers: int = doc("Ray Train workers (0: local mode, in the stage process).")
    use_gpu: bool = doc("One GPU per worker (NCCL); false: CPU workers (gloo).")
    cpus_per_worker: float = doc("CPUs reserved per worker.")
    max_failures: int = doc("FailureConfig.max_failures: worker-group restarts from a checkpoint.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "auto: bf16 on compute capability >= 8.0, fp16 + GradScaler on 7.x, fp32 on CPU."
    )
    steps: int = doc("Optimiser steps.")
    batch_size: int = doc("Global batch (split evenly over workers).")
    base_lr: float = doc("lr = base_lr x batch_size / 256 (MAGE: 1.5e-4).")
    min_lr: float = doc("Learning rate at the end of the cosine.")
    warmup_steps: int = doc("Linear warm-up steps before the cosine.")
    weight_decay: float = doc("AdamW weight decay (0.05; none on norms and biases).")
    betas: tuple[float, ...] = doc("AdamW betas (0.9, 0.95).")
    grad_clip: float = doc("Gradient-norm clip (3.0; 0: none).")
    label_smoothing: float = doc("Cross-entropy label smoothing (0.1).")
    masking: MaskingConfig = doc("Mask ratios and token drop.")
    compile: bool = doc("torch.compile the model (GPU; slow to start on CPU).")
    log_every: int = doc("Steps between logged training metrics.")
    eval_every: int = doc("Steps between validation losses on the test split (0: at the end).")
    eval_mask_ratios: tuple[float, ...] = doc("Fixed mask ratios of the validation loss.")
    eval_examples: int = doc("Test clips used for validation (0: all).")
    figure_every: int = doc(
        "Steps between the reconstruction figure and audio samples logged to MLflow (0: at the "
        "end only)."
    )
    figure_examples: int = doc("Test clips in each reconstruction figure and set of audio samples.")
    checkpoint_every: int = doc("Steps between checkpoints reported to Ray Train.")
    keep_checkpoints: int = doc("Checkpoints kept in storage_path (CheckpointConfig.num_to_keep).")

    def __post_init__(self) -> None:
        _check(bool(self.run_name.strip()), "run_name", "must not be empty (auto: derived)")
        _check(bool(self.storage_path.strip()), "storage_path", "must not be empty")
        _check(self.num_workers >= 0, "num_workers", "must be 0 (local mode) or positive")
        _check(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")
        _check(self.max_failures >= -1, "max_failures", "must be -1 (forever) or more")
        _check(self.steps >= 1, "steps", "must be at least 1")
        _check(
            self.batch_size >= max(1, self.num_workers)
            and self.batch_size % max(1, self.num_workers) == 0,
            "batch_size",
            "must be a positive multiple of num_workers",
        )
        _check(
            0 < self.base_lr < 1 and 0 <= self.min_lr <= self.base_lr,
            "base_lr",
            "must be in (0, 1) and at least min_lr",
        )
        _check(0 <= self.warmup_steps <= self.steps, "warmup_steps", "must be in [0, steps]")
        _check(self.weight_decay >= 0, "weight_decay", "must not be negative")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            "must be two numbers in [0, 1)",
        )
        _check(self.grad_clip >= 0, "grad_clip", "must be 0 (none) or positive")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        for name in ("log_every", "checkpoint_every"):
            _check(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("eval_every", "figure_every", "eval_examples", "figure_examples"):
            _check(getattr(self, name) >= 0, name, "must not be negative")
        _check(
            bool(self.eval_mask_ratios) and all(0 < r <= 1 for r in self.eval_mask_ratios),
            "eval_mask_ratios",
            "must be a non-empty list of ratios in (0, 1]",
        )
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")


@dataclass(frozen=True)
class GenerateConfig:
    """Iterative unmasking (paper §3.4, appendix A.2/A.3) for the command and evaluation."""

    steps: int = doc("Unmasking iterations N (paper: 30).")
    temperature: float = doc(
        "T: scale of the Gumbel noise on the re-masking confidence (paper: 9)."
    )
    guidance: float = doc("Classifier-free guidance s on logits (paper: 3; 1 disables it).")
    batch_size: int = doc("Examples generated together.")
    device: Literal["auto", "cpu", "cuda"] = doc(
        "Where generation runs: auto picks cuda if present."
    )
    drop_ratio: float = doc(
        "Share of each modality's positions hidden from the encoder at each step, at random, as"
        " train.masking.drop_ratio does in training (0: the full sequence, as in the paper).",
        default=0.0,
    )

    def __post_init__(self) -> None:
        _check(1 <= self.steps <= 1000, "steps", "must be between 1 and 1000")
        # `>= 0` alone lets inf through (NaN fails it): either gives NaN confidences
        _check(0 <= self.temperature < math.inf, "temperature", "must be a finite number >= 0")
        _check(
            0 <= self.guidance < math.inf,
            "guidance",
            "must be a finite number >= 0 (1: no guidance)",
        )
        _check(self.batch_size >= 1, "batch_size", "must be at least 1")
        _check(0 <= self.drop_ratio < 1, "drop_ratio", "must be in [0, 1)")


@dataclass(frozen=True)
class OfficialExtractorsConfig:
    """Local paths of the checkpoints behind the paper's numbers (`visual-echoes weights fetch`
    downloads and verifies them; no stage downloads anything)."""

    panns_cnn14_16k: str = doc("Cnn14_16k_mAP=0.438.pth: FD (2048-d) and IS (527 logits).")
    vggish: str = doc("vggish-10086976.pth: FAD on 128-d frame embeddings.")
    clip_vit_b32: str = doc("OpenAI ViT-B-32.pt: the image side of CS.")
    wav2clip: str = doc("Wav2CLIP.pt: the audio side of CS.")


@dataclass(frozen=True)
class EvaluatorConfig:
    """The offline evaluator trained on the extracted train split (pipeline.evaluation.local)."""

    device: Literal["auto", "cpu", "cuda"] = doc("Where it trains and runs.")
    per_label: int = doc("At most this many train clips per label (0: all).")
    codec_augment: bool = doc(
        "Also train on VQGAN reconstructions of the inputs, as generated samples are decodes."
    )
    embed_dim: int = doc("Width of the classifiers' penultimate embedding (FD features).")
    epochs: int = doc("Classifier training epochs.")
    batch_size: int = doc("Classifier batch size.")
    lr: float = doc("AdamW peak learning rate (cosine decay), classifiers and heads.")
    weight_decay: float = doc("AdamW weight decay.")
    joint_dim: int = doc("Dimension of the shared image-audio space (CS-style score).")
    joint_epochs: int = doc("Contrastive head training epochs.")
    joint_batch_size: int = doc("Pairs per InfoNCE batch.")
    joint_temperature: float = doc("InfoNCE temperature.")
    official: OfficialExtractorsConfig = doc("Paper-protocol extractors, when their files exist.")

    def __post_init__(self) -> None:
        _check(self.per_label >= 0, "per_label", "must not be negative")
        for name in ("embed_dim", "epochs", "batch_size", "joint_dim", "joint_batch_size"):
            _check(getattr(self, name) >= 1, name, "must be at least 1")
        _check(self.joint_epochs >= 0, "joint_epochs", "must not be negative")
        _check(0 < self.lr < 1, "lr", "must be in (0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", "must not be negative")
        _check(self.joint_temperature > 0, "joint_temperature", "must be positive")


EVAL_TASKS = ("image2audio", "audio2image", "cogenerate")


@dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate` stage: generation on the test split, metrics, samples (paper §4)."""

    tasks: tuple[str, ...] = doc("Among image2audio, audio2image, cogenerate.")
    guidance: tuple[float, ...] = doc(
        "CFG scales s to evaluate side by side; the first is the headline (paper: 3)."
    )
    max_clips: int = doc("Test clips to generate for (0: the whole test split).")
    cogenerate_samples: int = doc("Pairs co-generated from nothing, when cogenerate is asked.")
    samples: int = doc("Clips whose WAV and PNG are kept as examples.")
    figure_clips: int = doc("Rows of the Fig. 6-style figure.")
    num_actors: int = doc("Ray Data generation actors.")
    num_gpus_per_actor: float = doc("GPUs per generation actor (0 on CPU).")
    repeats: int = doc(
        "Generation runs per task and scale, each with its own seeds; the metrics are their "
        "mean, with each run's values beside it (the paper averages 2)."
    )

    def __post_init__(self) -> None:
        _check(bool(self.tasks), "tasks", "must name at least one task")
        for t in self.tasks:
            _check(t in EVAL_TASKS, "tasks", f"{t!r} is not one of {', '.join(EVAL_TASKS)}")
        _check(
            bool(self.guidance) and all(s >= 0 for s in self.guidance),
            "guidance",
            "must be a non-empty list of non-negative scales",
        )
        for name in ("max_clips", "cogenerate_samples", "samples", "figure_clips"):
            _check(getattr(self, name) >= 0, name, "must not be negative")
        _check(self.num_actors >= 1, "num_actors", "must be at least 1")
        _check(self.num_gpus_per_actor >= 0, "num_gpus_per_actor", "must not be negative")
        _check(1 <= self.repeats <= 100, "repeats", "must be between 1 and 100")


SWEEP_METRICS = ("acc_local", "fd_local", "is_local", "cs_local")


@dataclass(frozen=True)
class SweepConfig:
    """The `sweep` stage: a Ray Tune grid over the inference settings (paper Figs. 3-4)."""

    temperature: tuple[float, ...] = doc("Grid of T.")
    steps: tuple[int, ...] = doc("Grid of N.")
    guidance: tuple[float, ...] = doc("Grid of s.")
    clips: int = doc("Test clips each trial generates for, spread over the test split.")
    metric: str = doc("The metric that picks the best setting (a key of a trial's result).")
    mode: Literal["min", "max"] = doc("Whether the metric is better low or high.")
    cpus_per_trial: float = doc("CPUs each Ray Tune trial reserves.")
    gpus_per_trial: float = doc("GPUs each trial reserves (0 on CPU).")

    def __post_init__(self) -> None:
        for name in ("temperature", "steps", "guidance"):
            _check(bool(getattr(self, name)), name, "must list at least one value")
        _check(all(n >= 1 for n in self.steps), "steps", "must all be at least 1")
        _check(self.clips >= 1, "clips", "must be at least 1")
        _check(self.metric in SWEEP_METRICS, "metric", f"must be one of {', '.join(SWEEP_METRICS)}")
        _check(all(t >= 0 for t in self.temperature), "temperature", "must not be negative")
        _check(all(s >= 0 for s in self.guidance), "guidance", "must not be negative")
        _check(self.cpus_per_trial > 0, "cpus_per_trial", "must be positive")
        _check(self.gpus_per_trial >= 0, "gpus_per_trial", "must not be negative")


@dataclass(frozen=True)
class Params:
    base: BaseConfig
    paths: PathsConfig
    download: DownloadConfig
    extract: ExtractConfig
    tokenizers: TokenizersConfig
    tokenize: TokenizeConfig
    model: ModelConfig
    train: TrainConfig
    generate: GenerateConfig
    evaluator: EvaluatorConfig
    evaluate: EvaluateConfig
    sweep: SweepConfig


# ------------------------------------------------------------------------------------------ loader


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _build(cls: type, data: Any, key: str) -> Any:
    """Build dataclass `cls` from `data`, checking keys and types; `key` is the dotted path."""
    where = key or "params.yaml"
    _check(isinstance(data, dict), where, "must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"{_join(key, unknown[0])}: is not a known key (known: {', '.join(names)})"
        )
    missing = [n for n in names if n not in data]
    if missing:
        raise ConfigError(f"{_join(key, missing[0])}: is missing")
    values = {n: _coerce(hints[n], data[n], _join(key, n)) for n in names}
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{key}.{err}" if key else str(err)) from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, key, f"must be one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if value is None:
            value = []
        _check(isinstance(value, list), key, "must be a list")
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        _check(
            value is None or isinstance(value, typing.get_args(tp)),
            key,
            f"must be {' or '.join(a.__name__ for a in typing.get_args(tp))}",
        )
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, "must be true or false")
    elif tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, "must be an integer")
    elif tp is float:
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool), key, "must be a number"
        )
        value = float(value)
    elif tp is str:
        if value is None:
            value = ""
        _check(isinstance(value, str), key, "must be a string")
    return value


def parse_params(data: Any) -> Params:
    """Validate a params mapping (as read from YAML) and return the frozen `Params`."""
    return _build(Params, data, "")


def parse_section(cls: type[T], data: Any, key: str) -> T:
    """One section dataclass (e.g. `GenerateConfig` from a model's generation.json) from a
    mapping, checked as params.yaml is; `key` names it in errors."""
    return _build(cls, data, key)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; a syntax error or bad key raises `ConfigError`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    params = parse_params(data)
    folder = os.environ.get(PARAM_READS_ENV)
    return _recording(params, "", _reads_sink(folder)) if folder else params


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`base` with the keys of `overlay` replaced, recursively (a profile applied to params)."""
    out = dict(base)
    for name, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = merge(out[name], value)
        else:
            out[name] = value
    return out


def as_dict(section: Any) -> dict[str, Any]:
    """A config section as a plain nested dict (for logging params)."""
    return dataclasses.asdict(section)


# ------------------------------------------------------------------------------- param reads


def _reads_sink(folder: str) -> set[str]:
    """The set this process notes its reads in, written to `folder` at exit (made once)."""
    global _READS
    if _READS is None:
        _READS = set()
        entry = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "python"
        out = Path(folder) / f"{entry}-{os.getpid()}.txt"

        def write() -> None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(f"{key}\n" for key in sorted(_READS or ())))

        atexit.register(write)
    return _READS


_READS: set[str] | None = None
_RECORDING: dict[type, type] = {}


def _recording(section: Any, key: str, sink: set[str]) -> Any:
    """A recording copy of a config dataclass (and of the sections inside it)."""
    cls = type(section)
    if cls not in _RECORDING:
        _RECORDING[cls] = type(cls.__name__, (cls,), {
            "__getattribute__": _recorded_getattribute,
            "__reduce_ex__": _recorded_reduce,
            "__eq__": _recorded_eq,
            "__hash__": cls.__hash__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        })  # fmt: skip
    copy = object.__new__(_RECORDING[cls])
    for f in dataclasses.fields(cls):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            value = _recording(value, _join(key, f.name), sink)
        object.__setattr__(copy, f.name, value)
    object.__setattr__(copy, "_record", (key, sink))
    return copy


def _recorded_getattribute(self: Any, name: str) -> Any:
    value = object.__getattribute__(self, name)
    fields = object.__getattribute__(self, "__dataclass_fields__")
    if name in fields and not dataclasses.is_dataclass(value):
        # A copy made by dataclasses.replace has no key: replace read every field already.
        record = object.__getattribute__(self, "__dict__").get("_record")
        if record is not None:
            key, sink = record
            sink.add(_join(key, name))
    return value


def _recorded_reduce(self: Any, protocol: int) -> Any:
    """Pickle as the plain dataclass (the receiving process records nothing): every field counts
    as read."""
    base = type(self).__mro__[1]
    return (_plain, (base, {f.name: getattr(self, f.name) for f in dataclasses.fields(base)}))


def _recorded_eq(self: Any, other: Any) -> bool:
    """Equal to the plain section with the same values, as to another recording copy."""
    base = type(self).__mro__[1]
    if not isinstance(other, base):
        return NotImplemented
    return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(base))


def _plain(cls: type, values: dict[str, Any]) -> Any:
    """`cls` with these field values, as pickled by `_recorded_reduce` (no __post_init__ rerun:
    they were checked when params.yaml was read)."""
    obj = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    return obj
