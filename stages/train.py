"""DVC stage `train`: the masked generative transformer on the token ids, with Ray Train."""

import sys
from pathlib import Path

from pipeline import tracking
from pipeline.config import as_dict, load_params
from pipeline.stage import stage_main
from pipeline.training.ray_train import run_train


def main() -> str:
    params = load_params()
    out, report = Path(params.paths.transformer), Path(params.paths.reports) / "train"
    logged = {"model": as_dict(params.model), "train": as_dict(params.train)}
    with tracking.stage_run("train", params.base.experiment, logged, report) as run:
        summary = run_train(
            params.model,
            params.train,
            params.base.seed,
            Path(params.paths.tokens),
            Path(params.paths.tokenizers),
            out,
            report,
            tracking=run.handle(),
            cluster_wait_s=params.base.cluster_wait_s,
        )
        for name in ("loss.png", "reconstruction.png"):
            run.log_artifact(report / name)
        run.set_tags({"train_run": summary.run_name})
    return summary.describe()


if __name__ == "__main__":
    sys.exit(stage_main("train", main))
