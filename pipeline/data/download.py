"""The download stage: VGGSound sections from YouTube with yt-dlp, and the dispatcher over sources.

`run_download` reads the previous manifest, calls the configured source (synthetic, vggsound or
local), writes `<clips>/manifest.parquet` and returns a `DownloadSummary`.

`download_vggsound` fetches 10-s sections with the yt-dlp Python API in a thread pool. Each clip is
written inside `<clips>/.tmp-download/`, verified (video + audio, 10 s ± 1.5 s), then renamed to
`videos/<shard>/<clip_id>.mp4`; only then is it `ok`. Failures are classified into the manifest
statuses; transient ones are retried, rate limits and bot checks pause every worker, and a server
that no longer answers at all (connection refused, no route, DNS) ends the run with its progress
saved instead of marking every remaining clip failed. The manifest is saved every few completions
so that a killed run resumes where it stopped. With `download.executor: ray` the same workers run
on each node of a Ray cluster, one rate gate per node (`pipeline.data.download_ray`).

yt-dlp and ffprobe: yt-dlp's check "is ffmpeg available" (`FFmpegFD.available`) ignores the
`ffmpeg_location` parameter and looks on $PATH, so with only the imageio-ffmpeg binary a section
download fails with "ffmpeg is not installed". The yt-dlp CLI sets the context variable
`FFmpegPostProcessor._ffmpeg_location` for this; each worker thread sets it the same way. ffprobe is
not needed: the section download is one `ffmpeg -ss S -t 10 -i URL -c copy` call (no fix-up
post-processor runs on it), and the verification uses `pipeline.media.probe`.
"""

from __future__ import annotations

import dataclasses
import difflib
import email.utils
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tqdm import tqdm

from pipeline import io
from pipeline.config import DownloadConfig, VGGSoundConfig
from pipeline.data import manifest
from pipeline.data.manifest import ClipRecord, video_path
from pipeline.data.vggsound import VGGSoundEntry, read_list, video_url
from pipeline.errors import PipelineError
from pipeline.media import MediaError, Probe, ffmpeg_exe, probe

log = logging.getLogger(__name__)

CLIP_SECONDS = 10
DURATION_TOLERANCE_S = 1.5
WORK_DIR = ".tmp-download"
SAVE_EVERY_CLIPS = 25  # manifest checkpoint: after this many finished clips ...
SAVE_EVERY_S = 60.0  # ... or this many seconds, whichever comes first
RETRY_DELAY_S = 2.0  # pause before transient retry n is n * RETRY_DELAY_S
ERROR_CHARS = 500

# Statuses that describe our session, not the clip: pause everyone, and retry on the next run.
SESSION_STATUSES = ("rate_limited", "bot_check")


class DownloadError(PipelineError, RuntimeError):
    """A download problem the user can fix (missing list, empty selection); one sentence."""


class ClipVerifyError(MediaError):
    """A downloaded file that is not a complete 10-s clip with video and audio."""


class SectionOutOfRangeError(MediaError):
    """The video is too short for the requested section (permanent, not worth a retry)."""


# ------------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class DownloadSummary:
    """What a download run produced, for the stage's JSON report and MLflow."""

    source: str
    clips: int
    ok: int
    failed: int
    by_status: dict[str, int]
    by_split: dict[str, dict[str, int]]
    seconds: float
    ytdlp_version: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat numeric view: clips, ok, failed, status_<s>, <split>_ok, seconds."""
        out: dict[str, float] = {
            "clips": self.clips,
            "ok": self.ok,
            "failed": self.failed,
            "seconds": self.seconds,
        }
        out.update({f"status_{s}": n for s, n in self.by_status.items()})
        out.update({f"{split}_ok": c.get("ok", 0) for split, c in self.by_split.items()})
        return out

    def describe(self, clips_dir: str | Path) -> str:
        """One line for the end of the stage: counts, reasons, time, where the manifest is."""
        failed = {s: n for s, n in self.by_status.items() if s != "ok"}
        return (
            f"download ({self.source}): {self.ok} of {self.clips} clips ok"
            f"{f' ({_counts(failed)})' if failed else ''} in {self.seconds:.1f} s -> "
            f"{Path(clips_dir) / manifest.MANIFEST_NAME}"
        )


def summarize(source: str, records: Sequence[ClipRecord], seconds: float) -> DownloadSummary:
    """Counts by status and by split of `records`."""
    by_status = Counter(r.status for r in records)
    by_split: dict[str, Counter[str]] = {}
    for r in records:
        by_split.setdefault(r.split, Counter())[r.status] += 1
    return DownloadSummary(
        source=source,
        clips=len(records),
        ok=by_status.get("ok", 0),
        failed=len(records) - by_status.get("ok", 0),
        by_status=dict(sorted(by_status.items())),
        by_split={s: dict(sorted(c.items())) for s, c in sorted(by_split.items())},
        seconds=round(seconds, 3),
        ytdlp_version=ytdlp_version(),
    )


def ytdlp_version() -> str:
    """The installed yt-dlp version, or '' when yt-dlp is missing."""
    try:
        from yt_dlp.version import __version__
    except ImportError:  # pragma: no cover - a declared dependency
        return ""
    return __version__


# ---------------------------------------------------------------------------------- dispatcher


def run_download(
    cfg: DownloadConfig, clips_dir: str | Path, *, seed: int, cluster_wait_s: float = 0.0
) -> DownloadSummary:
    """Produce the clips of `cfg.source` in `clips_dir` and write its manifest.

    Resumes from the manifest already in `clips_dir`. Raises `DownloadError` for a problem the
    user can fix and when not a single clip ends up `ok`. `cluster_wait_s`: how long
    `executor: ray` waits for an autoscaler to add the `ray.nodes` it asks for.
    """
    started = time.monotonic()
    clips_dir = Path(clips_dir)
    clips_dir.mkdir(parents=True, exist_ok=True)
    previous = manifest.read_manifest(clips_dir)
    if cfg.source == "vggsound":
        records = download_vggsound(
            cfg, clips_dir, previous=previous, cluster_wait_s=cluster_wait_s
        )
    elif cfg.source == "local":
        from pipeline.data.local import download_local

        records = download_local(cfg, clips_dir, previous=previous)
    else:
        from pipeline.data.synthetic import generate_dataset

        records = generate_dataset(
            cfg.synthetic,
            clips_dir,
            seed=seed,
            splits=cfg.splits,
            classes=cfg.classes,
            limit=cfg.limit,
            previous=previous,
        )
    manifest.write_manifest(clips_dir, records)
    _note_other_sources(clips_dir, records)
    summary = summarize(cfg.source, records, time.monotonic() - started)
    log.info("%s", summary.describe(clips_dir))
    if summary.ok == 0:
        raise DownloadError(
            f"no clip of source {cfg.source!r} could be obtained; the reasons are "
            f"in {clips_dir / manifest.MANIFEST_NAME}"
        )
    return summary


def _note_other_sources(clips_dir: Path, records: Sequence[ClipRecord]) -> None:
    """Say how many clip files no record of this run names (an earlier source's): they are kept,
    so that switching back fetches nothing twice, and never read, since every later stage
    reads the manifest's clips only."""
    named = {r.path for r in records if r.path}
    videos = clips_dir / manifest.VIDEOS_DIR
    others = [p for p in videos.rglob("*") if p.is_file()] if videos.is_dir() else []
    others = [p for p in others if p.relative_to(clips_dir).as_posix() not in named]
    if others:
        log.info(
            "%d clip files in %s are not in this source's manifest (an earlier source's); "
            "later stages ignore them",
            len(others),
            videos,
        )


# ----------------------------------------------------------------------------------- selection


class Selectable(Protocol):
    @property
    def clip_id(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def split(self) -> str: ...


T = TypeVar("T", bound=Selectable)


def select_clips(
    items: Iterable[T], *, splits: Sequence[str], classes: Sequence[str], limit: int, source: str
) -> list[T]:
    """Items of the wanted splits and classes, in the given order, then the first `limit` (0:
    all). Every source selects with this: VGGSound and local lists pass their rows sorted by
    clip id, the synthetic set its class-balanced order.

    Raises `DownloadError` for a class that is no label of `source` (a typo would otherwise
    select nothing, or less than meant) and when nothing is left.
    """
    items = list(items)
    labels = sorted({x.label for x in items})
    for name in classes:
        if name not in labels:
            close = difflib.get_close_matches(name, labels, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = f" (its labels: {'; '.join(labels)})" if len(labels) <= 20 else ""
            raise DownloadError(
                f"download.classes: {name!r} is not a label of {source}{hint}{known}"
            )
    wanted = set(classes)
    kept = [x for x in items if x.split in splits and (not wanted or x.label in wanted)]
    if limit:
        kept = kept[:limit]
    if not kept:
        raise DownloadError(
            f"{source} has no clip left after keeping splits {list(splits)} and "
            f"classes {list(classes) or 'all'}"
        )
    return kept


# ------------------------------------------------------------------------------ classification


@dataclass(frozen=True)
class Failure:
    """A classified download error: manifest status, whether to retry, optional Retry-After."""

    status: str
    transient: bool
    message: str
    retry_after_s: float | None = None
    offline: bool = False  # nothing answers at all: says nothing about the clip


# Message rules, checked in order on the lower-cased text of the whole exception chain.
_RULES: tuple[tuple[str, bool, tuple[str, ...]], ...] = (
    ("bot_check", False, ("not a bot", "captcha", "unusual traffic")),
    ("rate_limited", True, ("too many requests", "rate-limit", "rate limit", "try again later")),
    (
        "age_restricted",
        False,
        ("confirm your age", "age-restricted", "age restricted", "inappropriate for some users"),
    ),
    ("private", False, ("private video", "video is private")),
    ("unavailable", False, ("in your country", "geo restrict", "geo-restrict")),
    (
        "removed",
        False,
        ("has been removed", "been terminated", "removed by the uploader", "no longer available"),
    ),
    (
        "unavailable",
        False,
        (
            "video unavailable",
            "not available",
            "isn't available",
            "does not exist",
            "unsupported url",
        ),
    ),
)
_HTTP_CODE = re.compile(r"(?:http error|server returned)\s*(\d{3})")
# No server at all (it vanished, the network or DNS is down): stop the run, retry next time.
_OFFLINE = (
    "connection refused",
    "network is unreachable",
    "no route to host",
    "name or service not known",
    "temporary failure in name resolution",
    "nodename nor servname",
)
_DROPPED = (
    "connection reset",
    "connection aborted",
    "remote end closed",
    "remotedisconnected",
    "broken pipe",
    "incomplete read",
    "bytes read",
    "transport endpoint",
    "unexpected eof",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def classify_error(err: BaseException) -> Failure:
    """Map an exception from yt-dlp (or the verification) to a manifest status.

    404/410 count as `unavailable` (the video is not there), other HTTP codes as `http_error`
    (5xx, 403 and dropped connections are transient), 429 as `rate_limited`, timeouts as
    `timeout`; an incomplete file and an ffmpeg failure are transient `other`, a section past
    the end of the video a permanent `other`. A refused connection or an unknown host is a
    transient `http_error` marked `offline`: the server is gone, not the clip.
    """
    chain = _chain(err)
    parts: list[str] = []
    for e in chain:  # yt-dlp repeats the cause inside each wrapper's message: keep new text only
        part = " ".join(_ANSI.sub("", str(e)).replace("ERROR: ", "").split())
        if part and not any(part in p for p in parts):
            parts.append(part)
    text = " | ".join(parts)
    message = text[:ERROR_CHARS]
    low = text.lower()
    code = next((c for c in (_http_status(e) for e in chain) if c is not None), None)
    if code is None and (m := _HTTP_CODE.search(low)):
        code = int(m[1])
    retry_after = next((r for r in (_retry_after(e) for e in chain) if r is not None), None)
    if code == 429:
        return Failure("rate_limited", True, message, retry_after)
    for status, transient, needles in _RULES:
        if any(n in low for n in needles):
            return Failure(status, transient, message, retry_after)
    if code in (404, 410):
        return Failure("unavailable", False, message)
    if code is not None:
        return Failure("http_error", code >= 500 or code in (403, 408), message)
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or any(n in low for n in _OFFLINE):
        return Failure("http_error", True, message, offline=True)
    if any(isinstance(e, (TimeoutError, socket.timeout)) for e in chain) or "timed out" in low:
        return Failure("timeout", True, message)
    if any(isinstance(e, ConnectionError) for e in chain) or any(n in low for n in _DROPPED):
        return Failure("http_error", True, message)
    if any(isinstance(e, ClipVerifyError) for e in chain) or "ffmpeg exited with code" in low:
        return Failure("other", True, message)
    return Failure("other", False, message)


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and its causes: yt-dlp's `exc_info` and `cause`, then `__cause__`/`__context__`."""
    out: list[BaseException] = []
    todo: list[object] = [err]
    while todo and len(out) < 8:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is seen for seen in out):
            continue
        out.append(e)
        exc_info = getattr(e, "exc_info", None)
        todo += [
            exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) > 1 else None,
            getattr(e, "cause", None),
            e.__cause__,
            e.__context__,
        ]
    return out


def _http_status(err: BaseException) -> int | None:
    status = getattr(err, "status", None)
    if status is None:
        status = getattr(err, "code", None)
    return status if isinstance(status, int) and 100 <= status <= 599 else None


def _retry_after(err: BaseException) -> float | None:
    """Seconds from a Retry-After header on an HTTP error's response (delta or HTTP date)."""
    headers = getattr(getattr(err, "response", None), "headers", None)
    if headers is None:
        headers = getattr(err, "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    value = str(value).strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ---------------------------------------------------------------------------------- rate gate


class RateGate:
    """Pauses every worker after a rate limit or bot check, with exponential back-off.

    A worker calls `wait()` before each attempt (it blocks while a pause lasts) and keeps the
    returned epoch; on a rate limit it calls `trip(epoch, retry_after_s)`. Several workers hitting
    the same wave count once (same epoch). The pause doubles from `backoff_s` up to
    `max_backoff_s`, at least Retry-After (capped at `max_backoff_s`); `clear()` after a success
    starts over. A rate limit right after a full `max_backoff_s` pause makes `trip` return False:
    the caller should stop the run.
    """

    def __init__(self, backoff_s: float, max_backoff_s: float) -> None:
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._cond = threading.Condition()
        self._resume_at = 0.0
        self._epoch = 0
        self._next = backoff_s
        self._at_max = False
        self._exhausted = False
        self.pauses = 0
        self.paused_s = 0.0

    def wait(self, stop: threading.Event | None = None) -> int:
        """Block while a pause is on (or until `stop` is set); return the current epoch."""
        with self._cond:
            while (left := self._resume_at - time.monotonic()) > 0 and not (stop and stop.is_set()):
                self._cond.wait(min(left, 0.5))
            return self._epoch

    def trip(self, epoch: int, retry_after_s: float | None = None) -> bool:
        """Start a pause for a rate limit seen by an attempt begun at `epoch`; False: give up."""
        with self._cond:
            if epoch != self._epoch:
                return not self._exhausted
            if self._at_max:
                self._exhausted = True
                return False
            pause = min(max(self._next, retry_after_s or 0.0), self.max_backoff_s)
            self._at_max = self._next >= self.max_backoff_s
            self._next = min(self._next * 2, self.max_backoff_s)
            self._epoch += 1
            self._resume_at = time.monotonic() + pause
            self.pauses += 1
            self.paused_s += pause
            log.warning("rate limited: pausing all workers for %.1f s", pause)
            self._cond.notify_all()
            return True

    def clear(self) -> None:
        """A success: the next rate limit starts again from `backoff_s`."""
        with self._cond:
            self._next, self._at_max = self.backoff_s, False


# ------------------------------------------------------------------------------------ vggsound


def download_vggsound(
    cfg: DownloadConfig,
    clips_dir: str | Path,
    *,
    previous: list[ClipRecord],
    cluster_wait_s: float = 0.0,
) -> list[ClipRecord]:
    """Download the selected VGGSound clips into `clips_dir`; one record per selected clip.

    Clips already `ok` with their file in place are not fetched again; clips a previous run
    recorded as failed are retried only with `cfg.retry_failed` (rate limits and bot checks are
    always retried). A final file without a record is verified and recorded. Raises
    `DownloadError` for a missing or empty list, and (after saving the manifest) when rate
    limiting outlasts the longest back-off.
    """
    vcfg = cfg.vggsound
    clips_dir = Path(clips_dir)
    entries = _read_entries(cfg)
    if vcfg.cookiefile and not Path(vcfg.cookiefile).is_file():
        raise DownloadError("download.vggsound.cookiefile does not point to a file")
    selected = select_clips(
        sorted(entries, key=lambda e: e.clip_id),
        splits=cfg.splits,
        classes=cfg.classes,
        limit=cfg.limit,
        source=vcfg.csv,
    )
    shutil.rmtree(clips_dir / WORK_DIR, ignore_errors=True)
    stale = io.remove_stale_temporaries(clips_dir)
    if stale:
        log.info("removed %d temporaries of an interrupted run", stale)
    records, todo = plan_fetch(selected, previous, clips_dir, retry_failed=cfg.retry_failed)
    log.info(
        "vggsound: %d clips selected, %d already done, %d to fetch with %d workers%s",
        len(selected),
        len(records),
        len(todo),
        vcfg.workers,
        " per node" if cfg.executor == "ray" else "",
    )
    by_id = {r.clip_id: r for r in previous}
    try:
        if cfg.executor == "ray":
            from pipeline.data.download_ray import fetch_on_nodes

            report = fetch_on_nodes(cfg, todo, clips_dir, by_id, records, cluster_wait_s)
        else:
            run = FetchRun(vcfg, clips_dir, by_id)
            try:
                _fetch_all(todo, run, records)
            finally:
                run.close()
            report = run.report()
    finally:
        manifest.write_manifest(clips_dir, records.values())
        shutil.rmtree(clips_dir / WORK_DIR, ignore_errors=True)
    out = [records[e.clip_id] for e in selected if e.clip_id in records]
    log.info(
        "vggsound: %s; %d rate-limit pauses (%.0f s)",
        _counts(Counter(r.status for r in out)),
        report.pauses,
        report.paused_s,
    )
    if report.gave_up is not None:
        raise DownloadError(
            f"YouTube kept refusing ({report.gave_up}) after backing off up to "
            f"{vcfg.max_backoff_s:.0f} s; progress is saved, rerun later"
        )
    if report.offline is not None:
        raise DownloadError(
            f"the server stopped answering ({report.offline}) after {len(out)} of "
            f"{len(selected)} clips were settled; progress is saved, rerun when it is back"
        )
    return out


def verify_clip(path: str | Path, expected_s: float | None = CLIP_SECONDS) -> Probe:
    """Probe `path`: it must have video and audio and last `expected_s` ± 1.5 s (None: any).

    Raises ClipVerifyError, also for a file ffmpeg cannot read at all (a cut-off download).
    """
    try:
        info = probe(path)
    except MediaError as err:
        raise ClipVerifyError(str(err)) from None
    if not (info.has_video and info.has_audio):
        kind = "video" if not info.has_video else "audio"
        raise ClipVerifyError(f"{Path(path).name} has no {kind} stream")
    if expected_s is not None and (
        info.duration_s is None or abs(info.duration_s - expected_s) > DURATION_TOLERANCE_S
    ):
        raise ClipVerifyError(
            f"incomplete clip: {info.duration_s} s long, expected "
            f"{expected_s} s ± {DURATION_TOLERANCE_S} s"
        )
    return info


def _read_entries(cfg: DownloadConfig) -> list[VGGSoundEntry]:
    path = Path(cfg.vggsound.csv)
    if not path.is_file():
        raise DownloadError(f"download.vggsound.csv: {path} does not exist")
    try:
        parsed = read_list(path, split=cfg.vggsound.split)
    except ValueError as err:
        raise DownloadError(
            f"download.vggsound.csv: {err}; set it to VGGSound's vggsound.csv, train.csv or "
            "test.csv"
        ) from None
    for bad in parsed.rejected[:10]:
        log.warning("%s: skipped %s", path, bad.reason)
    if len(parsed.rejected) > 10:
        log.warning("%s: skipped %d more bad lines", path, len(parsed.rejected) - 10)
    log.info(
        "%s: %d clips (%s format), %d lines rejected",
        path,
        len(parsed.entries),
        parsed.format,
        len(parsed.rejected),
    )
    return list(parsed.entries)


def _record(entry: VGGSoundEntry, **fields: Any) -> ClipRecord:
    return ClipRecord(
        clip_id=entry.clip_id,
        source="vggsound",
        label=entry.label,
        split=entry.split,
        youtube_id=entry.youtube_id,
        start_s=entry.start_s,
        **fields,
    )


def _ok_record(entry: VGGSoundEntry, final: Path, info: Probe, attempts: int) -> ClipRecord:
    return _record(
        entry,
        status="ok",
        path=video_path(entry.clip_id),
        size_bytes=final.stat().st_size,
        duration_s=float(info.duration_s or 0.0),
        attempts=attempts,
    )


def plan_fetch(
    selected: Sequence[VGGSoundEntry],
    previous: Sequence[ClipRecord],
    clips_dir: Path,
    *,
    retry_failed: bool,
) -> tuple[dict[str, ClipRecord], list[VGGSoundEntry]]:
    """Split the selection into records kept from before and entries still to fetch."""
    prev = {r.clip_id: r for r in previous}
    kept: dict[str, ClipRecord] = {}
    todo: list[VGGSoundEntry] = []
    for entry in selected:
        rec = prev.get(entry.clip_id)
        final = clips_dir / video_path(entry.clip_id)
        if final.is_file():
            if rec and rec.status == "ok" and rec.size_bytes == final.stat().st_size:
                kept[entry.clip_id] = _record(entry, **_outcome(rec))
                continue
            try:  # a file renamed into place just before a crash: verify, then record it
                kept[entry.clip_id] = _ok_record(
                    entry, final, verify_clip(final), rec.attempts if rec else 1
                )
                continue
            except MediaError as err:
                log.warning("%s: removing unusable file (%s)", final, err)
                final.unlink()
        failed = rec is not None and rec.status != "ok"
        if failed and rec.status not in SESSION_STATUSES and not retry_failed:
            kept[entry.clip_id] = _record(entry, **_outcome(rec))
            continue
        todo.append(entry)
    return kept, todo


def _outcome(rec: ClipRecord) -> dict[str, Any]:
    return {
        k: getattr(rec, k)
        for k in ("status", "error", "path", "size_bytes", "duration_s", "attempts", "node")
    }


@dataclass
class FetchReport:
    """How fetching went: rate-limit pauses, and why it stopped before the end (None: it did
    not): the rate limit outlasted the longest back-off (`gave_up`), or no server answered."""

    pauses: int = 0
    paused_s: float = 0.0
    gave_up: str | None = None
    offline: str | None = None


class FetchRun:
    """State shared by the workers of one run (or of one node's downloader): config, gate, stop
    flag, per-thread yt-dlp; `work_name` names the worker folders under WORK_DIR."""

    def __init__(
        self,
        vcfg: VGGSoundConfig,
        clips_dir: Path,
        previous: dict[str, ClipRecord],
        work_name: str = "worker",
    ) -> None:
        self.vcfg, self.clips_dir, self.previous = vcfg, clips_dir, previous
        self.work_name = work_name
        self.gate = RateGate(vcfg.backoff_s, vcfg.max_backoff_s)
        self.stop = threading.Event()
        self.gave_up: str | None = None
        self.offline: str | None = None  # why the run stopped: no server answered
        self._local = threading.local()
        self._lock = threading.Lock()
        self._workers: list[Any] = []
        # Cookie copies live outside clips_dir (a DVC output) and are deleted at the end:
        # yt-dlp writes its cookie jar back on close, and workers must not share one file.
        self._private = Path(tempfile.mkdtemp(prefix="ve-download-"))

    def worker(self) -> tuple[Any, Path]:
        """This thread's YoutubeDL and its empty work folder (created on first use)."""
        if not hasattr(self._local, "ydl"):
            with self._lock:
                n = len(self._workers)
                work = self.clips_dir / WORK_DIR / f"{self.work_name}-{n:02d}"
                work.mkdir(parents=True, exist_ok=True)
                self._local.ydl = _new_ydl(self.vcfg, work, self._cookie_copy(n))
                self._local.work = work
                self._workers.append(self._local.ydl)
        work: Path = self._local.work
        for child in work.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        return self._local.ydl, work

    def _cookie_copy(self, n: int) -> str | None:
        if not self.vcfg.cookiefile:
            return None
        src = Path(self.vcfg.cookiefile)
        dst = self._private / f"cookies-{n:02d}.txt"
        shutil.copyfile(src, dst)
        dst.chmod(0o600)
        return str(dst)

    def report(self) -> FetchReport:
        return FetchReport(self.gate.pauses, self.gate.paused_s, self.gave_up, self.offline)

    def close(self) -> None:
        for ydl in self._workers:
            try:
                ydl.close()
            except Exception as err:  # closing must not hide the run's own error
                log.debug("closing yt-dlp failed: %s", err)
        shutil.rmtree(self._private, ignore_errors=True)


class _YtdlpLogger:
    """yt-dlp's messages (including its per-clip warnings and errors) at DEBUG level only."""

    def debug(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    info = warning = error = debug


def _new_ydl(vcfg: VGGSoundConfig, work: Path, cookiefile: str | None) -> Any:
    from yt_dlp import YoutubeDL

    timeout_us = str(int(vcfg.socket_timeout * 1_000_000))
    opts: dict[str, Any] = {
        "format": vcfg.format,
        "merge_output_format": "mp4",
        "paths": {"home": str(work.resolve()), "temp": str(work.resolve())},
        "outtmpl": {"default": "clip.%(ext)s"},
        "ffmpeg_location": ffmpeg_exe(),
        # ffmpeg does the section's HTTP and knows nothing of socket_timeout: stalls end here.
        "external_downloader_args": {"ffmpeg_i": ["-rw_timeout", timeout_us]},
        "sleep_interval_requests": vcfg.sleep_requests,
        "sleep_interval": vcfg.sleep_interval,
        "max_sleep_interval": vcfg.max_sleep_interval,
        "socket_timeout": vcfg.socket_timeout,
        "logger": _YtdlpLogger(),
        "quiet": True,
        "noprogress": True,
        "noplaylist": True,
        "overwrites": True,
        "continuedl": False,
        "color": {"stdout": "no_color", "stderr": "no_color"},
    }
    if cookiefile:
        opts["cookiefile"] = cookiefile
    return YoutubeDL(opts)


def _fetch_all(
    todo: Sequence[VGGSoundEntry], run: FetchRun, records: dict[str, ClipRecord]
) -> None:
    """Fetch `todo` on `run.vcfg.workers` threads, filling `records` and saving it periodically."""
    if not todo:
        return
    progress = Progress(len(todo), run.clips_dir, records)
    pool = ThreadPoolExecutor(max_workers=run.vcfg.workers, thread_name_prefix="download")
    futures: list[Future[ClipRecord | None]] = [pool.submit(fetch_clip, e, run) for e in todo]
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            progress.add([fut.result() for fut in done])
    finally:
        run.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        # After Ctrl-C or SIGTERM, clips that finished (or were in flight) are kept too.
        ended = [
            f.result() for f in futures if f.done() and not f.cancelled() and not f.exception()
        ]
        records.update({r.clip_id: r for r in ended if r is not None})
        progress.close()


class Progress:
    """The driver's view of a run: records settled clips into `records`, shows a progress bar
    and saves the manifest every SAVE_EVERY_CLIPS clips or SAVE_EVERY_S seconds."""

    def __init__(self, total: int, clips_dir: Path, records: dict[str, ClipRecord]) -> None:
        self.clips_dir, self.records = clips_dir, records
        self.bar = tqdm(total=total, desc="download", unit="clip", mininterval=1.0)
        self.counts: Counter[str] = Counter()
        self.saved_n, self.saved_at = 0, time.monotonic()

    def add(self, settled: Iterable[ClipRecord | None]) -> None:
        """Clips that ended (None: one the run stopped before it was settled)."""
        for record in settled:
            self.bar.update()
            if record is None:
                continue
            self.records[record.clip_id] = record
            self.counts[record.status] += 1
        ok = self.counts["ok"]
        self.bar.set_postfix(ok=ok, failed=sum(self.counts.values()) - ok, refresh=False)
        finished = sum(self.counts.values())
        if (
            finished - self.saved_n >= SAVE_EVERY_CLIPS
            or time.monotonic() - self.saved_at >= SAVE_EVERY_S
        ):
            manifest.write_manifest(self.clips_dir, self.records.values())
            self.saved_n, self.saved_at = finished, time.monotonic()

    def close(self) -> None:
        self.bar.close()


def fetch_clip(entry: VGGSoundEntry, run: FetchRun) -> ClipRecord | None:
    """Fetch one clip with retries; None when the run stopped before the clip was settled."""
    prev = run.previous.get(entry.clip_id)
    attempts = prev.attempts if prev else 0
    transient = 0
    while not run.stop.is_set():
        epoch = run.gate.wait(run.stop)
        if run.stop.is_set():
            break
        attempts += 1
        try:
            final, info = _attempt(entry, run)
        except Exception as err:  # every failure becomes a manifest status
            failure = classify_error(err)
        else:
            run.gate.clear()
            return _ok_record(entry, final, info, attempts)
        log.debug(
            "%s: attempt %d failed: %s (%s)",
            entry.clip_id,
            attempts,
            failure.status,
            failure.message,
        )
        if failure.status in SESSION_STATUSES:
            if run.gate.trip(epoch, failure.retry_after_s):
                continue
            run.gave_up = failure.status
            run.stop.set()
        elif failure.transient and (transient := transient + 1) < run.vcfg.retries:
            if run.stop.wait(RETRY_DELAY_S * transient):
                break
            continue
        elif failure.offline:  # not the clip's fault: leave it unrecorded for the next run
            low = failure.message.lower()
            run.offline = next((n for n in _OFFLINE if n in low), "no connection")
            run.stop.set()
            break
        return _record(entry, status=failure.status, error=failure.message, attempts=attempts)
    return None


def _attempt(entry: VGGSoundEntry, run: FetchRun) -> tuple[Path, Probe]:
    """One yt-dlp call for the clip's section; the verified file is renamed to its final path."""
    from yt_dlp.postprocessor.ffmpeg import FFmpegPostProcessor
    from yt_dlp.utils import download_range_func

    ydl, work = run.worker()
    # See the module docstring: yt-dlp's availability check reads this, not ffmpeg_location.
    FFmpegPostProcessor._ffmpeg_location.set(ffmpeg_exe())
    start = entry.start_s
    ydl.params["download_ranges"] = download_range_func(None, [(start, start + CLIP_SECONDS)])
    info = ydl.extract_info(video_url(run.vcfg.url_template, entry.youtube_id), download=True)
    check_section(info, start)
    tmp = _downloaded_file(info, work)
    checked = verify_clip(tmp)
    final = run.clips_dir / video_path(entry.clip_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    return final, checked


def check_section(info: dict[str, Any] | None, start_s: int) -> None:
    """Raise `SectionOutOfRangeError` when yt-dlp knows the video ends before the section does."""
    duration = (info or {}).get("duration")
    if (
        isinstance(duration, (int, float))
        and start_s + CLIP_SECONDS > duration + DURATION_TOLERANCE_S
    ):
        raise SectionOutOfRangeError(
            f"the video lasts {duration:.1f} s, too short for the section "
            f"{start_s}-{start_s + CLIP_SECONDS} s"
        )


def _downloaded_file(info: dict[str, Any] | None, work: Path) -> Path:
    """The file yt-dlp wrote into `work` (never a .part leftover)."""
    paths = [
        Path(d["filepath"])
        for d in (info or {}).get("requested_downloads", [])
        if d.get("filepath")
    ]
    paths += sorted(p for p in work.glob("clip.*") if p.suffix not in (".part", ".ytdl"))
    for path in paths:
        if path.is_file() and work.resolve() in path.resolve().parents:
            return path
    raise ClipVerifyError("yt-dlp reported success but wrote no file")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"
