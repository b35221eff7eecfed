"""The `sweep` stage's work: a Ray Tune grid over the inference settings (T, N, s).

Each trial loads the trained transformer, the tokenizers and the offline evaluator, generates
audio for the same test subset (image→audio, the middle frame as condition) and reports the
evaluator's `_local` scores. Ray Tune's `MLflowLoggerCallback` logs each trial as an MLflow
run tagged with the sweep's parent run, so the trials are its child runs in the UI. The stage
then writes the results table, the best setting and two charts: each metric against s for every
(T, N), the paper's Fig. 3 (bottom), and the T x N grid at one s, its Fig. 4.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import io
from pipeline.config import SWEEP_METRICS, GenerateConfig, PathsConfig, SweepConfig
from pipeline.errors import PipelineError
from pipeline.evaluation.evaluate import evaluated_rows, load_test_set
from pipeline.evaluation.local import LocalEvaluator
from pipeline.evaluation.scoring import Reference

log = logging.getLogger(__name__)

METRICS = SWEEP_METRICS
AXES = ("temperature", "steps", "guidance")


class SweepError(PipelineError):
    """A sweep whose grid or metric does not make sense."""


def trial(config: dict[str, Any], frames: np.ndarray, ref: Reference, dirs: dict[str, str]) -> None:
    """One Tune trial: generate for the subset's conditioning `frames` at (T, N, s) and report
    the scores against `ref` (both made once by the driver and shared through the object store).
    `dirs`: the absolute transformer, tokenizers and evaluator folders, kept out of `config`
    because Tune logs the config as the trial's MLflow params and runs it in another folder."""
    import torch
    from ray import tune

    from pipeline.evaluation.local import LocalEvaluator
    from pipeline.evaluation.scoring import score_audio
    from pipeline.inference.generate import Generator

    torch.set_num_threads(config["threads"])
    start = time.monotonic()
    gen_cfg = GenerateConfig(
        steps=int(config["steps"]),
        temperature=float(config["temperature"]),
        guidance=float(config["guidance"]),
        batch_size=config["batch_size"],
        device=config["device"],
        drop_ratio=config["drop_ratio"],
    )
    generator = Generator(dirs["transformer"], dirs["tokenizers"], gen_cfg)
    evaluator = LocalEvaluator.load(dirs["evaluator"], generator.device)
    out = generator.run("image2audio", images=frames, seed=config["seed"], vocode=False)
    scores = score_audio(evaluator.audio_outputs(out.mels), ref, np.arange(len(frames)))
    tune.report(scores | {"seconds": time.monotonic() - start})


@dataclass
class SweepSummary:
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    seconds: float

    def describe(self, report_dir: Path) -> str:
        b = self.best
        return (
            f"sweep: {len(self.rows)} trials in {self.seconds:.0f} s; best {b['metric']} "
            f"{b['value']:.3f} at T={b['temperature']:g}, N={b['steps']}, s={b['guidance']:g} "
            f"-> {report_dir}/best.json"
        )


def grid(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every (T, N, s) of the grid, in a fixed order."""
    return [
        {"temperature": t, "steps": n, "guidance": s}
        for t, n, s in itertools.product(cfg.temperature, cfg.steps, cfg.guidance)
    ]


def run_sweep(
    cfg: SweepConfig,
    generate: GenerateConfig,
    paths: PathsConfig,
    *,
    seed: int,
    report_dir: Path,
    experiment: str,
    parent_run_id: str,
    tracking_uri: str,
    cluster_wait_s: float = 0.0,
) -> SweepSummary:
    """Run the grid with Ray Tune (trials as MLflow child runs of `parent_run_id` in
    `experiment`, with its git_commit and pipeline run). Of `generate` it reads batch_size and
    drop_ratio (fixed for every trial) and guidance (the s of the T x N chart). With
    `gpus_per_trial` > 0 a trial's GPU must be in the cluster, or come within `cluster_wait_s`
    from its autoscaler."""
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from pipeline import tracking
    from pipeline.devices import usable_cores
    from pipeline.ray_runtime import ray_session, require_resources

    start = time.monotonic()
    dirs = {
        "transformer": str(Path(paths.transformer).resolve()),
        "tokenizers": str(Path(paths.tokenizers).resolve()),
        "evaluator": str(Path(paths.evaluator).resolve()),
    }
    fixed = {
        "clips": cfg.clips,
        "seed": seed,
        "batch_size": max(generate.batch_size, cfg.clips),
        "drop_ratio": generate.drop_ratio,
        "device": "cuda" if cfg.gpus_per_trial > 0 else "cpu",
        "threads": max(1, int(cfg.cpus_per_trial)),
    }
    space = {k: tune.grid_search(list(getattr(cfg, k))) for k in AXES}
    # The subset and the evaluator's view of its real clips are the same for every trial.
    # Only the shards that hold them are read, and only these clips decoded.
    evaluator = LocalEvaluator.load(paths.evaluator)
    rows = evaluated_rows(paths.extract, cfg.clips)
    test = load_test_set(paths.extract, evaluator, rows, keep=set(range(len(rows))))
    frames, ref = test.frames(list(range(len(test)))), test.ref
    with ray_session():
        concurrent = max(
            1, int(ray.cluster_resources().get("CPU", usable_cores()) // cfg.cpus_per_trial)
        )
        if cfg.gpus_per_trial > 0:
            have = require_resources(
                [{"CPU": cfg.cpus_per_trial, "GPU": cfg.gpus_per_trial}],
                f"sweep asks for {cfg.gpus_per_trial:g} GPU per trial",
                "set sweep.gpus_per_trial to 0 to sweep on CPU",
                cluster_wait_s,
            )
            concurrent = min(concurrent, int(have.get("GPU", 0) // cfg.gpus_per_trial))
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(trial, frames=frames, ref=ref, dirs=dirs),
                {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial},
            ),
            param_space=fixed | space,
            tune_config=tune.TuneConfig(
                metric=cfg.metric, mode=cfg.mode, max_concurrent_trials=concurrent
            ),
            run_config=tune.RunConfig(
                name="sweep",
                storage_path=str((Path(paths.cache) / "ray_tune").resolve()),
                # Tune's trial table (grid values, metric, status) every 30 s and at the end;
                # per-result lines (verbose 2) would flood a DVC log.
                verbose=1,
                callbacks=[
                    MLflowLoggerCallback(
                        tracking_uri=tracking_uri,
                        experiment_name=experiment,
                        tags=tracking.trial_tags(parent_run_id, tracking_uri, "sweep-trial"),
                    )
                ],
            ),
        )
        results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise SweepError(f"{len(errors)} of {len(results)} sweep trials failed: {errors[0]}")
    rows = []
    for r in results:
        rows.append(
            {k: r.config[k] for k in AXES} | {m: r.metrics[m] for m in (*METRICS, "seconds")}
        )
    rows.sort(key=lambda row: tuple(row[k] for k in AXES))
    pick = min if cfg.mode == "min" else max
    best_row = pick(rows, key=lambda row: row[cfg.metric])
    best = {"metric": cfg.metric, "mode": cfg.mode, "value": best_row[cfg.metric],
            **{k: best_row[k] for k in AXES}, "clips": cfg.clips,
            "comparable_to_paper": False}  # fmt: skip
    write_results(rows, report_dir, cfg, generate)
    io.write_json(report_dir / "best.json", best)
    return SweepSummary(rows, best, time.monotonic() - start)


def write_results(
    rows: list[dict[str, Any]], report_dir: Path, cfg: SweepConfig, gen: GenerateConfig
) -> None:
    """results.csv and the two charts (guidance.png, grid.png)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    io.write_csv(report_dir / "results.csv", rows, [*AXES, *METRICS, "seconds"])
    guidance_figure(rows, report_dir / "guidance.png")
    s = gen.guidance if gen.guidance in cfg.guidance else max(cfg.guidance)
    grid_figure(rows, s, report_dir / "grid.png")


def guidance_figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """Each metric against s, one line per (T, N): the paper's Fig. 3 (bottom)."""
    from matplotlib.figure import Figure

    from pipeline.data import audio

    fig = Figure(figsize=(12, 3.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(METRICS))
    for (t, n), group in itertools.groupby(
        sorted(rows, key=lambda r: (r["temperature"], r["steps"], r["guidance"])),
        key=lambda r: (r["temperature"], r["steps"]),
    ):
        group = list(group)
        for ax, m in zip(axes, METRICS, strict=True):
            ax.plot([r["guidance"] for r in group], [r[m] for r in group], marker="o",
                    label=f"T={t:g}, N={n}")  # fmt: skip
    for ax, m in zip(axes, METRICS, strict=True):
        ax.set_xlabel("guidance s")
        ax.set_title(m, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "sweep: metric vs CFG scale (offline evaluator; not the paper's scale)", fontsize=9
    )
    audio.save_figure(fig, path)
    return path


def grid_figure(rows: list[dict[str, Any]], guidance: float, path: Path) -> Path:
    """Each metric over the T x N grid at one s, values written in the cells: the paper's Fig. 4."""
    from matplotlib.figure import Figure

    from pipeline.data import audio

    at = [r for r in rows if r["guidance"] == guidance]
    temps = sorted({r["temperature"] for r in at})
    steps = sorted({r["steps"] for r in at})
    fig = Figure(figsize=(3.2 * len(METRICS), 3.0), dpi=100, layout="constrained")
    for ax, m in zip(fig.subplots(1, len(METRICS)), METRICS, strict=True):
        table = np.full((len(steps), len(temps)), np.nan)
        for r in at:
            table[steps.index(r["steps"]), temps.index(r["temperature"])] = r[m]
        ax.imshow(table, cmap="viridis", origin="lower", aspect="auto")
        for (i, j), v in np.ndenumerate(table):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="w")
        ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
        ax.set_yticks(range(len(steps)), [str(n) for n in steps])
        ax.set_xlabel("temperature T")
        ax.set_ylabel("steps N")
        ax.set_title(m, fontsize=9)
    fig.suptitle(f"sweep: T x N at s={guidance:g}", fontsize=9)
    audio.save_figure(fig, path)
    return path
