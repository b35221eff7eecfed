"""The token files the tokenize stage writes and every later stage reads: schema, encoding of
id arrays as Arrow lists, and the readers.

    <tokens_dir>/{split}/part-NNNNN.parquet   every clip of the split sorted by clip_id
    <tokens_dir>/meta.json                    TokenLayout, tokenizer hashes, counts, labels,
                                              num_frames, precision, files with sha256

Columns (`TOKENS_SCHEMA`), plain Arrow types that pyarrow, pandas, polars or DuckDB read without
Ray (no tensor extension types):

    clip_id    string
    label      string
    split      string
    image_ids  list<list<uint16>>  num_frames lists of rows * cols ids, row-major per frame
    audio_ids  list<uint16>        rows * cols ids of the mel, row-major (mel bands x time)

Ids are codebook indices in [0, C) of each modality; the layout in meta.json says C, the grid
and the [MASK] id (= C); uint16 holds them because C <= 65535 (`VQGANArch.n_embed`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io
from pipeline.errors import PipelineError
from pipeline.tokenizers.layout import TokenLayout

ID_DTYPE = np.uint16
MAX_CODEBOOK = int(np.iinfo(ID_DTYPE).max)  # the [MASK] id C must fit as well

TOKENS_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("image_ids", pa.list_(pa.list_(pa.uint16()))),
        ("audio_ids", pa.list_(pa.uint16())),
    ]
)


class TokensError(PipelineError):
    """Token files that are missing or do not hold what their meta.json says."""


class TokenExample(NamedTuple):
    """One clip read back: image_ids (num_frames, L_v) and audio_ids (L_a,), both uint16."""

    clip_id: str
    label: str
    image_ids: np.ndarray
    audio_ids: np.ndarray


class TokenArrays(NamedTuple):
    """A whole split read back: image_ids (n, num_frames, L_v), audio_ids (n, L_a) uint16."""

    clip_ids: list[str]
    labels: list[str]
    image_ids: np.ndarray
    audio_ids: np.ndarray


# ---------------------------------------------------------------------------------- Arrow


def list_array(values: np.ndarray) -> pa.ChunkedArray:
    """(n, d1, ..., dk) ids -> n rows of k-level nested lists of uint16 (plain Arrow lists).

    Built in pieces of fewer than 2**31 ids, so that no piece's int32 offsets overflow."""
    values = np.ascontiguousarray(values, dtype=ID_DTYPE)
    list_type: pa.DataType = pa.uint16()
    for _ in values.shape[1:]:
        list_type = pa.list_(list_type)
    per_row = max(1, int(np.prod(values.shape[1:])))
    step = max(1, (2**31 - 1) // per_row)
    pieces = []
    for start in range(0, len(values), step):
        part = values[start : start + step]
        arr: pa.Array = pa.array(part.reshape(-1))
        for dim in reversed(part.shape[1:]):
            offsets = pa.array(np.arange(0, len(arr) + 1, dim, dtype=np.int32))
            arr = pa.ListArray.from_arrays(offsets, arr, type=pa.list_(arr.type))
        pieces.append(arr)
    return pa.chunked_array(pieces, type=list_type)


def ids_numpy(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """A list, nested-list or Ray tensor-extension column -> (n, *shape) uint16.

    Raises TokensError when a row does not hold prod(shape) ids."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = [np.zeros((0, *shape), ID_DTYPE)]
    for arr in chunks:
        n = len(arr)
        if isinstance(arr.type, pa.ExtensionType):
            arr = arr.storage
        while (
            pa.types.is_list(arr.type)
            or pa.types.is_large_list(arr.type)
            or pa.types.is_fixed_size_list(arr.type)
        ):
            arr = arr.flatten()
        values = arr.to_numpy(zero_copy_only=False)
        if values.size != n * int(np.prod(shape)):
            raise TokensError(f"a token column holds {values.size} ids, not {n} x {shape}")
        out.append(values.astype(ID_DTYPE, copy=False).reshape(n, *shape))
    return np.concatenate(out)


# ---------------------------------------------------------------------------------- readers


def load_token_meta(out_dir: Path) -> tuple[TokenLayout, dict[str, Any]]:
    """The tokens' TokenLayout and the whole meta.json."""
    path = Path(out_dir) / io.META_NAME
    if not path.is_file():
        raise TokensError(
            f"{out_dir} holds no tokens ({io.META_NAME}); run the tokenize stage first"
        )
    meta = io.read_json(path)
    return TokenLayout.from_dict(meta["layout"]), meta


def _read_file(path: Path, layout: TokenLayout, num_frames: int) -> TokenArrays:
    table = pq.read_table(path, columns=TOKENS_SCHEMA.names)
    return TokenArrays(
        table.column("clip_id").to_pylist(),
        table.column("label").to_pylist(),
        ids_numpy(table.column("image_ids"), (num_frames, layout.image.length)),
        ids_numpy(table.column("audio_ids"), (layout.audio.length,)),
    )


def read_split(out_dir: Path, split: str) -> TokenArrays:
    """All of `split` at once, in clip_id order (uint16: ~5 KB per clip at paper size)."""
    layout, meta = load_token_meta(out_dir)
    parts = [
        _read_file(Path(out_dir) / e["path"], layout, meta["num_frames"])
        for e in meta["files"].get(split, [])
    ]
    if not parts:
        n, lv, la = meta["num_frames"], layout.image.length, layout.audio.length
        return TokenArrays([], [], np.zeros((0, n, lv), ID_DTYPE), np.zeros((0, la), ID_DTYPE))
    return TokenArrays(
        [c for p in parts for c in p.clip_ids],
        [lab for p in parts for lab in p.labels],
        np.concatenate([p.image_ids for p in parts]),
        np.concatenate([p.audio_ids for p in parts]),
    )


def iter_tokens(out_dir: Path, split: str) -> Iterator[TokenExample]:
    """Every clip of `split` in clip_id order, one file in memory at a time."""
    layout, meta = load_token_meta(out_dir)
    for entry in meta["files"].get(split, []):
        part = _read_file(Path(out_dir) / entry["path"], layout, meta["num_frames"])
        for i, clip_id in enumerate(part.clip_ids):
            yield TokenExample(clip_id, part.labels[i], part.image_ids[i], part.audio_ids[i])
