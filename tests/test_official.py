"""pipeline.evaluation.official: loading the configured official files, streaming clips through
the four extractors, the labelled scores and their paper-comparability, IS in clip-id order, the
average of generation runs, and reference audio.

The checkpoints are random weights of the official architectures saved in their released
layouts (conftest's `official_files`): they exercise the plumbing and never give a metric value
worth reading. The PANNs FD is 2048-d, where scipy's sqrtm takes about a minute on a busy 2-core
box; tests that score a PANNs set swap in conftest's `low_rank_frechet`, the same distance
computed exactly through the low rank of a covariance of few rows, itself checked against
`frechet_distance` here.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import low_rank_frechet

from pipeline import io
from pipeline.checkpoint import CheckpointError
from pipeline.config import OfficialExtractorsConfig
from pipeline.errors import PipelineError
from pipeline.evaluation import official
from pipeline.evaluation.official import OfficialMetrics, OfficialMetricsError, reference_audio
from pipeline.media import ffmpeg_exe
from pipeline.metrics.extractors import audio_io
from pipeline.metrics.math import GaussianStats, frechet_distance, inception_score

RATE = 22050
SECONDS = 2.0  # the 32000-sample padding makes anything shorter cost the same
N_CLIPS = 12
IMAGE_SIZE = 64
FIELDS = ("panns_cnn14_16k", "vggish", "clip_vit_b32", "wav2clip")


def _sine(hz: float, rate: int = RATE, seconds: float = SECONDS) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _noise(seed: int, rate: int = RATE, seconds: float = SECONDS) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return (0.3 * rng.randn(round(seconds * rate))).astype(np.float32)


def _image(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def _sines(n: int) -> list[np.ndarray]:
    return [_sine(220.0 * (k + 1)) for k in range(n)]


def _noises(n: int) -> list[np.ndarray]:
    return [_noise(100 + k) for k in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two OpenMP threads on a shared 2-core box spin against the other jobs: one thread runs
    these batch-1 forwards 2-10x faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fast_frechet(monkeypatch):
    monkeypatch.setattr(official, "frechet_distance", low_rank_frechet)


@pytest.mark.parametrize("n", [12, 200])
def test_the_low_rank_stand_in_is_the_frechet_distance(n):
    rng = np.random.RandomState(n)
    a = GaussianStats.from_features(np.maximum(rng.randn(n, 64), 0))
    b = GaussianStats.from_features(np.maximum(rng.randn(n + 3, 64) + 0.2, 0))
    assert low_rank_frechet(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-7)
    assert abs(low_rank_frechet(a, a)) < 1e-6 * np.trace(a.sigma)


# ----------------------------------------------------------------------------- official files


@pytest.fixture(scope="module")
def checkpoints(official_files) -> OfficialExtractorsConfig:
    """The four networks, random weights, in their released layouts (tests/official_layouts.py)."""
    layouts = dict(zip(FIELDS, ("panns", "vggish", "clip", "wav2clip"), strict=True))
    files = official_files.get(*layouts.values())
    return OfficialExtractorsConfig(**{f: str(files[name].path) for f, name in layouts.items()})


@pytest.fixture(scope="module")
def loaded(checkpoints) -> OfficialMetrics:
    metrics = OfficialMetrics.load(checkpoints, "cpu")
    assert metrics is not None
    return metrics


def _subset(loaded: OfficialMetrics, *fields: str) -> OfficialMetrics:
    """A fresh OfficialMetrics sharing `loaded`'s extractors for `fields` only."""
    chosen = {f: e for f, e in loaded.by_field().items() if f in fields}
    return OfficialMetrics(
        chosen.get("panns_cnn14_16k"),
        chosen.get("vggish"),
        chosen.get("clip_vit_b32"),
        chosen.get("wav2clip"),
    )


def test_load_without_paths_gives_none():
    assert OfficialMetrics.load(OfficialExtractorsConfig(**dict.fromkeys(FIELDS, ""))) is None


def test_load_names_a_missing_checkpoint(tmp_path):
    paths = dict.fromkeys(FIELDS, "")
    paths["vggish"] = str(tmp_path / "absent-vggish.pth")
    with pytest.raises(CheckpointError, match="absent-vggish.pth does not exist"):
        OfficialMetrics.load(OfficialExtractorsConfig(**paths))


def test_load_holds_every_configured_extractor_with_its_file_hash(loaded, checkpoints):
    for field, extractor in loaded.by_field().items():
        assert extractor.sha256 == io.sha256_file(getattr(checkpoints, field)), field
    assert loaded.clip.model.visual.proj.dtype == torch.float32


# ------------------------------------------------------------------------------ full pipeline


@pytest.fixture(scope="module")
def full_run(loaded) -> OfficialMetrics:
    """12 generated sines (with conditioning images) against 12 reference noise clips."""
    metrics = _subset(loaded, *FIELDS)
    for wave in _noises(N_CLIPS):
        metrics.add_reference(wave, RATE)
    for k, wave in enumerate(_sines(N_CLIPS)):
        metrics.add_generated(wave, RATE, _image(k))
    return metrics


def test_scores_are_finite_and_labelled(full_run, checkpoints, fast_frechet):
    scores = full_run.scores()
    metrics = {"fd_panns", "fad_vggish", "is_panns", "is_panns_std", "cs_clip_wav2clip"}
    labels = {"protocol", "sample_rate", "resampler", "n_generated", "n_reference", "is_splits"}
    hashes = {f"sha256_{field}" for field in FIELDS}
    flags = {"comparable_to_paper", "not_comparable_because"}
    assert set(scores) == metrics | labels | hashes | flags
    assert json.loads(json.dumps(scores)) == scores
    assert all(np.isfinite(scores[key]) for key in metrics)
    assert scores["fd_panns"] > 0 and scores["fad_vggish"] > 0
    assert scores["is_panns"] >= 1 and -100 <= scores["cs_clip_wav2clip"] <= 100
    assert (scores["n_generated"], scores["n_reference"], scores["is_splits"]) == (12, 12, 10)
    assert scores["sample_rate"] == 16000 and scores["resampler"] == official.RESAMPLER
    for field in FIELDS:
        assert scores[f"sha256_{field}"] == io.sha256_file(getattr(checkpoints, field))[:8]


def test_comparable_only_with_the_four_official_files_and_the_full_test_list(
    full_run, loaded, fast_frechet, monkeypatch
):
    not_full = full_run.scores(full_vggsound_test=False)
    assert not not_full["comparable_to_paper"]
    sha = loaded.clip.sha256[:8]
    assert not_full["not_comparable_because"] == [
        f"clip_vit_b32 (sha256 {sha}) is not OpenAI's ViT-B-32.pt (sha256 40d36571)",
        "the clips are not the paper's full VGGSound test list",
    ]
    random_clip = full_run.scores(full_vggsound_test=True)
    assert not random_clip["comparable_to_paper"]
    assert len(random_clip["not_comparable_because"]) == 1
    # As if the CLIP file were OpenAI's: all four files and the full list make it comparable.
    monkeypatch.setattr(official, "clip_vit_b32_sha256", lambda: loaded.clip.sha256)
    full = full_run.scores(full_vggsound_test=True)
    assert full["comparable_to_paper"] and full["not_comparable_because"] == []
    assert {k: v for k, v in full.items() if k in ("fd_panns", "is_panns")} == {
        k: v for k, v in random_clip.items() if k in ("fd_panns", "is_panns")
    }


def test_a_set_against_itself_scores_zero_and_another_set_more(loaded, fast_frechet):
    metrics = _subset(loaded, *FIELDS)
    sines, noises = _sines(3), _noises(3)
    for wave in sines:
        metrics.add_reference(wave, RATE)
    for k, wave in enumerate(sines):
        metrics.add_generated(wave, RATE, _image(k))
    same = metrics.scores(full_vggsound_test=True)
    metrics.reset_generated()
    for k, wave in enumerate(noises):
        metrics.add_generated(wave, RATE, _image(k))
    other = metrics.scores(full_vggsound_test=True)
    for key in ("fd_panns", "fad_vggish"):
        assert abs(same[key]) < 1e-6 * other[key] and other[key] > 0, key
    # CS: 100 x the mean cosine of each clip's CLIP image and Wav2CLIP audio embeddings
    cosines = [
        loaded.clip.embed(_image(k)) @ _unit(loaded.wav2clip.embed(audio_io.prepare_wave(w, RATE)))
        for k, w in enumerate(noises)
    ]
    assert other["cs_clip_wav2clip"] == pytest.approx(100 * np.mean(cosines), abs=1e-4)
    assert (other["n_generated"], other["n_reference"], other["is_splits"]) == (3, 3, 3)
    assert "IS used 3 splits, not 10" in other["not_comparable_because"]


def test_fresh_scorers_share_the_reference_side_and_keep_their_own_clips(loaded, fast_frechet):
    """What the evaluate stage does with the CFG scales of one pass: one reference, one
    generated set per scale, scored side by side."""
    metrics = _subset(loaded, "panns_cnn14_16k", "vggish")
    sines, noises = _sines(3), _noises(3)
    for wave in sines:
        metrics.add_reference(wave, RATE)
    same, other = metrics.fresh_generated(), metrics.fresh_generated()
    for sine, noise in zip(sines, noises, strict=True):
        same.add_generated(sine, RATE)
        other.add_generated(noise, RATE)
    a, b = same.scores(), other.scores()
    for key in ("fd_panns", "fad_vggish"):
        assert abs(a[key]) < 1e-6 * b[key] and b[key] > 0, key
    assert (a["n_generated"], b["n_generated"], metrics.n_generated) == (3, 3, 0)
    assert a["n_reference"] == b["n_reference"] == 3


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def test_fad_pools_every_frame_and_missing_files_are_named(loaded):
    metrics = _subset(loaded, "vggish")
    generated = [_sine(440.0), _sine(3000.0, seconds=3.0)]
    reference = [np.stack([_noise(1, 44100), _sine(50.0, 44100)]), _noise(2, 16000)]
    for wave in generated:
        metrics.add_generated(wave, RATE)  # no image: CS is not configured
    for wave, rate in zip(reference, (44100, 16000), strict=True):
        metrics.add_reference(wave, rate)

    def rows(waves, rates):  # all frames of all clips, one row each
        return np.concatenate(
            [
                loaded.vggish.embed(audio_io.prepare_wave(w, r))
                for w, r in zip(waves, rates, strict=True)
            ]
        )

    gen_rows, ref_rows = rows(generated, (RATE, RATE)), rows(reference, (44100, 16000))
    assert len(gen_rows) == 2 + 3 and len(ref_rows) == 2 + 2
    scores = metrics.scores(full_vggsound_test=True)
    expected = frechet_distance(
        GaussianStats.from_features(gen_rows), GaussianStats.from_features(ref_rows)
    )
    assert scores["fad_vggish"] == pytest.approx(expected, rel=1e-6)
    assert not {"fd_panns", "is_panns", "is_splits", "cs_clip_wav2clip"} & set(scores)
    assert set(k for k in scores if k.startswith("sha256_")) == {"sha256_vggish"}
    reasons = " | ".join(scores["not_comparable_because"])
    for field in ("panns_cnn14_16k", "clip_vit_b32", "wav2clip"):
        assert f"{field} is not configured" in reasons
    assert not scores["comparable_to_paper"]


def test_generated_clips_need_their_image_for_cs_and_scores_need_clips(full_run, loaded):
    with pytest.raises(ValueError, match="needs the conditioning image"):
        full_run.add_generated(_sine(440.0), RATE, None)
    assert full_run.n_generated == N_CLIPS
    with pytest.raises(OfficialMetricsError, match="no generated clips"):
        _subset(loaded, "vggish").scores()


class _PresetLogits:
    """Stands in for PannsExtractor: each clip added gets the next preset logits."""

    sha256 = "0" * 64

    def __init__(self, logits: list[np.ndarray]) -> None:
        self.queue = list(logits)

    def features(self, wave) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((1, 2048), np.float32), self.queue.pop(0)


def test_is_takes_the_clips_in_clip_id_order_whatever_order_they_arrive_in():
    rng = np.random.RandomState(7)
    ids = [f"clip-{k:03d}" for k in range(40)]
    logits = {i: (4 * rng.randn(527)).astype(np.float32) for i in ids}
    arrivals = [ids, list(rng.permutation(ids)), list(reversed(ids))]  # e.g. 1, 2, 4 Ray actors

    def score(order: list[str], with_ids: bool) -> float:
        metrics = OfficialMetrics(panns=_PresetLogits([logits[i] for i in order]))
        for i in order:
            metrics.add_generated(_sine(440.0, seconds=0.05), RATE, clip_id=i if with_ids else None)
        return metrics.scores()["is_panns"]

    expected, _ = inception_score(np.stack([logits[i] for i in ids]), splits=10, seed=2020)
    assert [score(order, True) for order in arrivals] == [expected] * 3
    # what the ids fix: the same logits in arrival order give another figure
    assert score(arrivals[1], False) != expected
    metrics = OfficialMetrics(panns=_PresetLogits([logits["clip-000"]] * 2))
    metrics.add_generated(_sine(440.0), RATE, clip_id="clip-000")
    with pytest.raises(ValueError, match="clip-000 was already added"):
        metrics.add_generated(_sine(440.0), RATE, clip_id="clip-000")


def _run(fd: float, reasons: list[str]) -> dict:
    return {"protocol": official.PROTOCOL, "n_generated": 4, "fd_panns": fd, "is_panns": fd / 10,
            "comparable_to_paper": not reasons, "not_comparable_because": reasons}  # fmt: skip


def test_generation_runs_average_into_one_labelled_entry():
    two = official.average_runs([_run(10.0, ["a"]), _run(14.0, ["a", "b"])])
    assert (two["fd_panns"], two["is_panns"], two["repeats"]) == (12.0, 1.2, 2)
    assert two["runs"] == [{"fd_panns": 10.0, "is_panns": 1.0}, {"fd_panns": 14.0, "is_panns": 1.4}]
    assert two["not_comparable_because"] == ["a", "b"] and not two["comparable_to_paper"]
    assert (two["protocol"], two["n_generated"]) == (official.PROTOCOL, 4)
    one = official.average_runs([_run(10.0, [])])
    assert "runs" not in one and one["fd_panns"] == 10.0 and not one["comparable_to_paper"]
    assert one["not_comparable_because"] == ["1 generation run averaged, the paper averages 2"]
    assert official.average_runs([_run(1.0, []), _run(3.0, [])])["comparable_to_paper"]


# --------------------------------------------------------------------------- reference audio


def _ffmpeg(*args: str) -> None:
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def stereo_mp4(tmp_path_factory):
    """A 2 s MP4: tiny H.264 video, AAC stereo at 22050 Hz, 440 Hz left and 1000 Hz right."""
    path = tmp_path_factory.mktemp("reference-audio") / "clip.mp4"
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=2",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=22050:duration=2",
        "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=22050:duration=2",
        "-filter_complex", "[1:a][2:a]join=inputs=2:channel_layout=stereo[a]",
        "-map", "0:v", "-map", "[a]", "-c:v", "libx264", "-preset", "ultrafast",
        "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "96k", str(path),
    )  # fmt: skip
    return path


def _level_at(wave: np.ndarray, rate: int, hz: float) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    freqs = np.fft.rfftfreq(len(wave), 1 / rate)
    return float(spectrum[np.abs(freqs - hz) < 20].max())


def test_reference_audio_is_channel_0_at_the_native_rate(stereo_mp4):
    wave, rate = reference_audio(stereo_mp4, seconds=1.5)
    assert rate == 22050 and wave.dtype == np.float32 and wave.shape == (33075,)
    assert _level_at(wave, rate, 440) > 100 * _level_at(wave, rate, 1000)  # left only, no downmix
    whole, _ = reference_audio(stereo_mp4)
    assert abs(len(whole) - 2 * 22050) <= 1024  # the whole 2 s, give or take an AAC frame
    np.testing.assert_array_equal(whole[: len(wave)], wave)


def test_reference_audio_names_a_file_that_is_not_media(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video\n")
    with pytest.raises(official.ReferenceAudioError, match=r"cannot decode the audio of .*notes"):
        reference_audio(path)
    assert issubclass(official.ReferenceAudioError, PipelineError)
    with pytest.raises(official.ReferenceAudioError, match="does not exist"):
        reference_audio(tmp_path / "absent.mp4")


def test_reference_audio_reads_a_file_named_like_stdin(stereo_mp4, tmp_path, monkeypatch):
    (tmp_path / "-").write_bytes(stereo_mp4.read_bytes())  # to ffmpeg, a bare "-" is stdin
    monkeypatch.chdir(tmp_path)
    wave, rate = reference_audio("-", seconds=1.0)
    assert rate == 22050 and wave.shape == (22050,)
