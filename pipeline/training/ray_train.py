"""The `train` stage on Ray Train (V2): the only module that imports `ray.train`.

`run_train` builds a `TorchTrainer` around `loop.run_training`: workers and resources from
params (`num_workers: 0` is Ray Train's local mode, in the stage process), DDP over gloo on CPU
or NCCL on GPUs, checkpoints reported to `RunConfig(storage_path, name)`. Rerunning with the same
run name resumes from the run's last checkpoint; `train.run_name: auto` names the run after a
hash of everything that defines the optimisation (params, token files, seed and the code of
`OPTIMISATION_CODE`), so changed params or training code start a new run and an interrupted
identical one resumes. At the end the unwrapped weights and config.json go to
`models/transformer/`, and the reports (metrics, loss curves, reconstruction figure) to
`reports/train/`.

Ray's local mode keeps no checkpoints (Ray 2.60: `report` does not persist them and
`get_checkpoint` returns None), so there this module stores them itself in the same folder
layout, `<storage_path>/<run_name>/checkpoint_<step>/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint import CheckpointError
from pipeline.config import ModelConfig, TrainConfig
from pipeline.data.token_dataset import TokenSplit
from pipeline.data.tokens import load_token_meta
from pipeline.devices import usable_cores
from pipeline.errors import PipelineError
from pipeline.ray_runtime import ray_session, require_resources
from pipeline.training import reports
from pipeline.training.loop import (
    FolderEnvironment,
    TrainError,
    TrainJob,
    load_state,
    run_training,
    save_state,
)

log = logging.getLogger(__name__)

# TrainConfig fields that do not change the optimisation: resuming across them is allowed.
_RUN_ONLY_FIELDS = (
    "run_name",
    "storage_path",
    "num_workers",
    "use_gpu",
    "cpus_per_worker",
    "max_failures",
    "log_every",
    "eval_every",
    "eval_mask_ratios",
    "eval_examples",
    "figure_every",
    "figure_examples",
    "checkpoint_every",
    "keep_checkpoints",
)


# The modules (under pipeline/) whose code decides what a training step computes: a run trained
# by other code is not resumed (a finished one would otherwise come back as the new model).
OPTIMISATION_CODE = (
    "data/token_dataset.py", "devices.py", "masking.py", "models/transformer.py",
    "tokenizers/layout.py", "training/loop.py", "training/objective.py", "training/optim.py",
)  # fmt: skip
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def code_digest(root: Path = PACKAGE_ROOT) -> str:
    """sha256 over the source of OPTIMISATION_CODE under `root`."""
    digest = hashlib.sha256()
    for name in OPTIMISATION_CODE:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()


def fingerprint(
    model: ModelConfig, train: TrainConfig, tokens_meta: dict, seed: int, code: str | None = None
) -> str:
    """sha256 of what defines the optimisation: model, optimiser, masking, data files, seed and
    the training code (`code_digest()` unless given)."""
    train_part = {k: v for k, v in asdict(train).items() if k not in _RUN_ONLY_FIELDS}
    files = {s: [e["sha256"] for e in entries] for s, entries in tokens_meta["files"].items()}
    blob = json.dumps(
        {"model": asdict(model), "train": train_part, "files": files, "seed": seed,
         "code": code if code is not None else code_digest()},
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()


def run_name(train: TrainConfig, digest: str) -> str:
    return f"train-{digest[:12]}" if train.run_name == "auto" else train.run_name


def storage_uri(path: str) -> str:
    """Ray wants an absolute local path or a URI (s3://, gs://, ...)."""
    return path if "://" in path else str(Path(path).resolve())


# ------------------------------------------------------------------------------- worker side


def worker_device(use_gpu: bool, ray_device: torch.device) -> torch.device:
    """The device a worker trains on: the one Ray gives it (`ray.train.torch.get_device()`)
    when `train.use_gpu`, else the CPU. Ray's local mode (num_workers 0) gives a CUDA device
    whenever torch sees one, whatever `use_gpu` says (Ray 2.60), and the CPU when it sees
    none; both are turned into what params.yaml asked for, or a clear error."""
    if not use_gpu:
        return torch.device("cpu")
    if ray_device.type != "cuda":
        raise TrainError(
            "train.use_gpu is true but this worker has no CUDA GPU (torch sees none); set "
            "train.use_gpu to false to train on the CPU"
        )
    return ray_device


class RayEnvironment:
    """`loop.Environment` inside a Ray Train worker."""

    def __init__(self, local_store: str | None, keep: int, use_gpu: bool) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = worker_device(use_gpu, ray.train.torch.get_device())
        # Ray's local mode persists nothing: keep checkpoints in the same layout ourselves.
        self._local = (
            FolderEnvironment(Path(local_store), self.device, keep=keep) if (local_store) else None
        )

    def wrap(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        if self.world_size == 1:
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def restore(self) -> dict[str, Any] | None:
        import ray.train

        if self._local is not None:
            return self._local.restore()
        checkpoint = ray.train.get_checkpoint()
        return None if checkpoint is None else restore_checkpoint(checkpoint)

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        import ray.train

        if self._local is not None:
            self._local.report(metrics, state)
            ray.train.report(metrics)
            return
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="ve-ckpt-") as folder:
            save_state(Path(folder), state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def restore_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """The state of a Ray checkpoint; when it cannot be read, that of the newest earlier
    checkpoint of the same run (a sibling `checkpoint_*` folder in the storage), with a warning.
    Raises TrainError when none can be read."""
    import pyarrow.fs
    import ray.train

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    earlier = sorted(
        (i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(parent))
         if i.type == pyarrow.fs.FileType.Directory
         and i.base_name.startswith("checkpoint_") and i.base_name < name),
        reverse=True,
    )  # fmt: skip
    candidates = [checkpoint, *(ray.train.Checkpoint(p, filesystem=fs) for p in earlier)]
    for candidate, fallback in zip(candidates, [*earlier, None], strict=True):
        try:
            with candidate.as_directory() as folder:
                return load_state(folder)
        except CheckpointError as err:
            if fallback is None:
                raise TrainError(
                    f"no checkpoint of this run can be read (last error: {err}); delete "
                    f"{parent} or set train.run_name to start a new run"
                ) from None
            log.warning("train: %s; falling back to %s", err, fallback.rsplit("/", 1)[-1])
    raise TrainError(f"no checkpoint in {parent}")  # not reached: the loop returns or raises


def _worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    job: TrainJob = config["job"]
    torch.set_num_threads(max(1, int(config["threads"])))
    env = RayEnvironment(config["local_store"], job.train.keep_checkpoints, job.train.use_gpu)
    hooks = reports.WorkerHooks(job, env.device) if env.rank == 0 else None
    run_training(
        job,
        env,
        on_log=hooks.log if hooks else None,
        on_figure=hooks.figure if hooks else None,
        stop_after=config.get("stop_after"),
    )


# ------------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class TrainSummary:
    run_name: str
    steps: int
    resumed_from: int
    seconds: float
    metrics: dict[str, float]
    out_dir: str

    def describe(self) -> str:
        m = self.metrics
        resumed = f", resumed at step {self.resumed_from}" if self.resumed_from else ""
        return (
            f"train: {self.steps} steps{resumed} in {self.seconds:.0f}s (run {self.run_name}); "
            f"loss audio {m.get('loss_audio', float('nan')):.3f} image "
            f"{m.get('loss_image', float('nan')):.3f}; model in {self.out_dir}"
        )


def _worker_resources(cfg: TrainConfig) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})


def _scaling(cfg: TrainConfig):
    import ray.train

    return ray.train.ScalingConfig(
        num_workers=cfg.num_workers,
        use_gpu=cfg.use_gpu,
        resources_per_worker=_worker_resources(cfg) if cfg.num_workers else None,
    )


def _threads(cfg: TrainConfig) -> int:
    cores = usable_cores()
    if cfg.num_workers == 0:
        return cores
    return max(1, min(int(cfg.cpus_per_worker), cores // cfg.num_workers))


def _unwrap_failure(err: BaseException) -> BaseException:
    """The worker's own exception inside Ray's TrainingFailedError, when there is one."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PipelineError):
            return e
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        for attr in ("worker_failures", "errors"):
            value = getattr(e, attr, None)
            if isinstance(value, dict):
                stack.extend(v for v in value.values() if isinstance(v, BaseException))
    return err


def fit(job: TrainJob, name: str, storage: str, stop_after: int | None = None) -> dict[str, Any]:
    """Run the TorchTrainer to the end (or `stop_after`) and return the last checkpoint's state."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = job.train
    local_store = None
    if cfg.num_workers == 0:
        if "://" in storage:
            raise TrainError("train.num_workers 0 (local mode) needs a local storage_path")
        local_store = str(Path(storage) / name)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "job": job,
            "local_store": local_store,
            "threads": _threads(cfg),
            "stop_after": stop_after,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=_scaling(cfg),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        inner = _unwrap_failure(err)
        if isinstance(inner, PipelineError):
            raise TrainError(str(inner)) from None
        raise
    if local_store is not None:
        state = FolderEnvironment(Path(local_store)).restore()
    elif result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            state = load_state(folder)
    else:
        state = None
    if state is None:
        raise TrainError(f"run {name} ended without a checkpoint in {storage}")
    return state


def run_train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    seed: int,
    tokens_dir: Path,
    tokenizers_dir: Path,
    out_dir: Path,
    reports_dir: Path,
    tracking: dict[str, str] | None = None,
    stop_after: int | None = None,
    cluster_wait_s: float = 0.0,
) -> TrainSummary:
    """Train (or resume) the transformer on `tokens_dir`; export to `out_dir` (see module doc).
    The workers' CPUs and GPUs must be in the cluster, or come within `cluster_wait_s` from its
    autoscaler (`ray_runtime.require_resources`)."""
    start = time.monotonic()
    layout, tokens_meta = load_token_meta(Path(tokens_dir))
    digest = fingerprint(model_cfg, train_cfg, tokens_meta, seed)
    name = run_name(train_cfg, digest)
    storage = storage_uri(train_cfg.storage_path)
    job = TrainJob(
        model=model_cfg,
        train=train_cfg,
        layout=layout.to_dict(),
        tokens_dir=str(Path(tokens_dir).resolve()),
        seed=seed,
        fingerprint=digest,
        tracking=tracking,
        tokenizers_dir=str(Path(tokenizers_dir).resolve()),
    )
    log.info(
        "train: run %s in %s, %d worker(s)%s, %d steps of %d",
        name,
        storage,
        train_cfg.num_workers,
        " with GPUs" if train_cfg.use_gpu else "",
        train_cfg.steps,
        train_cfg.batch_size,
    )
    with ray_session():
        if train_cfg.num_workers:
            per_worker = _worker_resources(train_cfg)
            require_resources(
                [per_worker] * train_cfg.num_workers,
                f"train asks for {train_cfg.num_workers} worker(s) x {per_worker}",
                "lower train.num_workers or cpus_per_worker (use_gpu: false trains on CPU)",
                cluster_wait_s,
            )
        state = fit(job, name, storage, stop_after)
    history = state["history"]
    resumed_from = next((r["step"] for r in history.get("resumed", [])), 0)
    model = reports.export_model(state, job, name, out_dir)
    test_split = TokenSplit.load(tokens_dir, "test")
    final = reports.write_reports(state, job, model, test_split, reports_dir)
    return TrainSummary(
        run_name=name,
        steps=int(state["step"]),
        resumed_from=resumed_from,
        seconds=round(time.monotonic() - start, 1),
        metrics=final,
        out_dir=str(out_dir),
    )
