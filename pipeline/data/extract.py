"""The extract stage: clips → N JPEG frames + SpecVQGAN mel per clip, as Parquet shards.

Input: `<clips_dir>/manifest.parquet`; rows with status "ok" point at `clips_dir / path`.
Output (`out_dir`, replaced as a whole, never half-written):

    {split}/part-NNNNN.parquet   successful clips sorted by clip_id, `rows_per_shard` rows each
                                 (the last shard of a split is shorter); columns in `SHARD_SCHEMA`
    failures.parquet             clip_id, label, split, reason, detail (`FAILURE_SCHEMA`)
    meta.json                    counts, shapes, mel parameters, labels, shard hashes, ffmpeg

Shard columns: `frames` is a list of `num_frames` JPEG images (image_size² RGB, baseline, 4:4:4);
`mel` is the (n_mels, mel_frames) float16 little-endian C-order bytes of the [0, 1] mel
(`np.frombuffer(b, "<f2").reshape(meta["mel"]["shape"])`); `flags` lists soft problems.
`iter_examples` reads it back.

One ffmpeg process per clip decodes once: `fps=N/D` (D = min(duration, clip_seconds)) keeps the
last frame before the centre of each of N equal segments, then scale on the short side + centre
crop, raw RGB to stdout; the same process writes mono f32le audio at `sample_rate` to an unnamed
temporary file. The header (duration, streams, size) is read from that same run's log instead of a
separate `ffmpeg -i` probe, which would cost a second process start (~20-30 ms, a third of a small
clip's decode): the run assumes D = clip_seconds, and a clip whose header says it is shorter is
decoded once more with its own D.

Failure reasons (`REASONS`); a failed clip never stops the stage:
    unreadable   empty, not media, truncated (both streams stop well before the header's duration),
                 undecodable, or the path is missing / leaves clips_dir
    no_video     no video stream (cover art does not count)
    no_audio     no audio stream
    too_short    shorter than MIN_SECONDS (1 s) by header or by decoded audio
    silent       audio peak below SILENCE_PEAK (-60 dBFS) over the first clip_seconds
    error        anything unexpected (a split or clip id that is not a safe name, a bug); detail
                 holds the exception
Flags (`FLAGS`) on successful rows:
    black_frames every sampled frame is near-black (no pixel above BLACK_LEVEL)
    portrait     the video is taller than wide (the centre crop loses the top and bottom)
    looped_audio the audio was shorter than the part the kept mel frames see, so it was looped
    padded_frames fewer than num_frames frames decoded; the last one was repeated

Resumable: ok rows sorted by clip_id are cut into chunks of `rows_per_shard`; each finished chunk
is written atomically to `cache_dir/extract/<key>/chunk-NNNNN.parquet`, where key hashes the
parameters, the ffmpeg version, this code and the input files (size, mtime). A rerun reuses the
finished chunks; the cache is deleted after a successful compaction.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io as _stdio
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import io, media
from pipeline.config import ExtractConfig
from pipeline.data import audio
from pipeline.data.manifest import MANIFEST_NAME, ClipRecord, read_manifest
from pipeline.errors import PipelineError
from pipeline.media import Probe, ffmpeg_exe

log = logging.getLogger(__name__)

REASONS = ("unreadable", "no_video", "no_audio", "too_short", "silent", "error")
FLAGS = ("black_frames", "portrait", "looped_audio", "padded_frames")

MIN_SECONDS = 1.0  # shorter clips cannot give N distinct frames or a meaningful mel
SILENCE_PEAK = 10 ** (-60 / 20)  # -60 dBFS: below this the clip has no usable sound
BLACK_LEVEL = 24  # a frame whose brightest pixel is at most this is near-black
TRUNCATED_FRACTION = 0.9  # decoded audio under 90% of the header's duration, frames missing too
DECODE_TIMEOUT_S = 300.0
JPEG_SETTINGS = {"format": "JPEG", "optimize": False, "progressive": False, "subsampling": 0}

FAILURES_NAME = "failures.parquet"
CACHE_SUBDIR = "extract"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Clip ids become file names downstream (evaluate's samples): never a path or odd text.
_CLIP_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")  # VGGSound ids may start with "-"

SHARD_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("frames", pa.list_(pa.binary())),
        ("mel", pa.binary()),
        ("flags", pa.list_(pa.string())),
    ]
)
FAILURE_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
# A cache chunk holds both kinds of row: reason "" means success.
CHUNK_SCHEMA = pa.schema(
    [*FAILURE_SCHEMA, *(f for f in SHARD_SCHEMA if f.name not in FAILURE_SCHEMA.names)]
)


class ClipError(Exception):
    """A clip that cannot be used: `reason` is one of REASONS, `detail` one sentence."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Decoded:
    """What one ffmpeg pass returns.

    frames: (k, S, S, 3) uint8, k <= num_frames (fewer when the video ends early).
    audio: (T,) float32 mono at sample_rate, T <= clip_seconds * sample_rate.
    """

    frames: np.ndarray
    audio: np.ndarray


@dataclass(frozen=True)
class ClipData:
    """One successful clip: `frames` num_frames JPEGs, `mel` (n_mels, mel_frames) float16."""

    frames: list[bytes]
    mel: np.ndarray
    flags: list[str]


class Example(NamedTuple):
    """One row read back: frames (N, S, S, 3) uint8, mel (n_mels, mel_frames) float32 in [0, 1]."""

    clip_id: str
    label: str
    frames: np.ndarray
    mel: np.ndarray


@dataclass
class ExtractSummary:
    """What `run_extract` did; `counts` per split, `failures` per reason."""

    out_dir: str
    inputs: int
    counts: dict[str, int]
    failures: dict[str, int]
    chunks: int
    chunks_reused: int
    seconds: float
    flags: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat numeric view: inputs, written, failed, <split>_written, failed_<reason>,
        flag_<flag>, chunks_reused, seconds."""
        out: dict[str, float] = {
            "inputs": self.inputs,
            "written": sum(self.counts.values()),
            "failed": sum(self.failures.values()),
            "chunks_reused": self.chunks_reused,
            "seconds": self.seconds,
        }
        out.update({f"{split}_written": n for split, n in self.counts.items()})
        out.update({f"failed_{reason}": n for reason, n in self.failures.items()})
        out.update({f"flag_{flag}": n for flag, n in self.flags.items()})
        return out

    def describe(self, out_dir: str | Path) -> str:
        """One line for the end of the stage: counts, failure reasons, time, where."""
        written = sum(self.counts.values())
        splits = ", ".join(f"{s} {n}" for s, n in sorted(self.counts.items()))
        failed = ", ".join(f"{r} {n}" for r, n in sorted(self.failures.items()))
        return (
            f"extract: {written} of {self.inputs} clips written ({splits or 'none'})"
            f"{f'; failed: {failed}' if failed else ''} in {self.seconds:.1f} s -> {out_dir}"
        )


# ----------------------------------------------------------------------------------- one clip


def fps_fraction(num_frames: int, span_s: float) -> Fraction:
    """The `fps` filter rate N/D as an exact fraction (D rounded to milliseconds)."""
    span = Fraction(max(1, round(span_s * 1000)), 1000)
    return Fraction(num_frames) / span


def input_args(path: Path, cfg: ExtractConfig, loglevel: str = "error") -> list[str]:
    """ffmpeg up to its input: the first `clip_seconds` of `path`, one decoder thread (the
    stage runs one clip per core). Paths go in as `file:` + absolute path, so no name can read
    as an option or a protocol."""
    return [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", loglevel,
        "-threads", "1", "-t", f"{cfg.clip_seconds:g}", "-i", f"file:{path.resolve()}",
    ]  # fmt: skip


def video_filter(cfg: ExtractConfig, rate: Fraction | None) -> str:
    """`fps=rate` (None: every frame), then the short side scaled to `image_size` (bicubic)
    and a centre crop."""
    s = cfg.image_size
    scale = f"scale={s}:{s}:force_original_aspect_ratio=increase:flags=bicubic,crop={s}:{s}"
    return scale if rate is None else f"fps={rate.numerator}/{rate.denominator},{scale}"


def audio_args(cfg: ExtractConfig, audio_path: Path) -> list[str]:
    """The first audio stream, mono float32 at `sample_rate`, to `audio_path`."""
    return [
        "-map", "0:a:0", "-ac", "1", "-ar", str(cfg.sample_rate), "-c:a", "pcm_f32le",
        "-f", "f32le", "-y", f"file:{audio_path}",
    ]  # fmt: skip


def ffmpeg_command(
    path: Path, cfg: ExtractConfig, span_s: float, audio_path: Path, loglevel: str = "error"
) -> list[str]:
    """One decode pass: N frames (scaled, cropped, rgb24) to stdout, mono f32le to `audio_path`.

    `span_s` is D of `fps=N/D`. `-map 0:V:0` skips cover art.
    """
    rate = fps_fraction(cfg.num_frames, span_s)
    return [
        *input_args(path, cfg, loglevel),
        "-map", "0:V:0", "-vf", video_filter(cfg, rate), "-frames:v", str(cfg.num_frames),
        "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
        *audio_args(cfg, audio_path),
    ]  # fmt: skip


@dataclass(frozen=True)
class FfmpegRun:
    """One ffmpeg process: frames (k, S, S, 3) uint8 (whole frames only), the wave (T,) float32
    when asked for, and stderr with the input's absolute path shortened to its file name."""

    returncode: int
    frames: np.ndarray
    wave: np.ndarray | None
    stderr: str

    def failure(self) -> str:
        """ffmpeg's last log line, the one that says why it stopped."""
        lines = self.stderr.strip().splitlines()
        return lines[-1].strip() if lines else f"exit status {self.returncode}"


def run_ffmpeg(
    command: Callable[[Path | None], list[str]],
    path: Path,
    image_size: int,
    *,
    sound: bool,
    on_timeout: Callable[[], Exception],
) -> FfmpegRun:
    """Run `command(audio_path)` on `path`: raw RGB frames come on stdout, the wave (with `sound`)
    through a temporary float32 file. A run over DECODE_TIMEOUT_S raises `on_timeout()`; any
    other failure is in the returned run.

    The file is unlinked from the start (`tempfile.TemporaryFile`) and ffmpeg writes it through
    `/dev/fd/N`, so nothing is left on disk even when this process is killed mid-decode."""
    with (
        tempfile.TemporaryFile(prefix="ffmpeg-", suffix=".f32") if sound else nullcontext() as sink
    ):
        fds = (sink.fileno(),) if sink is not None else ()
        audio_path = Path(f"/dev/fd/{fds[0]}") if fds else None
        try:
            proc = subprocess.run(
                command(audio_path), capture_output=True, timeout=DECODE_TIMEOUT_S, pass_fds=fds
            )
        except subprocess.TimeoutExpired:
            raise on_timeout() from None
        wave = None
        if sink is not None:
            # Where /dev/fd/N shares this descriptor's offset (macOS), ffmpeg left it at the end.
            sink.seek(0)
            wave = np.fromfile(sink, dtype="<f4")
    frame = image_size * image_size * 3
    usable = len(proc.stdout) // frame * frame
    frames = np.frombuffer(proc.stdout[:usable], np.uint8).reshape(-1, image_size, image_size, 3)
    stderr = proc.stderr.decode("utf-8", "replace").replace(str(path.resolve()), path.name)
    return FfmpegRun(proc.returncode, frames, wave, stderr)


def _run_ffmpeg(path: Path, cfg: ExtractConfig, span_s: float, loglevel: str) -> FfmpegRun:
    """Run `ffmpeg_command`; raises ClipError("unreadable") only on a timeout."""
    return run_ffmpeg(
        lambda audio_path: ffmpeg_command(path, cfg, span_s, audio_path, loglevel),
        path,
        cfg.image_size,
        sound=True,
        on_timeout=lambda: ClipError("unreadable", f"decoding took over {DECODE_TIMEOUT_S:.0f} s"),
    )


def _failed(run: FfmpegRun) -> ClipError:
    return ClipError("unreadable", f"ffmpeg failed: {run.failure()}")


def _decoded(run: FfmpegRun, cfg: ExtractConfig) -> Decoded:
    assert run.wave is not None
    return Decoded(run.frames[: cfg.num_frames], run.wave)


def decode_clip(path: Path, cfg: ExtractConfig, duration_s: float | None) -> Decoded:
    """Decode `path` once with D = min(duration_s, clip_seconds) (clip_seconds when None).

    Raises ClipError("unreadable") when ffmpeg fails or times out.
    """
    span = min(duration_s or cfg.clip_seconds, cfg.clip_seconds)
    run = _run_ffmpeg(path, cfg, span, "error")
    if run.returncode != 0:
        raise _failed(run)
    return _decoded(run, cfg)


def decode_with_header(path: Path, cfg: ExtractConfig) -> tuple[Probe, Decoded]:
    """Decode `path` and read its header from the same ffmpeg run (no separate probe).

    The first pass assumes a full clip (D = clip_seconds); a clip whose header says it is
    shorter is decoded again with D = its duration, so frames still sit at segment centres.
    Raises ClipError for unreadable files, missing streams and clips under MIN_SECONDS.
    """
    if not path.is_file():
        raise ClipError("unreadable", "the file does not exist")
    if path.stat().st_size == 0:
        raise ClipError("unreadable", "the file is empty")
    run = _run_ffmpeg(path, cfg, cfg.clip_seconds, "info")
    info = media.parse_probe(run.stderr)
    if info is None:
        raise _failed(run) if run.returncode else ClipError("unreadable", "no media streams")
    if not info.has_video:
        raise ClipError("no_video", "the file has no video stream")
    if not info.has_audio:
        raise ClipError("no_audio", "the file has no audio stream")
    if info.duration_s is not None and info.duration_s < MIN_SECONDS:
        raise ClipError("too_short", f"{info.duration_s:.2f} s long (minimum {MIN_SECONDS:g} s)")
    if run.returncode != 0:
        raise _failed(run)
    if info.duration_s is not None and round(info.duration_s, 3) < cfg.clip_seconds:
        return info, decode_clip(path, cfg, info.duration_s)
    return info, _decoded(run, cfg)


def jpeg_bytes(frame: np.ndarray, quality: int) -> bytes:
    """One (S, S, 3) uint8 frame as baseline JPEG, 4:4:4, fixed settings (stable bytes)."""
    from PIL import Image

    buf = _stdio.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, quality=quality, **JPEG_SETTINGS)
    return buf.getvalue()


def _check_decoded(dec: Decoded, cfg: ExtractConfig, duration_s: float | None) -> None:
    """Reject truncated, too short or silent decodes. Raises ClipError."""
    seconds = dec.audio.size / cfg.sample_rate
    if len(dec.frames) == 0:
        raise ClipError("unreadable", "no video frame could be decoded")
    span = min(duration_s or cfg.clip_seconds, cfg.clip_seconds)
    if len(dec.frames) < cfg.num_frames and seconds < TRUNCATED_FRACTION * span:
        raise ClipError(
            "unreadable",
            f"truncated: the header says {span:.2f} s, "
            f"{seconds:.2f} s of audio and {len(dec.frames)} frames decode",
        )
    if seconds < MIN_SECONDS:
        raise ClipError("too_short", f"{seconds:.2f} s of audio (minimum {MIN_SECONDS:g} s)")
    peak = float(np.max(np.abs(dec.audio)))
    if not peak >= SILENCE_PEAK:  # also catches NaN
        raise ClipError("silent", f"audio peak {peak:.2e} is below {SILENCE_PEAK:.0e}")


def extract_clip(path: Path, cfg: ExtractConfig, rel: str = "") -> ClipData:
    """The whole per-clip work: decode (header from the same pass), check, encode.

    Returns num_frames JPEGs, the (n_mels, mel_frames) float16 mel and flags. Raises ClipError;
    `rel` is how the file is named in failure details (its name by default).
    """
    try:
        info, dec = decode_with_header(path, cfg)
        _check_decoded(dec, cfg, info.duration_s)
    except ClipError as err:
        raise ClipError(err.reason, err.detail.replace(path.name, rel or path.name)) from None
    frames = dec.frames
    flags = []
    if int(frames.max()) <= BLACK_LEVEL:
        flags.append("black_frames")
    if info.width and info.height and info.height > info.width:
        flags.append("portrait")
    if dec.audio.size < audio.geometry(cfg).samples_used:
        flags.append("looped_audio")
    if len(frames) < cfg.num_frames:
        flags.append("padded_frames")
        pad = np.repeat(frames[-1:], cfg.num_frames - len(frames), axis=0)
        frames = np.concatenate([frames, pad])
    mel = audio.log_mel(dec.audio, cfg).astype(np.float16)
    return ClipData([jpeg_bytes(f, cfg.jpeg_quality) for f in frames], mel, flags)


def _row(record: ClipRecord, clips_dir: Path, cfg: ExtractConfig) -> dict[str, Any]:
    """The cache row of one manifest record: success (reason "") or failure; never raises."""
    row: dict[str, Any] = {
        "clip_id": record.clip_id,
        "label": record.label,
        "split": record.split,
        "reason": "",
        "detail": "",
        "frames": None,
        "mel": None,
        "flags": None,
    }
    try:
        if not _SPLIT_NAME.fullmatch(record.split):
            raise ClipError("error", f"split {record.split!r} is not a valid folder name")
        if not _CLIP_ID.fullmatch(record.clip_id):
            raise ClipError("error", f"clip id {record.clip_id!r} is not a safe file name")
        try:
            path = io.inside(clips_dir, record.path)
        except ValueError as err:
            raise ClipError("unreadable", str(err)) from None
        data = extract_clip(path, cfg, record.path or record.clip_id)
        row.update(frames=data.frames, mel=data.mel.astype("<f2").tobytes(), flags=data.flags)
    except ClipError as err:
        row.update(reason=err.reason, detail=err.detail)
    except Exception as err:  # noqa: BLE001 - one broken clip must not stop the stage
        log.warning("%s: unexpected %s", record.clip_id, type(err).__name__, exc_info=True)
        row.update(reason="error", detail=f"{type(err).__name__}: {err}")
    return row


def _init_worker() -> None:
    """Pool initializer: one BLAS thread per worker process, as the pool already fills the cores."""
    try:
        from threadpoolctl import threadpool_limits  # a dependency of librosa's scikit-learn
    except ImportError:
        return
    threadpool_limits(1)


def _work(task: tuple[int, ClipRecord, Path, ExtractConfig]) -> tuple[int, dict[str, Any]]:
    """Process-pool entry: (index, record, clips_dir, cfg) → (index, row)."""
    index, record, clips_dir, cfg = task
    return index, _row(record, clips_dir, cfg)


# ------------------------------------------------------------------------------ chunk cache


def _inputs(clips_dir: Path) -> list[ClipRecord]:
    """ok manifest rows sorted by clip_id, first of any duplicate id kept."""
    if not (clips_dir / MANIFEST_NAME).is_file():
        raise PipelineError(
            f"no clip manifest at {clips_dir / MANIFEST_NAME}: run the download stage first"
        )
    seen: dict[str, ClipRecord] = {}
    for r in sorted(read_manifest(clips_dir), key=lambda r: r.clip_id):
        if r.status == "ok" and r.clip_id not in seen:
            seen[r.clip_id] = r
    return list(seen.values())


def _file_stamp(clips_dir: Path, rel: str) -> list[int]:
    try:
        st = (clips_dir / rel).stat()
    except (OSError, ValueError):
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


def cache_key(cfg: ExtractConfig, clips_dir: Path, records: list[ClipRecord]) -> str:
    """Hash of everything a chunk depends on: params (not workers), ffmpeg, code, input files."""
    params = {k: v for k, v in asdict(cfg).items() if k != "workers"}
    code = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in (audio.__file__, __file__)]
    files = [
        [r.clip_id, r.label, r.split, r.path, *_file_stamp(clips_dir, r.path)] for r in records
    ]
    blob = json.dumps([params, media.ffmpeg_version(), code, files], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _chunk_path(cache: Path, index: int) -> Path:
    return cache / f"chunk-{index:05d}.parquet"


def _write_chunk(path: Path, rows: list[dict[str, Any]]) -> None:
    io.write_table(path, pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA))


def _process(
    todo: dict[int, list[tuple[int, ClipRecord]]],
    clips_dir: Path,
    cfg: ExtractConfig,
    cache: Path,
    bar: tqdm,
) -> None:
    """Run the clips of the chunks in `todo` (chunk → [(index, record)]), writing each chunk
    as soon as all its clips are done. One worker runs inline; more use a process pool."""
    pending = {c: {} for c in todo}  # chunk → {index: row}
    owner = {i: c for c, items in todo.items() for i, _ in items}
    tasks = ((i, r, clips_dir, cfg) for c in sorted(todo) for i, r in todo[c])

    def done(index: int, row: dict[str, Any]) -> None:
        chunk = owner[index]
        pending[chunk][index] = row
        bar.update(1)
        if len(pending[chunk]) == len(todo[chunk]):
            rows = [pending[chunk][i] for i, _ in todo[chunk]]
            _write_chunk(_chunk_path(cache, chunk), rows)
            del pending[chunk]

    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1:
        for task in tasks:
            done(*_work(task))
        return
    ctx = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
    with cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker
    ) as pool:
        window: set[cf.Future] = set()
        try:
            for task in tasks:  # a bounded window keeps memory flat on 200k clips
                window.add(pool.submit(_work, task))
                if len(window) >= 4 * workers:
                    finished, window = cf.wait(window, return_when=cf.FIRST_COMPLETED)
                    for fut in finished:
                        done(*fut.result())
            for fut in cf.as_completed(window):
                done(*fut.result())
        except BaseException:  # Ctrl-C or a dead worker: finished chunks stay for the rerun
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# ------------------------------------------------------------------------------- compaction


def _iter_chunk_rows(cache: Path, chunks: int) -> Iterator[dict[str, Any]]:
    for c in range(chunks):
        for batch in pq.ParquetFile(_chunk_path(cache, c)).iter_batches(batch_size=64):
            yield from batch.to_pylist()


@dataclass
class _Compacted:
    """What the compaction wrote: shard entries per split, failure rows, flag counts, labels."""

    shards: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    flags: Counter = field(default_factory=Counter)
    labels: set[str] = field(default_factory=set)


def _compact(rows: Iterable[dict[str, Any]], cfg: ExtractConfig, tmp: Path) -> _Compacted:
    """Stream rows (sorted by clip_id) into `tmp/{split}/part-NNNNN.parquet` shards of exactly
    `rows_per_shard` rows (the last one of a split shorter); failures are collected."""
    buffers: dict[str, list[dict[str, Any]]] = {}
    result = _Compacted()
    shards, failures, flags = result.shards, result.failures, result.flags

    def flush(split: str) -> None:
        rel = f"{split}/part-{len(shards.setdefault(split, [])):05d}.parquet"
        io.write_table(tmp / rel, pa.Table.from_pylist(buffers[split], schema=SHARD_SCHEMA))
        shards[split].append(
            {"path": rel, "rows": len(buffers[split]), "first": buffers[split][0]["clip_id"]}
        )
        buffers[split] = []

    for row in rows:
        if row["reason"]:
            failures.append({k: row[k] for k in FAILURE_SCHEMA.names})
            continue
        flags.update(row["flags"])
        result.labels.add(row["label"])
        buf = buffers.setdefault(row["split"], [])
        buf.append({k: row[k] for k in SHARD_SCHEMA.names})
        if len(buf) == cfg.rows_per_shard:
            flush(row["split"])
    for split in sorted(buffers):
        if buffers[split]:
            flush(split)
    return result


def _meta(
    cfg: ExtractConfig, records: list[ClipRecord], done: _Compacted, tmp: Path
) -> dict[str, Any]:
    """The sidecar later stages size themselves from (hashes the files already in `tmp`)."""
    g = audio.geometry(cfg)
    shards, failures, flags = done.shards, done.failures, done.flags
    # a split that is not a safe folder name failed its rows (`_row`): it is no split here
    splits = sorted({r.split for r in records if _SPLIT_NAME.fullmatch(r.split)} | set(shards))
    for entries in shards.values():
        for e in entries:
            e["sha256"] = io.sha256_file(tmp / e["path"])
    return {
        "counts": {s: sum(e["rows"] for e in shards.get(s, [])) for s in splits},
        "inputs": len(records),
        "failures": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "flags": dict(sorted(flags.items())),
        "labels": sorted(done.labels),
        "num_frames": cfg.num_frames,
        "image_size": cfg.image_size,
        "frames": {
            "format": "jpeg",
            "quality": cfg.jpeg_quality,
            "subsampling": "4:4:4",
            "shape": [cfg.num_frames, cfg.image_size, cfg.image_size, 3],
            "sampling": "fps=N/D: the frame at the centre of each of N equal segments "
            "of D = min(duration, clip_seconds)",
        },
        "mel": {
            "shape": [cfg.n_mels, cfg.mel_frames],
            "dtype": "<f2",
            "order": "C",
            "range": [0.0, 1.0],
            "transform": "specvqgan",
            "sample_rate": cfg.sample_rate,
            "clip_seconds": cfg.clip_seconds,
            "num_samples": g.num_samples,
            "n_fft": cfg.n_fft,
            "hop_length": cfg.hop_length,
            "n_mels": cfg.n_mels,
            "fmin": cfg.fmin,
            "fmax": cfg.fmax,
            "stft_frames": g.stft_frames,
            "trim_frames": g.trim_frames,
            "crop_start": g.crop_start,
            "pad_mode": "reflect",
            "power": 1.0,
            "amp_floor": audio.AMP_FLOOR,
        },
        "rows_per_shard": cfg.rows_per_shard,
        "shards": {s: shards.get(s, []) for s in splits},
        "failures_file": {
            "path": FAILURES_NAME,
            "rows": len(failures),
            "sha256": io.sha256_file(tmp / FAILURES_NAME),
        },
        "ffmpeg": media.ffmpeg_version(),
        "limits": {
            "min_seconds": MIN_SECONDS,
            "silence_peak": SILENCE_PEAK,
            "black_level": BLACK_LEVEL,
            "truncated_fraction": TRUNCATED_FRACTION,
        },
    }


# ---------------------------------------------------------------------------------- stage


def run_extract(
    cfg: ExtractConfig,
    clips_dir: Path,
    out_dir: Path,
    cache_dir: Path,
    preview_path: Path | None = None,
) -> ExtractSummary:
    """Extract frames + mel for every ok manifest row of `clips_dir` into `out_dir`.

    Resumes from `cache_dir/extract/<key>/`; writes `out_dir` atomically (see the module doc);
    optionally a preview PNG of a few clips at `preview_path`. Failed clips go to
    failures.parquet; the stage itself only fails on problems outside a clip (disk, a crashed
    worker process).
    """
    start = time.monotonic()
    clips_dir, out_dir, cache_dir = Path(clips_dir), Path(out_dir), Path(cache_dir)
    records = _inputs(clips_dir)
    key = cache_key(cfg, clips_dir, records)
    cache = cache_dir / CACHE_SUBDIR / key
    cache.mkdir(parents=True, exist_ok=True)
    io.remove_stale_temporaries(cache)
    size = cfg.rows_per_shard
    chunks = -(-len(records) // size)
    todo = {
        c: [(i, records[i]) for i in range(c * size, min((c + 1) * size, len(records)))]
        for c in range(chunks)
        if not _chunk_path(cache, c).exists()
    }
    reused = chunks - len(todo)
    log.info(
        "extract: %d clips in %d chunks (%d reused from %s)", len(records), chunks, reused, cache
    )
    done_before = len(records) - sum(len(v) for v in todo.values())
    with tqdm(
        total=len(records), initial=done_before, unit="clip", desc="extract", disable=None
    ) as bar:
        _process(todo, clips_dir, cfg, cache, bar)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    io.clean_dir_leftovers(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{io.TMP_PREFIX}{out_dir.name}.new-", dir=out_dir.parent))
    try:
        done = _compact(_iter_chunk_rows(cache, chunks), cfg, tmp)
        io.write_table(
            tmp / FAILURES_NAME, pa.Table.from_pylist(done.failures, schema=FAILURE_SCHEMA)
        )
        meta = _meta(cfg, records, done, tmp)
        io.write_json(tmp / io.META_NAME, meta)
        io.replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(cache_dir / CACHE_SUBDIR, ignore_errors=True)  # this key and stale ones

    if preview_path is not None:
        save_preview(out_dir, Path(preview_path))
    summary = ExtractSummary(
        str(out_dir),
        len(records),
        meta["counts"],
        meta["failures"],
        chunks,
        reused,
        round(time.monotonic() - start, 3),
        meta["flags"],
    )
    log.info(
        "extract: %s clips written to %s, %d failed (%s) in %.1f s",
        sum(summary.counts.values()),
        out_dir,
        len(done.failures),
        ", ".join(f"{k} {v}" for k, v in summary.failures.items()) or "none",
        summary.seconds,
    )
    return summary


# ---------------------------------------------------------------------------------- readers


def load_meta(out_dir: Path) -> dict[str, Any]:
    """The stage's meta.json."""
    return io.read_json(Path(out_dir) / io.META_NAME)


def settings(meta: dict[str, Any]) -> ExtractConfig:
    """The extract settings the data of this meta.json was made with (`workers`, which does not
    change the data, is 0). Later stages size themselves from this, not from params.yaml."""
    mel = meta["mel"]
    return ExtractConfig(
        num_frames=int(meta["num_frames"]),
        image_size=int(meta["image_size"]),
        jpeg_quality=int(meta["frames"]["quality"]),
        sample_rate=int(mel["sample_rate"]),
        clip_seconds=float(mel["clip_seconds"]),
        n_fft=int(mel["n_fft"]),
        hop_length=int(mel["hop_length"]),
        n_mels=int(mel["n_mels"]),
        fmin=float(mel["fmin"]),
        fmax=float(mel["fmax"]),
        mel_frames=int(mel["shape"][1]),
        rows_per_shard=int(meta["rows_per_shard"]),
        workers=0,
    )


def decode_row(
    frames: list[bytes], mel: bytes, mel_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Stored columns → (frames (N, S, S, 3) uint8, mel (n_mels, F) float32)."""
    from PIL import Image

    images = np.stack([np.asarray(Image.open(_stdio.BytesIO(b)).convert("RGB")) for b in frames])
    spec = np.frombuffer(mel, dtype="<f2").reshape(mel_shape).astype(np.float32)
    return images, spec


def iter_examples(out_dir: Path, split: str) -> Iterator[Example]:
    """Every row of `split` in clip_id order as `Example` (frames uint8, mel float32)."""
    out_dir = Path(out_dir)
    meta = load_meta(out_dir)
    shape = tuple(meta["mel"]["shape"])
    for entry in meta["shards"].get(split, []):
        pf = pq.ParquetFile(out_dir / entry["path"])
        for batch in pf.iter_batches(batch_size=64, columns=["clip_id", "label", "frames", "mel"]):
            for row in batch.to_pylist():
                frames, mel = decode_row(row["frames"], row["mel"], shape)
                yield Example(row["clip_id"], row["label"], frames, mel)


def save_preview(out_dir: Path, path: Path, max_clips: int = 8) -> None:
    """A PNG for humans: for the first clip of up to `max_clips` labels (train split first),
    the frames in a row with the mel below, titled with clip id and label."""
    from matplotlib.figure import Figure

    meta = load_meta(out_dir)
    picked: dict[str, Example] = {}
    for split in sorted(meta["shards"], key=lambda s: (s != "train", s)):
        for ex in iter_examples(out_dir, split):
            if ex.label not in picked and len(picked) < max_clips:
                picked[ex.label] = ex
            if len(picked) >= max_clips:
                break
    n = meta["num_frames"]
    rows = max(1, len(picked))
    fig = Figure(figsize=(max(6.0, 1.0 * n), 2.8 * rows), dpi=100, layout="constrained")
    # One subfigure per clip keeps each title and axis label clear of its neighbours.
    for sub, ex in zip(fig.subfigures(rows, 1, squeeze=False)[:, 0], picked.values(), strict=False):
        sub.suptitle(f"{ex.clip_id}  [{ex.label}]", fontsize=9, x=0.01, ha="left")
        grid = sub.add_gridspec(2, n, height_ratios=[1.0, 1.3])
        for j in range(n):
            ax = sub.add_subplot(grid[0, j])
            ax.imshow(ex.frames[j])
            ax.set_axis_off()
        audio.plot_mel(sub.add_subplot(grid[1, :]), ex.mel)
    if not picked:
        fig.text(0.5, 0.5, "no clips extracted", ha="center")
    audio.save_figure(fig, path)
