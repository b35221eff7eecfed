"""The procedural dataset: real decodable MP4s, determinism, class structure, resume, filters."""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline import io
from pipeline.config import ExtractConfig, SyntheticConfig, load_params
from pipeline.data import synthetic
from pipeline.data.download import DownloadError, select_clips
from pipeline.data.manifest import video_path
from pipeline.data.synthetic import (
    CLASSES,
    ClipSpec,
    generate_dataset,
    render_clip,
)
from pipeline.media import ffmpeg_exe, probe

TINY = SyntheticConfig(
    num_classes=4,
    train_per_class=1,
    test_per_class=1,
    width=96,
    height=72,
    fps=10,
    sample_rate=22050,
    duration_s=10.0,
)
ALL = ("train", "test")


def _generate(cfg: SyntheticConfig, clips_dir: Path, previous=(), **kw):
    args = {"seed": 0, "splits": ALL, "classes": (), "limit": 0, "workers": 2} | kw
    return generate_dataset(cfg, clips_dir, previous=list(previous), **args)


def _decode(path: Path, *args: str) -> bytes:
    cmd = [ffmpeg_exe(), "-v", "error", "-nostdin", "-i", str(path), *args, "-"]
    return subprocess.run(cmd, capture_output=True, check=True).stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    clips_dir = tmp_path_factory.mktemp("clips")
    return clips_dir, _generate(TINY, clips_dir)


# ------------------------------------------------------------------------------- files on disk


def test_writes_one_decodable_ten_second_mp4_per_clip(tiny):
    clips_dir, records = tiny
    assert len(records) == 4 * 2
    assert {(r.label, r.split) for r in records} == {(c.label, s) for c in CLASSES[:4] for s in ALL}
    for r in records:
        assert re.fullmatch(r"synth-c\d\d-(train|test)-\d{4}_000000", r.clip_id)
        assert (r.status, r.source, r.youtube_id, r.start_s) == ("ok", "synthetic", "", 0)
        assert r.path == video_path(r.clip_id)
        path = clips_dir / r.path
        assert r.size_bytes == path.stat().st_size > 0
        info = probe(path)
        assert info.has_video and info.has_audio
        assert (info.width, info.height, info.fps) == (96, 72, 10.0)
        assert info.duration_s == pytest.approx(10.0, abs=0.1)
        assert r.duration_s == pytest.approx(info.duration_s)
        head = path.read_bytes()
        assert head.index(b"moov") < head.index(b"mdat"), "faststart puts the index first"
    assert not list(clips_dir.rglob(f"{io.TMP_PREFIX}*")), "no temporaries left behind"


def test_file_holds_the_rendered_arrays(tiny):
    clips_dir, records = tiny
    record = records[0]
    arrays = render_clip(TINY, record.clip_id, seed=0)
    frames = np.frombuffer(
        _decode(clips_dir / record.path, "-f", "rawvideo", "-pix_fmt", "rgb24"), np.uint8
    ).reshape(-1, 72, 96, 3)
    assert frames.shape == arrays.frames.shape == (100, 72, 96, 3)
    err = np.mean((frames.astype(float) - arrays.frames) ** 2)
    assert 10 * np.log10(255**2 / err) > 28, "decoded frames match the render (PSNR, dB)"
    audio = np.frombuffer(
        _decode(clips_dir / record.path, "-vn", "-f", "f32le", "-ac", "1"), np.float32
    )
    assert len(audio) == pytest.approx(len(arrays.audio), abs=2048)
    n = min(len(audio), len(arrays.audio))
    assert np.corrcoef(audio[:n], arrays.audio[:n])[0, 1] > 0.9, "AAC keeps the waveform"


def test_encoding_is_byte_identical_on_one_machine(tmp_path):
    kw = {"classes": (CLASSES[2].label,), "splits": ("test",)}
    (a,) = _generate(TINY, tmp_path / "a", **kw)
    (b,) = _generate(TINY, tmp_path / "b", **kw)
    assert io.sha256_file(tmp_path / "a" / a.path) == io.sha256_file(tmp_path / "b" / b.path)


# ------------------------------------------------------------------------------------- resuming


def test_resume_keeps_finished_clips_and_redoes_missing_ones(tiny):
    clips_dir, records = tiny
    mtimes = {r.clip_id: (clips_dir / r.path).stat().st_mtime_ns for r in records}
    again = _generate(TINY, clips_dir, previous=records)
    assert again == records
    assert {r.clip_id: (clips_dir / r.path).stat().st_mtime_ns for r in again} == mtimes

    lost = records[3]
    (clips_dir / lost.path).unlink()
    leftover = (clips_dir / lost.path).with_name(f"{io.TMP_PREFIX}{Path(lost.path).name}.x1")
    leftover.write_bytes(b"half a file")
    failed = replace(records[5], status="other", error="boom", path="")
    redone = _generate(TINY, clips_dir, previous=[*records[:5], failed, *records[6:]])
    assert (clips_dir / lost.path).is_file() and not leftover.exists()
    assert redone[5].status == "ok" and redone[5].attempts == failed.attempts + 1
    changed = {
        r.clip_id for r in redone if (clips_dir / r.path).stat().st_mtime_ns != mtimes[r.clip_id]
    }
    assert changed == {lost.clip_id, failed.clip_id}


def test_a_new_seed_or_setting_remakes_the_clips_instead_of_reusing_them(tmp_path):
    def mtimes(records):
        return {r.clip_id: (tmp_path / r.path).stat().st_mtime_ns for r in records}

    first = _generate(TINY, tmp_path, limit=2)
    before = mtimes(first)
    reseeded = _generate(TINY, tmp_path, previous=first, seed=1, limit=1)
    assert io.read_json(tmp_path / synthetic.SETTINGS_NAME)["seed"] == 1
    assert mtimes(reseeded)[first[0].clip_id] != before[first[0].clip_id]
    assert not (tmp_path / first[1].path).exists(), "an old clip cannot pass for a new one"
    assert _generate(TINY, tmp_path, previous=reseeded, seed=1, limit=1) == reseeded
    assert mtimes(reseeded) == mtimes(_generate(TINY, tmp_path, previous=reseeded, seed=1, limit=1))

    smaller = replace(TINY, width=64, height=48)
    (resized,) = _generate(smaller, tmp_path, previous=reseeded, seed=1, limit=1)
    assert probe(tmp_path / resized.path).width == 64


def test_a_failed_encode_becomes_a_record_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "ffmpeg_exe", lambda: "false")
    (record,) = _generate(TINY, tmp_path, limit=1)
    assert record.status == "other" and "ffmpeg failed" in record.error and record.path == ""
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [synthetic.SETTINGS_NAME]


# -------------------------------------------------------------------------------------- subsets


def select(cfg, **kwargs):
    return select_clips(synthetic.clip_specs(cfg), source="the synthetic set", **kwargs)


def test_filters_and_limit_select_a_balanced_deterministic_subset(tmp_path):
    cfg = replace(TINY, train_per_class=3, test_per_class=2)
    everything = select(cfg, splits=ALL, classes=(), limit=0)
    assert len(everything) == len(set(everything)) == 4 * 5

    tests = select(cfg, splits=("test",), classes=(), limit=0)
    assert {s.split for s in tests} == {"test"} and len(tests) == 8

    picked = (CLASSES[1].label, CLASSES[3].label)
    some = select(cfg, splits=("train",), classes=picked, limit=0)
    assert {(s.class_index, s.split) for s in some} == {(1, "train"), (3, "train")}
    assert len(some) == 6

    first = select(cfg, splits=ALL, classes=(), limit=6)
    assert first == everything[:6]
    assert sorted(s.class_index for s in first if s.split == "train") == [0, 1, 2, 3]

    with pytest.raises(DownloadError, match="'dog barking' is not a label of the synthetic set"):
        select(cfg, splits=ALL, classes=("dog barking",), limit=0)
    with pytest.raises(DownloadError, match="is not a label"):
        select(cfg, splits=ALL, classes=(CLASSES[7].label,), limit=0)  # only 4 classes
    with pytest.raises(DownloadError, match="no clip left"):
        select(cfg, splits=(), classes=(), limit=0)

    records = _generate(cfg, tmp_path, splits=("test",), classes=(CLASSES[0].label,), limit=1)
    assert [r.clip_id for r in records] == [ClipSpec(0, "test", 0).clip_id]
    assert [p.name for p in tmp_path.rglob("*.mp4")] == [f"{records[0].clip_id}.mp4"]


# ------------------------------------------------------------------------------ rendered arrays


def test_render_is_deterministic_in_the_seed():
    spec = ClipSpec(3, "train", 2)
    a = render_clip(TINY, spec, seed=7)
    assert a.frames.shape == (100, 72, 96, 3) and a.frames.dtype == np.uint8
    assert a.audio.shape == (220500,) and a.audio.dtype == np.float32
    assert 0.05 < np.abs(a.audio).max() <= 1.0
    b = render_clip(TINY, spec.clip_id, seed=7)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)
    c = render_clip(TINY, spec, seed=8)
    assert not np.array_equal(a.frames, c.frames) and not np.array_equal(a.audio, c.audio)


# Per class, of clip (class, "train", 0) at seed 0 and TINY's size with all 8 classes: the frames'
# mean level, their mean change from frame to frame (the motion) and the audio's RMS. They change
# only when the rendering changes on purpose (then update them). Numbers, not sha256 of the arrays:
# float32 sin and exp differ in the last bit between numpy versions and CPUs, which moves a few
# pixels by one level (numpy 1.26 and 2.4 give other frame bytes for 5 of the 8 classes, and these
# numbers apart by under 1e-6), while any change to the draws or the drawing moves them far more.
FINGERPRINTS = (
    (35.83381, 2.277104, 0.1056202),
    (95.00422, 2.273582, 0.3090369),
    (82.84553, 1.813092, 0.1110903),
    (54.1844, 2.621149, 0.08842743),
    (36.02092, 10.67803, 0.1028009),
    (67.63784, 1.302685, 0.05657614),
    (97.91449, 1.773397, 0.03008167),
    (100.8232, 6.729994, 0.06819333),
)


def test_each_class_renders_as_it_did():
    cfg = replace(TINY, num_classes=8)
    for synth, expected in zip(CLASSES, FINGERPRINTS, strict=True):
        arrays = render_clip(cfg, ClipSpec(synth.index, "train", 0), seed=0)
        frames = arrays.frames.astype(np.float64)  # (T, H, W, 3)
        got = (
            frames.mean(),
            np.abs(np.diff(frames, axis=0)).mean(),
            np.sqrt(np.mean(arrays.audio.astype(np.float64) ** 2)),
        )
        assert got == pytest.approx(expected, rel=1e-4), synth.label


def test_the_code_hash_covers_the_classes_module(monkeypatch):
    """A clip folder made by older class code is remade, not reused (see `made_with`)."""
    before = synthetic.made_with(TINY, 0)
    read_bytes = Path.read_bytes

    def edited(path: Path) -> bytes:
        return read_bytes(path) + (b"#" if path.name == "synthetic_classes.py" else b"")

    monkeypatch.setattr(Path, "read_bytes", edited)
    assert synthetic.made_with(TINY, 0)["code_sha256"] != before["code_sha256"]


def test_frames_move_and_clips_of_one_class_differ():
    cfg = replace(TINY, num_classes=8)
    for c in range(8):
        a = render_clip(cfg, ClipSpec(c, "train", 0), seed=0)
        b = render_clip(cfg, ClipSpec(c, "train", 1), seed=0)
        assert np.abs(a.frames[0].astype(int) - b.frames[0]).mean() > 5, CLASSES[c].label
        changing = np.ptp(a.frames[:20], axis=0).max(-1) > 40  # (H, W) over the first 2 s
        assert changing.mean() > 0.01, f"{CLASSES[c].label}: the scene moves or flashes"
        spectra = [
            np.log([band.mean() for band in np.array_split(np.abs(np.fft.rfft(x.audio)), 64)])
            for x in (a, b)
        ]
        assert np.abs(spectra[0] - spectra[1]).mean() > 0.08, CLASSES[c].label


def _colour_feature(frame: np.ndarray) -> np.ndarray:
    """Mean colour of the salient pixels: saturated or near white (backgrounds are neither)."""
    x = frame.reshape(-1, 3) / 255.0
    salient = (x.max(1) - x.min(1) > 0.35) | (x.min(1) > 0.75)
    return x[salient].mean(0) if salient.any() else np.zeros(3)


def _spectrum_feature(audio: np.ndarray, sample_rate: int, bands: int = 16) -> np.ndarray:
    """Log energy in log-spaced triangular bands 60 Hz-8 kHz relative to the loudest band.

    Floored 20 dB down: below that lies each clip's own background noise, not the class.
    """
    power = np.abs(np.fft.rfft(audio)) ** 2
    log_f = np.log(np.maximum(np.fft.rfftfreq(len(audio), 1 / sample_rate), 1.0))
    centres = np.log(np.geomspace(60, 8000, bands + 2))
    bank = np.clip(
        1 - np.abs(log_f[None] - centres[1:-1, None]) / (centres[1] - centres[0]), 0, None
    )
    energy = bank @ power
    return np.log10(np.maximum(energy / energy.max(), 1e-2))


def test_classes_separate_from_one_frame_and_from_the_spectrum():
    cfg = replace(TINY, num_classes=8, train_per_class=3, test_per_class=2)
    feats: dict[str, list] = {"train": [], "test": []}
    for spec in synthetic.clip_specs(cfg):
        arrays = render_clip(cfg, spec, seed=3)
        frame = arrays.frames[len(arrays.frames) // 2]
        feats[spec.split].append(
            (
                spec.class_index,
                _colour_feature(frame),
                _spectrum_feature(arrays.audio, cfg.sample_rate),
            )
        )
    for k, what in ((1, "frame colour"), (2, "audio spectrum")):
        centroids = np.stack(
            [np.mean([f[k] for f in feats["train"] if f[0] == c], axis=0) for c in range(8)]
        )
        predicted = [
            int(np.argmin(np.linalg.norm(centroids - f[k], axis=1))) for f in feats["test"]
        ]
        assert predicted == [f[0] for f in feats["test"]], what


def _coarse_envelope(mel: np.ndarray, extract: ExtractConfig) -> np.ndarray:
    """What the demo's briefly trained mel tokenizer keeps of a clip (docs/experiments.md, the
    sound bands): the mel averaged over the 16x16 blocks its 5 x 53 ids cover, as each block
    row's mean level and its spread over time."""
    mel = mel[:, : extract.mel_frames]
    rows, cols = extract.n_mels // 16, extract.mel_frames // 16
    blocks = mel.reshape(rows, 16, cols, 16).mean(axis=(1, 3))
    return np.concatenate([blocks.mean(1), blocks.std(1)])


def test_classes_differ_in_the_coarse_mel_envelope(class_mels):
    """Each class's sound has a loudness profile over the mel's coarse bands of its own, the part
    of a mel the demo's mel tokenizer keeps, so that generated audio can carry its class: a
    nearest-centroid classifier on that profile names the class of held-out clips. (The bell and
    the flash clicks once shared a profile: 85% here, and generated bells were 0-20% right.)"""
    extract = load_params(Path(__file__).resolve().parents[1] / "params.yaml").extract
    feats = {  # split -> (classes, clips, 10)
        split: np.array([_coarse_envelope(m, extract) for m in class_mels.mels[split]]).reshape(
            8, 5, -1
        )
        for split in ALL
    }
    scale = feats["train"].reshape(-1, feats["train"].shape[-1]).std(0)
    centroids = feats["train"].mean(1) / scale
    distance = np.linalg.norm(feats["test"][:, :, None] / scale - centroids[None, None], axis=-1)
    predicted = distance.argmin(-1)
    assert (predicted == np.arange(8)[:, None]).mean() >= 0.95, predicted.tolist()
