"""The extract stage's output as every later stage reads it: shard schema, meta.json, readers.

    {split}/part-NNNNN.parquet   successful clips sorted by clip_id, `rows_per_shard` rows each
                                 (the last shard of a split is shorter); columns in `SHARD_SCHEMA`
    failures.parquet             clip_id, label, split, reason, detail (`FAILURE_SCHEMA`)
    meta.json                    counts, shapes, mel parameters, labels, shard hashes, ffmpeg

Shard columns: `frames` is a list of `num_frames` JPEG images (image_size² RGB, baseline, 4:4:4);
`mel` is the (n_mels, mel_frames) float16 little-endian C-order bytes of the [0, 1] mel
(`np.frombuffer(b, "<f2").reshape(meta["mel"]["shape"])`); `flags` lists soft problems.
`iter_examples` reads it back, `iter_selected` some rows of it (reading only the shards that hold
them, decoding only those rows, optionally only one frame); `settings` gives the extract settings
the data was made with.
"""

from __future__ import annotations

import io as _stdio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

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
    """The extract settings the data of this meta.json was made with (`workers` and `executor`,
    which do not change the data, are 0 and "local"). Later stages size themselves from this, not from params.yaml."""
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
        executor="local",
    )


def decode_row(
    frames: list[bytes], mel: bytes, mel_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Stored columns → (frames (N, S, S, 3) uint8, mel (n_mels, F) float32)."""
    from PIL import Image

    images = np.stack([np.asarray(Image.open(_stdio.BytesIO(b)).convert("RGB")) for b in frames])
    spec = np.frombuffer(mel, dtype="<f2").reshape(mel_shape).astype(np.float32)
    return images, spec


def split_size(meta: dict[str, Any], split: str) -> int:
    """Rows of `split` in the shards a meta.json lists (0 for a split it does not have)."""
    return sum(int(e["rows"]) for e in meta["shards"].get(split, []))


def read_labels(out_dir: Path, split: str) -> list[str]:
    """The label of every row of `split`, in clip_id order (only that column is read)."""
    out_dir = Path(out_dir)
    return [label for entry in load_meta(out_dir)["shards"].get(split, [])
            for label in io.read_table(out_dir / entry["path"], columns=["label"])
            .column("label").to_pylist()]  # fmt: skip


def capped_rows(labels: list[str], per_label: int) -> list[int]:
    """Indices of the first `per_label` rows of each label (every row when 0), in order."""
    seen: dict[str, int] = {}
    rows = []
    for i, label in enumerate(labels):
        if per_label and seen.get(label, 0) >= per_label:
            continue
        seen[label] = seen.get(label, 0) + 1
        rows.append(i)
    return rows


def iter_examples(out_dir: Path, split: str) -> Iterator[Example]:
    """Every row of `split` in clip_id order as `Example` (frames uint8, mel float32)."""
    for _, example in iter_selected(out_dir, split):
        yield example


def iter_selected(
    out_dir: Path, split: str, rows: Sequence[int] | None = None, frame: int | None = None
) -> Iterator[tuple[int, Example]]:
    """(row, Example) for each row of `split` whose index (in clip_id order) is in `rows`
    (None: every row), in that order. Only the shards holding them are read and only those rows
    decoded; with `frame`, only that frame (`Example.frames` is then (1, S, S, 3))."""
    out_dir = Path(out_dir)
    meta = load_meta(out_dir)
    shape = tuple(meta["mel"]["shape"])
    wanted = None if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    end = 0
    for entry in meta["shards"].get(split, []):
        start, end = end, end + int(entry["rows"])  # this shard holds rows [start, end)
        local = None if wanted is None else wanted[(wanted >= start) & (wanted < end)] - start
        if local is not None and not len(local):
            continue
        table = io.read_table(
            out_dir / entry["path"], columns=["clip_id", "label", "frames", "mel"]
        )
        for i in range(table.num_rows) if local is None else local.tolist():
            row = table.slice(i, 1).to_pylist()[0]
            frames = row["frames"] if frame is None else row["frames"][frame : frame + 1]
            images, mel = decode_row(frames, row["mel"], shape)
            yield start + i, Example(row["clip_id"], row["label"], images, mel)
