"""Training, importing and evaluating the image and mel VQGANs of the `tokenizers` stage.

`train_tokenizer` trains taming's VQGAN recipe on the extracted train split: L1 reconstruction,
codebook + commitment loss, LPIPS for images when a local checkpoint is given, and a PatchGAN
hinge loss from `disc_start` with taming's adaptive weight; Adam with betas (0.5, 0.9) for both
networks. Two remedies keep the codebook alive on small data: k-means initialisation of the
codebook on the first batches' encoder latents, and restarts of codes unused over
`dead_code_every` steps onto random recent latents. Images train on one random frame (of the 10)
per clip per sample, mels on the clip's mel, each whole or as a random `crop` window; the split
is held in memory (uint8 frames, float16 mels), which suits the demo's hundreds of clips, not
VGGSound's 200k (use `pretrained` there).

`import_pretrained` loads an official checkpoint (taming / SpecVQGAN, `loss.*` keys dropped);
`evaluate_tokenizer` measures reconstructions and codebook use on the test split and draws them;
for mels also how much time structure the reconstructions keep (`pipeline.metrics.rhythm`).
Everything is deterministic for a given seed on CPU; on CUDA the caller picks the device and
bf16 autocast is used where the GPU supports it (the quantiser always runs in fp32).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.config import ModalityTokenizerConfig, VQGANTrain
from pipeline.data import audio
from pipeline.data.extracted import (
    capped_rows,
    iter_examples,
    iter_selected,
    load_meta,
    read_labels,
)
from pipeline.errors import PipelineError
from pipeline.metrics.rhythm import RhythmScorer
from pipeline.tokenizers.discriminator import (
    NLayerDiscriminator,
    adaptive_weight,
    disc_factor,
    generator_loss,
    hinge_d_loss,
)
from pipeline.tokenizers.lpips import LPIPS, load_lpips
from pipeline.tokenizers.tokenizer import InputSpec, Tokenizer, vqgan_config
from pipeline.tokenizers.vqgan import VQModel

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
LOG_EVERY = 10  # steps between history entries / log_metrics calls
KMEANS_ITERS = 10
KMEANS_POINTS_PER_CODE = 20  # latents gathered for k-means, per code
KMEANS_MAX_BATCHES = 16
KMEANS_MAX_POINTS = 65536
RESTART_NOISE = 0.01  # restarted codes: a recent latent + this x the latents' std x N(0, 1)
EVAL_BATCH = 32
RHYTHM_PER_LABEL = 64  # train mels per label the mel report's rhythm scorer learns from
MAX_IN_MEMORY_BYTES = 16 * 2**30  # the train split is held in memory (uint8 frames, f16 mels)
# taming's PatchGAN width is 64; a narrower VQGAN (CPU demos) gets a discriminator as narrow as
# its first level, which keeps the adversarial phase from costing more than the autoencoder.
DISC_NDF = 64


@dataclass
class TrainResult:
    """The trained tokenizer (eval mode, on the training device) and its history: one dict per
    `LOG_EVERY` steps with `step` and the window means of the loss terms and codebook use."""

    tokenizer: Tokenizer
    history: list[dict[str, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------------- data


def load_split(extract_dir: Path, split: str, spec: InputSpec, max_clips: int = 0) -> np.ndarray:
    """The inputs of `split` in clip_id order, in memory, in their compact stored form.

    Images: all frames, (N, F, S, S, 3) uint8. Mels: (N, n_mels, T) float16 in [0, 1].
    `max_clips` > 0 keeps the first ones. Raises PipelineError when the split is empty, would
    take more than MAX_IN_MEMORY_BYTES, or its shapes do not match `spec`.
    """
    meta = load_meta(extract_dir)
    clips = meta["counts"].get(split, 0)
    clips = min(clips, max_clips) if max_clips else clips
    per_clip = (
        math.prod(meta["frames"]["shape"])
        if spec.kind == "image"
        else 2 * math.prod(meta["mel"]["shape"])
    )
    if clips * per_clip > MAX_IN_MEMORY_BYTES:
        raise PipelineError(
            f"the {split} split's {spec.kind}s need {clips * per_clip / 2**30:.0f} GiB in memory "
            f"(limit {MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB): training a tokenizer here is meant for "
            "small sets; set tokenizers.<modality>.pretrained to import an official checkpoint"
        )
    items = []
    for ex in iter_examples(extract_dir, split):
        items.append(ex.frames if spec.kind == "image" else ex.mel.astype(np.float16))
        if max_clips and len(items) >= max_clips:
            break
    if not items:
        raise PipelineError(f"{extract_dir} has no {split} clips to train or evaluate a tokenizer")
    data = np.stack(items)
    got = (data.shape[-1], *data.shape[-3:-1]) if spec.kind == "image" else (1, *data.shape[1:])
    if tuple(got) != tuple(spec.shape):
        raise PipelineError(
            f"the extracted {spec.kind}s are {'x'.join(map(str, got))} but the tokenizer input "
            f"is {'x'.join(map(str, spec.shape))}; rerun extract or fix the tokenizer input"
        )
    return data


class BatchSampler:
    """Endless batches of raw inputs: clips from successive random permutations and, for images,
    a random frame per clip; all randomness from `generator`. `inputs(tokenizer)` gives the
    model's batch: preprocessed, then cut to a random `crop` window per example when one is set."""

    def __init__(
        self,
        data: np.ndarray,
        kind: str,
        batch_size: int,
        generator: torch.Generator,
        crop: tuple[int, int] | None = None,
    ):
        self.data, self.kind, self.batch_size, self.generator = data, kind, batch_size, generator
        self.crop = crop
        self._order = torch.empty(0, dtype=torch.long)

    def _clips(self) -> torch.Tensor:
        while len(self._order) < self.batch_size:
            perm = torch.randperm(len(self.data), generator=self.generator)
            self._order = torch.cat([self._order, perm])
        picked, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return picked

    def next(self) -> np.ndarray:
        """(B, S, S, 3) uint8 frames or (B, n_mels, T) float16 mels."""
        clips = self._clips().numpy()
        if self.kind == "image":
            frames = torch.randint(self.data.shape[1], (len(clips),), generator=self.generator)
            return self.data[clips, frames.numpy()]
        return self.data[clips]

    def inputs(self, tokenizer: Tokenizer) -> torch.Tensor:
        """The next batch as model input (B, C, h, w) in [-1, 1]."""
        return random_crops(tokenizer.preprocess(self.next()), self.crop, self.generator)


def check_crop(
    crop: tuple[int, ...], spec: InputSpec, factor: int, temporal: bool = False
) -> tuple[int, int] | None:
    """The training window (h, w) of `crop`, or None for whole inputs ([] or the input's size).

    Raises PipelineError when the window is larger than the input or a side does not divide by
    the VQGAN's downsampling `factor` (a temporal codec's window keeps every band: h = H).
    """
    full = tuple(spec.shape[1:])
    if not crop or tuple(crop) == full:
        return None
    h, w = crop
    if temporal and h != full[0]:
        raise PipelineError(
            f"tokenizers crop {h}x{w}: a temporal codec's window keeps all {full[0]} mel bands "
            f"(crop [{full[0]}, frames])"
        )
    if h > full[0] or w > full[1] or (h % factor and not temporal) or w % factor:
        raise PipelineError(
            f"tokenizers crop {h}x{w} does not fit the {spec.kind} input {full[0]}x{full[1]}: "
            f"it must be no larger and both sides must divide by the downsampling factor {factor}"
        )
    return h, w


def random_crops(
    x: torch.Tensor, size: tuple[int, int] | None, generator: torch.Generator
) -> torch.Tensor:
    """A random (h, w) window of each example of x (B, C, H, W), offsets drawn from `generator`;
    x itself when `size` is None. The VQGANs are convolutional, so a model trained on windows
    encodes whole inputs (taming trains on 256x256 crops the same way)."""
    if size is None:
        return x
    h, w = size
    tops = torch.randint(x.shape[-2] - h + 1, (len(x),), generator=generator).tolist()
    lefts = torch.randint(x.shape[-1] - w + 1, (len(x),), generator=generator).tolist()
    return torch.stack(
        [x[i, :, t : t + h, j : j + w] for i, (t, j) in enumerate(zip(tops, lefts, strict=True))]
    )


# ------------------------------------------------------------------------------ codebook care


def kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator, chunk: int = 16384
) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding: x (N, D) float -> centroids (k, D) on x's device.

    A cluster that loses all its points is reseeded with a random point. Distances are computed
    in chunks of `chunk` rows. All randomness comes from `generator` (a CPU generator).
    """
    centroids = kmeans_plus_plus(x, k, generator)
    n = x.shape[0]
    for _ in range(iters):
        assign = nearest(x, centroids, chunk)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        centroids = sums / counts.clamp(min=1).unsqueeze(1)
        if empty.any():
            refill = torch.randint(n, (int(empty.sum()),), generator=generator).to(x.device)
            centroids[empty] = x[refill]
    return centroids


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k seeds (k, D) drawn from x (N, D), each with probability proportional to its squared
    distance to the seeds so far (the first uniformly); no host sync on GPU."""
    uniform = torch.rand(k, generator=generator, dtype=torch.float64).to(x.device)
    seeds = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    d2 = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)  # first seed: uniform
    for i in range(k):
        cdf = d2.cumsum(0)
        index = torch.searchsorted(cdf, (uniform[i] * cdf[-1]).reshape(1)).clamp(max=len(x) - 1)
        seeds[i] = x[index[0]]
        dist = (x - seeds[i]).pow(2).sum(1).double()
        d2 = dist if i == 0 else torch.minimum(d2, dist)
    return seeds


def nearest(x: torch.Tensor, codes: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest row of `codes` (K, D) for each row of x (N, D): (N,) int64."""
    out = []
    sq = codes.pow(2).sum(1)
    for part in x.split(chunk):
        out.append((sq - 2 * part @ codes.t()).argmin(dim=1))  # |x|^2 is constant per row
    return torch.cat(out)


def flat_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B * h * w, D) float32, in the quantiser's row order."""
    return z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def quantisation_error(model: VQModel, z: torch.Tensor) -> float:
    """Mean squared distance of latents z (B, D, h, w) to their nearest code."""
    flat = flat_latents(z)
    codes = model.quantize.embedding.weight.detach().float()
    return float((flat - codes[nearest(flat, codes)]).pow(2).sum(1).mean())


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a code histogram (C,): 1 for one code, C for uniform use."""
    p = counts.double() / counts.sum().clamp(min=1)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum())) if len(p) else 0.0


# --------------------------------------------------------------------------------- training


def amp_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The autocast dtype: bf16 when asked, or on "auto" for CUDA with capability >= 8.0;
    None (fp32) otherwise."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else None
    return None


class VQGANTrainer:
    """The optimisation state of one VQGAN run and `step()`, one update of the autoencoder and
    (from `disc_start` on) the discriminator.

    The discriminator is built only when `cfg.disc_start < total_steps`. `usage` counts the ids
    seen since the last dead-code restart; `recent` holds the latest batch's latents (N, D).
    """

    def __init__(
        self,
        model: VQModel,
        cfg: VQGANTrain,
        *,
        total_steps: int,
        generator: torch.Generator,
        perceptual: LPIPS | None = None,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        self.model, self.cfg, self.generator = model, cfg, generator
        self.device = next(model.parameters()).device
        self.perceptual = perceptual
        self.autocast_dtype = autocast_dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=self.memory_format)
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        self.disc: NLayerDiscriminator | None = None
        self.opt_d: torch.optim.Optimizer | None = None
        if cfg.disc_start < total_steps:
            ndf = min(DISC_NDF, model.config.ch)
            self.disc = NLayerDiscriminator(model.config.sample_channels, ndf=ndf)
            self.disc.to(self.device, memory_format=self.memory_format)
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        n_embed = model.config.n_embed
        self.usage = torch.zeros(n_embed, dtype=torch.long, device=self.device)
        self.window_usage = torch.zeros_like(self.usage)
        self.recent: torch.Tensor | None = None
        self.restarted = 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [-1, 1] -> (reconstruction fp32, quantiser loss, ids (B, h, w),
        latents (B, D, h, w) fp32). The quantiser runs in fp32 outside autocast."""
        x = x.contiguous(memory_format=self.memory_format)
        with self._autocast():
            z = self.model.encode_latent(x)
        z = z.float()
        with torch.autocast(self.device.type, enabled=False):
            z_q, q_loss, ids = self.model.quantize(z)
        with self._autocast():
            rec = self.model.decode_latent(z_q)
        return rec.float(), q_loss, ids, z

    @torch.no_grad()
    def init_codebook(self, batches: list[torch.Tensor]) -> tuple[float, float]:
        """k-means the codebook onto the encoder latents of `batches` (each (B, C, H, W)).

        Returns the quantisation error (mean squared distance to the nearest code) before and after.
        """
        with self._autocast():
            z = torch.cat(
                [
                    self.model.encode_latent(x.contiguous(memory_format=self.memory_format)).float()
                    for x in batches
                ]
            )
        before = quantisation_error(self.model, z)
        flat = flat_latents(z)
        if len(flat) > KMEANS_MAX_POINTS:
            pick = torch.randperm(len(flat), generator=self.generator)[:KMEANS_MAX_POINTS]
            flat = flat[pick.to(flat.device)]
        codes = kmeans(flat, self.model.config.n_embed, KMEANS_ITERS, self.generator)
        self.model.quantize.embedding.weight.copy_(codes)
        after = quantisation_error(self.model, z)
        log.info("codebook: k-means on %d latents, error %.4g -> %.4g", len(flat), before, after)
        return before, after

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Move every code unused since the last restart onto a random recent latent plus
        noise; clears those rows' Adam moments and the usage counts. Returns how many moved."""
        dead = (self.usage == 0).nonzero().squeeze(1)
        self.usage.zero_()
        if len(dead) == 0 or self.recent is None:
            return 0
        pool = self.recent
        pick = torch.randint(len(pool), (len(dead),), generator=self.generator).to(pool.device)
        noise = torch.randn(len(dead), pool.shape[1], generator=self.generator).to(pool.device)
        weight = self.model.quantize.embedding.weight
        weight[dead] = pool[pick] + RESTART_NOISE * pool.std(0) * noise
        for moment in self.opt.state.get(weight, {}).values():
            if torch.is_tensor(moment) and moment.shape == weight.shape:
                moment[dead] = 0.0
        self.restarted += len(dead)
        return len(dead)

    def step(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One update on x (B, C, H, W) in [-1, 1] at 0-based `step`; returns detached scalar
        tensors: loss, rec_loss, q_loss (+ p_loss with LPIPS; g_loss, d_weight, d_loss once the
        discriminator is on). Restarts dead codes after every `dead_code_every`-th step."""
        cfg = self.cfg
        x = x.contiguous(memory_format=self.memory_format)
        rec, q_loss, ids, z = self.forward(x)
        out: dict[str, torch.Tensor] = {}
        nll = (x - rec).abs()  # (B, C, H, W)
        out["rec_loss"] = nll.detach().mean()
        if self.perceptual is not None:
            with self._autocast():
                p_loss = self.perceptual(x, rec).float()  # (B, 1, 1, 1)
            out["p_loss"] = p_loss.detach().mean()
            nll = nll + cfg.perceptual_weight * p_loss
        nll = nll.mean()
        loss = nll + cfg.codebook_weight * q_loss
        disc_on = self.disc is not None and disc_factor(step, cfg.disc_start) > 0
        if disc_on:
            self.disc.requires_grad_(False)  # the generator pass needs gradients for rec only
            with self._autocast():
                g_loss = generator_loss(self.disc(rec).float())
            d_weight = adaptive_weight(
                nll, g_loss, self.model.decoder.conv_out.weight, cfg.disc_weight
            )
            loss = loss + d_weight * disc_factor(step, cfg.disc_start) * g_loss
            out["g_loss"], out["d_weight"] = g_loss.detach(), d_weight
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if disc_on:
            out["d_loss"] = self._disc_step(x, rec.detach(), step)
        out["loss"], out["q_loss"] = loss.detach(), q_loss.detach()

        counts = torch.bincount(ids.flatten(), minlength=self.model.config.n_embed)
        self.usage += counts
        self.window_usage += counts
        self.recent = flat_latents(z)
        if cfg.dead_code_every and (step + 1) % cfg.dead_code_every == 0:
            self.restart_dead_codes()
        return out

    def _disc_step(self, real: torch.Tensor, fake: torch.Tensor, step: int) -> torch.Tensor:
        """One hinge-loss update of the discriminator on real and reconstructed inputs."""
        assert self.disc is not None and self.opt_d is not None
        self.disc.requires_grad_(True)
        with self._autocast():
            logits_real, logits_fake = self.disc(real).float(), self.disc(fake).float()
        d_loss = disc_factor(step, self.cfg.disc_start) * hinge_d_loss(logits_real, logits_fake)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        return d_loss.detach()

    def window_stats(self) -> dict[str, float]:
        """Codebook use since the last call: fraction of codes used, perplexity; then resets."""
        counts = self.window_usage
        stats = {
            "codebook_usage": float((counts > 0).float().mean()),
            "perplexity": perplexity(counts),
            "codes_restarted": float(self.restarted),
        }
        self.window_usage = torch.zeros_like(counts)
        return stats


class _Window:
    """Running sums of the step outputs between two log points (one device sync per window)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, out: dict[str, torch.Tensor]) -> None:
        for key, value in out.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.float()
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        means = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


def _perceptual(
    modality: str, spec: InputSpec, cfg: VQGANTrain, device: torch.device
) -> LPIPS | None:
    """The frozen LPIPS for images when `lpips_vgg16` is set and weighted; None otherwise."""
    if spec.kind != "image":
        log.info(
            "%s tokenizer: no perceptual loss for mels (SpecVQGAN's LPAPS needs a VGGish-like "
            "spectrogram net that is not available)%s",
            modality,
            "; lpips_vgg16 is ignored" if cfg.lpips_vgg16 else "",
        )
        return None
    if not cfg.lpips_vgg16 or cfg.perceptual_weight == 0:
        log.info("%s tokenizer: no perceptual loss (lpips_vgg16 empty or weight 0)", modality)
        return None
    return load_lpips(cfg.lpips_vgg16).to(device)


def build_model(cfg: ModalityTokenizerConfig, spec: InputSpec) -> VQModel:
    """VQModel for `cfg.arch` on inputs of `spec`, with the quantiser's beta from `cfg.train`."""
    model = VQModel(vqgan_config(cfg.arch, spec))
    model.quantize.beta = cfg.train.beta
    return model


def train_tokenizer(
    modality: str,
    cfg: ModalityTokenizerConfig,
    spec: InputSpec,
    extract_dir: Path,
    *,
    device: torch.device,
    seed: int,
    report_dir: Path,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    precision: Precision = "auto",
    channels_last: bool | None = None,
) -> TrainResult:
    """Train a VQGAN (`cfg.arch`, `cfg.train`) on the train split of `extract_dir`.

    `spec` is the model input (image (3, S, S) or mel (1, n_mels, T)) and must match the
    extracted data. Writes `report_dir/loss.png`. `log_metrics(metrics, step)` is called every
    LOG_EVERY steps with the window means (loss terms, codebook_usage, perplexity). Same seed,
    same device and thread count -> same weights. `precision` "auto": bf16 autocast on CUDA
    with compute capability >= 8, fp32 otherwise. `channels_last` None: on CPU only (measured
    10-20% faster there for these narrow convolutions).
    """
    start = time.monotonic()
    device = torch.device(device)
    train = cfg.train
    crop = check_crop(
        train.crop, spec, vqgan_config(cfg.arch, spec).downsampling, cfg.arch.temporal
    )
    data = load_split(Path(extract_dir), "train", spec)
    log.info(
        "%s tokenizer: %d train clips in memory (%.1f MB), %d steps of %d %s on %s",
        modality, len(data), data.nbytes / 2**20, train.steps, train.batch_size,
        f"{crop[0]}x{crop[1]} windows" if crop else "whole inputs", device,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    dtype = amp_dtype(device, precision)
    cuda = []
    if device.type == "cuda":
        cuda = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=cuda):  # seeds init and dropout without leaking out
        torch.manual_seed(seed)
        model = build_model(cfg, spec).to(device)
        tokenizer = Tokenizer(modality, model, spec, meta={})
        trainer = VQGANTrainer(
            model.train(),
            train,
            total_steps=train.steps,
            generator=generator,
            perceptual=_perceptual(modality, spec, train, device),
            autocast_dtype=dtype,
            channels_last=device.type == "cpu" if channels_last is None else channels_last,
        )
        sampler = BatchSampler(data, spec.kind, train.batch_size, generator, crop)
        history = _run(trainer, sampler, tokenizer, train.steps, log_metrics, modality)
    model.to(memory_format=torch.contiguous_format).eval()
    final = history[-1] if history else {}
    tokenizer.meta = {
        "source": "trained",
        "steps": train.steps,
        "seed": seed,
        "train_clips": len(data),
        "precision": str(dtype or torch.float32).removeprefix("torch."),
        "seconds": round(time.monotonic() - start, 1),
        "final": {k: v for k, v in final.items() if k != "step"},
    }
    save_loss_plot(history, Path(report_dir) / "loss.png", f"{modality} tokenizer")
    log.info(
        "%s tokenizer: trained %d steps in %.1f s, final loss %.4g, codebook usage %.2f",
        modality, train.steps, time.monotonic() - start, final.get("loss", math.nan),
        final.get("codebook_usage", math.nan),
    )  # fmt: skip
    return TrainResult(tokenizer, history)


def _run(
    trainer: VQGANTrainer,
    sampler: BatchSampler,
    tokenizer: Tokenizer,
    steps: int,
    log_metrics: Callable[[dict[str, float], int], None] | None,
    modality: str,
) -> list[dict[str, float]]:
    """The step loop (k-means init first when configured); returns the history."""
    if trainer.cfg.kmeans_init:
        trainer.init_codebook(_kmeans_batches(trainer, sampler, tokenizer))
    history: list[dict[str, float]] = []
    window = _Window()
    with tqdm(range(steps), desc=f"{modality} tokenizer", unit="step", disable=None) as bar:
        for step in bar:
            window.add(trainer.step(sampler.inputs(tokenizer), step))
            if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                metrics = {**window.means(), **trainer.window_stats()}
                history.append({"step": float(step + 1), **metrics})
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}", usage=f"{metrics['codebook_usage']:.2f}"
                )
                if log_metrics is not None:
                    log_metrics(metrics, step + 1)
    return history


def _kmeans_batches(
    trainer: VQGANTrainer, sampler: BatchSampler, tokenizer: Tokenizer
) -> list[torch.Tensor]:
    """Enough batches for ~KMEANS_POINTS_PER_CODE latents per code (at most KMEANS_MAX_BATCHES)."""
    h, w = trainer.model.config.grid(*sampler.crop) if sampler.crop else tokenizer.grid
    want = KMEANS_POINTS_PER_CODE * trainer.model.config.n_embed
    count = min(KMEANS_MAX_BATCHES, max(1, math.ceil(want / (sampler.batch_size * h * w))))
    return [sampler.inputs(tokenizer) for _ in range(count)]


# ---------------------------------------------------------------------------------- import


def import_pretrained(
    modality: str,
    cfg: ModalityTokenizerConfig,
    spec: InputSpec,
    *,
    device: torch.device | str = "cpu",
) -> Tokenizer:
    """The official checkpoint at `cfg.pretrained` as a Tokenizer on `device` (eval mode).

    The file may be a Lightning checkpoint or a bare state dict; `loss.*` (LPIPS/LPAPS and the
    discriminator) is dropped and everything else must fit `cfg.arch` exactly. Raises
    CheckpointError (one sentence) for a missing, unsafe or mismatching file.
    """
    if not cfg.pretrained:
        raise checkpoint.CheckpointError(
            f"tokenizers.{modality}.pretrained is empty: no checkpoint to import"
        )
    state = checkpoint.read_state_dict(cfg.pretrained)
    model = build_model(cfg, spec)
    checkpoint.load_into(model, state, f"{modality} tokenizer ({_describe_arch(cfg)})")
    meta = {
        "source": "pretrained",
        "pretrained_path": state.path,
        "pretrained_sha256": state.sha256,
    }
    log.info("%s tokenizer: imported %s (sha256 %s)", modality, state.path, state.sha256[:12])
    return Tokenizer(modality, model.to(device), spec, meta)


def _describe_arch(cfg: ModalityTokenizerConfig) -> str:
    a = cfg.arch
    return f"ch {a.ch}, ch_mult {list(a.ch_mult)}, {a.n_embed} codes of {a.embed_dim}"


# -------------------------------------------------------------------------------- evaluation


class _Item(NamedTuple):
    """Where an evaluated item comes from: the clip's position in the split, its id and label."""

    clip: int
    clip_id: str
    label: str


def _eval_batches(
    extract_dir: Path, split: str, kind: str, max_examples: int
) -> Iterator[tuple[np.ndarray, list[_Item]]]:
    """Batches of up to EVAL_BATCH raw inputs with their origin: every frame of each clip for
    images, the mel for mels; the first `max_examples` clips (0: all)."""
    items: list[np.ndarray] = []
    origin: list[_Item] = []
    for index, ex in enumerate(iter_examples(extract_dir, split)):
        if max_examples and index >= max_examples:
            break
        new = list(ex.frames) if kind == "image" else [ex.mel]
        items.extend(new)
        origin.extend([_Item(index, ex.clip_id, ex.label)] * len(new))
        while len(items) >= EVAL_BATCH:
            yield np.stack(items[:EVAL_BATCH]), origin[:EVAL_BATCH]
            items, origin = items[EVAL_BATCH:], origin[EVAL_BATCH:]
    if items:
        yield np.stack(items), origin


class _Scores:
    """Running reconstruction errors and the code histogram over evaluated batches."""

    def __init__(self, kind: str, n_embed: int) -> None:
        self.kind = kind
        self.counts = np.zeros(n_embed, dtype=np.int64)
        self.keys = ("psnr",) if kind == "image" else ("mel_l1", "mel_l2")
        self.sums = dict.fromkeys(self.keys, 0.0)
        self.n = 0

    def add(self, batch: np.ndarray, ids: np.ndarray, recon: np.ndarray) -> None:
        """batch/recon: (B, H, W, 3) uint8 or (B, F, T) [0, 1]; ids (B, L)."""
        self.counts += np.bincount(ids.reshape(-1), minlength=len(self.counts))
        err = recon.astype(np.float64) - batch.astype(np.float64)
        if self.kind == "image":
            mse = np.maximum((err**2).mean(axis=(1, 2, 3)), 1e-10)  # 1e-10: at most 148 dB
            self.sums["psnr"] += float((10.0 * np.log10(255.0**2 / mse)).sum())
        else:
            self.sums["mel_l1"] += float(np.abs(err).mean(axis=(1, 2)).sum())
            self.sums["mel_l2"] += float((err**2).mean(axis=(1, 2)).sum())
        self.n += len(batch)

    def metrics(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.n for k in self.keys}
        out["codebook_usage"] = float((self.counts > 0).mean())
        out["perplexity"] = perplexity(torch.from_numpy(self.counts))
        out["examples"] = float(self.n)
        return out


def fit_rhythm(extract_dir: Path, per_label: int = RHYTHM_PER_LABEL) -> RhythmScorer | None:
    """A rhythm scorer fit on the first `per_label` train mels of each label (read one at a
    time); None when there is no train split."""
    labels = read_labels(extract_dir, "train")
    rows = capped_rows(labels, per_label)
    if not rows:
        return None
    mel = load_meta(extract_dir)["mel"]
    mels = (ex.mel for _, ex in iter_selected(extract_dir, "train", rows, frame=0))
    return RhythmScorer.fit(mels, [labels[r] for r in rows], mel["sample_rate"] / mel["hop_length"])


class _Rhythm:
    """The rhythm scorer's rows (`describe`) of the real mels and of their reconstructions."""

    def __init__(self, scorer: RhythmScorer) -> None:
        self.scorer = scorer
        self.rows: dict[str, list[np.ndarray]] = {"real": [], "codec": []}
        self.labels: list[str] = []

    def add(self, batch: np.ndarray, recon: np.ndarray, origin: list[_Item]) -> None:
        self.rows["real"].append(self.scorer.describe(batch))
        self.rows["codec"].append(self.scorer.describe(recon))
        self.labels += [item.label for item in origin]

    def metrics(self) -> dict[str, float]:
        """acc_rhythm / period_err of the real mels, the same with `_codec` of the
        reconstructions (the names of the evaluator's held-out report)."""
        out = {}
        for which, suffix in (("real", ""), ("codec", "_codec")):
            scores = self.scorer.score_rows(np.concatenate(self.rows[which]), self.labels)
            out |= {f"{k}{suffix}": v for k, v in scores.items()}
        return out


def evaluate_tokenizer(
    tok: Tokenizer,
    extract_dir: Path,
    *,
    split: str = "test",
    max_examples: int = 0,
    report_dir: Path,
) -> dict[str, float]:
    """Reconstruction quality and codebook use of `tok` on `split` (first `max_examples`
    clips; 0: all), and `report_dir/reconstructions.png` (8 frames or 3 mels, spread over the
    split).

    Images (every frame of every clip): `psnr`, the mean per-frame PSNR in dB on uint8 [0, 255].
    Mels: `mel_l1` and `mel_l2` (mean absolute / squared error on the [0, 1] scale), and the
    rhythm score (`pipeline.metrics.rhythm`, fit by `fit_rhythm` on the train split) of the real
    mels and of their reconstructions: `acc_rhythm`, `period_err`, `acc_rhythm_codec`,
    `period_err_codec` (none without a train split).
    Both: `codebook_usage`, the fraction of the C codes used over the set, in (0, 1];
    `perplexity`, exp(entropy) of the code histogram, in [1, C]; `examples`, items evaluated.
    Raises PipelineError when the split is empty.
    """
    extract_dir = Path(extract_dir)
    total = load_meta(extract_dir)["counts"].get(split, 0)
    total = min(total, max_examples) if max_examples else total
    image = tok.spec.kind == "image"
    shown = set(np.linspace(0, max(total - 1, 0), 8 if image else 3).round().astype(int).tolist())
    pairs: dict[_Item, tuple[np.ndarray, np.ndarray]] = {}
    scores = _Scores(tok.spec.kind, tok.model.config.n_embed)
    scorer = None if image else fit_rhythm(extract_dir)
    rhythm = None if scorer is None else _Rhythm(scorer)
    for batch, origin in _eval_batches(extract_dir, split, tok.spec.kind, max_examples):
        ids = tok.encode(batch)
        recon = tok.decode(ids)
        scores.add(batch, ids, recon)
        if rhythm is not None:
            rhythm.add(batch, recon, origin)
        for j, item in enumerate(origin):
            if item.clip in shown and item not in pairs:  # the first frame of a shown clip
                pairs[item] = (batch[j], recon[j])
    if scores.n == 0:
        raise PipelineError(
            f"{extract_dir} has no {split} clips to evaluate the {tok.modality} tokenizer on"
        )
    metrics = scores.metrics() | (rhythm.metrics() if rhythm is not None else {})
    shown_items = sorted(pairs)
    path = Path(report_dir) / "reconstructions.png"
    if image:
        save_image_pairs([pairs[k] for k in shown_items], path)
    else:
        save_mel_pairs([pairs[k] for k in shown_items], path, [k.clip_id for k in shown_items])
    log.info(
        "%s tokenizer on %s: %s",
        tok.modality,
        split,
        ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
    )
    return metrics


# ----------------------------------------------------------------------------------- figures


def save_image_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """Inputs (top row) over reconstructions (bottom row); pairs of (S, S, 3) uint8."""
    from matplotlib.figure import Figure

    cols = max(1, len(pairs))
    fig = Figure(figsize=(1.4 * cols + 0.6, 3.2), dpi=100, layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)
    for j, row in ((0, "input"), (1, "reconstruction")):
        axes[j, 0].set_title(row, fontsize=8, loc="left")
        for i in range(cols):
            axes[j, i].set_axis_off()
            if i < len(pairs):
                axes[j, i].imshow(pairs[i][j], interpolation="nearest")
    audio.save_figure(fig, path)


def save_mel_pairs(
    pairs: list[tuple[np.ndarray, np.ndarray]], path: Path, names: list[str] | None = None
) -> None:
    """For each clip, the input mel above its reconstruction; pairs of (n_mels, T) in [0, 1]."""
    from matplotlib.figure import Figure

    rows = max(1, len(pairs))
    fig = Figure(figsize=(9, 3.6 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(2 * rows, 1, squeeze=False)[:, 0]
    for i, (mel, recon) in enumerate(pairs):
        name = names[i] if names else f"clip {i}"
        audio.plot_mel(axes[2 * i], mel.astype(np.float32), f"{name}: input")
        audio.plot_mel(axes[2 * i + 1], recon, f"{name}: reconstruction")
    audio.save_figure(fig, path)


def save_loss_plot(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training curves: loss terms (log scale; non-positive values such as a negative g_loss are
    left out) and the codebook usage, against the step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    steps = [h["step"] for h in history]
    for key in ("loss", "rec_loss", "q_loss", "p_loss", "g_loss", "d_loss"):
        points = [(h["step"], h[key]) for h in history if key in h and h[key] > 0]
        if points:
            left.plot(*zip(*points, strict=True), label=key)
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_title(f"{title} losses".strip(), fontsize=9)
    if left.lines:
        left.legend(fontsize=7)
    right.plot(steps, [h.get("codebook_usage", 0.0) for h in history], color="C4")
    right.set_ylim(0.0, 1.05)
    right.set_xlabel("step")
    right.set_title("codebook usage (fraction of codes per window)", fontsize=9)
    audio.save_figure(fig, path)
