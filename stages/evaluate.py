"""DVC stage `evaluate`: generation on the test split (Ray Data), scored by the offline
evaluator; metrics, sample WAVs/PNGs and a Fig. 6-style figure."""

import sys
from pathlib import Path

from pipeline import checkpoint, tracking
from pipeline.config import as_dict, load_params
from pipeline.evaluation.evaluate import run_evaluate
from pipeline.stage import stage_main


def main() -> str:
    params = load_params()
    report = Path(params.paths.reports) / "evaluate"
    logged = {"evaluate": as_dict(params.evaluate), "generate": as_dict(params.generate)}
    meta = checkpoint.read_config(params.paths.transformer, "transformer")
    with tracking.stage_run(
        "evaluate", params.base.experiment, logged, report, paths=params.paths
    ) as run:
        # The train stage's MLflow run carries the same `train_run` tag (the Ray Train run name).
        run.set_tags({"train_run": meta.get("run_name", ""), "comparable_to_paper": "false"})
        summary = run_evaluate(params.evaluate, params.generate, params.evaluator, params.paths,
                               seed=params.base.seed, report_dir=report, tracking_run=run,
                               cluster_wait_s=params.base.cluster_wait_s)  # fmt: skip
        run.set_tags({"comparable_to_paper": str(summary.comparable_to_paper).lower()})
        for path in summary.artifacts():
            run.log_artifact(path)
        run.log_artifacts(report / "samples", artifact_path="samples")
    return summary.describe(params.base.experiment, tracking.redact(tracking.tracking_uri()))


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", main))
