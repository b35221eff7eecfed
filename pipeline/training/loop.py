"""The training loop in plain PyTorch, run by every worker.

Ray stays outside: the loop gets an `Environment` (rank, world size, device, how to wrap the model
for DDP, how to restore and report checkpoints). `ray_train.RayEnvironment` is the one used by the
`train` stage; `FolderEnvironment` runs the same loop without Ray (tests, debugging).

Everything random is a function of (seed, step, rank): the batch (see `data.token_dataset`), the
mask and drop, and dropout. A checkpoint therefore holds only the step, model, optimiser, LR
schedule, grad scaler and the metric history, and a resumed run continues exactly where the
interrupted one would have been.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline import checkpoint, io
from pipeline.config import ModelConfig, TrainConfig
from pipeline.data.token_dataset import StepSampler, TokenSplit, step_seed
from pipeline.devices import autocast, choose_precision
from pipeline.errors import PipelineError
from pipeline.masking import MaskedBatch, mask_fixed_ratio, mask_for_training
from pipeline.models.transformer import AudioVisualTransformer
from pipeline.tokenizers.layout import MODALITIES, TokenLayout
from pipeline.training.objective import compute_loss
from pipeline.training.optim import build_optimizer

log = logging.getLogger(__name__)

STATE_NAME = "state.pt"
# Seed streams of `step_seed` (the sampler uses 1 and 2).
DROPOUT_STREAM, MASK_STREAM, EVAL_STREAM = 3, 4, 5


class TrainError(PipelineError):
    """A training problem the user can fix (a checkpoint from other params, empty data)."""


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, as plain data (it is pickled to Ray workers)."""

    model: ModelConfig
    train: TrainConfig
    layout: dict[str, Any]
    tokens_dir: str
    seed: int
    fingerprint: str
    tracking: dict[str, str] | None = None
    tokenizers_dir: str = ""

    @property
    def token_layout(self) -> TokenLayout:
        return TokenLayout.from_dict(self.layout)


class Environment(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as the loop should call it (DDP on several workers)."""

    def restore(self) -> dict[str, Any] | None:
        """The latest checkpoint state of this run, or None for a fresh start."""

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        """Called by every rank at each checkpoint; rank 0 passes the state to save."""


# ------------------------------------------------------------------------------------ pieces


def build_model(job: TrainJob) -> AudioVisualTransformer:
    """The model with the run's initial weights (identical on every rank: seeded)."""
    torch.manual_seed(job.seed)
    return AudioVisualTransformer(job.model, job.token_layout)


@torch.no_grad()
def validate(
    model: nn.Module,
    split: TokenSplit,
    layout: TokenLayout,
    cfg: TrainConfig,
    device: torch.device,
    precision: str,
    seed: int,
) -> dict[str, float]:
    """Loss and accuracy per modality on `split` at the evaluation frame, at each fixed mask
    ratio in `cfg.eval_mask_ratios`, nothing dropped. The masks depend only on the seed, so the
    numbers are comparable across steps and runs."""
    was_training = model.training
    model.eval()
    n = len(split) if cfg.eval_examples == 0 else min(len(split), cfg.eval_examples)
    out: dict[str, float] = {}
    for ratio in cfg.eval_mask_ratios:
        g = torch.Generator().manual_seed(step_seed(seed, 0, 0, EVAL_STREAM))
        sums = {f"{k}_{m}": 0.0 for k in ("loss", "acc") for m in MODALITIES}
        for start in range(0, n, cfg.batch_size):
            ids = split.eval_batch(start, min(n, start + cfg.batch_size))
            batch = mask_fixed_ratio(layout, ids, ratio, g).to(device)
            with autocast(device, precision):
                _, parts = compute_loss(model, batch, cfg.label_smoothing)
            for key, value in parts.items():
                sums[key] += float(value) * len(ids["audio"])
        tag = f"r{round(ratio * 100):02d}"
        out |= {f"val/{key}_{tag}": value / max(1, n) for key, value in sums.items()}
    model.train(was_training)
    return out


class Window:
    """Running means of the step metrics between two log points."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.start = time.monotonic()

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.count) for k, v in self.sums.items()}


def _all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))


class Progress:
    """What rank 0 shows while training: on a terminal a tqdm bar (step, loss per modality,
    samples/s, ETA); elsewhere (a DVC log, a Ray worker's output) a log line at the first logged
    window, every `LINE_EVERY`-th one and the last."""

    LINE_EVERY = 10

    def __init__(self, start: int, last: int, log_every: int, rank: int) -> None:
        # disable=None: tqdm draws only on a terminal; other ranks draw nothing.
        self.bar = tqdm(total=last, initial=start, desc="train", unit="step",
                        disable=None if rank == 0 else True, dynamic_ncols=True)  # fmt: skip
        self.lines = rank == 0 and self.bar.disable
        self.start, self.last, self.every = start, last, log_every
        self.began, self.shown = time.monotonic(), False

    def update(self) -> None:
        self.bar.update(1)

    def logged(self, done: int, metrics: dict[str, float]) -> None:
        """Show the window of training metrics that ends at step `done`."""
        losses = {m: metrics.get(f"loss_{m}", math.nan) for m in MODALITIES}
        rate = metrics.get("samples_per_s", math.nan)
        if not self.bar.disable:
            self.bar.set_postfix_str(
                " ".join(f"{m} {v:.3f}" for m, v in losses.items()) + f", {rate:.1f} samples/s"
            )
            if done == self.last:  # the rate of the steps, not of the validation after them
                self.bar.close()
        due = done % (self.every * self.LINE_EVERY) == 0 or done == self.last
        if self.lines and (due or not self.shown):
            self.shown = True
            elapsed = time.monotonic() - self.began
            left = (self.last - done) * elapsed / max(1, done - self.start)
            log.info(
                "train: step %d/%d, loss audio %.4f image %.4f, %.1f samples/s, %s left",
                done, self.last, losses["audio"], losses["image"], rate,
                tqdm.format_interval(left),
            )  # fmt: skip

    def close(self) -> None:
        self.bar.close()


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


# -------------------------------------------------------------------------------------- loop


def train_step(
    net: nn.Module,
    model: nn.Module,
    batch: MaskedBatch,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    precision: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One optimiser step on a masked batch already on the device; `net` is `model` as wrapped
    (DDP, compile). Returns (loss, per-modality parts, gradient norm before clipping)."""
    device = batch.inputs["audio"].device
    with autocast(device, precision):
        loss, parts = compute_loss(net, batch, cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    return loss.detach(), parts, grad_norm


def run_training(
    job: TrainJob,
    env: Environment,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_figure: Callable[[int, nn.Module, TokenSplit], None] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train from the environment's latest checkpoint (or from scratch) to `train.steps`.

    Returns the final state. On rank 0, `on_log(step, metrics)` gets every logged training and
    validation metric (the stage sends them to MLflow) and `on_figure(step, model, test_split)`
    is called every `figure_every` steps and at the end. `stop_after` ends the loop after that
    step with a checkpoint, as an interruption would (tests of resume).
    """
    cfg, layout, device = job.train, job.token_layout, env.device
    precision = choose_precision(cfg.precision, device)
    train_split = TokenSplit.load(job.tokens_dir, "train")
    test_split = TokenSplit.load(job.tokens_dir, "test")
    if len(train_split) == 0:
        raise TrainError(f"{job.tokens_dir} has no train clips; run the tokenize stage first")

    model = build_model(job).to(device)
    opt, schedule = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
    start = 0
    state = env.restore()
    if state is not None:
        if state.get("fingerprint") != job.fingerprint:
            raise TrainError(
                "the checkpoint in this run's storage was made with other params or tokens; "
                "set train.run_name to a new name (or auto) to start a new run"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, start = state["history"], int(state["step"])
        history.setdefault("resumed", []).append({"step": start})
        if env.rank == 0:
            log.info("train: resuming at step %d of %d", start, cfg.steps)

    net = env.wrap(model)
    if cfg.compile:
        net = torch.compile(net)
    sampler = StepSampler(len(train_split), cfg.batch_size, env.world_size, env.rank, job.seed)
    tokens_per_sample = layout.seq_len
    window = Window()
    last = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps

    def snapshot(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict(),
            "history": history,
            "fingerprint": job.fingerprint,
            "precision": precision,
        }

    net.train()
    progress = Progress(start, last, cfg.log_every, env.rank)
    # Log records go above the bar instead of through it.
    redirect = logging_redirect_tqdm() if not progress.bar.disable else contextlib.nullcontext()
    with redirect:
        for step in range(start, last):
            torch.manual_seed(step_seed(job.seed, step, env.rank, DROPOUT_STREAM))
            g = torch.Generator().manual_seed(step_seed(job.seed, step, env.rank, MASK_STREAM))
            batch = mask_for_training(layout, sampler.batch(train_split, step), cfg.masking, g)
            loss, parts, grad_norm = train_step(
                net, model, batch.to(device), opt, scaler, cfg, precision
            )
            lr = schedule.get_last_lr()[0]
            schedule.step()
            window.add({"loss": loss, **parts, "grad_norm": grad_norm, "lr": lr})
            progress.update()

            done = step + 1
            if done % cfg.log_every == 0 or done == last:
                metrics = _all_reduce_mean(window.means(), device)
                seconds = time.monotonic() - window.start
                samples = window.count * cfg.batch_size
                metrics |= {
                    "samples_per_s": samples / seconds,
                    "tokens_per_s": samples * tokens_per_sample / seconds,
                    "epoch": sampler.epoch(done),
                }
                if (mem := _memory_gib(device)) is not None:
                    metrics["gpu_mem_gib"] = mem
                if env.rank == 0:
                    history["train"].append({"step": done, **metrics})
                    progress.logged(done, metrics)
                    if on_log:
                        on_log(done, metrics)
                window = Window()

            if env.rank == 0 and (_due(done, cfg.eval_every) or done == cfg.steps):
                val = validate(model, test_split, layout, cfg, device, precision, job.seed)
                history["val"].append({"step": done, **val})
                if on_log:
                    on_log(done, val)
            if env.rank == 0 and on_figure and (_due(done, cfg.figure_every) or done == cfg.steps):
                on_figure(done, model, test_split)
            if _due(done, cfg.checkpoint_every) or done == last:
                env.report(
                    {"step": done, "loss": float(loss)},
                    snapshot(done) if env.rank == 0 else None,
                )
    progress.close()
    if start >= last:  # nothing left to do: report the restored state as the result
        env.report({"step": start}, snapshot(start) if env.rank == 0 else None)
    return snapshot(max(start, last))


# ----------------------------------------------------------------------- without Ray (tests)


@dataclasses.dataclass
class FolderEnvironment:
    """One process, no Ray: checkpoints as `checkpoint_<step>/state.pt` under `folder`."""

    folder: Path
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    keep: int = 2

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def restore(self) -> dict[str, Any] | None:
        found = sorted(Path(self.folder).glob("checkpoint_*/" + STATE_NAME), reverse=True)
        return first_loadable([p.parent for p in found])

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        if state is None:
            return
        saved = save_state(Path(self.folder) / f"checkpoint_{state['step']:08d}", state)
        others = sorted(p for p in Path(self.folder).glob("checkpoint_*") if p != saved)
        older = [p for p in others if p.name < saved.name]
        # Later steps are what a resumed run fell back from (unreadable): never keep them.
        stale = [p for p in others if p.name > saved.name]
        for old in stale + older[: max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(old)


def save_state(folder: Path, state: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(folder / STATE_NAME) as tmp:
        torch.save(state, tmp)
    return folder


def load_state(folder: str | Path) -> dict[str, Any]:
    """The state saved in `folder`; CheckpointError for a corrupt or unsafe file."""
    return checkpoint.safe_load(Path(folder) / STATE_NAME)


def first_loadable(folders: list[Path]) -> dict[str, Any] | None:
    """The state of the first of `folders` (newest first) that loads, None when there are none.

    A corrupt checkpoint (a crash while the disk filled, a bad copy) is skipped with a warning
    and the one before it is used; TrainError when none of them loads.
    """
    for i, folder in enumerate(folders):
        try:
            return load_state(folder)
        except checkpoint.CheckpointError as err:
            if i + 1 == len(folders):
                raise TrainError(
                    f"no checkpoint of this run can be read (last error: {err}); delete "
                    f"{Path(folder).parent} or set train.run_name to start a new run"
                ) from None
            log.warning("train: %s; falling back to %s", err, folders[i + 1].name)
    return None
