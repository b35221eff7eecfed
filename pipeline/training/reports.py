"""What training leaves behind besides checkpoints: MLflow logging from rank 0 (metrics, and every
`figure_every` steps a reconstruction figure and a few generated sounds, WAV + mel PNG, under
`reconstructions/` and `samples/step_NNNNNNN/`), the saved model folder with its card, and the DVC
reports (metrics JSON, loss/validation CSVs for `dvc plots`, figures).

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

from pipeline import cards, checkpoint, io, tracking
from pipeline.config import MaskingConfig, as_dict
from pipeline.data import audio
from pipeline.data.token_dataset import TokenSplit
from pipeline.data.tokens import load_token_meta
from pipeline.inference.scheduler import Unmasker, UnmaskingScheduler
from pipeline.inference.tasks import task
from pipeline.models.transformer import AudioVisualTransformer, count_parameters
from pipeline.tokenizers.layout import TokenLayout
from pipeline.tokenizers.vocoder import Vocoder
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
# How the audio samples of training are decoded: a fixed, short schedule, so that the samples of
# two steps differ only by the model (the sweep and evaluate stages measure the real settings).
SAMPLE_SCHEDULE = UnmaskingScheduler(steps=12, temperature=1.0, guidance=3.0)


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


def _vocoder_if_any(folder: str | Path) -> Vocoder | None:
    """The tokenizers' vocoder on CPU, or None when `folder` lacks it (no audio samples then)."""
    try:
        return Vocoder.load(Path(folder) / "vocoder")
    except checkpoint.CheckpointError as err:
        log.warning("no audio samples: %s", err)
        return None


@torch.no_grad()
def write_audio_samples(
    model: nn.Module,
    split: TokenSplit,
    layout: TokenLayout,
    tokenizers: dict[str, Any],
    vocoder: Vocoder,
    folder: Path,
    examples: int,
    seed: int,
    device: torch.device | str,
) -> list[Path]:
    """Sound generated for `examples` clips of `split` (spread as in the reconstruction figure)
    from their evaluation frame alone, by `SAMPLE_SCHEDULE`: `<folder>/<k>-<label>.wav` and
    `.mel.png` each. The same model, split and seed give the same files. Returns the WAVs."""
    index = torch.linspace(0, len(split) - 1, min(examples, len(split))).round().long()
    ids = {m: v.to(device) for m, v in split.eval_take(index).items()}
    spec = task("image2audio", layout)
    generator = torch.Generator(device=device).manual_seed(seed)
    unmasker = Unmasker(model, layout, SAMPLE_SCHEDULE)
    filled = unmasker.run(ids, spec.batch_known(len(index), device), generator, spec.condition)
    mels = tokenizers["audio"].decode(filled["audio"].cpu())
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k, (i, mel) in enumerate(zip(index.tolist(), mels, strict=True)):
        label = "".join(c if c.isalnum() else "_" for c in str(split.labels[i]))[:40]
        wav = folder / f"{k}-{label}.wav"
        audio.save_wav(wav, vocoder(mel, seed=seed), vocoder.mel.sample_rate)
        audio.save_mel_png(folder / f"{k}-{label}.mel.png", mel, title=str(split.labels[i]))
        written.append(wav)
    return written


class WorkerHooks:
    """Rank-0 callbacks of `run_training`: metrics, figures and audio samples to the stage's
    MLflow run."""

    def __init__(self, job: TrainJob, device: torch.device) -> None:
        self.job, self.device = job, device
        self.logger = tracking.RunLogger(**job.tracking) if job.tracking else None
        self._tokenizers: dict[str, Any] | None = None
        self._vocoder: Vocoder | None = None
        self._tokenizers_loaded = False

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)

    def figure(self, step: int, model: nn.Module, test_split: TokenSplit) -> None:
        if self.logger is None or len(test_split) == 0:
            return
        if not self._tokenizers_loaded:
            self._tokenizers = _tokenizers_if_any(self.job.tokenizers_dir)
            self._vocoder = _vocoder_if_any(self.job.tokenizers_dir)
            self._tokenizers_loaded = True
        if self._tokenizers is None:
            return
        examples = self.job.train.figure_examples or 4
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"reconstruction_step{step:07d}.png"
            figures.make_reconstruction(
                model,
                test_split,
                self.job.token_layout,
                self._tokenizers,
                path,
                examples=examples,
                ratio=figure_ratio(self.job.train.masking),
                seed=FIGURE_SEED,
                device=self.device,
                title=f"step {step}: masked {figure_ratio(self.job.train.masking):.0%} of each",
            )
            self.logger.log_artifact(path, artifact_path="reconstructions")
            if self._vocoder is not None:
                samples = Path(tmp) / f"step_{step:07d}"
                write_audio_samples(model, test_split, self.job.token_layout, self._tokenizers,
                                    self._vocoder, samples, examples, FIGURE_SEED, self.device)  # fmt: skip
                self.logger.log_artifacts(samples, artifact_path=f"samples/{samples.name}")


def export_model(
    state: dict[str, Any], job: TrainJob, name: str, out_dir: Path
) -> AudioVisualTransformer:
    """Write `out_dir`: the unwrapped weights, config.json (model config, layout, the tokenizers'
    hashes, step, metrics, commit) and the model card."""
    model = AudioVisualTransformer(job.model, job.token_layout)
    model.load_state_dict(state["model"])
    history = state["history"]
    _, tokens = load_token_meta(job.tokens_dir)
    meta = {
        "model": as_dict(job.model),
        "layout": job.layout,
        "tokenizers": tokens.get("tokenizers", {}),
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
    checkpoint.save(tmp, model, meta, cards.transformer_card(meta, tokens))
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
