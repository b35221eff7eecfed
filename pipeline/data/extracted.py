"""The extract stage's output as every later stage reads it: shard schema, meta.json, readers.

    {split}/part-NNNNN.parquet   successful clips sorted by clip_id, `rows_per_shard` rows each
                                 (the last shard of a split is shorter); columns in `SHARD_SCHEMA`
    failures.parquet             clip_id, label, split, reason, detail (`FAILURE_SCHEMA`)
    meta.json                    counts, shapes, mel parameters, labels, shard hashes, ffmpeg

Shard columns: `frames` is a list of `num_frames` JPEG images (image_size² RGB, baseline, 4:4:4);
`mel` is the (n_mels, mel_frames) float16 little-endian C-order bytes of the [0, 1] mel
(`np.frombuffer(b, "<f2").reshape(meta["mel"]["shape"])`); `flags` lists soft problems.
`iter_examples` reads it back; `settings` gives the extract settings the data was made with.
"""

from __future__ import annotations

import io as _stdio
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io
from pipeline.config import ExtractConfig

FAILURES_NAME = "failures.parquet"

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


class Example(NamedTuple):
    """One row read back: frames (N, S, S, 3) uint8, mel (n_mels, mel_frames) float32 in [0, 1]."""

    clip_id: str
    label: str
    frames: np.ndarray
    mel: np.ndarray


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
