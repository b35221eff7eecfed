"""Inpainting that keeps its input: the generated part pasted into the user's original file.

The model regenerates whole token cells (about 0.19 s of a 10-s clip, or 32 pixels of a 256-px
frame); what the user asked to change is a time span or a box of their own file, at its own
sample rate, channels and size. `splice_sound` keeps every original sample outside the span and
crossfades into the generated sound over FADE_S inside each border; `splice_picture` keeps every
original pixel outside the box. `audio_window` says where the generated waveform sits in the clip.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from pipeline.config import ExtractConfig
from pipeline.data import audio

FADE_S = 0.005  # crossfade at each border of the span: short enough to keep the span's content


def audio_window(cfg: ExtractConfig) -> tuple[float, float]:
    """(first, last) second of the clip the generated waveform covers: the centres of the first
    and last kept mel frame (frame k of the mel is STFT frame crop_start + k of the clip)."""
    g = audio.geometry(cfg)
    hop = cfg.hop_length / cfg.sample_rate
    return g.crop_start * hop, (g.crop_start + g.mel_frames - 1) * hop


def span_fractions(cfg: ExtractConfig, start_s: float, end_s: float) -> tuple[float, float]:
    """The kept mel frames that shape [start_s, end_s) (those centred in it and one hop beyond)
    as fractions (0..1) of the kept frames, for `tasks.time_columns`."""
    first, _ = audio_window(cfg)
    frames_per_s = cfg.sample_rate / cfg.hop_length
    k0 = math.floor((start_s - first) * frames_per_s)
    k1 = math.ceil((end_s - first) * frames_per_s) + 1
    return max(0, k0) / cfg.mel_frames, min(cfg.mel_frames, k1) / cfg.mel_frames


def splice_mel(
    original: np.ndarray, generated: np.ndarray, cfg: ExtractConfig, start_s: float, end_s: float
) -> np.ndarray:
    """`original` (n_mels, F) with the frames of [start_s, end_s) taken from `generated`: the
    mel of what `splice_sound` writes, for its plot."""
    lo, hi = span_fractions(cfg, start_s, end_s)
    k0, k1 = round(lo * cfg.mel_frames), round(hi * cfg.mel_frames)
    out = original.copy()
    out[:, k0:k1] = generated[:, k0:k1]
    return out


def splice_sound(
    original: np.ndarray,
    rate: int,
    generated: np.ndarray,
    cfg: ExtractConfig,
    start_s: float,
    end_s: float,
) -> np.ndarray:
    """`original` (T, C) int16 at `rate` with [start_s, end_s) replaced by `generated` (the
    vocoder's (T',) float waveform at cfg.sample_rate, sample 0 at `audio_window`'s first
    second), resampled to `rate` and copied to every channel. Samples outside the span are the
    original's, untouched; over FADE_S inside each border the two are crossfaded (raised cosine).
    Returns (T, C) int16.
    """
    from scipy.signal import resample_poly

    first, _ = audio_window(cfg)
    a, b = round(start_s * rate), min(len(original), round(end_s * rate))
    ratio = Fraction(rate, cfg.sample_rate)
    sound = resample_poly(np.asarray(generated, np.float64), ratio.numerator, ratio.denominator)
    offset = round(first * rate)  # the generated sample at the clip's sample `offset`
    part = np.zeros(b - a)
    lo, hi = max(a, offset), min(b, offset + len(sound))
    part[lo - a : hi - a] = sound[lo - offset : hi - offset]
    fade = min(round(FADE_S * rate), (b - a) // 2)
    weight = np.ones(b - a)
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(fade) + 0.5) / fade)  # 0 -> 1
        weight[:fade], weight[len(weight) - fade :] = ramp, ramp[::-1]
    kept = original[a:b].astype(np.float64) / 32768.0
    mixed = weight[:, None] * part[:, None] + (1.0 - weight[:, None]) * kept
    out = original.copy()
    out[a:b] = np.clip(np.round(mixed * 32768.0), -32768, 32767).astype(np.int16)
    return out


def splice_picture(
    original: np.ndarray, generated: np.ndarray, crop_box: tuple[int, int, int, int],
    picture_box: tuple[int, int, int, int],
) -> np.ndarray:  # fmt: skip
    """`original` (H, W, 3) uint8 with `picture_box` = (x0, y0, x1, y1) replaced by the pixels
    `crop_box` of `generated` (S, S, 3), scaled to fit (bicubic). Returns (H, W, 3) uint8."""
    from PIL import Image

    x0, y0, x1, y1 = crop_box
    X0, Y0, X1, Y1 = picture_box
    patch = Image.fromarray(np.ascontiguousarray(generated[y0:y1, x0:x1]))
    out = original.copy()
    out[Y0:Y1, X0:X1] = np.asarray(patch.resize((X1 - X0, Y1 - Y0), Image.Resampling.BICUBIC))
    return out
