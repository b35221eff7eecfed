"""What training leaves behind besides checkpoints: MLflow logging from rank 0, the exported
model folder, and the DVC reports (metrics JSON, loss/validation CSVs for `dvc plots`, figures).

reports/train/
    metrics.json        last logged training window + last validation, step, run name
    loss.csv            step, loss, loss_audio, loss_image, acc_audio, acc_image, lr, grad_norm
    val.csv             step and every val/ metric
    loss.png            training and validation loss curves
    reconstruction.png  the final reconstruction figure (paper Fig. 5 style)
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import checkpoint, io, tracking
from pipeline.config import MaskingConfig, as_dict
from pipeline.data.token_dataset import TokenSplit
from pipeline.models.transformer import AudioVisualTransformer, count_parameters
from pipeline.training import figures
from pipeline.training.loop import TrainJob

log = logging.getLogger(__name__)

LOSS_COLUMNS = (
    "step",
    "loss",
    "loss_audio",
    "loss_image",
    "acc_audio",
    "acc_image",
    "lr",
    "grad_norm",
    "samples_per_s",
)
# Mask ratio of the reconstruction figures: the training distribution's location.
FIGURE_SEED = 1234


def figure_ratio(masking: MaskingConfig) -> float:
    return masking.mean


def _tokenizers_if_any(folder: str | Path) -> dict[str, Any] | None:
    """Both tokenizers on CPU, or None when `folder` lacks them (figures are then skipped)."""
    from pipeline.tokenizers.tokenizer import load_tokenizers

    try:
        return load_tokenizers(folder)
    except checkpoint.CheckpointError as err:
        log.warning("no reconstruction figures: %s", err)
        return None


class WorkerHooks:
    """Rank-0 callbacks of `run_training`: metrics and figures to the stage's MLflow run."""

    def __init__(self, job: TrainJob, device: torch.device) -> None:
        self.job, self.device = job, device
        self.logger = tracking.RunLogger(**job.tracking) if job.tracking else None
        self._tokenizers: dict[str, Any] | None = None
        self._tokenizers_loaded = False

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.job.train.log_every or step % (self.job.train.log_every * 10) == 0:
            shown = {k: round(v, 4) for k, v in metrics.items() if "loss" in k}
            log.info("train: step %d %s", step, shown)
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)

    def figure(self, step: int, model: nn.Module, test_split: TokenSplit) -> None:
        if self.logger is None or len(test_split) == 0:
            return
        if not self._tokenizers_loaded:
            self._tokenizers = _tokenizers_if_any(self.job.tokenizers_dir)
            self._tokenizers_loaded = True
        if self._tokenizers is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"reconstruction_step{step:07d}.png"
            figures.make_reconstruction(
                model,
                test_split,
                self.job.token_layout,
                self._tokenizers,
                path,
                examples=self.job.train.figure_examples,
                ratio=figure_ratio(self.job.train.masking),
                seed=FIGURE_SEED,
                device=self.device,
                title=f"step {step}: masked {figure_ratio(self.job.train.masking):.0%} of each",
            )
            self.logger.log_artifact(path, artifact_path="reconstructions")


def export_model(
    state: dict[str, Any], job: TrainJob, name: str, out_dir: Path
) -> AudioVisualTransformer:
    """Write the unwrapped weights + meta.json (config, layout, step, metrics, commit)."""
    model = AudioVisualTransformer(job.model, job.token_layout)
    model.load_state_dict(state["model"])
    history = state["history"]
    meta = {
        "model": as_dict(job.model),
        "layout": job.layout,
        "step": int(state["step"]),
        "parameters": count_parameters(model),
        "precision": state.get("precision", "fp32"),
        # A password in an s3://id:secret@bucket storage path must not travel with the weights.
        "train": as_dict(job.train) | {"storage_path": tracking.redact(job.train.storage_path)},
        "seed": job.seed,
        "run_name": name,
        "fingerprint": job.fingerprint,
        "git_commit": tracking.git_commit(),
        "metrics": {
            **(history["train"][-1] if history["train"] else {}),
            **(history["val"][-1] if history["val"] else {}),
        },
    }
    tmp = io.make_temp_dir(out_dir)
    checkpoint.save(tmp, model, meta)
    io.replace_dir(tmp, out_dir)
    return model


def _write_csv(path: Path, rows: list[dict[str, float]], columns: list[str]) -> None:
    io.write_csv(path, ({k: _fmt(row.get(k)) for k in columns} for row in rows), columns)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def write_reports(
    state: dict[str, Any],
    job: TrainJob,
    model: nn.Module,
    test_split: TokenSplit,
    out: Path,
) -> dict[str, float]:
    """Write reports/train/ (see the module doc); returns the final metrics."""
    out.mkdir(parents=True, exist_ok=True)
    history = state["history"]
    train_rows, val_rows = history["train"], history["val"]
    _write_csv(out / "loss.csv", train_rows, list(LOSS_COLUMNS))
    val_columns = ["step", *sorted({k for r in val_rows for k in r if k != "step"})]
    _write_csv(out / "val.csv", val_rows, val_columns)
    final = {
        "step": int(state["step"]),
        **{k: v for k, v in (train_rows[-1] if train_rows else {}).items() if k != "step"},
        **{k: v for k, v in (val_rows[-1] if val_rows else {}).items() if k != "step"},
    }
    if train_rows:
        final["first_loss"] = train_rows[0]["loss"]
    io.write_json(out / "metrics.json", final)

    curves = [
        {"step": r["step"], "train audio": r["loss_audio"], "train image": r["loss_image"]}
        for r in train_rows
    ]
    ratio = f"r{round(figure_ratio(job.train.masking) * 100):02d}"
    for r in val_rows:
        curves.append(
            {
                "step": r["step"],
                "val audio": r.get(f"val/loss_audio_{ratio}", math.nan),
                "val image": r.get(f"val/loss_image_{ratio}", math.nan),
            }
        )
    figures.loss_figure(
        curves,
        out / "loss.png",
        keys=["train audio", "train image", "val audio", "val image"],
        title=f"masked-token cross-entropy (val at mask ratio {ratio[1:]}%)",
    )
    tokenizers = _tokenizers_if_any(job.tokenizers_dir)
    if tokenizers is not None and len(test_split):
        figures.make_reconstruction(
            model,
            test_split,
            job.token_layout,
            tokenizers,
            out / "reconstruction.png",
            examples=job.train.figure_examples or 4,
            ratio=figure_ratio(job.train.masking),
            seed=FIGURE_SEED,
            device=torch.device("cpu"),
            title=f"step {state['step']}: masked {figure_ratio(job.train.masking):.0%} of each",
        )
    return final
