"""DVC stage `evaluator`: the offline evaluator (audio + image classifiers, contrastive heads)
trained on the extracted train split and checked on the test split."""

import sys
from pathlib import Path

from pipeline import tracking
from pipeline.config import as_dict, load_params
from pipeline.evaluation.train_local import run_evaluator
from pipeline.stage import stage_main


def main() -> str:
    params = load_params()
    cfg, out = params.evaluator, Path(params.paths.evaluator)
    report = Path(params.paths.reports) / "evaluator"
    with tracking.stage_run(
        "evaluator", params.base.experiment, as_dict(cfg), report, paths=params.paths
    ) as run:
        summary = run_evaluator(
            cfg,
            Path(params.paths.extract),
            Path(params.paths.tokenizers),
            out,
            report,
            seed=params.base.seed,
            meta={"git_commit": tracking.git_commit()},
        )
        run.log_metrics(summary.metrics)
        run.log_artifact(report / "evaluator.png")
    return summary.describe(out)


if __name__ == "__main__":
    sys.exit(stage_main("evaluator", main))
