"""The tokenize stage: extracted frames + mels -> VQGAN ids with Ray Data, as Parquet shards.

The one module of the pipeline that uses Ray Data; `ray` is imported inside functions only.

Input: the extract stage's `<extract_dir>/{split}/part-NNNNN.parquet` + meta.json, and the
tokenizers stage's `<tokenizers_dir>/{image,audio}/` folders. Output (`out_dir`, replaced as a
whole, never half-written):

    {split}/part-NNNNN.parquet   every clip of the split sorted by clip_id, exactly
                                 `rows_per_file` rows per file (the last one shorter)
    meta.json                    TokenLayout, tokenizer hashes and sources, counts, labels,
                                 num_frames, precision, encoders used, files with sha256

The file format, its schema and the readers are `pipeline.data.tokens`.

How it runs: `ray.data.read_parquet` over the extract shards -> `map_batches(ClipTokenizer)`, a
callable class run by a fixed pool of `num_actors` actors that each load both tokenizers once
(on cuda when the actor has a GPU), decode the JPEGs and mels of a batch and encode them, no
encoder forward seeing more than `batch_size` inputs. The ids go to a scratch location first:

  * `output_uri` empty: the driver streams the batches (a few KB per clip) into
    `cache_dir/tokenize/<key>/chunk-NNNNN.parquet`. This works on any cluster: no worker
    writes a file, so nothing lands on another node's disk.
  * `output_uri` set (a path every node sees, or s3://...): the workers write there with
    `Dataset.write_parquet` (file names carry Ray's random write id).

A deterministic pyarrow compaction then sorts by clip_id, cuts files of `rows_per_file` rows
and writes them with `pipeline.io.write_table`'s fixed settings, so two runs on the same
hardware give byte-identical files; the scratch is deleted afterwards.

On a multi-node cluster (`RAY_ADDRESS` set) `extract_dir` and `tokenizers_dir` must be on a
filesystem every node mounts at the same path: the workers read them directly.

Numerics (`encoder_numerics`): fp32 is the reference (TF32 off for matmuls and cuDNN
convolutions); tf32 allows TF32 on CUDA; bf16 runs the encoder under CUDA autocast. On CPU both
fall back to fp32 with a warning; the encoders used are recorded in meta.json, because a
nearest-code argmin can flip on near-ties between devices and precisions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import torch

from pipeline import checkpoint, io
from pipeline.config import TokenizeConfig
from pipeline.data import extracted
from pipeline.data.tokens import (
    ID_DTYPE,
    MAX_CODEBOOK,
    TOKENS_SCHEMA,
    TokensError,
    ids_numpy,
    list_array,
)
from pipeline.devices import usable_cores
from pipeline.ray_runtime import ray_session, require_resources
from pipeline.tokenizers.layout import MODALITIES, TokenLayout
from pipeline.tokenizers.tokenizer import Tokenizer, load_tokenizers

log = logging.getLogger(__name__)

CACHE_SUBDIR = "tokenize"
PRECISIONS = ("fp32", "tf32", "bf16")
# The driver writes a scratch chunk once it holds this many clips (~5 KB of ids each).
SCRATCH_CHUNK_ROWS = 4096
READ_COLUMNS = ["clip_id", "label", "split", "frames", "mel"]

# Scratch rows also say which encoder (device + effective precision) made them.
SCRATCH_SCHEMA = TOKENS_SCHEMA.append(pa.field("encoder", pa.string()))


class TokenizeError(TokensError):
    """A tokenize problem the user can fix: missing inputs, mismatched shapes, no GPUs."""


@dataclass(frozen=True)
class TokenizeSummary:
    """What `run_tokenize` did. Times in seconds: `seconds` the whole stage, `ray_seconds` the
    Ray Data job alone, `startup_seconds` starting Ray (0 when it was already running)."""

    out_dir: str
    counts: dict[str, int]
    num_frames: int
    image_grid: tuple[int, int]
    audio_grid: tuple[int, int]
    files: int
    precision: str
    encoders: tuple[str, ...]
    seconds: float
    ray_seconds: float
    startup_seconds: float

    @property
    def clips(self) -> int:
        return sum(self.counts.values())

    def metrics(self) -> dict[str, float]:
        """Flat numbers: clips, <split>_clips, image_sequences, audio_sequences, tokens per clip,
        files, seconds, ray_seconds, startup_seconds, clips_per_s (of the Ray job)."""
        out: dict[str, float] = {
            "clips": self.clips,
            "image_sequences": self.clips * self.num_frames,
            "audio_sequences": self.clips,
            "image_tokens_per_clip": self.num_frames * self.image_grid[0] * self.image_grid[1],
            "audio_tokens_per_clip": self.audio_grid[0] * self.audio_grid[1],
            "files": self.files,
            "seconds": self.seconds,
            "ray_seconds": self.ray_seconds,
            "startup_seconds": self.startup_seconds,
            "clips_per_s": round(self.clips / self.ray_seconds, 3) if self.ray_seconds else 0.0,
        }
        out.update({f"{split}_clips": n for split, n in sorted(self.counts.items())})
        return out

    def describe(self, out_dir: str | Path) -> str:
        """The stage's closing line: counts, grids, time, where."""
        splits = ", ".join(f"{s} {n:,}" for s, n in sorted(self.counts.items()))
        iv, ia = self.image_grid, self.audio_grid
        return (
            f"tokenize: {self.clips:,} clips ({splits}) -> {self.clips * self.num_frames:,} image "
            f"({iv[0]}x{iv[1]}) + {self.clips:,} audio ({ia[0]}x{ia[1]}) id sequences on "
            f"{', '.join(self.encoders)} in {self.seconds:.1f} s -> {out_dir}"
        )


# ---------------------------------------------------------------------------------- encoding


def effective_precision(precision: str, device: torch.device | str) -> str:
    """`precision` on CUDA; fp32 on any other device (no TF32 or bf16 autocast there)."""
    if precision not in PRECISIONS:
        raise TokenizeError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision if torch.device(device).type == "cuda" else "fp32"


@contextlib.contextmanager
def encoder_numerics(precision: str, device: torch.device | str) -> Iterator[str]:
    """Set TF32 and autocast for `precision` on `device`; restores the global flags on exit.

    Yields the effective precision (`effective_precision`). Uses torch's `fp32_precision`
    switches where they exist (torch >= 2.9, where cuDNN convolutions default to TF32) and the
    legacy `allow_tf32` flags otherwise; the two must not be mixed in one process.
    """
    effective = effective_precision(precision, device)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        saved = (matmul.fp32_precision, cudnn.conv.fp32_precision)
        value = "tf32" if effective == "tf32" else "ieee"
        matmul.fp32_precision = cudnn.conv.fp32_precision = value

        def restore() -> None:
            matmul.fp32_precision, cudnn.conv.fp32_precision = saved
    else:  # pragma: no cover - torch < 2.9
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32 = cudnn.allow_tf32 = effective == "tf32"

        def restore() -> None:
            matmul.allow_tf32, cudnn.allow_tf32 = saved

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if effective == "bf16"
        else contextlib.nullcontext()
    )
    try:
        with autocast:
            yield effective
    finally:
        restore()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return "cpu"


class ClipEncoder:
    """Both tokenizers on one device: decoded clips in, ids out. The work of one actor, and of
    the plain loop `tokenize_plain`; no encoder forward sees more than `batch_size` inputs."""

    def __init__(
        self,
        tokenizers_dir: str | Path,
        device: str | torch.device,
        precision: str,
        batch_size: int,
    ) -> None:
        self.device = torch.device(device)
        self.image = Tokenizer.load(Path(tokenizers_dir) / "image", self.device)
        self.audio = Tokenizer.load(Path(tokenizers_dir) / "audio", self.device)
        self.precision = precision
        self.batch_size = batch_size
        effective = effective_precision(precision, self.device)
        if effective != precision:
            log.warning("%s is not available on %s; encoding in fp32", precision, self.device)
        self.description = f"{_device_name(self.device)} {effective} (torch {torch.__version__})"

    def _encode(self, tok: Tokenizer, inputs: np.ndarray) -> np.ndarray:
        out = [
            tok.encode(inputs[i : i + self.batch_size]).astype(ID_DTYPE)
            for i in range(0, len(inputs), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, tok.layout().length), ID_DTYPE)

    def encode(self, frames: np.ndarray, mels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """frames (B, N, S, S, 3) uint8, mels (B, F, T) [0, 1] float ->
        image_ids (B, N, L_v) uint16, audio_ids (B, L_a) uint16."""
        b, n = frames.shape[:2]
        with encoder_numerics(self.precision, self.device):
            image = self._encode(self.image, frames.reshape(b * n, *frames.shape[2:]))
            audio = self._encode(self.audio, mels)
        return image.reshape(b, n, -1), audio

    def encode_stored(
        self, frames: list[list[bytes]], mels: list[bytes], mel_shape: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Shard columns (JPEG lists, float16 mel bytes) -> (image_ids, audio_ids) as `encode`."""
        decoded = [
            extracted.decode_row(list(f), m, mel_shape) for f, m in zip(frames, mels, strict=True)
        ]
        return self.encode(np.stack([d[0] for d in decoded]), np.stack([d[1] for d in decoded]))


class ClipTokenizer:
    """The Ray Data callable class: loads both tokenizers once per actor, then maps numpy
    batches of extract rows to clip_id, label, split, image_ids (B, N, L_v), audio_ids (B, L_a)
    (uint16) and encoder (device + effective precision, for the provenance in meta.json)."""

    def __init__(
        self,
        tokenizers_dir: str,
        precision: str,
        use_gpu: bool,
        batch_size: int,
        mel_shape: tuple[int, ...],
        num_actors: int,
    ) -> None:
        device = "cpu"
        if use_gpu and torch.cuda.is_available():
            device = "cuda"
        elif use_gpu:
            log.warning("this actor was given a GPU but torch sees no CUDA; encoding on cpu")
        if device == "cpu":
            # Ray starts workers with one thread per reserved CPU (OMP_NUM_THREADS=1); a CPU
            # actor instead takes its share of this node's cores, as the plain loop would.
            torch.set_num_threads(_cpu_threads(num_actors))
        self.encoder = ClipEncoder(tokenizers_dir, device, precision, batch_size)
        self.mel_shape = tuple(mel_shape)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image, audio = self.encoder.encode_stored(
            list(batch["frames"]), list(batch["mel"]), self.mel_shape
        )
        return {
            "clip_id": batch["clip_id"],
            "label": batch["label"],
            "split": batch["split"],
            "image_ids": image,
            "audio_ids": audio,
            "encoder": np.full(len(image), self.encoder.description, dtype=object),
        }


def tokenize_plain(
    extract_dir: Path,
    tokenizers_dir: Path,
    precision: str = "fp32",
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The same computation as the Ray job in a plain PyTorch loop (the reference for tests and
    the benchmark): clip_id -> (image_ids (N, L_v), audio_ids (L_a,)) uint16, every split."""
    meta = _extract_meta(Path(extract_dir))
    shape = tuple(meta["mel"]["shape"])
    enc = ClipEncoder(tokenizers_dir, device, precision, batch_size)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in sorted(meta["shards"]):
        for entry in meta["shards"][split]:
            pf = pq.ParquetFile(Path(extract_dir) / entry["path"])
            for batch in pf.iter_batches(
                batch_size=batch_size, columns=["clip_id", "frames", "mel"]
            ):
                cols = batch.to_pydict()
                image, audio = enc.encode_stored(cols["frames"], cols["mel"], shape)
                for i, clip_id in enumerate(cols["clip_id"]):
                    out[clip_id] = (image[i], audio[i])
    return out


# ---------------------------------------------------------------------------------- Ray


def _cpu_threads(num_actors: int) -> int:
    return max(1, usable_cores() // num_actors)


def _dataset(cfg: TokenizeConfig, paths: list[str], tokenizers_dir: Path, mel_shape: list[int]):
    import ray

    # `columns=` on read_parquet is deprecated since Ray 2.5x: select instead (pushed down).
    return (
        ray.data.read_parquet(paths)
        .select_columns(READ_COLUMNS)
        .map_batches(
            ClipTokenizer,
            fn_constructor_kwargs={
                "tokenizers_dir": str(tokenizers_dir),
                "precision": cfg.precision,
                "use_gpu": cfg.num_gpus_per_actor > 0,
                "batch_size": cfg.batch_size,
                "mel_shape": tuple(mel_shape),
                "num_actors": cfg.num_actors,
            },
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            num_gpus=cfg.num_gpus_per_actor,
            batch_size=cfg.batch_size,
            batch_format="numpy",
        )
    )


def _scratch_uri(cfg: TokenizeConfig, key: str) -> str | None:
    """Where Ray workers write (`output_uri`), or None: the driver writes into the cache."""
    if not cfg.output_uri:
        return None
    uri = cfg.output_uri.rstrip("/")
    if "://" not in uri:
        uri = str(Path(uri).resolve())  # workers do not share the driver's working directory
    return f"{uri}/{CACHE_SUBDIR}-{key}"


def _write_scratch(ds, scratch: Path, uri: str | None) -> None:
    """Run the job, its output going to `uri` (workers) or to `scratch` (driver)."""
    import ray

    if uri is not None:
        ds.write_parquet(uri, mode=ray.data.SaveMode.OVERWRITE)
        return
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    pending: list[pa.Table] = []
    rows = chunks = 0

    def flush() -> None:
        nonlocal rows, chunks
        io.write_table(scratch / f"chunk-{chunks:05d}.parquet", pa.concat_tables(pending))
        pending.clear()
        rows, chunks = 0, chunks + 1

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if len(batch["clip_id"]):
            pending.append(_scratch_table(batch))
            rows += len(batch["clip_id"])
        if rows >= SCRATCH_CHUNK_ROWS:
            flush()
    if pending:
        flush()


# ---------------------------------------------------------------------------------- Arrow


def _scratch_table(batch: dict[str, np.ndarray]) -> pa.Table:
    image, audio = batch["image_ids"], batch["audio_ids"]
    return pa.Table.from_arrays(
        [
            pa.array(list(batch["clip_id"]), pa.string()),
            pa.array(list(batch["label"]), pa.string()),
            pa.array(list(batch["split"]), pa.string()),
            list_array(image),
            list_array(audio),
            pa.array(list(batch["encoder"]), pa.string()),
        ],
        schema=SCRATCH_SCHEMA,
    )


def _read_scratch(uri: str) -> pa.Table:
    """Every Parquet file below `uri` (a local path or any pyarrow filesystem URI)."""
    fs, root = pa.fs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pa.fs.FileSelector(root, recursive=True))
    files = sorted(i.path for i in infos if i.is_file and i.path.endswith(".parquet"))
    if not files:
        raise TokenizeError(f"the Ray job wrote nothing under {uri}")
    return pa.concat_tables(
        [pq.read_table(f, filesystem=fs, columns=SCRATCH_SCHEMA.names) for f in files],
        promote_options="permissive",
    )


def _delete_scratch(uri: str) -> None:
    fs, root = pa.fs.FileSystem.from_uri(uri)
    with contextlib.suppress(OSError, FileNotFoundError):
        fs.delete_dir(root)


# ---------------------------------------------------------------------------------- compaction


def _compact(
    scratch: pa.Table, layout: TokenLayout, num_frames: int, rows_per_file: int, tmp: Path
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """Write `tmp/{split}/part-NNNNN.parquet`, sorted by clip_id, `rows_per_file` rows each.

    Returns (file entries per split, clip counts per split)."""
    clip_ids = np.asarray(scratch.column("clip_id").to_pylist(), dtype=object)
    if len(set(clip_ids)) != len(clip_ids):
        raise TokenizeError("the Ray job returned some clips more than once")
    image = ids_numpy(scratch.column("image_ids"), (num_frames, layout.image.length))
    audio = ids_numpy(scratch.column("audio_ids"), (layout.audio.length,))
    labels = np.asarray(scratch.column("label").to_pylist(), dtype=object)
    splits = np.asarray(scratch.column("split").to_pylist(), dtype=object)
    order = sorted(range(len(clip_ids)), key=clip_ids.__getitem__)
    files: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, int] = {}
    for split in sorted(set(splits)):
        rows = np.asarray([i for i in order if splits[i] == split], dtype=np.int64)
        counts[split] = len(rows)
        files[split] = []
        for start in range(0, len(rows), rows_per_file):
            take = rows[start : start + rows_per_file]
            table = pa.Table.from_arrays(
                [
                    pa.array(clip_ids[take].tolist(), pa.string()),
                    pa.array(labels[take].tolist(), pa.string()),
                    pa.array(splits[take].tolist(), pa.string()),
                    list_array(image[take]),
                    list_array(audio[take]),
                ],
                schema=TOKENS_SCHEMA,
            )
            rel = f"{split}/part-{len(files[split]):05d}.parquet"
            io.write_table(tmp / rel, table)
            files[split].append(
                {
                    "path": rel,
                    "rows": len(take),
                    "first": clip_ids[take[0]],
                    "sha256": io.sha256_file(tmp / rel),
                }
            )
    return files, counts


# ---------------------------------------------------------------------------------- inputs


def _extract_meta(extract_dir: Path) -> dict[str, Any]:
    if not (extract_dir / io.META_NAME).is_file():
        raise TokenizeError(
            f"{extract_dir} holds no extract output ({io.META_NAME}); run the extract stage first"
        )
    return extracted.load_meta(extract_dir)


def _tokenizer_record(folder: Path, tok: Tokenizer) -> dict[str, Any]:
    meta = tok.meta
    record = {
        "source": meta.get("source", ""),
        "weights_sha256": meta.get("weights_sha256")
        or io.sha256_file(checkpoint.weights_path(folder)),
        "meta_sha256": io.sha256_file(checkpoint.config_path(folder)),
        "input": {"kind": tok.spec.kind, "shape": list(tok.spec.shape)},
    }
    if meta.get("pretrained_sha256"):
        record["pretrained_sha256"] = meta["pretrained_sha256"]
    return record


def _check_inputs(meta: dict[str, Any], toks: dict[str, Tokenizer]) -> None:
    """The tokenizers must eat what extract wrote, and their ids must fit uint16."""
    _, height, width, _ = meta["frames"]["shape"]
    image_in = (3, height, width)
    if toks["image"].spec.shape != image_in:
        raise TokenizeError(
            f"the image tokenizer expects {toks['image'].spec.shape} inputs but extract wrote "
            f"{image_in} frames; retrain the tokenizers or rerun extract with their image_size"
        )
    mel_in = (1, *meta["mel"]["shape"])
    if toks["audio"].spec.shape != mel_in:
        raise TokenizeError(
            f"the audio tokenizer expects {toks['audio'].spec.shape} mels but extract wrote "
            f"{mel_in}"
        )
    for modality, tok in toks.items():
        if tok.layout().codebook_size > MAX_CODEBOOK:
            raise TokenizeError(
                f"the {modality} codebook has {tok.layout().codebook_size} codes; "
                f"uint16 ids allow at most {MAX_CODEBOOK}"
            )
    if sum(meta["counts"].values()) == 0:
        raise TokenizeError("extract wrote no clips, so there is nothing to tokenize")


def _run_key(extract_dir: Path, tokenizers_dir: Path, cfg: TokenizeConfig) -> str:
    """Names the scratch of one set of inputs and settings."""
    digest = hashlib.sha256()
    for path in (
        extract_dir / io.META_NAME,
        checkpoint.config_path(tokenizers_dir / "image"),
        checkpoint.config_path(tokenizers_dir / "audio"),
    ):
        digest.update(path.read_bytes())
    digest.update(json.dumps([cfg.precision, cfg.batch_size]).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------- stage


def run_tokenize(
    cfg: TokenizeConfig,
    extract_dir: Path,
    tokenizers_dir: Path,
    out_dir: Path,
    cache_dir: Path,
    *,
    cluster_wait_s: float = 0.0,
) -> TokenizeSummary:
    """Tokenize every extracted clip with Ray Data into `out_dir` (see the module doc).

    Starts a local Ray instance, or joins the cluster at `RAY_ADDRESS`, unless Ray is already
    running. Fails with a `TokenizeError` before any work when an input is missing or the
    tokenizers do not fit the extracted shapes, and with a `ClusterError` when the cluster has
    fewer GPUs than `num_actors * num_gpus_per_actor` (an autoscaling cluster is asked for them
    and given `cluster_wait_s` to add them: `ray_runtime.require_resources`).
    """
    start = time.monotonic()
    extract_dir, tokenizers_dir = Path(extract_dir).resolve(), Path(tokenizers_dir).resolve()
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    meta_in = _extract_meta(extract_dir)
    try:
        toks = load_tokenizers(tokenizers_dir)
    except checkpoint.CheckpointError as err:
        raise TokenizeError(str(err)) from None
    _check_inputs(meta_in, toks)
    layout = TokenLayout(audio=toks["audio"].layout(), image=toks["image"].layout())
    num_frames = int(meta_in["num_frames"])
    paths = [
        str(extract_dir / e["path"])
        for s in sorted(meta_in["shards"])
        for e in meta_in["shards"][s]
    ]
    key = _run_key(extract_dir, tokenizers_dir, cfg)
    scratch = cache_dir / CACHE_SUBDIR / key
    uri = _scratch_uri(cfg, key)

    with ray_session() as startup_s:
        require_resources(
            [{"GPU": cfg.num_gpus_per_actor}] * cfg.num_actors,
            f"tokenize asks for {cfg.num_actors} actor(s) x {cfg.num_gpus_per_actor:g} GPU",
            "set tokenize.num_gpus_per_actor to 0 to tokenize on CPU",
            cluster_wait_s,
        )
        if cfg.num_gpus_per_actor == 0 and cfg.precision != "fp32":
            log.warning("tokenize on CPU: precision %s falls back to fp32", cfg.precision)
        job_start = time.monotonic()
        _write_scratch(_dataset(cfg, paths, tokenizers_dir, meta_in["mel"]["shape"]), scratch, uri)
        ray_s = time.monotonic() - job_start

    table = _read_scratch(uri or str(scratch.resolve()))
    expected = {s: n for s, n in meta_in["counts"].items() if n}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    io.clean_dir_leftovers(out_dir)
    tmp = io.make_temp_dir(out_dir)
    try:
        files, counts = _compact(table, layout, num_frames, cfg.rows_per_file, tmp)
        if counts != expected:
            raise TokenizeError(
                f"the Ray job returned {counts} clips per split, extract holds {expected}"
            )
        encoders = sorted(set(table.column("encoder").to_pylist()))
        meta = {
            "layout": layout.to_dict(),
            "tokenizers": {m: _tokenizer_record(tokenizers_dir / m, toks[m]) for m in MODALITIES},
            "counts": counts,
            "num_frames": num_frames,
            "labels": list(meta_in["labels"]),
            "precision": cfg.precision,
            "encoders": encoders,
            "rows_per_file": cfg.rows_per_file,
            "files": files,
            "extract_meta_sha256": io.sha256_file(extract_dir / io.META_NAME),
            "columns": {
                "image_ids": f"list<list<uint16>>: {num_frames} frames x {layout.image.length} ids "
                f"({layout.image.grid[0]}x{layout.image.grid[1]} row-major)",
                "audio_ids": f"list<uint16>: {layout.audio.length} ids "
                f"({layout.audio.grid[0]}x{layout.audio.grid[1]} row-major, mel bands x time)",
            },
        }
        io.write_json(tmp / io.META_NAME, meta)
        io.replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if uri is not None:
        _delete_scratch(uri)
    shutil.rmtree(cache_dir / CACHE_SUBDIR, ignore_errors=True)  # this key and stale ones

    summary = TokenizeSummary(
        out_dir=str(out_dir),
        counts=counts,
        num_frames=num_frames,
        image_grid=layout.image.grid,
        audio_grid=layout.audio.grid,
        files=sum(len(v) for v in files.values()),
        precision=cfg.precision,
        encoders=tuple(encoders),
        seconds=round(time.monotonic() - start, 3),
        ray_seconds=round(ray_s, 3),
        startup_seconds=round(startup_s, 3),
    )
    log.info("%s", summary.describe(out_dir))
    return summary
