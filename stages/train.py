"""DVC stage `train`: the masked generative transformer on the token ids, with Ray Train; the
model is also logged to MLflow with its tokenizers (`runs:/<run_id>/model`)."""

import sys
from pathlib import Path

from pipeline import bundle, tracking
from pipeline.config import as_dict, load_params
from pipeline.stage import stage_main
from pipeline.training.ray_train import run_train


def main() -> str:
    params = load_params()
    out, report = Path(params.paths.transformer), Path(params.paths.reports) / "train"
    tokenizers = Path(params.paths.tokenizers)
    logged = {"model": as_dict(params.model), "train": as_dict(params.train)}
    with tracking.stage_run(
        "train", params.base.experiment, logged, report, paths=params.paths
    ) as run:
        summary = run_train(
            params.model, params.train, params.base.seed, Path(params.paths.tokens),
            tokenizers, out, report, tracking=run.handle(),
            cluster_wait_s=params.base.cluster_wait_s,
        )  # fmt: skip
        for name in ("loss.png", "reconstruction.png"):
            run.log_artifact(report / name)
        run.set_tags({"train_run": summary.run_name})
        model_id = bundle.log_to(run, out, tokenizers, summary.steps)
    logged = f"; logged to MLflow as runs:/{run.run_id}/model" if model_id else ""
    return summary.describe() + logged


if __name__ == "__main__":
    sys.exit(stage_main("train", main))
