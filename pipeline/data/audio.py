"""SpecVQGAN's log-mel spectrogram (VGGSound setup), its Griffin-Lim inverse, WAV and PNG helpers.

The forward transform reproduces `feature_extraction/extract_mel_spectrogram.py` of
v-iashin/SpecVQGAN followed by the dataset's centre crop, parameterised by `ExtractConfig`
(the defaults give exactly SpecVQGAN's 80 x 848):

1. mono waveform at `sample_rate`; shorter than `clip_seconds` is looped, then everything is cut
   to `sample_rate * clip_seconds` samples (220,500); an empty waveform becomes zeros;
2. `|stft(n_fft=1024, hop_length=256, center=True, pad_mode="reflect")|` (magnitude, power 1);
3. `mel_basis @ magnitude` with `librosa.filters.mel(sr, n_fft, n_mels=80, fmin=125, fmax=7600)`
   (Slaney scale and norm, librosa's defaults);
4. `v = clip((20 * log10(max(mel, 1e-5)) - 20 + 100) / 100, 0, 1)`;
5. trim to 860 frames (SpecVQGAN's `TrimSpec(860)`: the last 2 of the 862 STFT frames go), then a
   centre crop to `mel_frames` (848): frames 6..853.

Values live in [0, 1]: 0 is -80 dB (mel magnitude 1e-4), 1 is +20 dB. The arithmetic is float64
like SpecVQGAN's (its waveform buffer is `np.zeros(length)`); the result is returned as float32.
For other clip lengths the trim keeps "all STFT frames but the last 2" and the crop is centred
the way albumentations' CenterCrop does it. Only `mel_to_wave` and the plot helpers are
approximate; the forward transform matches a direct librosa computation to float32 precision.
"""

from __future__ import annotations

import functools
import io as _stdio
import wave as _wave
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import io
from pipeline.config import ExtractConfig

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

AMP_FLOOR = 1e-5  # SpecVQGAN's LowerThresh
DB_REF = 20.0  # "- 20" after 20*log10
DB_RANGE = 100.0  # "+ 100, / 100"
TRIM_DROP = 2  # SpecVQGAN keeps 860 of the 862 frames of a 10-s clip: the last 2 go


@dataclass(frozen=True)
class MelGeometry:
    """Where the kept mel frames sit in the clip's STFT (all counts in frames)."""

    num_samples: int  # waveform length the mel is computed on (220,500)
    stft_frames: int  # 1 + num_samples // hop (862)
    trim_frames: int  # after TrimSpec (860)
    crop_start: int  # first kept frame of the centre crop (6)
    mel_frames: int  # kept frames (848)
    samples_used: int  # the kept frames see samples [0, samples_used) only (218,880)


def geometry(cfg: ExtractConfig) -> MelGeometry:
    """The frame bookkeeping of the transform for `cfg`.

    SpecVQGAN defaults: 220,500 samples, 862 STFT frames, 860 trimmed, crop from 6, 848 kept,
    218,880 samples seen (a shorter waveform changes the kept mel when it is looped).
    """
    num_samples = int(round(cfg.sample_rate * cfg.clip_seconds))
    stft_frames = 1 + num_samples // cfg.hop_length
    trim = max(stft_frames - TRIM_DROP, cfg.mel_frames)
    crop_start = (trim - cfg.mel_frames) // 2  # albumentations' CenterCrop: (h - crop_h) // 2
    # with center=True, frame k reads samples [k * hop - n_fft / 2, k * hop + n_fft / 2)
    last = crop_start + cfg.mel_frames - 1
    used = min(num_samples, last * cfg.hop_length + cfg.n_fft // 2)
    return MelGeometry(num_samples, stft_frames, trim, crop_start, cfg.mel_frames, used)


@functools.lru_cache(maxsize=8)
def mel_basis(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """librosa's Slaney mel filter bank, (n_mels, 1 + n_fft // 2) float32; cached, read-only."""
    import librosa

    basis = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=8)
def _basis64(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    # SpecVQGAN multiplies the float32 basis with a float64 magnitude, so numpy works in float64.
    basis = mel_basis(sample_rate, n_fft, n_mels, fmin, fmax).astype(np.float64)
    basis.setflags(write=False)
    return basis


@functools.lru_cache(maxsize=8)
def _sparse_basis(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> Any:
    # 98% of the basis is zeros: a CSR product takes ~1 ms on one core, where a dense BLAS
    # product takes 2-25 ms depending on how busy the cores are; results agree to ~1e-16.
    from scipy import sparse

    return sparse.csr_array(_basis64(sample_rate, n_fft, n_mels, fmin, fmax))


def _basis(cfg: ExtractConfig) -> np.ndarray:
    return _basis64(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)


@functools.lru_cache(maxsize=8)
def _basis_pinv(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    pinv = np.linalg.pinv(_basis64(sample_rate, n_fft, n_mels, fmin, fmax))
    pinv.setflags(write=False)
    return pinv


def mel_to_magnitude(spec: np.ndarray, cfg: ExtractConfig) -> np.ndarray:
    """STFT magnitudes (1 + n_fft // 2, F) of a [0, 1] mel (n_mels, F): the least-squares
    inverse of the mel basis, negatives clipped to 0.

    This is what `librosa.util.nnls` returns for a mel of this size (what
    `librosa.feature.inverse.mel_to_stft` calls): it starts L-BFGS-B from exactly this point and,
    its objective being divided by the number of mel values, the projected gradient is already
    under the default tolerance there, so no iteration moves it (bit-identical on real clips,
    tests/test_audio.py), after about 3 s of setting up bounds for 435,000 variables.
    """
    pinv = _basis_pinv(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
    return np.clip(pinv @ unit_to_amplitude(spec), 0.0, None)


def fit_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """`wave` (T,) looped if shorter, then cut to (num_samples,) float64; empty gives zeros."""
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    if wave.size == 0:
        return np.zeros(num_samples, dtype=np.float64)
    if wave.size < num_samples:
        wave = np.tile(wave, -(-num_samples // wave.size))
    return wave[:num_samples].copy()


def amplitude_to_unit(mel: np.ndarray) -> np.ndarray:
    """Mel magnitudes to SpecVQGAN's [0, 1] scale, applied in SpecVQGAN's order of operations."""
    x = np.log10(np.maximum(AMP_FLOOR, mel))
    x = (x * 20.0 - DB_REF + DB_RANGE) / DB_RANGE
    return np.clip(x, 0.0, 1.0)


def unit_to_amplitude(spec: np.ndarray) -> np.ndarray:
    """Inverse of `amplitude_to_unit` on [0, 1]: mel = 10 ** ((100 v - 80) / 20)."""
    return np.power(10.0, (DB_RANGE * np.asarray(spec, np.float64) - DB_RANGE + DB_REF) / 20.0)


def unit_mel(y: np.ndarray, cfg: ExtractConfig) -> np.ndarray:
    """The [0, 1] mel of `y` (T,) as is: no looping, trim or crop.

    Returns (n_mels, 1 + T // hop_length) float64; frame k is centred on sample k * hop_length.
    """
    import librosa

    magnitude = np.abs(
        librosa.stft(
            np.asarray(y, np.float64),
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            center=True,
            pad_mode="reflect",
        )
    )
    basis = _sparse_basis(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
    return amplitude_to_unit(basis @ magnitude)


def log_mel(wave: np.ndarray, cfg: ExtractConfig) -> np.ndarray:
    """SpecVQGAN's mel of a mono waveform at `cfg.sample_rate`.

    wave: (T,) float, any length (looped / cut to `cfg.clip_seconds`, computed in float64 as
    SpecVQGAN does). Returns (n_mels, mel_frames) float32 in [0, 1]; row 0 is the lowest band,
    column k is STFT frame `crop_start + k` of the clip.
    """
    g = geometry(cfg)
    spec = unit_mel(fit_length(wave, g.num_samples), cfg)[:, : g.trim_frames]
    return spec[:, g.crop_start : g.crop_start + g.mel_frames].astype(np.float32)


def mel_to_wave(
    spec: np.ndarray, cfg: ExtractConfig, n_iter: int = 32, seed: int = 0
) -> np.ndarray:
    """Listenable waveform of a [0, 1] mel (n_mels, F): `mel_to_magnitude`, then Griffin-Lim.

    Returns ((F - 1) * hop_length,) float32 at `cfg.sample_rate`, peak-limited to 1, aligned so
    that `unit_mel(wave)[:, k]` approximates `spec[:, k]`. Deterministic for a given `seed`
    (Griffin-Lim starts from random phases).
    """
    import librosa

    magnitude = mel_to_magnitude(spec, cfg)
    wave = librosa.griffinlim(
        magnitude,
        n_iter=n_iter,
        hop_length=cfg.hop_length,
        n_fft=cfg.n_fft,
        center=True,
        pad_mode="reflect",
        random_state=seed,
    )
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    if peak > 1.0:
        wave = wave / peak
    return wave.astype(np.float32)


def wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    """A 16-bit PCM WAV file of `wave`: (T,) mono or (T, C) samples, float in [-1, 1] (clipped
    and quantised here) or int16 (written as they are).

    soundfile (librosa's dependency) writes it when installed, the stdlib `wave` module otherwise;
    the samples are quantised here, so both give the same PCM data.
    """
    wave = np.asarray(wave)
    if wave.dtype == np.int16:
        pcm = wave.astype("<i2")
    else:
        pcm = (np.clip(wave.astype(np.float64), -1.0, 1.0) * 32767.0).round().astype("<i2")
    buf = _stdio.BytesIO()
    try:
        import soundfile
    except ImportError:
        with _wave.open(buf, "wb") as fh:
            fh.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
            fh.setsampwidth(2)
            fh.setframerate(int(sample_rate))
            fh.writeframes(pcm.tobytes())
    else:
        soundfile.write(buf, pcm, int(sample_rate), format="WAV", subtype="PCM_16")
    return buf.getvalue()


def save_wav(path: str | Path, wave: np.ndarray, sample_rate: int) -> None:
    """Write `wave` as a 16-bit WAV, atomically (see `wav_bytes`)."""
    io.write_bytes(path, wav_bytes(wave, sample_rate))


def plot_mel(ax: Axes, spec: np.ndarray, title: str = "") -> None:
    """Draw a [0, 1] mel (n_mels, F) on `ax`, low bands at the bottom."""
    ax.imshow(
        spec,
        origin="lower",
        aspect="auto",
        cmap="magma",
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
    )
    ax.set_xlabel("frame")
    ax.set_ylabel("mel band")
    if title:
        ax.set_title(title, fontsize=8)


def save_figure(fig: Figure, path: str | Path) -> None:
    """Save `fig` as a PNG atomically, without the software tag (stable bytes)."""
    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    io.write_bytes(path, buf.getvalue())


def save_mel_png(path: str | Path, spec: np.ndarray, title: str = "") -> None:
    """Plot a [0, 1] mel (n_mels, F) as a PNG (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 2.5), dpi=100, layout="constrained")
    plot_mel(fig.subplots(), spec, title)
    save_figure(fig, path)
