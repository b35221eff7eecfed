"""pipeline.evaluation: the offline evaluator, its scores and figures, the sweep's pure parts and
the evaluate stage's helpers, plus the evaluator / evaluate / sweep sections of params.yaml.

The evaluator is trained on real data, small: 4 classes of the procedural set (yellow triangle /
buzzy drone, white rain / hiss, orange stripes / rapid clicks, cyan waves / low rumble: the ones
whose object still fills a 64x64 frame), 6 train and 2 test clips each, rendered by
`synthetic.render_clip`. Frames are taken as the extract stage does (N segment centres, scaled
and centre-cropped to 64x64); the mel is `audio.log_mel` with the params.yaml settings (80 x 848).
Everything else uses hand-built arrays.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io as _stdio
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps

from pipeline import checkpoint
from pipeline.config import ConfigError, SweepConfig, SyntheticConfig, load_params, parse_params
from pipeline.data.audio import log_mel
from pipeline.data.decode import jpeg_bytes
from pipeline.data.synthetic import ClipSpec, parse_clip_id, render_clip
from pipeline.data.token_dataset import eval_frame
from pipeline.evaluation.evaluate import Generated, decode_clips, spread, write_per_class
from pipeline.evaluation.figures import evaluator_figure, generation_figure, image_grid_figure
from pipeline.evaluation.local import LocalEvaluator, Outputs
from pipeline.evaluation.scoring import (
    Reference,
    reference,
    score_audio,
    score_image,
    score_pairs,
    score_reference,
)
from pipeline.evaluation.sweep import (
    AXES,
    METRICS,
    grid,
    grid_figure,
    guidance_figure,
    write_results,
)
from pipeline.evaluation.train_local import (
    Clips,
    EvaluatorError,
    held_out_metrics,
    load_clips,
    read_chunks,
    reconstruct,
    split_outputs,
    train_local_evaluator,
)
from pipeline.metrics.math import GaussianStats, confusion_matrix

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CLASSES = (3, 4, 6, 7)
TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 2
NUM_FRAMES, IMAGE_SIZE = 10, 64
SYNTH = SyntheticConfig(
    num_classes=8, train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS,
    width=96, height=72, fps=5, sample_rate=22050, duration_s=10.0,
)  # fmt: skip
EXTRACT = PARAMS.extract
# Small nets and batches of 4: six optimizer steps per epoch, so that BatchNorm's running
# statistics (momentum 0.1) settle within the 8 epochs.
EVALUATOR = dataclasses.replace(
    PARAMS.evaluator, device="cpu", codec_augment=False, embed_dim=32, epochs=8, batch_size=4,
    joint_dim=16, joint_epochs=5, joint_batch_size=8,
)  # fmt: skip
BOUND = 0.625  # 5 of the 8 test clips; chance (4 classes) is 2 of 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convolutions: one intra-op thread is as fast and does not spin while other
    processes hold the cores (as in test_figures)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _render(spec: ClipSpec) -> tuple[np.ndarray, np.ndarray]:
    """(frames (N, S, S, 3) uint8, mel (F, T) float16) of one clip, as extract makes them."""
    clip = render_clip(SYNTH, spec, seed=0)
    centres = ((np.arange(NUM_FRAMES) + 0.5) * len(clip.frames) / NUM_FRAMES).astype(int)
    frames = [
        np.asarray(
            ImageOps.fit(Image.fromarray(clip.frames[i]), (IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        )
        for i in centres
    ]
    return np.stack(frames), log_mel(clip.audio, EXTRACT).astype(np.float16)


def _clips(split: str, per_class: int) -> Clips:
    specs = [ClipSpec(c, split, i) for c in CLASSES for i in range(per_class)]
    rendered = [_render(spec) for spec in specs]
    return Clips(
        [s.clip_id for s in specs],
        [s.label for s in specs],
        np.stack([f for f, _ in rendered]),
        np.stack([m for _, m in rendered]),
    )


@pytest.fixture(scope="module")
def clips() -> tuple[Clips, Clips]:
    """(train, test): 4 x 6 and 4 x 2 real synthetic clips."""
    return _clips("train", TRAIN_PER_CLASS), _clips("test", TEST_PER_CLASS)


@pytest.fixture(scope="module")
def trained(clips):
    """(evaluator, history, timings) trained on the train clips, seed 0, on CPU."""
    return train_local_evaluator(clips[0], EVALUATOR, seed=0, device=torch.device("cpu"))


def _subset(c: Clips, keep: list[int]) -> Clips:
    return Clips(
        [c.clip_ids[i] for i in keep], [c.labels[i] for i in keep], c.frames[keep], c.mels[keep]
    )


# ---------------------------------------------------------------------- training the evaluator


def test_trained_evaluator_beats_chance_on_held_out_clips(clips, trained):
    test = clips[1]
    model, history, timings = trained
    metrics, confusion = held_out_metrics(model, test)
    assert not model.training
    assert metrics["audio_acc"] >= BOUND, metrics
    assert metrics["image_acc"] >= BOUND, metrics
    # The confusion matrices count the same predictions the accuracies do.
    for part in ("audio", "image"):
        assert confusion[part].sum() == len(test)
        assert np.trace(confusion[part]) / len(test) == pytest.approx(metrics[f"{part}_acc"])
    parts = [r["part"] for r in history.rows]
    expected = EVALUATOR.epochs * 2 + EVALUATOR.joint_epochs
    assert parts.count("audio") == parts.count("image") == EVALUATOR.epochs
    assert len(parts) == expected
    assert {"audio_s", "image_s", "joint_s"} <= set(timings)

    torch.manual_seed(0)
    untrained = LocalEvaluator(model.labels, EVALUATOR.embed_dim, EVALUATOR.joint_dim)
    before, _ = held_out_metrics(untrained, test)
    assert before["audio_acc"] < BOUND and before["image_acc"] < BOUND, before


class _ReversingCodec:
    """A stand-in VQGAN whose "reconstruction" of a batch is the batch in reverse order."""

    def encode(self, x: np.ndarray) -> np.ndarray:
        return x

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return ids[::-1]


def test_codec_confusion_counts_the_predictions_on_the_reconstructions(clips, trained):
    model, test = trained[0], clips[1]
    metrics, confusion = held_out_metrics(
        model, test, {"audio": _ReversingCodec(), "image": _ReversingCodec()}
    )
    y = model.label_index(test.labels)
    k = len(model.labels)
    for part, outputs in (("audio", model.audio_outputs), ("image", model.image_outputs)):
        x = test.mels if part == "audio" else test.frames[:, eval_frame(NUM_FRAMES)]
        expected = confusion_matrix(outputs(x[::-1]).predicted, y, k)
        np.testing.assert_array_equal(confusion[f"{part} codec"], expected)
        assert np.trace(expected) / len(test) == pytest.approx(metrics[f"{part}_acc_codec"])
        # Reversed, the clips sit against other classes' labels: the codec view must differ.
        assert not np.array_equal(expected, confusion[part])


def test_few_step_training_leaves_usable_batchnorm_statistics(clips):
    """A small train split (2 clips per label, as in the tiny profile) and a batch larger than
    it: one optimizer step per epoch, 12 in all (params.yaml evaluator.epochs). Training fits
    the clips; the evaluator it returns (eval mode, BatchNorm running statistics) must classify
    the same clips about as well."""
    train, _ = clips
    keep = [i for i, cid in enumerate(train.clip_ids) if parse_clip_id(cid).index < 2]
    small = _subset(train, keep)
    assert len(small) == 2 * len(CLASSES)
    cfg = dataclasses.replace(EVALUATOR, epochs=12, batch_size=32, joint_epochs=0)
    model, history, _ = train_local_evaluator(small, cfg, seed=0, device=torch.device("cpu"))
    last = {r["part"]: r["acc"] for r in history.rows}
    assert last == {"audio": 1.0, "image": 1.0}, "precondition: training fits the 8 clips"
    y = model.label_index(small.labels)
    audio_acc = float(np.mean(model.audio_outputs(small.mels).predicted == y))
    frames = small.frames[:, eval_frame(NUM_FRAMES)]
    image_acc = float(np.mean(model.image_outputs(frames).predicted == y))
    assert audio_acc >= 0.75 and image_acc >= 0.75, (
        f"eval mode on the training clips: audio {audio_acc}, image {image_acc} "
        f"(training reported {last})"
    )


def test_training_needs_two_labels_and_held_out_labels_it_knows(clips, trained):
    train, test = clips
    one_label = _subset(train, [i for i, lab in enumerate(train.labels) if lab == train.labels[0]])
    with pytest.raises(EvaluatorError, match="1 label"):
        train_local_evaluator(one_label, EVALUATOR, seed=0, device=torch.device("cpu"))
    renamed = dataclasses.replace(test, labels=["no such label", *test.labels[1:]])
    with pytest.raises(EvaluatorError, match="no such label"):
        held_out_metrics(trained[0], renamed)


class _Doubler:
    """A stand-in tokenizer: encode records its input, decode doubles it."""

    def __init__(self) -> None:
        self.seen: list[tuple[np.dtype, int]] = []

    def encode(self, x: np.ndarray) -> np.ndarray:
        self.seen.append((x.dtype, len(x)))
        return x

    def decode(self, z: np.ndarray) -> np.ndarray:
        return z * 2


def test_reconstruct_runs_in_batches_and_keeps_dtype():
    mels = np.arange(5 * 2 * 3, dtype=np.float16).reshape(5, 2, 3) / 64
    tok = _Doubler()
    out = reconstruct(tok, mels, batch_size=2)
    assert out.dtype == np.float16 and out.shape == mels.shape
    np.testing.assert_array_equal(out, mels * 2)
    assert tok.seen == [(np.float32, 2), (np.float32, 2), (np.float32, 1)]
    frames = np.full((3, 4, 4, 3), 7, np.uint8)
    out = reconstruct(_Doubler(), frames, batch_size=8)
    assert out.dtype == np.uint8 and (out == 14).all()


def _write_extract(out_dir: Path, split: str, c: Clips) -> Path:
    """A one-shard extract output (SHARD_SCHEMA Parquet + the meta.json keys readers use)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import io
    from pipeline.data.extracted import SHARD_SCHEMA

    rows = [
        {"clip_id": cid, "label": lab, "split": split, "flags": [],
         "frames": [jpeg_bytes(f, 90) for f in frames], "mel": mel.astype("<f2").tobytes()}
        for cid, lab, frames, mel in zip(c.clip_ids, c.labels, c.frames, c.mels, strict=True)
    ]  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), out_dir / "part-00000.parquet")
    meta = {
        "mel": {"shape": list(c.mels.shape[1:])},
        "frames": {"shape": list(c.frames.shape[1:])},
        "num_frames": c.frames.shape[1],
        "shards": {split: [{"path": "part-00000.parquet", "rows": len(rows)}]},
    }
    io.write_json(out_dir / io.META_NAME, meta)
    return out_dir


def test_load_clips_reads_the_extract_output(tmp_path, clips):
    test = clips[1]
    folder = _write_extract(tmp_path / "extract", "test", test)
    every = load_clips(folder, "test")
    assert every.clip_ids == test.clip_ids and every.labels == test.labels
    assert every.mels.dtype == np.float16
    np.testing.assert_array_equal(every.mels, test.mels)
    assert every.frames.shape == test.frames.shape
    assert np.abs(every.frames.astype(int) - test.frames).mean() < 3  # JPEG q90
    first = load_clips(folder, "test", per_label=1)
    assert first.clip_ids == test.clip_ids[::TEST_PER_CLASS]
    with pytest.raises(EvaluatorError, match="no clips in split 'train'"):
        load_clips(folder, "train")


def test_a_train_subset_too_big_for_memory_is_refused_before_decoding(tmp_path, clips):
    folder = _write_extract(tmp_path / "extract", "train", clips[0])
    # 24 clips of 10 64-px frames and a float16 mel: 6.2 MB decoded.
    with pytest.raises(EvaluatorError) as info:
        load_clips(folder, "train", budget=10**6)
    message = str(info.value)
    assert message.startswith("the evaluator would hold 24 train clips in memory (0.0 GB")
    assert "set evaluator.per_label" in message and "\n" not in message
    capped = load_clips(folder, "train", per_label=2, budget=10**7)
    assert len(capped) == 8 and capped.clip_ids == [
        c for i, c in enumerate(clips[0].clip_ids) if i % TRAIN_PER_CLASS < 2
    ]


def test_streamed_outputs_equal_one_call_over_the_clips_in_memory(tmp_path, clips, trained):
    """`read_chunks` + `split_outputs` (64 clips at a time, read back from the shard, only the
    rows asked for and only their middle frame decoded) give bit for bit the outputs of one call
    over the same clips in memory; `kept` holds the inputs of the positions asked for."""
    model, train = trained[0], clips[0]
    source = [i % len(train) for i in range(150)]
    many = Clips(
        [f"{train.clip_ids[i]}-{k:03d}" for k, i in enumerate(source)],
        [train.labels[i] for i in source], train.frames[source], train.mels[source],
    )  # fmt: skip
    folder = _write_extract(tmp_path / "extract", "test", many)
    rows = list(range(3, 150, 2))  # 74 clips: a full chunk and a short one
    out = split_outputs(model, read_chunks(folder, "test", rows), keep={0, 70})
    whole = load_clips(folder, "test")  # every frame decoded, as the evaluator stage did
    frames = whole.frames[rows, eval_frame(NUM_FRAMES)]
    assert out.clip_ids == [many.clip_ids[r] for r in rows] and len(out) == 74
    for got, want in ((out.audio, model.audio_outputs(whole.mels[rows])),
                      (out.image, model.image_outputs(frames))):  # fmt: skip
        for field in ("embedding", "logits", "joint"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert sorted(out.kept) == [0, 70] and out.audio_codec is None
    np.testing.assert_array_equal(out.kept[70][0], frames[70])
    np.testing.assert_array_equal(out.kept[70][1], whole.mels[rows[70]])
    # Copies: a view of a chunk's row would keep the whole chunk (64 mels) in memory.
    assert all(a.base is None for pair in out.kept.values() for a in pair)


# ------------------------------------------------------------------------ the evaluator itself


def test_save_load_round_trip_gives_identical_outputs(tmp_path, clips, trained):
    model = trained[0]
    test = clips[1]
    folder = model.save(tmp_path / "evaluator", {"metrics": {"audio_acc": 1.0}})
    loaded = LocalEvaluator.load(folder)
    assert not loaded.training
    assert loaded.labels == model.labels
    assert (loaded.embed_dim, loaded.joint_dim) == (model.embed_dim, model.joint_dim)
    meta = checkpoint.load(folder)[1]
    assert loaded.sha256 == meta["weights_sha256"] and meta["metrics"] == {"audio_acc": 1.0}
    frames = test.frames[:, eval_frame(NUM_FRAMES)]
    for a, b in [
        (model.audio_outputs(test.mels), loaded.audio_outputs(test.mels)),
        (model.image_outputs(frames), loaded.image_outputs(frames)),
    ]:
        for name in ("embedding", "logits", "joint"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_load_refuses_a_folder_that_is_not_a_local_evaluator(tmp_path):
    model = LocalEvaluator(["a", "b"], embed_dim=8, joint_dim=4)
    checkpoint.save(tmp_path / "other", model, {"name": "transformer", "labels": ["a", "b"]})
    with pytest.raises(checkpoint.CheckpointError, match="not a local evaluator.*'transformer'"):
        LocalEvaluator.load(tmp_path / "other")
    with pytest.raises(checkpoint.CheckpointError, match="not a local evaluator folder"):
        LocalEvaluator.load(tmp_path / "missing")


def test_label_index_gives_minus_one_for_unknown_labels():
    model = LocalEvaluator(["bark", "hum", "rain"], embed_dim=8, joint_dim=4)
    index = model.label_index(["rain", "thunder", "bark", "hum", "Rain"])
    assert index.dtype == np.int64
    assert index.tolist() == [2, -1, 0, 1, -1]


def test_outputs_have_one_row_per_input_even_for_none():
    torch.manual_seed(0)
    model = LocalEvaluator(["a", "b", "c"], embed_dim=8, joint_dim=4)
    some = model.image_outputs(np.zeros((2, 16, 16, 3), np.uint8))
    assert (some.embedding.shape, some.logits.shape, some.joint.shape) == ((2, 8), (2, 3), (2, 4))
    np.testing.assert_allclose(np.linalg.norm(some.joint, axis=1), 1.0, rtol=1e-5)
    none = model.audio_outputs(np.zeros((0, 80, 64), np.float32))
    assert (none.embedding.shape, none.logits.shape, none.joint.shape) == ((0, 8), (0, 3), (0, 4))


# ----------------------------------------------------------------------------------- scoring


def _onehot(classes: np.ndarray, k: int, scale: float = 10.0) -> np.ndarray:
    return np.eye(k)[classes] * scale


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(n: int = 40, k: int = 4, d: int = 6, seed: int = 0) -> Reference:
    """A hand-built reference: labels cycle through k classes, outputs predict them exactly,
    image and audio joint vectors are equal row by row."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    joint = _unit(rng.normal(size=(n, 5)))
    audio = Outputs(rng.normal(size=(n, d)), _onehot(labels, k), joint)
    image = Outputs(rng.normal(size=(n, d)), _onehot(labels, k), joint.copy())
    return Reference(
        labels,
        audio,
        image,
        GaussianStats.from_features(audio.embedding),
        GaussianStats.from_features(image.embedding),
    )


def test_accuracy_is_the_fraction_of_labels_matching_the_conditioning_clip():
    ref = _reference()
    rows = np.random.default_rng(1).permutation(len(ref.labels))[:12]
    predicted = ref.labels[rows].copy()
    predicted[:5] = (predicted[:5] + 1) % 4  # 5 of 12 wrong
    out = Outputs(ref.audio.embedding[rows], _onehot(predicted, 4), ref.image.joint[rows])
    assert score_audio(out, ref, rows)["acc_local"] == pytest.approx(7 / 12)
    assert score_image(out, ref, rows)["acc_local"] == pytest.approx(7 / 12)
    # Scored against row order instead of `rows`, the same predictions would mostly miss.
    assert score_audio(out, ref, np.arange(12))["acc_local"] != pytest.approx(7 / 12)


@pytest.mark.parametrize("shift", [0.0, 1.0, 2.0])
def test_fd_against_own_stats_is_zero_and_grows_with_a_shift(shift):
    ref = _reference()
    rows = np.arange(len(ref.labels))
    d = ref.audio.embedding.shape[1]
    # Same covariance, mean moved by `shift` in every dim: FD = ||dmu||^2 = d * shift^2.
    audio = dataclasses.replace(ref.audio, embedding=ref.audio.embedding + shift)
    image = dataclasses.replace(ref.image, embedding=ref.image.embedding + shift)
    expected = d * shift**2
    assert score_audio(audio, ref, rows)["fd_local"] == pytest.approx(expected, abs=1e-6)
    assert score_image(image, ref, rows)["fid_local"] == pytest.approx(expected, abs=1e-6)
    pairs = score_pairs(image, audio, ref)
    assert pairs["fd_local"] == pytest.approx(expected, abs=1e-6)
    assert pairs["fid_local"] == pytest.approx(expected, abs=1e-6)


def test_cs_of_identical_joint_vectors_is_100():
    ref = _reference()
    n = len(ref.labels)
    rows = np.arange(n)[::-1].copy()
    out = Outputs(ref.audio.embedding, ref.audio.logits, ref.image.joint[rows])
    assert score_audio(out, ref, rows)["cs_local"] == pytest.approx(100.0)
    # The same vectors paired with other clips are not identical to them.
    assert score_audio(out, ref, np.arange(n))["cs_local"] < 50.0
    out = Outputs(ref.image.embedding, ref.image.logits, ref.audio.joint[rows])
    assert score_image(out, ref, rows)["cs_local"] == pytest.approx(100.0)
    assert score_image(out, ref, np.arange(n))["cs_local"] < 50.0
    flipped = dataclasses.replace(ref.audio, joint=-ref.image.joint)
    pairs = score_pairs(ref.image, flipped, ref)
    assert pairs["cs_local"] == pytest.approx(-100.0)
    assert pairs["agreement_local"] == 1.0


def test_inception_score_is_one_for_one_class_and_grows_with_confident_variety():
    ref = _reference()
    rows = np.arange(len(ref.labels))
    same = Outputs(ref.audio.embedding, np.zeros_like(ref.audio.logits), ref.audio.joint)
    assert score_audio(same, ref, rows)["is_local"] == pytest.approx(1.0)
    assert score_audio(ref.audio, ref, rows)["is_local"] > 2.0


def test_score_reference_reports_the_ceiling_of_the_real_clips():
    ref = _reference()
    scores = score_reference(ref)
    assert set(scores) == {
        "audio_acc_local", "image_acc_local", "audio_is_local", "cs_local", "cs_shuffled_local",
    }  # fmt: skip
    assert scores["audio_acc_local"] == scores["image_acc_local"] == 1.0
    assert scores["cs_local"] == pytest.approx(100.0)
    assert scores["cs_shuffled_local"] < 50.0
    assert all(k.endswith("_local") for k in scores)


def test_reference_runs_the_evaluator_on_the_real_clips(clips, trained):
    model = trained[0]
    test = clips[1]
    frames = test.frames[:, eval_frame(NUM_FRAMES)]
    ref = reference(model, test.labels, test.mels.astype(np.float32), frames)
    np.testing.assert_array_equal(ref.labels, model.label_index(test.labels))
    assert ref.audio_stats.dim == ref.image_stats.dim == EVALUATOR.embed_dim
    metrics, _ = held_out_metrics(model, test)
    scores = score_reference(ref)
    assert scores["audio_acc_local"] == pytest.approx(metrics["audio_acc"])
    assert scores["image_acc_local"] == pytest.approx(metrics["image_acc"])
    assert scores["cs_local"] == pytest.approx(metrics["cs_matched"])


# ----------------------------------------------------------------------------------- figures


def _assert_png(path: Path, min_size: tuple[int, int]) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(_stdio.BytesIO(data)) as img:
        img.load()
        w, h = img.size
        assert w >= min_size[0] and h >= min_size[1], img.size
        darkest, brightest = img.convert("L").getextrema()
    assert darkest < brightest, "a blank image"


def test_evaluator_figure_writes_a_png(tmp_path):
    history = [
        {"part": part, "epoch": e, "loss": 2.0 / e, "acc": 0.2 * e}
        for part in ("audio", "image", "joint")
        for e in (1, 2, 3)
    ]
    confusion = {"audio": np.array([[3, 1], [0, 4]]), "image": np.array([[4, 0], [2, 2]])}
    path = evaluator_figure(history, confusion, ["dog / bark", "cat / meow"], tmp_path / "e.png")
    assert path == tmp_path / "e.png"
    _assert_png(path, (600, 200))


def test_write_per_class_breaks_accuracy_down_by_the_conditions_label(tmp_path):
    def outputs(predicted: list[int]) -> Outputs:
        n = len(predicted)
        return Outputs(np.zeros((n, 4)), np.eye(3)[predicted], np.ones((n, 2)))

    ref = Reference(np.array([0, 0, 1, 2]), *([None] * 4))  # only the labels are read
    rows = np.array([3, 0, 1, 2])  # Ray's order: row i was conditioned on clip rows[i]
    generated = {
        ("image2audio", "s3"): Generated(rows, outputs([2, 0, 1, 1]), None),
        ("audio2image", "s3"): Generated(rows, None, outputs([2, 0, 0, 0])),
        ("cogenerate", "free"): Generated(rows, outputs([0, 0, 0, 0]), outputs([1, 1, 1, 1])),
    }
    write_per_class(generated, ref, ["dog / bark", "cat / meow", "owl / hoot"], tmp_path)
    with open(tmp_path / "per_class.csv", newline="") as f:
        table = [(r["task"], r["label"], r["clips"], r["correct"], r["acc_local"])
                 for r in csv.DictReader(f)]  # fmt: skip
    assert table == [
        ("image2audio", "dog / bark", "2", "1", "0.5"),
        ("image2audio", "cat / meow", "1", "1", "1.0"),
        ("image2audio", "owl / hoot", "1", "1", "1.0"),
        ("audio2image", "dog / bark", "2", "2", "1.0"),
        ("audio2image", "cat / meow", "1", "0", "0.0"),
        ("audio2image", "owl / hoot", "1", "1", "1.0"),
    ]
    _assert_png(tmp_path / "confusion.png", (400, 200))
    # a rerun with co-generation only leaves no table or figure of the run before
    write_per_class({("cogenerate", "free"): generated[("cogenerate", "free")]}, ref, [], tmp_path)
    assert not (tmp_path / "per_class.csv").exists() and not (tmp_path / "confusion.png").exists()


def test_generation_figure_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    mels = rng.random((2, 80, 64)).astype(np.float32)
    generated = {"s3": rng.random((2, 80, 64)), "s1": rng.random((2, 80, 64))}
    predicted = {"s3": ["dog", "cat"], "s1": ["cat", "cat"]}
    path = generation_figure(
        ["clip-a", "clip-b"], ["dog", "cat"], frames, mels, generated, tmp_path / "g.png", predicted
    )
    _assert_png(path, (600, 300))
    path = generation_figure(["pair 0"], ["dog"], frames[:1], mels[:1], {}, tmp_path / "c.png")
    _assert_png(path, (300, 150))


def test_image_grid_figure_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        ("ground truth", rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)),
        ("s3", rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)),
    ]
    path = image_grid_figure(rows, tmp_path / "grid.png", "audio → image")
    _assert_png(path, (400, 200))


# ------------------------------------------------------------------------------------- sweep


def _sweep_cfg(**kw) -> SweepConfig:
    return dataclasses.replace(PARAMS.sweep, **kw)


def test_grid_is_the_full_cartesian_product_in_order():
    cfg = _sweep_cfg(temperature=(4.5, 9.0), steps=(8, 30, 50), guidance=(1.0, 3.0))
    expected = [
        {"temperature": t, "steps": n, "guidance": s}
        for t in (4.5, 9.0)
        for n in (8, 30, 50)
        for s in (1.0, 3.0)
    ]
    assert grid(cfg) == expected
    assert grid(_sweep_cfg(temperature=(1.0,), steps=(4,), guidance=(2.0,))) == [
        {"temperature": 1.0, "steps": 4, "guidance": 2.0}
    ]


def _trial_rows(cfg: SweepConfig) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        point | {m: float(rng.random()) for m in METRICS} | {"seconds": float(rng.random() * 9)}
        for point in grid(cfg)
    ]


@pytest.mark.parametrize("headline", [3.0, 7.0])
def test_write_results_writes_the_table_and_both_charts(tmp_path, headline):
    cfg = _sweep_cfg(temperature=(4.5, 9.0), steps=(8, 30), guidance=(1.0, 3.0))
    rows = _trial_rows(cfg)
    gen = dataclasses.replace(PARAMS.generate, guidance=headline)  # 7 is not in the grid
    report = tmp_path / "sweep"
    write_results(rows, report, cfg, gen)
    with open(report / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == [*AXES, *METRICS, "seconds"]
        back = list(reader)
    assert len(back) == len(rows) == 8
    for written, row in zip(back, rows, strict=True):
        assert {k: float(v) for k, v in written.items()} == row
    _assert_png(report / "guidance.png", (600, 200))
    _assert_png(report / "grid.png", (600, 200))


def test_sweep_charts_write_pngs_directly(tmp_path):
    cfg = _sweep_cfg(temperature=(4.5, 9.0, 12.0), steps=(8,), guidance=(1.0, 3.0, 5.0))
    rows = _trial_rows(cfg)[::-1]  # any order
    assert guidance_figure(rows, tmp_path / "g.png") == tmp_path / "g.png"
    assert grid_figure(rows, 3.0, tmp_path / "t.png") == tmp_path / "t.png"
    _assert_png(tmp_path / "g.png", (600, 200))
    _assert_png(tmp_path / "t.png", (600, 200))


# ------------------------------------------------------------------- evaluate stage: helpers


@pytest.mark.parametrize(("n", "k"), [(10, 3), (10, 2), (100, 7), (9, 8), (48, 32)])
def test_spread_picks_k_unique_indices_from_end_to_end(n, k):
    picked = spread(n, k)
    assert len(picked) == k
    assert picked.tolist() == sorted(set(picked.tolist()))
    assert picked[0] == 0 and picked[-1] == n - 1
    gaps = np.diff(picked)
    assert gaps.max() - gaps.min() <= 1, picked  # evenly spread


def test_spread_is_exact_for_every_small_case():
    for n in range(1, 30):
        for k in range(2, n):
            picked = spread(n, k)
            assert len(np.unique(picked)) == k and picked[0] == 0 and picked[-1] == n - 1


@pytest.mark.parametrize(("n", "k"), [(7, 0), (7, 7), (7, 20), (0, 0), (0, 3)])
def test_spread_takes_everything_when_k_is_zero_or_too_large(n, k):
    assert spread(n, k).tolist() == list(range(n))


MEL_SHAPE = (8, 12)


def _stored_row(value: int) -> tuple[np.ndarray, bytes, np.ndarray]:
    """Ten JPEG frames, frame j a flat grey of value + 10 j, and a float16 mel as stored."""
    frames = np.empty(NUM_FRAMES, dtype=object)
    frames[:] = [jpeg_bytes(np.full((16, 16, 3), value + 10 * j, np.uint8), 90) for j in range(10)]
    mel = (np.random.default_rng(value).random(MEL_SHAPE)).astype("<f2")
    return frames, mel.tobytes(), mel.astype(np.float32)


def _batch(clip_ids: list[str], values: list[int]) -> tuple[dict[str, np.ndarray], list]:
    stored = [_stored_row(v) for v in values]
    frames = np.empty(len(values), dtype=object)
    frames[:] = [f for f, _, _ in stored]
    batch = {
        "clip_id": np.array(clip_ids, dtype=object),
        "frames": frames,
        "mel": np.array([b for _, b, _ in stored], dtype=object),
    }
    return batch, stored


def test_decode_clips_keeps_test_rows_with_their_middle_frame():
    def decode(batch):
        return decode_clips(batch, {"c": 0, "a": 1}, MEL_SHAPE, NUM_FRAMES)

    batch, stored = _batch(["a", "b", "c"], [20, 40, 60])
    out = decode(batch)
    assert out["row"].tolist() == [1, 0]
    assert out["image"].shape == (2, 16, 16, 3) and out["image"].dtype == np.uint8
    middle = eval_frame(NUM_FRAMES)
    assert middle == 5
    for i, value in enumerate([20, 60]):
        assert np.abs(out["image"][i].astype(int) - (value + 10 * middle)).max() <= 2
    assert out["mel"].shape == (2, *MEL_SHAPE) and out["mel"].dtype == np.float32
    np.testing.assert_array_equal(out["mel"][0], stored[0][2])
    np.testing.assert_array_equal(out["mel"][1], stored[2][2])


def test_decode_clips_without_test_rows_returns_empty_columns():
    def decode(batch):
        return decode_clips(batch, {"x": 0}, MEL_SHAPE, NUM_FRAMES)

    out = decode(_batch(["a", "b"], [20, 40])[0])
    assert set(out) == {"row", "image", "mel"}
    assert out["row"].shape == (0,) and out["row"].dtype == np.int64
    assert out["image"].ndim == 4 and len(out["image"]) == 0 and out["image"].shape[-1] == 3
    assert out["image"].dtype == np.uint8
    assert out["mel"].shape == (0, *MEL_SHAPE) and out["mel"].dtype == np.float32


# ------------------------------------------------------------------------------------- config


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_yaml_has_the_evaluation_sections(raw):
    params = parse_params(raw)
    assert params.evaluate.guidance[0] == 3.0  # the headline
    assert set(params.evaluate.tasks) <= {"image2audio", "audio2image", "cogenerate"}
    assert params.sweep.metric in METRICS
    assert params.evaluator.embed_dim >= 1 and params.evaluator.epochs >= 1


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("evaluate", "max_clips", -1, r"^evaluate\.max_clips: must not be negative"),
        ("evaluate", "tasks", ["image2audio", "video2text"], r"^evaluate\.tasks: 'video2text'"),
        ("evaluate", "guidance", [], r"^evaluate\.guidance: must be a non-empty"),
        ("evaluate", "repeats", 0, r"^evaluate\.repeats: must be between 1 and 100"),
        ("sweep", "steps", [], r"^sweep\.steps: must list at least one value"),
        ("sweep", "steps", [8, 0], r"^sweep\.steps: must all be at least 1"),
        ("evaluator", "joint_temperature", 0.0, r"^evaluator\.joint_temperature: must be"),
        ("evaluator", "epochs", 0, r"^evaluator\.epochs: must be at least 1"),
    ],
)
def test_bad_evaluation_params_name_the_key(raw, section, key, value, message):
    data = copy.deepcopy(raw)
    data[section][key] = value
    with pytest.raises(ConfigError, match=message):
        parse_params(data)
