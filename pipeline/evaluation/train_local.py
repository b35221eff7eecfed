"""Training the offline evaluator (`local.LocalEvaluator`) on the extracted train split, and
running it over real clips.

The classifiers see real inputs and, when the tokenizers are given, their VQGAN reconstructions
(encode → decode) as well: every generated sample is a VQGAN decode, so an evaluator that only
knew clean inputs would confuse codec artefacts with class evidence. The contrastive heads are
trained last, on the frozen classifier embeddings of matching (frame, mel) pairs.

Memory: training holds its clips in memory (all of the train split, or `per_label` per label,
refused when that would not fit); the held-out split, and `evaluate`'s and `sweep`'s test clips,
are streamed `CHUNK` clips at a time (`read_chunks` → `split_outputs`): only the evaluator's small
per-clip outputs are kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import io
from pipeline.config import EvaluatorConfig
from pipeline.data.extracted import (
    capped_rows,
    iter_selected,
    load_meta,
    read_labels,
    split_size,
)
from pipeline.data.token_dataset import eval_frame
from pipeline.devices import available_memory, resolve_device
from pipeline.errors import PipelineError
from pipeline.evaluation.figures import evaluator_figure
from pipeline.evaluation.local import LocalEvaluator, Outputs
from pipeline.metrics.rhythm import RhythmScorer
from pipeline.tokenizers.tokenizer import Tokenizer, load_tokenizers


class EvaluatorError(PipelineError):
    """Data the evaluator cannot be trained or scored on."""


@dataclass
class Clips:
    """One split in memory: frames (n, N, S, S, 3) uint8, mels (n, F, T) float16."""

    clip_ids: list[str]
    labels: list[str]
    frames: np.ndarray
    mels: np.ndarray

    def __len__(self) -> int:
        return len(self.clip_ids)


def load_clips(
    extract_dir: str | Path, split: str, per_label: int = 0, budget: int | None = None
) -> Clips:
    """Every clip of `split` (at most `per_label` per label when > 0), in clip_id order; only
    the clips kept are decoded. With `budget` (bytes), an `EvaluatorError` instead when their
    decoded frames and mels would take more."""
    extract_dir = Path(extract_dir)
    rows = capped_rows(read_labels(extract_dir, split), per_label)
    if not rows:
        raise EvaluatorError(f"{extract_dir} has no clips in split {split!r}")
    if budget is not None:
        meta = load_meta(extract_dir)
        per_clip = int(np.prod(meta["frames"]["shape"])) + 2 * int(np.prod(meta["mel"]["shape"]))
        if len(rows) * per_clip > budget:
            raise EvaluatorError(
                f"the evaluator would hold {len(rows)} {split} clips in memory "
                f"({len(rows) * per_clip / 1e9:.1f} GB decoded, more with the codec views), "
                f"more than the {budget / 1e9:.1f} GB it may use; set evaluator.per_label "
                "(e.g. 20) to train on that many clips per label"
            )
    ids, labels, frames, mels = [], [], [], []
    for _, ex in iter_selected(extract_dir, split, rows):
        ids.append(ex.clip_id)
        labels.append(ex.label)
        frames.append(ex.frames)
        mels.append(ex.mel.astype(np.float16))
    return Clips(ids, labels, np.stack(frames), np.stack(mels))


# The evaluator runs over real clips CHUNK at a time: a multiple of every batch size it (32 mels,
# 64 frames) and the codec (32) run in, so the outputs equal those of one call over all the
# clips while memory holds one chunk.
CHUNK = 64


class Chunk(NamedTuple):
    """Consecutive clips of a selection: positions in it, ids, labels, the conditioning (middle)
    frame (c, S, S, 3) uint8 and the mel (c, F, T) float16."""

    rows: list[int]
    clip_ids: list[str]
    labels: list[str]
    frames: np.ndarray
    mels: np.ndarray


def read_chunks(
    extract_dir: str | Path, split: str, rows: Iterable[int] | None = None
) -> Iterator[Chunk]:
    """The clips of `split` at `rows` (None: all; in clip_id order) as `Chunk`s, streamed from
    the shards that hold them; positions count from 0 in the selection."""
    frame = eval_frame(int(load_meta(Path(extract_dir))["num_frames"]))
    picked = None if rows is None else list(rows)
    items: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    done = 0
    for _, ex in iter_selected(Path(extract_dir), split, picked, frame):
        items.append((ex.clip_id, ex.label, ex.frames[0], ex.mel.astype(np.float16)))
        if len(items) == CHUNK:
            yield _chunk(items, done)
            done, items = done + len(items), []
    if items:
        yield _chunk(items, done)


def _chunk(items: list[tuple[str, str, np.ndarray, np.ndarray]], first: int) -> Chunk:
    ids, labels, frames, mels = zip(*items, strict=True)
    rows = list(range(first, first + len(items)))
    return Chunk(rows, list(ids), list(labels), np.stack(frames), np.stack(mels))


def memory_chunks(clips: Clips) -> Iterator[Chunk]:
    """`Chunk`s of clips already in memory (all their frames: the middle one is taken)."""
    frame = eval_frame(clips.frames.shape[1])
    for start in range(0, len(clips), CHUNK):
        part = slice(start, start + CHUNK)
        yield Chunk(list(range(len(clips)))[part], clips.clip_ids[part], clips.labels[part],
                    clips.frames[part, frame], clips.mels[part])  # fmt: skip


@dataclass
class SplitOutputs:
    """The evaluator on real clips, in selection order: on the mels (`audio`), the conditioning
    frames (`image`) and, when tokenizers were given, on their VQGAN reconstructions; `kept`
    holds (frame, mel float16) of the positions asked for (examples, figures)."""

    clip_ids: list[str]
    labels: list[str]
    audio: Outputs
    image: Outputs
    audio_codec: Outputs | None = None
    image_codec: Outputs | None = None
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.clip_ids)


def split_outputs(
    model: LocalEvaluator,
    chunks: Iterable[Chunk],
    tokenizers: dict[str, Tokenizer] | None = None,
    keep: Iterable[int] = (),
) -> SplitOutputs:
    """Run `model` over `chunks` (see `SplitOutputs`); at least one clip."""
    keep = set(keep)
    ids: list[str] = []
    labels: list[str] = []
    parts: dict[str, list[Outputs]] = {"audio": [], "image": [], "audio_codec": [],
                                       "image_codec": []}  # fmt: skip
    kept = {}
    for c in chunks:
        ids += c.clip_ids
        labels += c.labels
        parts["audio"].append(model.audio_outputs(c.mels))
        parts["image"].append(model.image_outputs(c.frames))
        if tokenizers is not None:
            parts["audio_codec"].append(
                model.audio_outputs(reconstruct(tokenizers["audio"], c.mels))
            )
            parts["image_codec"].append(
                model.image_outputs(reconstruct(tokenizers["image"], c.frames))
            )
        # Copies: a row of a chunk is a view that would keep the whole chunk (64 mels) alive.
        kept |= {row: (c.frames[i].copy(), c.mels[i].copy())
                 for i, row in enumerate(c.rows) if row in keep}  # fmt: skip
    joined = {k: Outputs.cat(v) if v else None for k, v in parts.items()}
    return SplitOutputs(ids, labels, **joined, kept=kept)


def reconstruct(tokenizer: Tokenizer, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """encode → decode through a VQGAN, in batches (mels come back float16, frames uint8)."""
    out = []
    for start in range(0, len(x), batch_size):
        part = x[start : start + batch_size]
        rec = tokenizer.decode(
            tokenizer.encode(part.astype(np.float32) if part.dtype == np.float16 else part)
        )
        out.append(rec.astype(x.dtype))
    return np.concatenate(out)


@dataclass
class History:
    """Per-epoch training loss and accuracy of each part, for the report's plot."""

    rows: list[dict[str, float]] = field(default_factory=list)


def _schedule(optimizer: torch.optim.Optimizer, lr: float, step: int, total: int) -> None:
    scale = 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total))))
    for group in optimizer.param_groups:
        group["lr"] = lr * scale


def _run_epochs(
    params: list[torch.nn.Parameter],
    batch_loss: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n: int,
    batch_size: int,
    epochs: int,
    cfg: EvaluatorConfig,
    rng: np.random.Generator,
    part: str,
    history: History,
) -> int:
    """AdamW with a cosine schedule over `epochs` shuffled passes of `n` items, one history row
    per epoch; `batch_loss(indices)` gives (loss, logits, targets). Returns the batch size."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = min(batch_size, n)
    per_epoch = max(1, n // bs)
    step = 0
    for epoch in tqdm(range(epochs), desc=part, unit="epoch", leave=False):
        order = rng.permutation(n)
        loss_sum = correct = seen = 0.0
        for b in range(per_epoch):
            idx = order[b * bs : (b + 1) * bs]
            _schedule(opt, cfg.lr, step, per_epoch * epochs)
            loss, logits, y = batch_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += float((logits.argmax(1) == y).sum())
            seen += len(idx)
        history.rows.append(
            {"part": part, "epoch": epoch + 1, "loss": loss_sum / seen, "acc": correct / seen}
        )
    return bs


def _fit(
    net: torch.nn.Module,
    sample: Callable[[np.ndarray, np.random.Generator], torch.Tensor],
    targets: np.ndarray,
    cfg: EvaluatorConfig,
    rng: np.random.Generator,
    device: torch.device,
    desc: str,
    history: History,
) -> None:
    """Train one classifier; `sample(indices, rng)` builds an augmented input batch."""

    def batch_loss(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.as_tensor(targets[idx], device=device)
        _, logits = net(sample(idx, rng).to(device))
        return F.cross_entropy(logits, y, label_smoothing=0.05), logits, y

    net.train()
    n = len(targets)
    bs = _run_epochs(
        list(net.parameters()), batch_loss, n, cfg.batch_size, cfg.epochs, cfg, rng, desc, history
    )
    _settle_batchnorm(net, sample, n, bs, rng, device)
    net.eval()


@torch.no_grad()
def _settle_batchnorm(
    net: torch.nn.Module,
    sample: Callable[[np.ndarray, np.random.Generator], torch.Tensor],
    n: int,
    batch_size: int,
    rng: np.random.Generator,
    device: torch.device,
) -> None:
    """Recompute BatchNorm running statistics as exact averages over one pass of the (augmented)
    training inputs: after a few hundred steps the momentum averages have not settled, and the
    eval-mode network would predict from stale statistics."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    net.train()
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        net(sample(order[start : start + batch_size], rng).to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def _fit_joint(
    model: LocalEvaluator,
    image_emb: torch.Tensor,
    audio_emb: torch.Tensor,
    cfg: EvaluatorConfig,
    rng: np.random.Generator,
    history: History,
) -> None:
    """Symmetric InfoNCE on (frame embedding, mel embedding) pairs of the same clip.

    image_emb: (n, frames, D) — one frame per clip is drawn each step; audio_emb: (n, views, D),
    one view (real or reconstructed mel) likewise."""

    def batch_loss(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fi = rng.integers(0, image_emb.shape[1], len(idx))
        ai = rng.integers(0, audio_emb.shape[1], len(idx))
        zi = model.image_proj(image_emb[idx, fi])
        za = model.audio_proj(audio_emb[idx, ai])
        logits = zi @ za.T / cfg.joint_temperature
        y = torch.arange(len(idx), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)), logits, y

    heads = [*model.audio_proj.parameters(), *model.image_proj.parameters()]
    model.audio_proj.train()
    model.image_proj.train()
    _run_epochs(
        heads, batch_loss, len(image_emb), cfg.joint_batch_size, cfg.joint_epochs, cfg, rng,
        "joint", history,
    )  # fmt: skip
    model.audio_proj.eval()
    model.image_proj.eval()


def _roll(mels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Circular shift of each mel in time (sounds may start anywhere in a clip)."""
    shifts = rng.integers(0, mels.shape[-1], len(mels))
    return np.stack([np.roll(m, s, axis=-1) for m, s in zip(mels, shifts, strict=True)])


def train_local_evaluator(
    train: Clips,
    cfg: EvaluatorConfig,
    seed: int,
    device: torch.device,
    tokenizers: dict[str, Tokenizer] | None = None,
) -> tuple[LocalEvaluator, History, dict[str, float]]:
    """Train all parts on `train`; returns the evaluator (eval mode), the history and timings."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = sorted(set(train.labels))
    if len(labels) < 2:
        raise EvaluatorError(f"the train split has {len(labels)} label(s); a classifier needs 2+")
    model = LocalEvaluator(labels, cfg.embed_dim, cfg.joint_dim).to(device)
    y = model.label_index(train.labels)
    history, timings = History(), {}

    t0 = time.perf_counter()
    # Codec views: every mel, and the frame generation is conditioned on or compared with
    # (the middle one); all frames would cost 10x the encode/decode for little more variety.
    mel_views = [train.mels]
    frames = train.frames.reshape(len(train), -1, *train.frames.shape[2:])  # (n, N, S, S, 3)
    if tokenizers is not None and cfg.codec_augment:
        mel_views.append(reconstruct(tokenizers["audio"], train.mels))
        middle = reconstruct(tokenizers["image"], train.frames[:, eval_frame(frames.shape[1])])
        frames = np.concatenate([frames, middle[:, None]], axis=1)  # (n, N + 1, S, S, 3)
    timings["reconstruct_s"] = time.perf_counter() - t0
    mels = np.stack(mel_views, axis=1)  # (n, views, F, T)

    def mel_batch(idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        view = rng.integers(0, mels.shape[1], len(idx))
        x = _roll(mels[idx, view].astype(np.float32), rng)
        return torch.as_tensor(x)

    num_real = train.frames.shape[1]

    def frame_batch(idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        # Half the draws are the codec view of the middle frame when there is one.
        f = rng.integers(0, num_real, len(idx))
        if frames.shape[1] > num_real:
            f = np.where(rng.random(len(idx)) < 0.5, num_real, f)
        x = frames[idx, f]
        flip = rng.random(len(idx)) < 0.5
        x[flip] = x[flip, :, ::-1]
        return torch.as_tensor(np.ascontiguousarray(x))

    t0 = time.perf_counter()
    _fit(model.audio, mel_batch, y, cfg, rng, device, "audio", history)
    timings["audio_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _fit(model.image, frame_batch, y, cfg, rng, device, "image", history)
    timings["image_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n, nf = frames.shape[:2]
    image_emb = model.image_outputs(frames.reshape(-1, *frames.shape[2:])).embedding
    audio_emb = model.audio_outputs(mels.reshape(-1, *mels.shape[2:])).embedding
    _fit_joint(
        model,
        torch.as_tensor(image_emb, device=device).reshape(n, nf, -1),
        torch.as_tensor(audio_emb, device=device).reshape(n, mels.shape[1], -1),
        cfg,
        rng,
        history,
    )
    timings["joint_s"] = time.perf_counter() - t0
    return model.eval(), history, timings


def held_out_metrics(
    model: LocalEvaluator,
    test: Clips | SplitOutputs,
    tokenizers: dict[str, Tokenizer] | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """How well the evaluator does on the held-out split, and its confusion matrices.

    Classifier accuracy on real test mels and on the middle frame (and on their VQGAN
    reconstructions when the tokenizers are given: the ceiling for generated samples), with a
    confusion matrix for each (keys "audio", "image", "audio codec", "image codec"); the
    CS-style score of matching and of shuffled pairs; image→audio retrieval top-1 among all test
    clips; with the model's rhythm scorer, `audio_acc_rhythm` and `audio_period_err` (and their
    `_codec` twins). `test` is the split in memory, or the outputs `split_outputs` streamed from it (with
    the codec ones when it was given the tokenizers)."""
    from pipeline.metrics.math import accuracy, clip_score, confusion_matrix

    y = model.label_index(test.labels)
    if (y < 0).any():
        unknown = sorted({lab for lab, i in zip(test.labels, y, strict=True) if i < 0})
        raise EvaluatorError(f"test labels not in the train split: {', '.join(unknown[:3])}")
    out = test if isinstance(test, SplitOutputs) else split_outputs(model, memory_chunks(test),
                                                                     tokenizers)  # fmt: skip
    audio, image = out.audio, out.image
    metrics = {
        "audio_acc": accuracy(audio.predicted, y),
        "image_acc": accuracy(image.predicted, y),
        "cs_matched": clip_score(image.joint, audio.joint),
        "cs_shuffled": clip_score(image.joint, np.roll(audio.joint, 1, axis=0)),
        "retrieval_top1": accuracy((image.joint @ audio.joint.T).argmax(1), np.arange(len(y))),
    }
    if model.rhythm is not None and audio.rhythm is not None:
        metrics |= {
            f"audio_{k}": v for k, v in model.rhythm.score_rows(audio.rhythm, test.labels).items()
        }
    k = len(model.labels)
    confusion = {
        "audio": confusion_matrix(audio.predicted, y, k),
        "image": confusion_matrix(image.predicted, y, k),
    }
    if out.audio_codec is not None and out.image_codec is not None:
        rec_audio, rec_image = out.audio_codec, out.image_codec
        metrics["audio_acc_codec"] = accuracy(rec_audio.predicted, y)
        metrics["image_acc_codec"] = accuracy(rec_image.predicted, y)
        if model.rhythm is not None and rec_audio.rhythm is not None:
            rhythm = model.rhythm.score_rows(rec_audio.rhythm, test.labels)
            metrics |= {f"audio_{k}_codec": v for k, v in rhythm.items()}
        # Which classes the codec loses is what generation inherits (e.g. two orange-ish
        # objects that the demo's image VQGAN blurs into one blob).
        confusion["audio codec"] = confusion_matrix(rec_audio.predicted, y, k)
        confusion["image codec"] = confusion_matrix(rec_image.predicted, y, k)
    return metrics, confusion


# ---------------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class EvaluatorSummary:
    """What `run_evaluator` made: the held-out metrics (also in `report_dir/metrics.json`)."""

    labels: list[str]
    metrics: dict[str, float]

    def describe(self, out_dir: Path) -> str:
        """The stage's closing line."""
        m = self.metrics
        return (
            f"evaluator: {len(self.labels)} labels, {m['train_clips']} train clips; on "
            f"{m['test_clips']} test clips audio accuracy {m['audio_acc']:.1%}, image "
            f"{m['image_acc']:.1%}, rhythm {m.get('audio_acc_rhythm', float('nan')):.1%}, CS "
            f"matched {m['cs_matched']:.1f} vs shuffled "
            f"{m['cs_shuffled']:.1f} -> {out_dir}"
        )


def run_evaluator(
    cfg: EvaluatorConfig,
    extract_dir: Path,
    tokenizers_dir: Path,
    out_dir: Path,
    report_dir: Path,
    *,
    seed: int,
    meta: dict[str, object] | None = None,
) -> EvaluatorSummary:
    """Train the offline evaluator on `extract_dir`'s train split (the first `cfg.per_label`
    clips of each label, or all; with the codec's reconstructions when `cfg.codec_augment`), fit
    its rhythm scorer on the same mels, score both on the test split (streamed), save it to `out_dir` (with `meta` added to its
    config.json) and write `report_dir`/metrics.json (which states `train_clips` and
    `train_per_label`), history.csv and evaluator.png. Refuses, before any work, a train subset
    whose decoded clips would take more than a third of the memory available (training holds
    them, their codec views and a copy while stacking)."""
    device = resolve_device(cfg.device)
    toks = load_tokenizers(tokenizers_dir, device) if cfg.codec_augment else None
    available = available_memory()
    train = load_clips(extract_dir, "train", cfg.per_label,
                       budget=None if available is None else available // 3)  # fmt: skip
    model, history, timings = train_local_evaluator(train, cfg, seed, device, toks)
    mel = load_meta(Path(extract_dir))["mel"]
    model.rhythm = RhythmScorer.fit(
        train.mels, train.labels, mel["sample_rate"] / mel["hop_length"]
    )
    if not split_size(load_meta(Path(extract_dir)), "test"):
        raise EvaluatorError(f"{extract_dir} has no clips in split 'test'")
    test = split_outputs(model, read_chunks(extract_dir, "test"), toks)
    metrics, confusion = held_out_metrics(model, test)
    metrics |= {"train_clips": len(train), "train_per_label": cfg.per_label,
                "test_clips": len(test)}  # fmt: skip
    metrics |= {k: round(v, 1) for k, v in timings.items()}
    model.save(out_dir, {"metrics": metrics, "comparable_to_paper": False, **(meta or {})})
    io.write_json(report_dir / "metrics.json", {"comparable_to_paper": False, **metrics})
    io.write_csv(report_dir / "history.csv", history.rows, ["part", "epoch", "loss", "acc"])
    evaluator_figure(history.rows, confusion, model.labels, report_dir / "evaluator.png")
    return EvaluatorSummary(list(model.labels), metrics)
