"""DVC stage `download`: fetch (vggsound, local) or generate (synthetic) the clips."""

import sys
from pathlib import Path

from pipeline import io, tracking
from pipeline.config import as_dict, load_params
from pipeline.data.download import run_download
from pipeline.stage import stage_main


def main() -> str:
    params = load_params()
    cfg, clips = params.download, Path(params.paths.clips)
    report = Path(params.paths.reports) / "download"
    with tracking.stage_run(
        "download", params.base.experiment, as_dict(cfg), report, paths=params.paths
    ) as run:
        summary = run_download(
            cfg, clips, seed=params.base.seed, cluster_wait_s=params.base.cluster_wait_s
        )
        run.log_metrics(summary.metrics())
        run.set_tags({"source": summary.source, "yt_dlp": summary.ytdlp_version})
        io.write_json(report / "summary.json", summary.metrics())
    return summary.describe(clips)


if __name__ == "__main__":
    sys.exit(stage_main("download", main))
