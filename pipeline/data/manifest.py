"""The clip manifest: one row per clip, written by `download`, read by `extract`.

Every source (synthetic, vggsound, local) writes the same table to `<paths.clips>/manifest.parquet`,
sorted by clip_id. Only rows with status `ok` point at a complete, verified video file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa

from pipeline import io

MANIFEST_NAME = "manifest.parquet"
VIDEOS_DIR = "videos"

STATUSES = (
    "ok",
    "unavailable",
    "private",
    "removed",
    "age_restricted",
    "rate_limited",
    "bot_check",
    "http_error",
    "timeout",
    "other",
)

SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("youtube_id", pa.string()),
        ("start_s", pa.int32()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("path", pa.string()),
        ("size_bytes", pa.int64()),
        ("duration_s", pa.float64()),
        ("attempts", pa.int32()),
        ("node", pa.string()),
    ]
)


@dataclass
class ClipRecord:
    """One manifest row. `path` is relative to the clips folder; empty unless status is ok.
    `node`: the Ray node id of the downloader that settled the clip (`download.executor: ray`);
    empty when this machine did."""

    clip_id: str
    source: str
    label: str
    split: str
    status: str = "other"
    error: str = ""
    path: str = ""
    size_bytes: int = 0
    duration_s: float = 0.0
    attempts: int = 0
    youtube_id: str = ""
    start_s: int = 0
    node: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown clip status {self.status!r}")


def video_path(clip_id: str, ext: str = "mp4") -> str:
    """Where a clip's video lives, relative to the clips folder: videos/<shard>/<clip_id>.<ext>."""
    return f"{VIDEOS_DIR}/{io.shard_of(clip_id)}/{clip_id}.{ext}"


def write_manifest(clips_dir: str | Path, records: Iterable[ClipRecord]) -> Path:
    """Write the manifest atomically, sorted by clip_id."""
    rows = sorted((asdict(r) for r in records), key=lambda r: r["clip_id"])
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    path = Path(clips_dir) / MANIFEST_NAME
    io.write_table(path, table)
    return path


def read_manifest(clips_dir: str | Path) -> list[ClipRecord]:
    """The manifest's rows; an empty list when no manifest was written yet."""
    path = Path(clips_dir) / MANIFEST_NAME
    if not path.exists():
        return []
    names = {f.name for f in fields(ClipRecord)}
    return [
        ClipRecord(**{k: v for k, v in row.items() if k in names})
        for row in io.read_table(path).to_pylist()
    ]
