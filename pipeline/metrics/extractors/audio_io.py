"""Audio input of the paper-protocol metrics: audioldm_eval's "main-2024" `WaveDataset`.

Each clip is read as float32, only channel 0 is kept, its mean is subtracted, it is resampled to
16 kHz with torchaudio's default windowed-sinc resampler and zero-padded at the end to at least
32000 samples (docs/references.md, "Paper-protocol metrics"). torchaudio itself cannot be installed next to this
project's torch, so `resample` re-implements `torchaudio.functional.resample` at its defaults
(Hann window, lowpass_filter_width=6, rolloff=0.99), in the same dtype and operation order.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

from pipeline.errors import PipelineError

EVAL_SAMPLE_RATE = 16000
# audioldm_eval pads to this many samples whatever the rate (2 s at 16 kHz).
MIN_SAMPLES = 32000
# torchaudio.functional.resample defaults.
LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99


class AudioInputError(PipelineError, ValueError):
    """An audio file or array that cannot be turned into an evaluation waveform."""


def sinc_resample_kernel(
    orig_freq: int,
    new_freq: int,
    lowpass_filter_width: int = LOWPASS_FILTER_WIDTH,
    rolloff: float = ROLLOFF,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, int]:
    """Hann-windowed sinc filters of a rational resampler, one per output phase.

    With the rates reduced by their gcd to o → n, output sample j of every block of n reads
    input samples [-width, width + o) around the block start. Returns (kernel (n, 1, 2·width + o),
    width). The cutoff is `rolloff` times the lower Nyquist rate, and the sinc is cut after
    `lowpass_filter_width` zero crossings.
    """
    if int(orig_freq) != orig_freq or int(new_freq) != new_freq or orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"resampling needs positive integer rates, got {orig_freq} → {new_freq}")
    if lowpass_filter_width <= 0:
        raise ValueError("lowpass_filter_width must be positive")
    gcd = math.gcd(int(orig_freq), int(new_freq))
    o, n = int(orig_freq) // gcd, int(new_freq) // gcd
    cutoff = min(o, n) * rolloff  # in cycles per block of o input samples
    width = math.ceil(lowpass_filter_width * o / cutoff)
    taps = torch.arange(-width, width + o, dtype=dtype, device=device)[None, None] / o
    phases = torch.arange(0, -n, -1, dtype=dtype, device=device)[:, None, None] / n
    t = phases + taps  # (n, 1, 2·width + o): input time minus output time, in blocks
    t *= cutoff
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t *= math.pi
    sinc = torch.where(t == 0, torch.tensor(1.0, dtype=dtype, device=device), t.sin() / t)
    return sinc * (window * (cutoff / o)), width


def resample(
    wave: torch.Tensor,
    orig_freq: int,
    new_freq: int,
    lowpass_filter_width: int = LOWPASS_FILTER_WIDTH,
    rolloff: float = ROLLOFF,
) -> torch.Tensor:
    """`torchaudio.functional.resample(wave, orig_freq, new_freq)`: (..., T) → (..., T').

    T' = ceil(new/old · T), evaluated in float32 as torchaudio does. Equal rates return `wave`
    itself. The kernel is built in `wave`'s dtype, as torchaudio builds it.
    """
    if not wave.is_floating_point():
        raise TypeError(f"resample needs a floating-point waveform, got {wave.dtype}")
    if orig_freq == new_freq:
        return wave
    kernel, width = sinc_resample_kernel(
        orig_freq, new_freq, lowpass_filter_width, rolloff, wave.dtype, wave.device
    )
    gcd = math.gcd(int(orig_freq), int(new_freq))
    o, n = int(orig_freq) // gcd, int(new_freq) // gcd
    shape = wave.shape
    flat = wave.reshape(-1, shape[-1])
    length = flat.shape[-1]
    padded = F.pad(flat, (width, width + o))
    blocks = F.conv1d(padded[:, None], kernel, stride=o)  # (B, n, blocks)
    out = blocks.transpose(1, 2).reshape(flat.shape[0], -1)
    # torchaudio: torch.ceil(torch.as_tensor(n * length / o)), a float32 tensor by default.
    target = math.ceil(float(np.float32(n * length / o)))
    return out[:, :target].reshape(*shape[:-1], -1)


def prepare_wave(
    wave: ArrayLike | torch.Tensor,
    sample_rate: int,
    target_rate: int = EVAL_SAMPLE_RATE,
    min_samples: int = MIN_SAMPLES,
) -> torch.Tensor:
    """A clip as audioldm_eval's WaveDataset returns it: (1, T) float32 at `target_rate`.

    wave: (T,) mono or (C, T) channels first; only channel 0 is used (no channel averaging).
    Steps: float32, channel 0, minus its mean, `resample`, zero-pad at the end to `min_samples`.
    """
    x = wave.detach() if isinstance(wave, torch.Tensor) else torch.as_tensor(np.asarray(wave))
    x = x.to("cpu", torch.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise AudioInputError(f"a waveform is (T,) or (channels, T), got shape {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise AudioInputError("the waveform is empty")
    x = x[0:1]
    x = x - x.mean()
    x = resample(x, int(sample_rate), int(target_rate))
    if x.shape[-1] < min_samples:
        x = F.pad(x, (0, min_samples - x.shape[-1]))
    return x


def load_wave(
    path: str | Path,
    target_rate: int = EVAL_SAMPLE_RATE,
    min_samples: int = MIN_SAMPLES,
) -> torch.Tensor:
    """Read an audio file with soundfile and `prepare_wave` it: (1, T) float32 at `target_rate`.

    Integer PCM is scaled to [-1, 1) as torchaudio.load does (int16 / 32768).
    """
    import soundfile

    path = Path(path)
    try:
        data, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as err:  # soundfile.LibsndfileError is a RuntimeError
        raise AudioInputError(f"cannot read audio file {path}: {err}") from None
    if data.shape[0] < 1:
        raise AudioInputError(f"audio file {path} is empty")
    return prepare_wave(data.T, sample_rate, target_rate, min_samples)
