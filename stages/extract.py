"""DVC stage `extract`: 10 frames and an 80x848 log-mel per clip, as Parquet shards."""

import sys
from pathlib import Path

from pipeline import io, tracking
from pipeline.config import as_dict, load_params
from pipeline.data.extract import run_extract
from pipeline.stage import stage_main


def main() -> str:
    params = load_params()
    cfg, out = params.extract, Path(params.paths.extract)
    report = Path(params.paths.reports) / "extract"
    with tracking.stage_run(
        "extract", params.base.experiment, as_dict(cfg), report, paths=params.paths
    ) as run:
        summary = run_extract(
            cfg,
            Path(params.paths.clips),
            out,
            Path(params.paths.cache),
            preview_path=report / "preview.png",
            cluster_wait_s=params.base.cluster_wait_s,
        )
        run.log_metrics(summary.metrics())
        run.log_artifact(report / "preview.png")
        io.write_json(report / "summary.json", summary.metrics())
    return summary.describe(out)


if __name__ == "__main__":
    sys.exit(stage_main("extract", main))
