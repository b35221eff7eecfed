"""DVC stage `tokenizers`: import or train the image and audio VQGANs; set up the vocoder."""

import sys
from pathlib import Path

from pipeline import io, tracking
from pipeline.config import as_dict, load_params
from pipeline.stage import stage_main
from pipeline.tokenizers.build import run_tokenizers


def main() -> str:
    params = load_params()
    out, report = Path(params.paths.tokenizers), Path(params.paths.reports) / "tokenizers"
    with tracking.stage_run(
        "tokenizers", params.base.experiment, as_dict(params.tokenizers), report, paths=params.paths
    ) as run:
        summary = run_tokenizers(
            params.tokenizers,
            Path(params.paths.extract),
            out,
            report,
            seed=params.base.seed,
            log_metrics=run.log_metrics,
        )
        run.log_metrics(summary.metrics)
        run.set_tags({f"{m}_tokenizer": s for m, s in summary.sources.items()})
        for picture in summary.pictures:
            run.log_artifact(picture, artifact_path=picture.parent.name)
        io.write_json(report / "metrics.json", summary.metrics)
    return summary.describe(out)


if __name__ == "__main__":
    sys.exit(stage_main("tokenizers", main))
