"""The `local` source: a folder of the user's own videos and a labels CSV.

The CSV has a header `file,label[,split]`; `file` is relative to `videos_dir`. Names and labels
are untrusted: a file must resolve inside `videos_dir` (symlinks included), the clip id is the
file name reduced to `[A-Za-z0-9_-]` plus 8 hex digits of the path's sha1 (so two names that
sanitise alike stay distinct), and labels pass `vggsound.clean_label`. Without a split column,
a file goes to `test` when the sha1 of its path is 0 mod 10, else to `train` (90/10, stable).
Good files are probed, then copied atomically to `videos/<shard>/<clip_id>.mp4` (a copy, not a
hard link: DVC may make its outputs read-only, which must not touch the user's originals).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipeline import io
from pipeline.config import DownloadConfig
from pipeline.data.download import DownloadError, select_clips, verify_clip
from pipeline.data.manifest import ClipRecord, video_path
from pipeline.data.vggsound import SPLITS, Rejected, clean_label
from pipeline.media import MediaError

log = logging.getLogger(__name__)

SOURCE = "local"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_STEM_CHARS = 48


@dataclass(frozen=True)
class LocalEntry:
    """One row of the labels CSV: the file as written, its clip id, label and split."""

    file: str
    clip_id: str
    label: str
    split: str
    line: int


def local_clip_id(file: str) -> str:
    """A safe, unique clip id for `file`: sanitised stem + '_' + 8 hex digits of sha1(path)."""
    norm = PurePosixPath(file.replace("\\", "/")).as_posix()
    stem = _UNSAFE.sub("_", PurePosixPath(norm).stem).strip("_")[:MAX_STEM_CHARS] or "clip"
    return f"{stem}_{hashlib.sha1(norm.encode()).hexdigest()[:8]}"


def default_split(file: str) -> str:
    """`test` for about 1 file in 10 (by sha1 of the path), else `train`; never random."""
    digest = hashlib.sha1(f"split:{PurePosixPath(file.replace(chr(92), '/')).as_posix()}".encode())
    return "test" if int(digest.hexdigest(), 16) % 10 == 0 else "train"


def read_labels(path: str | Path) -> tuple[list[LocalEntry], list[Rejected]]:
    """Parse the labels CSV; bad rows are returned as `Rejected` (line number, reason).

    Raises `DownloadError` when the header lacks `file` or `label`.
    """
    path = Path(path)
    entries: list[LocalEntry] = []
    rejected: list[Rejected] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip().lower() for h in reader.fieldnames or []]
        if "file" not in header or "label" not in header:
            raise DownloadError(f"{path}: the header must be 'file,label[,split]'")
        reader.fieldnames = header
        for row in reader:
            line = reader.line_num
            try:
                entry = _entry(row, line)
            except ValueError as err:
                rejected.append(Rejected(line, ascii(row)[:60], f"line {line}: {err}"))
                continue
            if entry.clip_id in seen:
                rejected.append(
                    Rejected(
                        line,
                        ascii(entry.file)[:60],
                        f"line {line}: duplicate of line {seen[entry.clip_id]}",
                    )
                )
                continue
            seen[entry.clip_id] = line
            entries.append(entry)
    return entries, rejected


def download_local(
    cfg: DownloadConfig, clips_dir: str | Path, *, previous: list[ClipRecord]
) -> list[ClipRecord]:
    """Copy the selected videos of `cfg.local` into `clips_dir`; one record per selected row.

    A clip already `ok` with its file in place is not copied again. A file outside
    `videos_dir`, missing, or without both video and audio gets a non-ok record with the reason.
    Raises `DownloadError` for a missing folder or CSV and an empty selection.
    """
    lcfg = cfg.local
    clips_dir = Path(clips_dir)
    if not lcfg.videos_dir or not Path(lcfg.videos_dir).is_dir():
        raise DownloadError(f"download.local.videos_dir: {lcfg.videos_dir!r} is not a folder")
    if not lcfg.labels_csv or not Path(lcfg.labels_csv).is_file():
        raise DownloadError(f"download.local.labels_csv: {lcfg.labels_csv!r} does not exist")
    entries, rejected = read_labels(lcfg.labels_csv)
    for bad in rejected:
        log.warning("%s: skipped %s", lcfg.labels_csv, bad.reason)
    selected = select_clips(
        sorted(entries, key=lambda e: e.clip_id),
        splits=cfg.splits,
        classes=cfg.classes,
        limit=cfg.limit,
        source=lcfg.labels_csv,
    )
    io.remove_stale_temporaries(clips_dir)
    prev = {r.clip_id: r for r in previous}
    records = [
        _import(entry, Path(lcfg.videos_dir), clips_dir, prev.get(entry.clip_id))
        for entry in tqdm(selected, desc="local", unit="clip", mininterval=1.0)
    ]
    ok = sum(r.status == "ok" for r in records)
    log.info("local: %d of %d clips ok, %d rows rejected", ok, len(records), len(rejected))
    return records


def _entry(row: dict[str, str | None], line: int) -> LocalEntry:
    file = (row.get("file") or "").strip()
    if not file:
        raise ValueError("file is empty")
    if any(ord(ch) < 32 for ch in file):
        raise ValueError("file name contains control characters")
    label = clean_label(row.get("label") or "")
    split = (row.get("split") or "").strip().lower() or default_split(file)
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not 'train' or 'test'")
    return LocalEntry(file, local_clip_id(file), label, split, line)


def _import(
    entry: LocalEntry, videos_dir: Path, clips_dir: Path, prev: ClipRecord | None
) -> ClipRecord:
    """Check, probe and copy one file; the record says `ok` or why not."""
    final = clips_dir / video_path(entry.clip_id)

    def record(status: str, error: str = "", **fields: object) -> ClipRecord:
        attempts = (prev.attempts if prev else 0) + 1
        return ClipRecord(
            clip_id=entry.clip_id,
            source=SOURCE,
            label=entry.label,
            split=entry.split,
            status=status,
            error=error,
            attempts=attempts,
            **fields,
        )

    if prev and prev.status == "ok" and final.is_file() and prev.size_bytes == final.stat().st_size:
        return replace(prev, label=entry.label, split=entry.split)
    try:
        src = io.inside(videos_dir, entry.file)
    except ValueError:
        return record("other", f"{entry.file!r} is outside download.local.videos_dir")
    if not src.is_file():
        return record("unavailable", f"{entry.file!r} does not exist")
    try:
        info = verify_clip(src, expected_s=None)
    except MediaError as err:
        return record("other", str(err))
    with io.atomic_path(final) as tmp:
        shutil.copyfile(src, tmp)
    return record(
        "ok",
        path=video_path(entry.clip_id),
        size_bytes=final.stat().st_size,
        duration_s=float(info.duration_s or 0.0),
    )
