"""Files that other stages trust: atomic writes, sharded clip paths, Parquet tables, hashes.

A stage never leaves a half-written file under its final name: everything is written to a
temporary sibling and renamed into place (rename is atomic on POSIX within one filesystem).
Temporaries are created with the mode the umask gives (0644 files and 0755 folders under umask
022), as `open` and `mkdir` would: `tempfile`'s private 0600 / 0700 would follow the rename and
lock teammates out of every output on a shared file system.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import secrets
import shutil
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# Parquet settings fixed so that the same rows give the same bytes on every run.
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 3, "write_statistics": True}

TMP_PREFIX = ".tmp-"
# The JSON sidecar of every stage output (shards, checkpoints) that the next stage sizes
# itself from.
META_NAME = "meta.json"


def _create_unique(folder: Path, prefix: str, create: Callable[[Path], None]) -> Path:
    """`folder / (prefix + random hex)`, made by `create`, which must fail on an existing path."""
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(4)}"
        try:
            create(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name {prefix}... in {folder}")


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # less the umask


def make_temp_dir(out_dir: str | Path, kind: str = "new") -> Path:
    """An empty folder `.tmp-<name>.<kind>-XXXXXXXX` beside `out_dir` (its parent is created),
    mode 0777 less the umask, to build `out_dir` in and then `replace_dir` it into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return _create_unique(out_dir.parent, f"{TMP_PREFIX}{out_dir.name}.{kind}-", Path.mkdir)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    The temporary exists (empty) with mode 0666 less the umask; a writer that truncates or
    replaces it leaves that mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_unique(path.parent, f"{TMP_PREFIX}{path.name}.", _new_file)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON (stable bytes for DVC)."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write `rows` as CSV with a header of `columns` (keys not in it are left out), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_table(path: str | Path, table: pa.Table) -> None:
    """Write a Parquet file atomically with the fixed, reproducible settings."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **PARQUET_OPTIONS)


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file through one open handle: given a path, pyarrow opens it more than
    once, and a `write_table` replacing the file in between (the download manifest is rewritten
    while a run goes on) gave torn reads ("Page was smaller than expected")."""
    with open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporaries an interrupted run left below `folder`; returns how many."""
    count = 0
    for tmp in Path(folder).rglob(f"{TMP_PREFIX}*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            count += 1
    return count


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder `tmp` to `out_dir`, removing what was there (stale files too)."""
    old = None
    if out_dir.exists():
        old = make_temp_dir(out_dir, "old")
        os.replace(out_dir, old / "x")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


def clean_dir_leftovers(out_dir: Path) -> None:
    """Remove the `.new-`/`.old-` folders an interrupted `replace_dir` run left beside `out_dir`."""
    for prefix in (f"{TMP_PREFIX}{out_dir.name}.new-", f"{TMP_PREFIX}{out_dir.name}.old-"):
        for p in out_dir.parent.glob(f"{prefix}*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def shard_of(clip_id: str, width: int = 2) -> str:
    """A stable shard folder name for a clip: the first hex digits of its sha1.

    256 folders keep each under ~1000 files at VGGSound's 200k clips.
    """
    return hashlib.sha1(clip_id.encode()).hexdigest()[:width]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def inside(root: str | Path, path: str | Path) -> Path:
    """`path` resolved, after checking it stays inside `root` (guards untrusted names)."""
    root = Path(root).resolve()
    resolved = (root / path).resolve()
    if resolved != root and root not in resolved.parents:
        raise ValueError(f"{path!s} would leave {root}")
    return resolved


def tar_member_problem(member: tarfile.TarInfo) -> str | None:
    """Why `member` of a tar archive may not be unpacked (an absolute path, '..', a link, a
    device), or None for a plain file or folder that stays inside the folder unpacked into."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        return "would be written outside the folder it is unpacked into"
    if member.issym() or member.islnk():
        return "is a link"
    if not (member.isfile() or member.isdir()):
        return "is not a plain file or folder"
    return None


def extract_tar(tar: tarfile.TarFile, dest: Path) -> None:
    """Unpack `tar` into `dest`; a member with a `tar_member_problem` is refused with
    tarfile.TarError before anything is written. The check is ours, so that a Python without
    tarfile's data filter (Debian 12's 3.11.2; it came with 3.11.4) refuses the same; where the
    filter exists it runs as well and also drops permission bits and owners."""
    members = tar.getmembers()
    for member in members:
        problem = tar_member_problem(member)
        if problem:
            raise tarfile.TarError(f"member {member.name!r} {problem}")
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    tar.extractall(dest, members=members, **kwargs)
