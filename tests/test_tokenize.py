"""pipeline.tokenizers.batch_tokenize: Ray Data job == plain loop, determinism, output contract.

A tiny synthetic set (4 classes x (2 train + 1 test), 96x72 at 10 fps) goes through the real
extract at 32 px; two random-init tokenizers (image 32x32 -> 8x8 ids, C 32; mel 80x848 -> 5x53
ids, C 48) tokenize it. Ray starts once for the module; two Ray jobs run in all.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import io
from pipeline.config import ExtractConfig, SyntheticConfig, TokenizeConfig
from pipeline.data import extract, extracted, tokens
from pipeline.data.manifest import write_manifest
from pipeline.data.synthetic import generate_dataset
from pipeline.ray_runtime import ClusterError, ray_session
from pipeline.tokenizers import batch_tokenize as bt
from pipeline.tokenizers.layout import TokenLayout
from pipeline.tokenizers.tokenizer import InputSpec, Tokenizer
from pipeline.tokenizers.vqgan import VQGANConfig, VQModel

SYNTH = SyntheticConfig(
    num_classes=4, train_per_class=2, test_per_class=1, width=96, height=72, fps=10,
    sample_rate=22050, duration_s=10.0,
)  # fmt: skip
EXTRACT = ExtractConfig(
    num_frames=10, image_size=32, jpeg_quality=90, sample_rate=22050, clip_seconds=10.0,
    n_fft=1024, hop_length=256, n_mels=80, fmin=125.0, fmax=7600.0, mel_frames=848,
    rows_per_shard=5, workers=2,
)  # fmt: skip
CFG = TokenizeConfig(
    batch_size=4, num_actors=1, num_gpus_per_actor=0, precision="fp32", rows_per_file=3,
    output_uri="",
)  # fmt: skip
TINY = {"ch": 8, "num_res_blocks": 1, "attn_resolutions": (), "z_channels": 8, "embed_dim": 8,
        "norm_groups": 8}  # fmt: skip
IMAGE_C, AUDIO_C = 32, 48


def _save_tokenizer(folder: Path, modality: str, spec: InputSpec, **arch) -> Tokenizer:
    cfg = VQGANConfig(
        in_channels=spec.shape[0], out_channels=spec.shape[0], resolution=spec.shape[2],
        **TINY, **arch,
    )  # fmt: skip
    tok = Tokenizer(modality, VQModel(cfg), spec, {"source": "random-init"})
    tok.save(folder)
    return tok


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenize")
    clips = root / "clips"
    records = generate_dataset(
        SYNTH, clips, seed=0, splits=("train", "test"), classes=(), limit=0, previous=[], workers=2
    )
    write_manifest(clips, records)
    extract.run_extract(EXTRACT, clips, root / "extract", root / "cache")
    torch.manual_seed(0)
    _save_tokenizer(root / "tok/image", "image", InputSpec("image", (3, 32, 32)),
                    ch_mult=(1, 2, 2), n_embed=IMAGE_C)  # fmt: skip
    _save_tokenizer(root / "tok/audio", "audio", InputSpec("mel", (1, 80, 848)),
                    ch_mult=(1, 1, 1, 1, 2), n_embed=AUDIO_C)  # fmt: skip
    return {"root": root, "extract": root / "extract", "tok": root / "tok", "cache": root / "cache"}


@pytest.fixture(scope="module")
def ray_up():
    with ray_session():
        yield


@pytest.fixture(scope="module")
def run(data, ray_up):
    out = data["root"] / "tokens"
    summary = bt.run_tokenize(CFG, data["extract"], data["tok"], out, data["cache"])
    return out, summary


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------- the Ray job


def test_ray_output_equals_plain_loop(data, run):
    out, _ = run
    plain = bt.tokenize_plain(data["extract"], data["tok"], "fp32", batch_size=7)
    got = {}
    for split in ("train", "test"):
        for ex in tokens.iter_tokens(out, split):
            got[ex.clip_id] = (ex.image_ids, ex.audio_ids)
    assert sorted(got) == sorted(plain) and len(got) == 12
    for clip_id, (image, audio) in plain.items():
        assert image.shape == (10, 64) and audio.shape == (265,)
        np.testing.assert_array_equal(got[clip_id][0], image, err_msg=clip_id)
        np.testing.assert_array_equal(got[clip_id][1], audio, err_msg=clip_id)
    # The ids actually depend on the input: frames of different clips tokenize differently.
    assert len({v[0].tobytes() for v in plain.values()}) == 12


def test_second_run_is_byte_identical_and_replaces_stale_files(data, run, tmp_path):
    """Run 2 sends the ids through `output_uri` (workers write) instead of the driver; the
    compacted files must still be the same bytes, the stale file must go, no scratch stays."""
    out, _ = run
    first = _files(out)
    second_out = data["root"] / "tokens-2"
    (second_out / "train").mkdir(parents=True)
    (second_out / "train" / "part-00099.parquet").write_bytes(b"stale")
    shared = tmp_path / "shared"
    summary = bt.run_tokenize(
        replace(CFG, output_uri=str(shared)),
        data["extract"],
        data["tok"],
        second_out,
        data["cache"],
    )
    second = _files(second_out)
    assert sorted(second) == sorted(first)
    for name in first:
        assert second[name] == first[name], name
    assert summary.counts == {"test": 4, "train": 8}
    assert not any(shared.rglob("*.parquet")), "the workers' scratch was left behind"
    assert not (data["cache"] / bt.CACHE_SUBDIR).exists()
    assert not list(second_out.parent.glob(".tmp-*"))


def test_meta_round_trips_the_layout(data, run):
    out, summary = run
    layout, meta = tokens.load_token_meta(out)
    image = Tokenizer.load(data["tok"] / "image")
    audio = Tokenizer.load(data["tok"] / "audio")
    assert layout == TokenLayout(audio=audio.layout(), image=image.layout())
    assert TokenLayout.from_dict(layout.to_dict()) == layout
    assert (layout.image.mask_id, layout.audio.mask_id) == (IMAGE_C, AUDIO_C)
    assert (layout.image.grid, layout.audio.grid) == ((8, 8), (5, 53))
    assert meta["counts"] == {"test": 4, "train": 8} == summary.counts
    assert meta["labels"] == extracted.load_meta(data["extract"])["labels"]
    assert meta["num_frames"] == 10 and meta["precision"] == "fp32"
    assert meta["encoders"] == [f"cpu fp32 (torch {torch.__version__})"]
    for m in ("image", "audio"):
        rec = meta["tokenizers"][m]
        assert rec["weights_sha256"] == io.sha256_file(data["tok"] / m / "model.safetensors")
        assert rec["source"] == "random-init"
    listed = [e for entries in meta["files"].values() for e in entries]
    assert sorted(e["path"] for e in listed) == sorted(
        str(p.relative_to(out)) for p in out.rglob("*.parquet")
    )
    for e in listed:
        assert io.sha256_file(out / e["path"]) == e["sha256"]


def test_ids_are_codes_of_their_codebook(run):
    out, _ = run
    layout, _ = tokens.load_token_meta(out)
    for split in ("train", "test"):
        arrays = tokens.read_split(out, split)
        assert arrays.image_ids.dtype == arrays.audio_ids.dtype == np.uint16
        assert arrays.image_ids.max() < layout.image.codebook_size
        assert arrays.audio_ids.max() < layout.audio.codebook_size
        # more than one code in use, or the range check above would be vacuous
        assert len(np.unique(arrays.image_ids)) > 1 and len(np.unique(arrays.audio_ids)) > 1


def test_files_are_plain_arrow_sorted_and_sized(run):
    out, _ = run
    _, meta = tokens.load_token_meta(out)
    for split, rows in (("train", [3, 3, 2]), ("test", [3, 1])):
        entries = meta["files"][split]
        assert [e["path"] for e in entries] == [
            f"{split}/part-{i:05d}.parquet" for i in range(len(rows))
        ]
        clip_ids = []
        for e, n in zip(entries, rows, strict=True):
            schema = pq.read_schema(out / e["path"])
            assert schema.names == ["clip_id", "label", "split", "image_ids", "audio_ids"]
            assert schema.field("image_ids").type == pa.list_(pa.list_(pa.uint16()))
            assert schema.field("audio_ids").type == pa.list_(pa.uint16())
            for f in schema:
                assert not isinstance(f.type, pa.ExtensionType)
                assert b"ARROW:extension:name" not in (f.metadata or {})
            table = pq.read_table(out / e["path"])
            assert table.num_rows == n == e["rows"]
            assert set(table.column("split").to_pylist()) == {split}
            clip_ids += table.column("clip_id").to_pylist()
        assert clip_ids == sorted(clip_ids) and len(set(clip_ids)) == len(clip_ids)


def test_compaction_gives_the_same_bytes_for_any_row_order(run, tmp_path):
    """Ray returns rows in no fixed order; the compacted files must not depend on it."""
    out, _ = run
    layout, meta = tokens.load_token_meta(out)
    parts = {split: tokens.read_split(out, split) for split in ("train", "test")}
    batch = {
        "clip_id": np.array([c for p in parts.values() for c in p.clip_ids], dtype=object),
        "label": np.array([lab for p in parts.values() for lab in p.labels], dtype=object),
        "split": np.array([s for s, p in parts.items() for _ in p.clip_ids], dtype=object),
        "image_ids": np.concatenate([p.image_ids for p in parts.values()]),
        "audio_ids": np.concatenate([p.audio_ids for p in parts.values()]),
        "encoder": np.array(["cpu"] * 12, dtype=object),
    }
    shuffled = {k: v[np.random.default_rng(1).permutation(12)] for k, v in batch.items()}
    files, counts = bt._compact(bt._scratch_table(shuffled), layout, 10, 3, tmp_path)
    assert files == meta["files"] and counts == meta["counts"]
    for entries in files.values():
        for e in entries:
            assert (tmp_path / e["path"]).read_bytes() == (out / e["path"]).read_bytes()


def test_summary_line_and_metrics(run):
    out, summary = run
    line = summary.describe(out)
    assert line.startswith("tokenize: 12 clips") and "120 image" in line and str(out) in line
    m = summary.metrics()
    assert m["clips"] == 12 and m["train_clips"] == 8 and m["image_sequences"] == 120
    assert m["image_tokens_per_clip"] == 640 and m["audio_tokens_per_clip"] == 265
    assert all(isinstance(v, int | float) for v in m.values())


# ------------------------------------------------------------------------------- failures


def test_more_gpus_than_the_cluster_has_fails_fast(data, ray_up):
    """Without the check Ray Data waits forever for the GPU: run it in a thread with a deadline."""
    import ray

    have = int(ray.cluster_resources().get("GPU", 0))
    out = data["root"] / "tokens-gpu"
    cfg = replace(CFG, num_gpus_per_actor=have + 1)
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            bt.run_tokenize(cfg, data["extract"], data["tok"], out, data["cache"])
            result.append(None)
        except BaseException as err:  # handed to the test thread
            result.append(err)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "run_tokenize waited for a GPU instead of failing"
    assert isinstance(result[0], ClusterError), result[0]
    assert f"{have + 1} GPU(s) but the Ray cluster has {have}" in str(result[0])
    assert not out.exists()


def test_mismatched_tokenizer_or_missing_input_is_one_sentence(data, tmp_path):
    with pytest.raises(bt.TokenizeError, match="run the extract stage"):
        bt.run_tokenize(CFG, tmp_path / "none", data["tok"], tmp_path / "o", tmp_path / "c")
    wrong = tmp_path / "tok"
    _save_tokenizer(wrong / "image", "image", InputSpec("image", (3, 64, 64)),
                    ch_mult=(1, 2, 2), n_embed=IMAGE_C)  # fmt: skip
    _save_tokenizer(wrong / "audio", "audio", InputSpec("mel", (1, 80, 848)),
                    ch_mult=(1, 1, 1, 1, 2), n_embed=AUDIO_C)  # fmt: skip
    with pytest.raises(bt.TokenizeError, match="image tokenizer expects"):
        bt.run_tokenize(CFG, data["extract"], wrong, tmp_path / "o", tmp_path / "c")
    assert not (tmp_path / "o").exists()


def _tf32_state() -> tuple:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; the legacy flags must not be read then
        return matmul.fp32_precision, cudnn.conv.fp32_precision
    return matmul.allow_tf32, cudnn.allow_tf32


def test_numerics_set_tf32_only_when_asked_and_restore_the_flags():
    before = _tf32_state()
    tf32 = ("tf32", "tf32") if isinstance(before[0], str) else (True, True)
    ieee = ("ieee", "ieee") if isinstance(before[0], str) else (False, False)
    with bt.encoder_numerics("tf32", "cuda") as effective:
        assert effective == "tf32" and _tf32_state() == tf32
    assert _tf32_state() == before
    with bt.encoder_numerics("fp32", "cuda") as effective:
        assert effective == "fp32" and _tf32_state() == ieee
    with bt.encoder_numerics("bf16", "cpu") as effective:
        assert effective == "fp32" and _tf32_state() == ieee
    assert _tf32_state() == before
    with pytest.raises(bt.TokenizeError):
        bt.effective_precision("fp16", "cuda")
