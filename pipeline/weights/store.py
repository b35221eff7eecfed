"""The weights folder: fetch an official file, verify it, unpack it, say what is there.

A file is installed only whole and verified. The body goes to `<download name>.part` in the
weights folder (pipeline.weights.download resumes it), is checked against everything its
project publishes (size, sha256 or its torch.hub prefix, md5, git blob id) and against the lock
file, and only then renamed to its final name; a tarball is unpacked into a temporary folder
beside its final one (members that are absolute, leave the folder, are links or devices are
refused) and swapped in. A download that does not verify is deleted and nothing changes under
the final name. Where no full sha256 is published, the first verified download records its
sha256 and size in the lock file, and every later download must match them (trust on first
use: that first download is only as good as what its project publishes about it).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import quote

from pipeline import io
from pipeline.config import Params
from pipeline.weights.download import ATTEMPTS, TIMEOUT_S, DownloadError, download
from pipeline.weights.registry import SHA_SHOWN, Lock, Weight, WeightsError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Digests:
    """Size and hashes of one file, computed in one pass."""

    size: int
    sha256: str
    md5: str
    git_blob_sha1: str

    def record(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}


def digests(path: Path) -> Digests:
    size = path.stat().st_size
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    blob = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)  # git's object id
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in (sha256, md5, blob):
                h.update(chunk)
    return Digests(size, sha256.hexdigest(), md5.hexdigest(), blob.hexdigest())


def _short(digest: str) -> str:
    return digest[:SHA_SHOWN]


def published_mismatches(d: Digests, w: Weight) -> list[str]:
    """How the download `d` differs from what `w`'s project publishes (empty: it does not)."""
    out = []
    if w.size and d.size != w.size:
        out.append(f"{d.size} bytes, not the published {w.size}")
    if w.sha256 and not d.sha256.startswith(w.sha256):
        out.append(f"sha256 {_short(d.sha256)} is not the published {_short(w.sha256)}")
    if w.md5 and d.md5 != w.md5:
        out.append(f"md5 {d.md5} is not the published {w.md5}")
    if w.git_blob_sha1 and d.git_blob_sha1 != w.git_blob_sha1:
        out.append(f"git blob id {d.git_blob_sha1} is not the published {w.git_blob_sha1}")
    return out


def recorded_mismatches(d: Digests, recorded: dict | None, lock: Lock) -> list[str]:
    """How `d` differs from what the lock file recorded (empty: nothing recorded, or equal)."""
    if recorded is None:
        return []
    out = []
    if d.size != recorded["size"]:
        out.append(f"{d.size} bytes, not the {recorded['size']} {lock.path.name} recorded")
    if d.sha256 != recorded["sha256"]:
        out.append(
            f"sha256 {_short(d.sha256)} is not the {_short(recorded['sha256'])} "
            f"{lock.path.name} recorded"
        )
    return out


def _published_checks(w: Weight) -> list[str]:
    sha = "sha256" if w.full_sha256 else "sha256 prefix"
    kinds = [("size", w.size), (sha, w.sha256), ("md5", w.md5), ("git blob id", w.git_blob_sha1)]
    return [f"published {k}" for k, v in kinds if v]


State = Literal["missing", "verified", "unverified", "wrong"]


@dataclass(frozen=True)
class FileState:
    state: State
    detail: str

    def __str__(self) -> str:
        return f"{self.state} ({self.detail})" if self.detail else self.state


def file_state(path: Path, w: Weight, lock: Lock) -> FileState:
    """Whether the file the params read for `w` is at `path` and is the official one."""
    if not path.is_file():
        return FileState("missing", "")
    d = digests(path)
    recorded = lock.recorded(w.name, "file")
    problems = recorded_mismatches(d, recorded, lock)
    checks = [f"{lock.path.name}"] if recorded else []
    if not w.archive:  # what is published describes the download, here the file itself
        problems += published_mismatches(d, w)
        checks = _published_checks(w) + checks
    if problems:
        return FileState("wrong", "; ".join(problems))
    if not checks:
        return FileState(
            "unverified", f"sha256 {_short(d.sha256)}; no published or recorded hash to check"
        )
    return FileState("verified", f"sha256 {_short(d.sha256)}: {', '.join(checks)}")


def mirror_url(mirror: str, w: Weight) -> str:
    """Where a mirror holds `w`: <mirror>/<name>/<download name>."""
    return f"{mirror.rstrip('/')}/{w.name}/{quote(w.download_name)}"


# ------------------------------------------------------------------------------------- unpacking


def _check_member(member: tarfile.TarInfo, folder: str, archive: str) -> None:
    path = PurePosixPath(member.name)
    where = f"{archive}: member {member.name!r}"
    problem = io.tar_member_problem(member)
    if problem:
        raise WeightsError(f"{where} {problem}; refused")
    if not path.parts or path.parts[0] != folder:
        raise WeightsError(f"{where} lies outside {folder}/; refused")


def _extract(archive: Path, staging: Path, w: Weight) -> None:
    """Unpack `archive` into `staging` after checking every member (see _check_member)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                _check_member(member, w.folder, w.archive)
            io.extract_tar(tar, staging)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise WeightsError(f"{w.archive}: not a readable tar archive ({err})") from None
    if not (staging / w.file).is_file():
        raise WeightsError(f"{w.archive} holds no {w.file}")


# ----------------------------------------------------------------------------------------- fetch


@dataclass(frozen=True)
class FetchOptions:
    """How `fetch` downloads: from a mirror instead of the official URLs, timeouts, attempts."""

    mirror: str = ""
    timeout_s: float = TIMEOUT_S
    attempts: int = ATTEMPTS
    force: bool = False


def _download_verified(w: Weight, url: str, part: Path, lock: Lock, opts: FetchOptions, echo: Callable[[str], None]) -> Digests:  # fmt: skip
    """Download `url` into `part` and check it; a part that fails is deleted (and, when it was
    resumed from an earlier run, fetched once more from the start)."""
    resumed = part.is_file() and part.stat().st_size > 0
    while True:
        try:
            download(url, part, timeout_s=opts.timeout_s, attempts=opts.attempts, desc=w.name)
        except DownloadError as err:
            raise DownloadError(f"{w.name}: {err}") from None
        d = digests(part)
        against_lock = recorded_mismatches(d, lock.recorded(w.name, "download"), lock)
        problems = published_mismatches(d, w) + against_lock
        if not problems:
            return d
        part.unlink(missing_ok=True)
        if not resumed:
            hint = (
                f" (if its project replaced the file on purpose, remove {w.name} from "
                f"{lock.path.name} and fetch again)"
                if against_lock
                else ""
            )
            raise WeightsError(
                f"{w.name}: the download from {url} is not the official file "
                f"({'; '.join(problems)}); it was deleted and nothing was installed{hint}"
            )
        echo(f"{w.name}: the partial download kept from an earlier run did not verify; "
             "downloading again from the start")  # fmt: skip
        resumed = False


def _install_archive(w: Weight, part: Path, dest: Path, lock: Lock, got: Digests, record: bool) -> None:  # fmt: skip
    """Unpack the verified tarball `part` beside `dest / w.folder` and swap it in; a tarball
    that is refused (a bad member, no `w.file`, not the recorded file) is deleted."""
    staging = Path(tempfile.mkdtemp(prefix=f"{io.TMP_PREFIX}{w.folder}.new-", dir=dest))
    try:
        _extract(part, staging, w)
        inner = digests(staging / w.file)
        problems = recorded_mismatches(inner, lock.recorded(w.name, "file"), lock)
        if problems:
            raise WeightsError(
                f"{w.name}: {w.file} in the verified {w.archive} is not the one recorded "
                f"({'; '.join(problems)}); nothing was installed"
            )
        if record:
            lock.record(w.name, w.url, got.record(), inner.record())
        io.replace_dir(staging / w.folder, dest / w.folder)
    except WeightsError:
        part.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    part.unlink()


def fetch_one(w: Weight, dest: Path, lock: Lock, opts: FetchOptions, echo: Callable[[str], None]) -> FileState:  # fmt: skip
    """Install `w` under `dest` whole and verified (see the module docstring); says what
    happened through `echo` and returns the state of the file now."""
    final = dest / w.file
    before = file_state(final, w, lock)
    if not opts.force and before.state == "verified":
        echo(f"{w.name}: {final} is there, {before}")
        return before
    if not opts.force and before.state == "unverified":
        echo(f"{w.name}: {final} is there but {before.detail}; --force downloads it again to "
             "record its hash")  # fmt: skip
        return before
    url = mirror_url(opts.mirror, w) if opts.mirror else w.url
    part = dest / (w.archive + ".part" if w.archive else w.file + ".part")
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
        got = _download_verified(w, url, part, lock, opts, echo)
        # The first verified download is recorded unless a full sha256 is published for the
        # file itself (for a tarball, the file inside has no published hash at all).
        record = (w.archive or not w.full_sha256) and lock.recorded(w.name, "download") is None
        if w.archive:
            _install_archive(w, part, dest, lock, got, record)
        else:
            if record:
                lock.record(w.name, w.url, got.record(), got.record())
            os.replace(part, final)
    except OSError as err:  # the folder or the disk (full, read-only), not the download
        raise WeightsError(f"{w.name}: cannot write in {dest}: {err.strerror or err}") from None
    after = file_state(final, w, lock)
    how = "replaced a file that did not verify; " if before.state == "wrong" else ""
    echo(f"{w.name}: {final} fetched, {how}{after}")
    return after


def fetch(
    weights: Sequence[Weight],
    dest: str | Path,
    lock: Lock,
    opts: FetchOptions = FetchOptions(),
    echo: Callable[[str], None] = print,
) -> str:
    """Fetch each of `weights` into `dest`, going on past failures; raises WeightsError naming
    every failure at the end. Returns the closing line."""
    dest = Path(dest)
    failed: list[str] = []
    states: list[str] = []
    for w in weights:
        try:
            states.append(fetch_one(w, dest, lock, opts, echo).state)
        except WeightsError as err:
            failed.append(str(err))
    if failed:
        if len(failed) == 1:
            raise WeightsError(failed[0])
        raise WeightsError(f"{len(failed)} of {len(weights)} files failed: {'; '.join(failed)}")
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("verified", "unverified") if s in states)
    return f"{len(weights)} official file(s) in {dest}/: {counts}"


# ------------------------------------------------------------------------------ what is there


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n else "—"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def list_table(registry: dict[str, Weight], dest: str | Path, lock: Lock) -> str:
    """The Markdown table of `visual-echoes weights list`."""
    rows = []
    for w in registry.values():
        recorded = lock.recorded(w.name, "download")
        if w.sha256:
            sha = f"{_short(w.sha256)}" + ("" if w.full_sha256 else " (prefix)")
        elif recorded:
            sha = f"{_short(recorded['sha256'])} (lock)"
        else:
            sha = "—"
        size = _size(w.size or (recorded or {}).get("size", 0))
        other = [f"{k} {_short(v)}" for k, v in (("md5", w.md5), ("git blob", w.git_blob_sha1)) if v]  # fmt: skip
        here = file_state(Path(dest) / w.file, w, lock).state
        rows.append([w.name, w.used_by, f"`{w.params_key}`", w.file, w.url, size, sha, ", ".join(other) or "—", here])  # fmt: skip
    header = ["name", "used by", "params key", f"file under {dest}/", "source", "size", "sha256", "other hashes", "here"]  # fmt: skip
    return _table(header, rows)


def check_dir(weights: Sequence[Weight], dest: str | Path, lock: Lock) -> tuple[str, str]:
    """(report, problem): a line per file under `dest` (missing, verified, unverified or
    wrong), and one sentence when a file there is not the official one ('' when none is)."""
    states = {w.name: file_state(Path(dest) / w.file, w, lock) for w in weights}
    report = "\n".join(f"{w.name}: {Path(dest) / w.file}: {states[w.name]}" for w in weights)
    wrong = [name for name, s in states.items() if s.state == "wrong"]
    if not wrong:
        return report, ""
    return report, (
        f"{', '.join(wrong)}: not the official file(s); `visual-echoes weights fetch --force "
        f"{' '.join(wrong)}` downloads them again"
    )


def params_report(
    params: Params, registry: dict[str, Weight], lock: Lock, root: str | Path = "."
) -> tuple[str, str]:
    """(report, problem) for `visual-echoes check`: a line per weight file the params point at
    (relative paths are taken from `root`, where the stages run), and one sentence when any of
    them is missing or not the official file ('' when none is)."""
    lines, bad = [], []
    for w in registry.values():
        value = functools.reduce(getattr, w.params_key.split("."), params)
        if not value:
            continue
        state = file_state(Path(root) / value, w, lock)
        lines.append(f"  {w.params_key}: {value}: {state}")
        if state.state in ("missing", "wrong"):
            bad.append(f"{w.params_key} ({state.state})")
    if not lines:
        return "weight files: none set in the params", ""
    report = "weight files the params point at:\n" + "\n".join(lines)
    if not bad:
        return report, ""
    return report, (
        f"{len(bad)} weight file(s) the params point at are missing or not the official ones: "
        f"{', '.join(bad)}; `visual-echoes weights fetch --all` downloads and verifies them"
    )
