"""DVC stage `tokenize`: every clip's 10 frames and mel to VQGAN ids with Ray Data (Parquet)."""

import sys
from pathlib import Path

from pipeline import io, tracking
from pipeline.config import as_dict, load_params
from pipeline.stage import stage_main
from pipeline.tokenizers.batch_tokenize import run_tokenize


def main() -> str:
    params = load_params()
    out, report = Path(params.paths.tokens), Path(params.paths.reports) / "tokenize"
    with tracking.stage_run(
        "tokenize", params.base.experiment, as_dict(params.tokenize), report, paths=params.paths
    ) as run:
        summary = run_tokenize(
            params.tokenize,
            Path(params.paths.extract),
            Path(params.paths.tokenizers),
            out,
            Path(params.paths.cache),
            cluster_wait_s=params.base.cluster_wait_s,
        )
        run.log_metrics(summary.metrics())
        io.write_json(report / "summary.json", summary.metrics())
    return summary.describe(out)


if __name__ == "__main__":
    sys.exit(stage_main("tokenize", main))
