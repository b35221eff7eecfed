"""pipeline.data.audio: SpecVQGAN's mel, written out here independently, on a real VGGSound clip."""

from __future__ import annotations

import wave
from pathlib import Path

import librosa
import numpy as np
import pytest

from pipeline.config import ExtractConfig
from pipeline.data import audio

CLIP = Path(__file__).parent / "data" / "vggsound" / "FwVYUHKoLtQ_000034.wav"
SR = 22050

CFG = ExtractConfig(
    num_frames=10, image_size=64, jpeg_quality=90, sample_rate=SR, clip_seconds=10.0,
    n_fft=1024, hop_length=256, n_mels=80, fmin=125.0, fmax=7600.0, mel_frames=848,
    rows_per_shard=256, workers=1,
)  # fmt: skip


def reference_full(y: np.ndarray) -> np.ndarray:
    """SpecVQGAN's TRANSFORMS up to (not including) TrimSpec, spelled out step by step."""
    magnitude = np.abs(librosa.stft(y, n_fft=1024, hop_length=256, center=True, pad_mode="reflect"))
    basis = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=80, fmin=125, fmax=7600)
    mel = basis @ magnitude
    mel = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    return np.clip((mel + 100) / 100, 0, 1)


def reference(y: np.ndarray) -> np.ndarray:
    """The stored (80, 848) mel: zero-pad/cut to 220,500, transform, TrimSpec(860), CenterCrop."""
    buf = np.zeros(220_500)
    buf[: min(len(y), 220_500)] = y[:220_500]
    return reference_full(buf)[:, :860][:, 6 : 6 + 848]


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    y, sr = librosa.load(CLIP, sr=None)
    assert sr == 16_000
    return librosa.resample(y, orig_sr=sr, target_sr=SR)


def test_geometry_of_the_defaults() -> None:
    g = audio.geometry(CFG)
    assert (g.num_samples, g.stft_frames, g.trim_frames, g.crop_start, g.mel_frames) == (
        220_500,
        862,
        860,
        6,
        848,
    )
    assert g.samples_used == 853 * 256 + 512


def test_mel_matches_specvqgan_formula(clip: np.ndarray) -> None:
    assert len(clip) >= 220_500  # a full 10-s clip: cut, never looped
    spec = audio.log_mel(clip, CFG)
    assert spec.shape == (80, 848) and spec.dtype == np.float32
    assert np.abs(spec - reference(clip)).max() < 1e-6
    assert spec.min() >= 0.0 and spec.max() <= 1.0
    assert 0.3 < spec.mean() < 0.9  # a real clip uses the range, not the floor or the ceiling


def test_full_mel_uses_reflect_padding_and_magnitude(clip: np.ndarray) -> None:
    # The crop hides the edge frames, so the edge-sensitive padding is checked before it.
    y = clip[:220_500].astype(np.float64)
    full = audio.unit_mel(y, CFG)
    assert full.shape == (80, 862)
    expected = reference_full(y)
    assert np.abs(full - expected).max() < 1e-6
    constant = np.abs(librosa.stft(y, n_fft=1024, hop_length=256, pad_mode="constant"))
    assert not np.allclose(audio.amplitude_to_unit(audio._basis(CFG) @ constant), full, atol=1e-3)


def test_mel_basis_is_cached_and_read_only() -> None:
    basis = audio.mel_basis(SR, 1024, 80, 125.0, 7600.0)
    assert basis is audio.mel_basis(SR, 1024, 80, 125.0, 7600.0)
    assert basis.shape == (80, 513) and not basis.flags.writeable


def test_short_audio_is_looped_then_cut() -> None:
    rng = np.random.default_rng(0)
    period = 258 * 256  # ~3 s, a whole number of hops so the mel repeats exactly
    y = rng.uniform(-0.5, 0.5, period)
    fitted = audio.fit_length(y, 220_500)
    assert fitted.shape == (220_500,)
    np.testing.assert_array_equal(fitted[:period], y)
    np.testing.assert_array_equal(fitted[period : 2 * period], y)
    spec = audio.log_mel(y, CFG)
    # column c is frame c + 6; frames f and f + 258 of a periodic signal are equal
    np.testing.assert_allclose(spec[:, : 848 - 258], spec[:, 258:], atol=1e-5)
    assert spec[:, 258:].min() > 0  # no zero padding after the first period


def test_three_seconds_loop_exactly() -> None:
    y = np.sin(np.arange(3 * SR) * 2 * np.pi * 440 / SR) * np.linspace(0.1, 0.9, 3 * SR)
    fitted = audio.fit_length(y, 220_500)
    np.testing.assert_array_equal(fitted, np.tile(y, 4)[:220_500])
    assert np.abs(audio.log_mel(y, CFG) - reference(np.tile(y, 4))).max() < 1e-6


def test_long_audio_is_cut(clip: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    y = np.concatenate([clip[:220_500], rng.uniform(-1, 1, 3 * SR)])  # 13 s
    spec = audio.log_mel(y, CFG)
    np.testing.assert_array_equal(spec, audio.log_mel(y[:220_500], CFG))
    assert np.abs(spec - audio.log_mel(y[-220_500:], CFG)).max() > 0.1


def test_silence_maps_to_zero() -> None:
    assert np.all(audio.log_mel(np.zeros(220_500, np.float32), CFG) == 0.0)
    assert np.all(audio.log_mel(np.zeros(0, np.float32), CFG) == 0.0)


def test_unit_scale_round_trip() -> None:
    v = np.linspace(0, 1, 101)
    np.testing.assert_allclose(audio.amplitude_to_unit(audio.unit_to_amplitude(v)), v, atol=1e-12)
    assert audio.unit_to_amplitude(np.array([0.0, 1.0])) == pytest.approx([1e-4, 10.0])


def test_griffin_lim_inverse_is_close(clip: np.ndarray) -> None:
    spec = audio.log_mel(clip, CFG)
    y = audio.mel_to_wave(spec, CFG)
    assert y.dtype == np.float32 and y.shape == (847 * 256,)
    assert np.abs(y).max() <= 1.0
    again = audio.unit_mel(y, CFG)[:, :847]
    err = np.abs(again - spec[:, :847]).mean()
    assert err < 0.05
    # the bound is meaningful: one frame of misalignment is already far worse
    assert np.abs(again[:, 1:] - spec[:, :846]).mean() > err
    np.testing.assert_array_equal(y, audio.mel_to_wave(spec, CFG))  # seeded


def test_mel_inversion_is_what_librosa_nnls_returns(clip: np.ndarray) -> None:
    spec = audio.log_mel(clip, CFG)
    noisy = np.clip(spec + np.random.default_rng(0).normal(0, 0.05, spec.shape), 0, 1)
    basis = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=80, fmin=125, fmax=7600)
    for s in (spec, noisy):
        amplitude = 10.0 ** ((s.astype(np.float64) * 100 - 100 + 20) / 20)
        expected = librosa.util.nnls(basis.astype(np.float64), amplitude)
        got = audio.mel_to_magnitude(s, CFG)
        assert got.shape == (513, 848) and got.min() >= 0
        np.testing.assert_array_equal(got, expected)
    # Not a trivial identity: clipping changed the unconstrained least-squares solution.
    assert (np.linalg.pinv(basis.astype(np.float64)) @ amplitude).min() < 0


def test_wav_and_png_helpers(tmp_path: Path) -> None:
    t = np.arange(SR) / SR
    y = 0.5 * np.sin(2 * np.pi * 440 * t)
    audio.save_wav(tmp_path / "a.wav", y, SR)
    with wave.open(str(tmp_path / "a.wav")) as fh:
        assert (fh.getnchannels(), fh.getsampwidth(), fh.getframerate()) == (1, 2, SR)
        pcm = np.frombuffer(fh.readframes(fh.getnframes()), "<i2")
    np.testing.assert_allclose(pcm / 32767, y, atol=1 / 32767)
    spec = np.random.default_rng(0).uniform(0, 1, (80, 848))
    audio.save_mel_png(tmp_path / "m.png", spec, "test")
    first = (tmp_path / "m.png").read_bytes()
    assert first.startswith(b"\x89PNG")
    audio.save_mel_png(tmp_path / "m.png", spec, "test")
    assert (tmp_path / "m.png").read_bytes() == first
    assert audio.wav_bytes(y, SR) == (tmp_path / "a.wav").read_bytes()
