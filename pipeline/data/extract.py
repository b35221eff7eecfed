"""The extract stage: clips → N JPEG frames + SpecVQGAN mel per clip, as Parquet shards.

Input: `<clips_dir>/manifest.parquet`; rows with status "ok" point at `clips_dir / path`.
Output (`out_dir`, replaced as a whole, never half-written): the layout `pipeline.data.extracted`
describes and reads. Each clip goes through `pipeline.data.decode` (one ffmpeg process, the
failure rules) in a process pool of `workers` (`executor: local`) or as a Ray task on any node of
the cluster (`executor: ray`: the same code, byte-identical shards); a failed clip is a
failures.parquet row, never a stopped stage.

Resumable: ok rows sorted by clip_id are cut into chunks of `rows_per_shard`; each finished chunk
is written atomically to `cache_dir/extract/<key>/chunk-NNNNN.parquet`, where key hashes the
parameters, the ffmpeg version, the decoding code and the input files (size, mtime). A rerun
reuses the finished chunks; the cache is deleted after a successful compaction.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import io, media
from pipeline.config import ExtractConfig
from pipeline.data import audio, decode
from pipeline.data.decode import (
    BLACK_LEVEL,
    MIN_SECONDS,
    SILENCE_PEAK,
    TRUNCATED_FRACTION,
    ClipError,
    extract_clip,
)
from pipeline.data.extracted import (
    FAILURE_SCHEMA,
    FAILURES_NAME,
    SHARD_SCHEMA,
    Example,
    iter_examples,
    load_meta,
)
from pipeline.data.manifest import MANIFEST_NAME, ClipRecord, read_manifest
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

CACHE_SUBDIR = "extract"

_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")

# Clip ids become file names downstream (evaluate's samples): never a path or odd text.
_CLIP_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")  # VGGSound ids may start with "-"

# A cache chunk holds both kinds of row: reason "" means success.
CHUNK_SCHEMA = pa.schema(
    [*FAILURE_SCHEMA, *(f for f in SHARD_SCHEMA if f.name not in FAILURE_SCHEMA.names)]
)


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
    """Hash of everything a chunk depends on: params (not workers or executor), ffmpeg, code,
    input files."""
    params = {k: v for k, v in asdict(cfg).items() if k not in ("workers", "executor")}
    code = [
        hashlib.sha256(Path(f).read_bytes()).hexdigest()
        for f in (audio.__file__, decode.__file__, __file__)
    ]
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
    wait_s: float = 0.0,
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

    if cfg.executor == "ray":
        _process_on_cluster(tasks, done, wait_s)
        return
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


def _cluster_work(task: tuple[int, ClipRecord, Path, ExtractConfig]) -> tuple[int, dict[str, Any]]:
    """Ray task entry: `_work` with one BLAS thread, as in the local pool's processes."""
    _init_worker()
    return _work(task)


def _process_on_cluster(
    tasks: Iterable[tuple[int, ClipRecord, Path, ExtractConfig]],
    done: Callable[[int, dict[str, Any]], None],
    wait_s: float = 0.0,
) -> None:
    """`executor: ray`: each clip is a Ray task of 1 CPU, wherever the cluster has one (the
    clips folder is read at the same absolute path on every node); a bounded window of tasks
    keeps the driver's memory flat, and a task lost with its node is run again elsewhere. A
    cluster without a CPU is given `wait_s` to get one from its autoscaler."""
    import ray

    from pipeline.ray_runtime import ray_session, require_resources

    with ray_session():
        require_resources(
            [{"CPU": 1}],
            "extract (executor: ray) asks for 1 CPU per task",
            "set extract.executor to local to use this machine's cores",
            wait_s,
        )
        work = ray.remote(num_cpus=1, max_retries=3)(_cluster_work)
        limit = 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        window: list[Any] = []
        try:
            for index, record, clips_dir, cfg in tasks:
                window.append(work.remote((index, record, clips_dir.resolve(), cfg)))
                if len(window) >= limit:
                    finished, window = ray.wait(window, num_returns=1)
                    done(*ray.get(finished[0]))
            while window:
                finished, window = ray.wait(window, num_returns=1)
                done(*ray.get(finished[0]))
        except BaseException:  # Ctrl-C: finished chunks stay for the rerun
            for ref in window:
                ray.cancel(ref, force=True)
            raise


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


def run_extract(
    cfg: ExtractConfig,
    clips_dir: Path,
    out_dir: Path,
    cache_dir: Path,
    preview_path: Path | None = None,
    cluster_wait_s: float = 0.0,
) -> ExtractSummary:
    """Extract frames + mel for every ok manifest row of `clips_dir` into `out_dir`.

    Resumes from `cache_dir/extract/<key>/`; writes `out_dir` atomically (see the module doc);
    optionally a preview PNG of a few clips at `preview_path`. Failed clips go to
    failures.parquet; the stage itself only fails on problems outside a clip (disk, a crashed
    worker process). `cluster_wait_s`: how long `executor: ray` waits for an autoscaler to add a
    CPU when the cluster has none.
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
        _process(todo, clips_dir, cfg, cache, bar, cluster_wait_s)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    io.clean_dir_leftovers(out_dir)
    tmp = io.make_temp_dir(out_dir)
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
