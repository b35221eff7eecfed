"""DVC stage `evaluate`: generation on the test split (Ray Data), scored by the offline
evaluator; metrics, sample WAVs/PNGs and a Fig. 6-style figure."""

import sys
from pathlib import Path

from pipeline import io, tracking
from pipeline.config import as_dict, load_params
from pipeline.evaluation.evaluate import run_evaluate
from pipeline.stage import stage_main


def main() -> str:
    params = load_params()
    report = Path(params.paths.reports) / "evaluate"
    logged = {"evaluate": as_dict(params.evaluate), "generate": as_dict(params.generate)}
    meta = io.read_json(Path(params.paths.transformer) / io.META_NAME)
    with tracking.stage_run("evaluate", params.base.experiment, logged, report) as run:
        # The train stage's MLflow run carries the same `train_run` tag (the Ray Train run name).
        run.set_tags({"train_run": meta.get("run_name", ""), "comparable_to_paper": "false"})
        summary = run_evaluate(params, report, run)
        paper = summary.metrics.get("paper_protocol", {}).values()
        comparable = bool(paper) and all(v["comparable_to_paper"] for v in paper)
        run.set_tags({"comparable_to_paper": str(comparable).lower()})
        figures = ("image2audio.png", "audio2image.png", "cogenerate.png", "confusion.png")
        for name in ("metrics.json", "per_class.csv", *figures):
            if (report / name).is_file():
                run.log_artifact(report / name)
        run.log_artifacts(report / "samples", artifact_path="samples")
    uri = tracking.redact(tracking.tracking_uri())
    return (
        f"evaluate: {summary.headline()}\n"
        f"  metrics: {report}/metrics.json (dvc metrics show)\n"
        f"  samples: {report}/samples/, figures: {report}/*.png, sweep: reports/sweep/\n"
        f"  MLflow: experiment {params.base.experiment!r} at {uri} "
        f"(visual-echoes compare; mlflow ui --backend-store-uri {uri})"
    )


if __name__ == "__main__":
    sys.exit(stage_main("evaluate", main))
