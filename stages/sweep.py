"""DVC stage `sweep`: a Ray Tune grid over (T, N, s) on the trained checkpoint; the trials are
MLflow child runs of this stage's run. The best setting goes to reports/sweep/best.json and is
never written back into params.yaml."""

import sys
from pathlib import Path

from pipeline import tracking
from pipeline.config import as_dict, load_params
from pipeline.evaluation.sweep import run_sweep
from pipeline.stage import stage_main


def main() -> str:
    params = load_params()
    report = Path(params.paths.reports) / "sweep"
    with tracking.stage_run(
        "sweep", params.base.experiment, as_dict(params.sweep), report, paths=params.paths
    ) as run:
        summary = run_sweep(
            params.sweep,
            params.generate,
            params.paths,
            seed=params.base.seed,
            report_dir=report,
            experiment=params.base.experiment,
            parent_run_id=run.run_id,
            tracking_uri=tracking.tracking_uri(),
            cluster_wait_s=params.base.cluster_wait_s,
        )
        run.log_metrics({f"best_{summary.best['metric']}": summary.best["value"]})
        run.log_params({f"best_{k}": summary.best[k] for k in ("temperature", "steps", "guidance")})
        for name in ("results.csv", "best.json", "guidance.png", "grid.png"):
            run.log_artifact(report / name)
    return summary.describe(report)


if __name__ == "__main__":
    sys.exit(stage_main("sweep", main))
