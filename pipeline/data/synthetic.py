"""The procedural audio-visual dataset: eight classes of moving shapes paired with sounds.

Each class pairs a visual signature (shape, colour, texture, motion, and a scene: the background's
hue) with a sound signature (pitch band, rhythm, timbre, noise band), and the two are tied inside a
clip as well: the sound's events happen when the picture's events do (a ball's thump when it
touches the floor, a chirp when the ring pulses), and what one frame shows sets part of the sound
(a bigger object sounds lower, denser rain hisses louder). Every clip varies within its class
(position, size, background shade and texture, motion phase, pitch, onset times, loudness,
background noise), so image-to-audio is learnable but not a lookup.

The scene matters for the demo: as in VGGSound, where a frame's surroundings (water, a road, a
stage) say as much about the sound as its subject, the background covers most of a frame and so
most of its 16x16 image ids. With backgrounds of any hue, one frame's ids told the class apart
only 39% of the time (nearest centroid of id histograms); the object alone is a handful of ids.

Clips are rendered with numpy (frames and waveform, deterministic from the seed and the clip id)
and encoded by one ffmpeg process per clip into a real 10-second MP4 (H.264 + AAC), so that every
later stage decodes real files. `render_clip` gives the arrays without encoding.
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import logging
import os
import re
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from pipeline import io
from pipeline.config import SyntheticConfig
from pipeline.data.download import select_clips
from pipeline.data.manifest import ClipRecord, video_path
from pipeline.media import MediaError, ffmpeg_exe, probe

log = logging.getLogger(__name__)

SOURCE = "synthetic"
SPLITS = ("train", "test")
# Beside the manifest: the settings the clips in the folder were made with. The clips folder
# persists across DVC runs, so a clip is reused only while seed, settings and code are the same.
SETTINGS_NAME = "synthetic.json"

# x264 with one thread is deterministic; bitexact flags and no metadata keep the encoder's
# version string and timestamps out of the file, so one machine always writes the same bytes.
VIDEO_CODEC = [
    "-c:v",
    "libx264",
    "-preset",
    "veryfast",
    "-crf",
    "23",
    "-pix_fmt",
    "yuv420p",
    "-threads",
    "1",
    "-g",
    "60",
]
AUDIO_CODEC = ["-c:a", "aac", "-b:a", "64k", "-ac", "1"]
BITEXACT = [
    "-fflags",
    "+bitexact",
    "-flags:v",
    "+bitexact",
    "-flags:a",
    "+bitexact",
    "-map_metadata",
    "-1",
    "-movflags",
    "+faststart",
]

# Frames are drawn this many at a time: vectorised, yet a moving object's box over the chunk
# stays small and a 30-s HD clip stays within memory.
FRAME_CHUNK = 8


# ------------------------------------------------------------------------------------ the classes


@dataclass(frozen=True)
class SynthClass:
    """One audio-visual class: what it looks like and what it sounds like."""

    index: int
    label: str
    colour: tuple[float, float, float]  # RGB in [0, 1] of the foreground object
    scene_hue: float  # HSV hue of the background (the scene), jittered per clip
    visual: str
    sound: str


CLASSES: tuple[SynthClass, ...] = (
    SynthClass(
        0,
        "red bouncing ball / low thumps",
        (0.88, 0.12, 0.10),
        0.375,
        "red shaded disc bouncing on an invisible floor",
        "150-220 Hz soft square-wave thump with a pitch drop at each floor contact",
    ),
    SynthClass(
        1,
        "green sliding box / steady hum",
        (0.15, 0.75, 0.20),
        0.875,
        "green checkered square sliding left and right",
        "steady 340-490 Hz tone with two harmonics, Doppler wobble with the speed",
    ),
    SynthClass(
        2,
        "blue pulsing ring / high chirps",
        (0.15, 0.30, 0.95),
        0.125,
        "blue ring that swells at a steady 2-3.5 Hz pulse",
        "1.3-1.8 kHz chirp rising by 30% at each pulse",
    ),
    SynthClass(
        3,
        "yellow spinning triangle / buzzy drone",
        (0.95, 0.85, 0.10),
        0.625,
        "yellow shaded triangle rotating about its centre",
        "195-285 Hz band-limited sawtooth, amplitude beating three times per turn",
    ),
    SynthClass(
        4,
        "white falling rain / hiss",
        (0.95, 0.95, 0.95),
        0.75,
        "white streaks falling over a dark background",
        "5-7.6 kHz noise hiss with scattered drip ticks, louder when denser",
    ),
    SynthClass(
        5,
        "magenta drifting star / bell strikes",
        (0.85, 0.15, 0.80),
        0.25,
        "magenta five-pointed star drifting, popping at each strike",
        "680-990 Hz bell (partials x1.2, x1.5, x2: minor third, fifth, octave) struck at irregular times",
    ),
    SynthClass(
        6,
        "orange flashing stripes / rapid clicks",
        (1.00, 0.50, 0.05),
        0.5,
        "orange horizontally striped panel flashing at 3-6 Hz",
        "2.5-4 kHz noise burst at each flash",
    ),
    SynthClass(
        7,
        "cyan waves / low rumble",
        (0.10, 0.80, 0.85),
        0.0,
        "cyan water with a rolling wave surface and a foam line",
        "100-450 Hz rumbling noise that swells with the waves",
    ),
)

_CLIP_ID = re.compile(r"synth-c(\d{2})-(train|test)-(\d{4,})_000000")


class ClipSpec(NamedTuple):
    """Which clip: the class, the split and the index within class and split."""

    class_index: int
    split: str
    index: int

    @property
    def clip_id(self) -> str:
        return f"synth-c{self.class_index:02d}-{self.split}-{self.index:04d}_000000"

    @property
    def label(self) -> str:
        return CLASSES[self.class_index].label


class ClipArrays(NamedTuple):
    """A rendered clip: frames (T, H, W, 3) uint8 and mono audio (N,) float32 in [-1, 1]."""

    frames: np.ndarray
    audio: np.ndarray


def parse_clip_id(clip_id: str) -> ClipSpec:
    """The `ClipSpec` of a synthetic clip id such as `synth-c03-train-0007_000000`."""
    m = _CLIP_ID.fullmatch(clip_id)
    if not m or int(m[1]) >= len(CLASSES):
        raise ValueError(f"{clip_id!r} is not a synthetic clip id")
    return ClipSpec(int(m[1]), m[2], int(m[3]))


def clip_specs(cfg: SyntheticConfig) -> list[ClipSpec]:
    """Every clip of the dataset, interleaved so that any prefix is balanced over classes.

    Order: index 0 of every class in train, then in test, then index 1, and so on; taking the
    first `limit` clips therefore keeps the classes (and splits) as even as possible.
    """
    specs = []
    for index in range(max(cfg.train_per_class, cfg.test_per_class)):
        for split, per_class in (("train", cfg.train_per_class), ("test", cfg.test_per_class)):
            if index < per_class:
                specs.extend(ClipSpec(c, split, index) for c in range(cfg.num_classes))
    return specs


# -------------------------------------------------------------------------------------- rendering


class _Canvas:
    """Pixel-centre coordinates in height units: y in [0, 1] downwards, x in [0, W/H].

    A crop keeps the frame's units, so that drawing into it gives the same pixels as drawing
    the whole frame and cutting them out.
    """

    def __init__(self, width: int, height: int) -> None:
        self.height, self.width = height, width
        self.aspect = width / height
        self.y = ((np.arange(height, dtype=np.float32) + 0.5) / height)[None, :, None]  # (1,H,1)
        self.x = ((np.arange(width, dtype=np.float32) + 0.5) / height)[None, None, :]  # (1,1,W)

    def crop(self, rows: slice, cols: slice) -> _Canvas:
        sub = object.__new__(_Canvas)
        sub.height, sub.width, sub.aspect = self.height, self.width, self.aspect
        sub.y, sub.x = self.y[:, rows], self.x[:, :, cols]
        return sub

    def cover(self, distance: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage of a signed distance (positive inside, height units)."""
        return np.clip(distance * self.height + 0.5, 0.0, 1.0)


def _rotated(cv: _Canvas, cx: np.ndarray, cy: np.ndarray, angle: np.ndarray | float):
    """Object coordinates (u, v) of every pixel; all inputs broadcast to (n, 1, 1)."""
    dx, dy = cv.x - cx, cv.y - cy
    cos, sin = np.cos(angle), np.sin(angle)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def _col(values: np.ndarray) -> np.ndarray:
    """(n,) per-frame values as (n, 1, 1) for broadcasting over pixels."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def _bounce(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold an unbounded coordinate back into [lo, hi] as if it bounced off the walls."""
    span = max(hi - lo, 1e-6)
    folded = np.mod(x - lo, 2 * span)
    return lo + np.where(folded > span, 2 * span - folded, folded)


def _since_last(t: np.ndarray, onsets: np.ndarray) -> np.ndarray:
    """Seconds since the latest onset at or before each time (inf before the first)."""
    if len(onsets) == 0:
        return np.full_like(t, np.inf)
    k = np.searchsorted(onsets, t, side="right") - 1
    return np.where(k >= 0, t - onsets[np.maximum(k, 0)], np.inf)


def _background(cv: _Canvas, p: dict) -> np.ndarray:
    """(H, W, 3) static background: a tinted vertical gradient with a soft sinusoidal texture."""
    base = np.asarray(colorsys.hsv_to_rgb(p["bg_hue"], p["bg_sat"], p["bg_val"]), np.float32)
    y, x = cv.y[0], cv.x[0]  # (H,1), (1,W)
    shade = 1.0 + p["bg_grad"] * (y - 0.5)
    wave = np.sin(
        2 * np.pi * p["bg_freq"] * (x * np.cos(p["bg_angle"]) + y * np.sin(p["bg_angle"]))
        + p["bg_phase"]
    )
    level = shade * (1.0 + p["bg_tex"] * wave)  # (H, W)
    return np.clip(level[..., None] * base, 0.0, 1.0).astype(np.float32)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Blend `colour` over `img` with coverage `alpha` (n,H,W); all broadcast to (n,H,W,3)."""
    return img + alpha[..., None] * (colour - img)


def _pose(cls: int, p: dict, t: np.ndarray, aspect: float):
    """Centre (cx, cy), each (n,), and reach (the farthest painted distance from the centre) of
    a compact object at times `t`; None for the classes that fill the frame (rain, waves)."""
    ones = np.ones_like(t)
    if cls == 0:  # the ball is on the floor where |sin| is 0: at each thump onset
        lift = np.abs(np.sin(np.pi * (t / p["period"] + p["phase"])))
        cx = p["x0"] + p["drift"] * np.sin(2 * np.pi * t / 7.0 + p["phase"])
        return cx, p["floor"] - p["size"] - p["height"] * lift, p["size"]
    if cls == 1:
        cx = p["x0"] + p["amp"] * np.sin(2 * np.pi * t / p["period"] + p["phase"])
        return cx, p["y0"] * ones, p["size"] * np.sqrt(2)
    if cls == 2:
        return p["x0"] * ones, p["y0"] * ones, p["size"] * 1.3 + p["width"]
    if cls == 3:
        return p["x0"] + 0.03 * np.sin(2 * np.pi * t / 3.0), p["y0"] * ones, p["size"]
    if cls == 5:
        half = p["size"] * 1.1
        return (
            _bounce(p["x0"] + p["vx"] * t, half, aspect - half),
            _bounce(p["y0"] + p["vy"] * t, half, 1.0 - half),
            p["size"] * 1.3,
        )
    if cls == 6:
        return p["x0"] * ones, p["y0"] * ones, p["size"] * np.hypot(1.3, 0.9)
    return None


def _extent(cls: int, p: dict, t: np.ndarray, aspect: float) -> tuple[float, ...]:
    """(top, bottom, left, right) in height units of all that is drawn over the background."""
    pose = _pose(cls, p, t, aspect)
    if pose is not None:
        cx, cy, reach = pose
        return cy.min() - reach, cy.max() + reach, cx.min() - reach, cx.max() + reach
    if cls == 7:  # the water and its foam line lie below the highest crest
        return p["level"] - 1.3 * p["amp"] - 0.02, 1.0, 0.0, aspect
    return 0.0, 1.0, 0.0, aspect


def _draw(cls: int, p: dict, cv: _Canvas, t: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Frames at times `t` (n,) as float RGB in [0, 1], shape (n, h, w, 3) of canvas `cv`."""
    img = bg  # broadcast against the (n, h, w) coverage by the first _paint
    colour = p["colour"]
    tt = _col(t)
    pose = _pose(cls, p, t, cv.aspect)
    if pose is not None:
        cx, cy = _col(pose[0]), _col(pose[1])
    if cls == 0:  # bouncing ball: height |sin| touches the floor at each thump onset
        r = p["size"]
        u, v = _rotated(cv, cx, cy, 0.0)
        dist = np.sqrt(u * u + v * v)
        alpha = cv.cover(r - dist)
        highlight = np.sqrt((u + 0.35 * r) ** 2 + (v + 0.35 * r) ** 2) / (1.6 * r)
        shade = np.clip(1.15 - 0.7 * highlight, 0.25, 1.2)[..., None]
        return _paint(img, alpha, shade * colour)
    if cls == 1:  # sliding checkered box
        s = p["size"]
        u, v = _rotated(cv, cx, cy, p["tilt"])
        alpha = cv.cover(s - np.maximum(np.abs(u), np.abs(v)))
        cells = (np.floor((u + s) / (2 * s) * 3) + np.floor((v + s) / (2 * s) * 3)) % 2
        return _paint(img, alpha, (1.0 - 0.4 * cells)[..., None] * colour)
    if cls == 2:  # pulsing ring
        swell = np.exp(-_since_last(t, p["onsets"]) / 0.12)
        r = _col(p["size"] * (1.0 + 0.3 * swell))
        u, v = _rotated(cv, cx, cy, 0.0)
        dist = np.sqrt(u * u + v * v)
        alpha = cv.cover(p["width"] - np.abs(dist - r))
        glow = _col(0.8 + 0.3 * swell)[..., None]
        return _paint(img, alpha, np.clip(glow * colour, 0, 1))
    if cls == 3:  # spinning triangle: three half-planes around the centre
        radius = p["size"]
        angle = _col(p["angle0"] + 2 * np.pi * p["turns"] * t)
        u, v = _rotated(cv, cx, cy, angle)
        edge = np.max(
            np.stack(
                [
                    u * np.cos(a) + v * np.sin(a)
                    for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)
                ]
            ),
            axis=0,
        )
        alpha = cv.cover(radius / 2 - edge)
        shade = np.clip(1.0 - 0.5 * (v / radius), 0.5, 1.3)[..., None]
        return _paint(img, alpha, np.clip(shade * colour, 0, 1))
    if cls == 4:  # rain: streaks in fixed columns, each falling with its own speed and offset
        xs, speed, offset, length = (
            p["streak_x"],
            p["streak_speed"],
            p["streak_offset"],
            p["streak_len"],
        )
        # nearest streak of every pixel column (W,), then its head position per frame.
        nearest = np.abs(cv.x[0, 0][:, None] - xs[None, :]).argmin(axis=1)
        near_x = np.abs(cv.x[0, 0] - xs[nearest])  # (W,)
        # one pixel column fully lit (the nearest), its neighbours anti-aliased
        width = np.clip(1.5 - near_x * cv.height, 0.0, 1.0)[None, None, :]  # (1,1,W)
        head = np.mod(offset[nearest][None, :] + speed[nearest][None, :] * t[:, None], 1.4)
        behind = head[:, None, :] - cv.y  # (n,H,W): how far above the head a pixel is
        trail = (behind >= 0) & (behind < length[nearest][None, None, :])
        alpha = 0.9 * trail * width * (1.0 - 0.6 * np.clip(behind / 0.2, 0, 1))
        return _paint(img, alpha, colour)
    if cls == 5:  # drifting star that pops at each bell strike
        pop = np.exp(-_since_last(t, p["onsets"]) / 0.2)
        angle = _col(p["angle0"] + 0.2 * t)
        u, v = _rotated(cv, cx, cy, angle)
        dist = np.sqrt(u * u + v * v)
        # radius (0.45 .. 1) x size: a triangle wave over the angle puts five sharp points
        spoke = np.mod(np.arctan2(v, u) * (5 / (2 * np.pi)), 1.0)
        star = p["size"] * _col(1.0 + 0.3 * pop) * (1.0 - 1.1 * np.abs(spoke - 0.5))
        alpha = cv.cover(star - dist)
        glow = _col(0.85 + 0.35 * pop)[..., None]
        return _paint(img, alpha, np.clip(glow * colour, 0, 1))
    if cls == 6:  # striped panel flashing at each click
        flash = np.exp(-_since_last(t, p["onsets"]) / 0.08)
        u, v = _rotated(cv, cx, cy, p["tilt"])
        a, b = p["size"] * 1.3, p["size"] * 0.9
        alpha = cv.cover(np.minimum(a - np.abs(u), b - np.abs(v)))
        stripes = np.floor((v + b) / (2 * b) * p["stripes"] * 2) % 2
        level = (0.6 + 0.4 * stripes) * _col(0.6 + 0.4 * flash)
        return _paint(img, alpha, np.clip(level[..., None] * colour, 0, 1))
    # cls == 7: cyan water under a rolling wave surface with a foam line
    x = cv.x
    surface = (
        p["level"]
        + p["amp"] * np.sin(p["k"] * x - 2 * np.pi * tt / p["period"] + p["phase"])
        + 0.3 * p["amp"] * np.sin(2.3 * p["k"] * x + 1.7 * 2 * np.pi * tt / p["period"])
    )
    depth = cv.y - surface
    alpha = cv.cover(depth)
    ripple = 0.8 + 0.2 * np.sin(40 * depth + 3 * x)
    img = _paint(img, alpha, np.clip(ripple[..., None] * colour, 0, 1))
    foam = cv.cover(0.012 - np.abs(depth))
    return _paint(img, foam, np.float32(0.95))


def _band_noise(
    rng: np.random.Generator, n: int, sr: int, lo: float, hi: float, tilt: float = 0.0
) -> np.ndarray:
    """Gaussian noise band-limited to [lo, hi] Hz (FFT mask), power ~ f**tilt, unit peak."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    mask = ((f >= lo) & (f <= hi)) * np.power(np.maximum(f, 1.0), tilt / 2)
    out = np.fft.irfft(spec * mask, n)
    return out / (np.abs(out).max() + 1e-9)


def _add_events(
    out: np.ndarray, onsets: np.ndarray, sr: int, kernel: Callable[[int], np.ndarray]
) -> None:
    """Add `kernel(k)` (one event's waveform) into `out` at each onset time in seconds."""
    for k, onset in enumerate(onsets):
        start = int(round(onset * sr))
        if start >= len(out):
            continue
        wave = kernel(k)
        if start < 0:
            wave, start = wave[-start:], 0
        end = min(len(out), start + len(wave))
        out[start:end] += wave[: end - start]


def _regular_onsets(
    rng: np.random.Generator, rate: float, duration: float, jitter: float
) -> np.ndarray:
    """Onsets at a steady rate with a random phase and a little timing jitter."""
    period = 1.0 / rate
    base = np.arange(rng.uniform(0, period), duration, period)
    return np.sort(base + rng.uniform(-jitter, jitter, len(base)))


def _sound(cls: int, p: dict, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """The class's sound, float64 (n,) with unit peak."""
    t = np.arange(n) / sr
    out = np.zeros(n)
    if cls == 0:  # thump at each floor contact: square wave with a fast pitch drop
        kt = np.arange(int(0.3 * sr)) / sr
        freq = p["f0"] * (1.0 + 0.6 * np.exp(-kt / 0.03))
        # a soft square (tanh) keeps the harmonics low: a thump, not a broadband click
        wave = np.tanh(2.5 * np.sin(2 * np.pi * np.cumsum(freq) / sr)) * np.exp(-kt / 0.12)
        wave *= np.minimum(1.0, kt / 0.003)
        gains = rng.uniform(0.7, 1.0, len(p["onsets"]))
        _add_events(out, p["onsets"], sr, lambda k: gains[k] * wave)
    elif cls == 1:  # hum with Doppler wobble from the box's horizontal speed
        speed = np.cos(2 * np.pi * t / p["period"] + p["phase"])
        freq = p["f0"] * (1.0 + 0.03 * speed)
        phase = 2 * np.pi * np.cumsum(freq) / sr
        out = np.sin(phase) + 0.35 * np.sin(2 * phase) + 0.15 * np.sin(3 * phase)
        out *= 1.0 + 0.1 * np.sin(2 * np.pi * 0.7 * t)
    elif cls == 2:  # rising chirp at each pulse
        kt = np.arange(int(p["chirp_s"] * sr)) / sr
        freq = p["f0"] * (1.0 + 0.3 * kt / p["chirp_s"])
        wave = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.sin(np.pi * kt / p["chirp_s"]) ** 2
        _add_events(out, p["onsets"], sr, lambda k: wave)
    elif cls == 3:  # band-limited sawtooth drone beating three times per turn
        phase = 2 * np.pi * p["f0"] * t + p["phase"]
        for h in range(1, int(5000 / p["f0"]) + 1):
            out += np.sin(h * phase) / h
        out *= 0.6 + 0.4 * np.cos(2 * np.pi * 3 * p["turns"] * t)
    elif cls == 4:  # hiss, fluttering slowly, with drips
        flutter = 0.8 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6.3))
        out = p["density_gain"] * flutter * _band_noise(rng, n, sr, 5000, 7600)
        drips = np.sort(rng.uniform(0, n / sr, rng.poisson(5 * n / sr)))
        kt = np.arange(int(0.03 * sr)) / sr
        tick = (
            np.sin(2 * np.pi * rng.uniform(5000, 6500) * kt)
            * np.exp(-kt / 0.006)
            * np.minimum(1.0, kt / 0.001)
        )  # a 1-ms attack: no broadband splatter
        _add_events(out, drips, sr, lambda k: 0.5 * tick)
    elif cls == 5:  # bell strikes: a church bell's prime, tierce, quint and nominal
        kt = np.arange(int(1.5 * sr)) / sr
        wave = sum(
            a * np.sin(2 * np.pi * p["f0"] * r * kt) * np.exp(-kt / d)
            for r, a, d in ((1.0, 1.0, 1.2), (1.2, 0.6, 0.9), (1.5, 0.5, 0.7), (2.0, 0.4, 0.6))
        )
        wave = wave * np.minimum(1.0, kt / 0.002)
        gains = rng.uniform(0.6, 1.0, len(p["onsets"]))
        _add_events(out, p["onsets"], sr, lambda k: gains[k] * wave)
    elif cls == 6:  # a short noise burst at each flash
        m = int(0.12 * sr)
        clicks = _band_noise(rng, m * len(p["onsets"]) + 1, sr, 2500, 4000).reshape(-1)
        env = np.exp(-np.arange(m) / sr / 0.04) * np.minimum(1.0, np.arange(m) / sr / 0.002)
        _add_events(out, p["onsets"], sr, lambda k: clicks[k * m : (k + 1) * m] * env)
    else:  # rumble swelling with the waves
        swell = 0.6 + 0.4 * np.sin(2 * np.pi * t / p["period"] - p["phase"])
        out = p["amp_gain"] * swell * _band_noise(rng, n, sr, 100, 450, tilt=-1.0)
    return out / (np.abs(out).max() + 1e-9)


def _params(cls: int, rng: np.random.Generator, cfg: SyntheticConfig) -> dict:
    """The random parameters of one clip: the background, then the class's own."""
    aspect, duration = cfg.width / cfg.height, cfg.duration_s
    dark = cls == 4  # rain falls at night: the white streaks need a dark sky
    p: dict = {
        "bg_hue": (CLASSES[cls].scene_hue + rng.uniform(-0.04, 0.04)) % 1.0,
        "bg_sat": rng.uniform(0.25, 0.55),
        "bg_val": rng.uniform(0.08, 0.22) if dark else rng.uniform(0.15, 0.55),
        "bg_grad": rng.uniform(-0.5, 0.5),
        "bg_tex": rng.uniform(0.0, 0.15),
        "bg_freq": rng.uniform(0.5, 4.0),
        "bg_angle": rng.uniform(0, np.pi),
        "bg_phase": rng.uniform(0, 2 * np.pi),
        "gain_db": rng.uniform(-12.0, -3.0),
        "noise_db": rng.uniform(-50.0, -30.0),
        "noise_tilt": rng.uniform(-1.5, 0.0),
    }
    jitter = rng.uniform(0.92, 1.08, 3)
    p["colour"] = np.clip(np.asarray(CLASSES[cls].colour) * jitter, 0, 1).astype(np.float32)
    scale = rng.uniform(0.7, 1.3)  # object size; sets the pitch where the class has one
    pitch = scale**-0.5 * rng.uniform(0.97, 1.03)  # bigger sounds lower, within the band
    p["phase"] = rng.uniform(0, 1) if cls == 0 else rng.uniform(0, 2 * np.pi)
    if cls == 0:
        p["size"] = 0.11 * scale
        p["period"] = rng.uniform(0.45, 0.8)
        p["floor"] = rng.uniform(0.85, 0.97)
        p["height"] = rng.uniform(0.3, 0.5)
        p["x0"] = rng.uniform(0.25, aspect - 0.25)
        p["drift"] = rng.uniform(0.0, 0.12)
        p["f0"] = 180.0 * pitch
        # the ball is on the floor where sin(pi (t / period + phase)) == 0
        first = (np.ceil(p["phase"]) - p["phase"]) * p["period"]
        p["onsets"] = np.arange(first, duration, p["period"])
    elif cls == 1:
        p["size"] = 0.12 * scale
        p["amp"] = rng.uniform(0.5, 1.0) * (aspect / 2 - p["size"] * 1.5)
        p["x0"] = aspect / 2
        p["y0"] = rng.uniform(0.3, 0.7)
        p["tilt"] = rng.uniform(-0.25, 0.25)
        p["period"] = rng.uniform(2.0, 4.0)
        p["f0"] = 400.0 * pitch
    elif cls == 2:
        p["size"] = 0.17 * scale
        p["width"] = rng.uniform(0.025, 0.045)
        p["x0"] = rng.uniform(0.3, aspect - 0.3)
        p["y0"] = rng.uniform(0.3, 0.7)
        p["onsets"] = _regular_onsets(rng, rng.uniform(2.0, 3.5), duration, 0.0)
        p["chirp_s"] = rng.uniform(0.1, 0.16)
        p["f0"] = 1500.0 * pitch
    elif cls == 3:
        p["size"] = 0.2 * scale
        p["x0"] = rng.uniform(0.3, aspect - 0.3)
        p["y0"] = rng.uniform(0.35, 0.65)
        p["angle0"] = rng.uniform(0, 2 * np.pi)
        p["turns"] = rng.uniform(0.3, 0.8) * rng.choice([-1.0, 1.0])
        p["f0"] = 230.0 * pitch
    elif cls == 4:
        count = int(rng.integers(25, 70))
        p["streak_x"] = rng.uniform(0, aspect, count)
        p["streak_speed"] = rng.uniform(0.8, 1.6, count)
        p["streak_offset"] = rng.uniform(0, 1.4, count)
        p["streak_len"] = rng.uniform(0.06, 0.16, count)
        p["density_gain"] = 0.5 + 0.5 * (count - 25) / 45
    elif cls == 5:
        p["size"] = 0.13 * scale
        p["x0"] = rng.uniform(0.2, aspect - 0.2)
        p["y0"] = rng.uniform(0.2, 0.8)
        p["vx"] = rng.uniform(0.05, 0.15) * rng.choice([-1.0, 1.0])
        p["vy"] = rng.uniform(0.02, 0.08) * rng.choice([-1.0, 1.0])
        p["angle0"] = rng.uniform(0, 2 * np.pi)
        gaps = np.maximum(rng.exponential(1.0 / rng.uniform(1.0, 2.0), 40), 0.25)
        onsets = rng.uniform(0, 0.5) + np.concatenate([[0.0], np.cumsum(gaps)])
        p["onsets"] = onsets[onsets < duration]
        p["f0"] = 800.0 * pitch
    elif cls == 6:
        p["size"] = 0.15 * scale
        p["x0"] = rng.uniform(0.35, aspect - 0.35)
        p["y0"] = rng.uniform(0.3, 0.7)
        p["tilt"] = rng.uniform(-0.2, 0.2)
        p["stripes"] = int(rng.integers(3, 7))
        p["onsets"] = _regular_onsets(rng, rng.uniform(3.0, 6.0), duration, 0.01)
    else:
        p["level"] = rng.uniform(0.45, 0.7)
        p["amp"] = rng.uniform(0.02, 0.07)
        p["k"] = 2 * np.pi / rng.uniform(0.5, 1.2)
        p["period"] = rng.uniform(1.5, 4.0)
        p["amp_gain"] = 0.4 + 0.6 * (p["amp"] - 0.02) / 0.05
    # numpy float64 scalars and arrays would promote the float32 frame maths to float64
    return {
        k: float(v)
        if isinstance(v, np.floating)
        else v.astype(np.float32)
        if isinstance(v, np.ndarray) and v.dtype == np.float64
        else v
        for k, v in p.items()
    }


def _clip_rng(spec: ClipSpec, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, spec.class_index, SPLITS.index(spec.split), spec.index])


def _to_uint8(rgb: np.ndarray, out: np.ndarray) -> None:
    """Write float RGB in [0, 1] into the uint8 array `out` (rounded, clipped)."""
    scaled = rgb * np.float32(255)
    np.clip(scaled + np.float32(0.5), 0, 255, out=scaled)
    np.copyto(out, scaled, casting="unsafe")


def _render_frames(cls: int, p: dict, cv: _Canvas, times: np.ndarray) -> np.ndarray:
    """All frames (T, H, W, 3) uint8: the background, with the object drawn chunk by chunk.

    Each chunk (a few frames) is drawn only inside the box that its object can touch during
    the chunk (`_extent`): the same pixels as drawing the whole frame, at a fraction of the cost.
    """
    bg = _background(cv, p)
    frames = np.empty((len(times), cv.height, cv.width, 3), np.uint8)
    _to_uint8(bg, frames[0])
    frames[1:] = frames[0]
    for start in range(0, len(times), FRAME_CHUNK):
        t = times[start : start + FRAME_CHUNK]
        top, bottom, left, right = _extent(cls, p, t, cv.aspect)
        # the box in pixels, one pixel wider on each side for the anti-aliased edge
        rows = slice(max(0, int(top * cv.height) - 1), max(0, int(np.ceil(bottom * cv.height)) + 1))
        cols = slice(max(0, int(left * cv.height) - 1), max(0, int(np.ceil(right * cv.height)) + 1))
        crop = cv.crop(rows, cols)
        if crop.y.size and crop.x.size:
            _to_uint8(
                _draw(cls, p, crop, t, bg[rows, cols]), frames[start : start + len(t), rows, cols]
            )
    return frames


def render_clip(cfg: SyntheticConfig, clip: ClipSpec | str, *, seed: int) -> ClipArrays:
    """Render one clip's frames and audio without encoding; the same seed gives the same arrays.

    `clip` is a `ClipSpec` or a synthetic clip id. Returns frames (T, H, W, 3) uint8 with
    T = round(duration_s * fps), and audio (N,) float32 at cfg.sample_rate with
    N = round(duration_s * sample_rate).
    """
    spec = parse_clip_id(clip) if isinstance(clip, str) else clip
    if not 0 <= spec.class_index < cfg.num_classes:
        raise ValueError(f"class {spec.class_index} is outside the {cfg.num_classes} classes")
    rng = _clip_rng(spec, seed)
    cls = spec.class_index
    p = _params(cls, rng, cfg)

    times = np.arange(int(round(cfg.duration_s * cfg.fps)), dtype=np.float32) / cfg.fps
    frames = _render_frames(cls, p, _Canvas(cfg.width, cfg.height), times)

    sr, n = cfg.sample_rate, int(round(cfg.duration_s * cfg.sample_rate))
    audio = _sound(cls, p, rng, n, sr) * 10 ** (p["gain_db"] / 20)
    noise = _band_noise(rng, n, sr, 30, sr / 2, tilt=p["noise_tilt"])
    audio = audio + noise * 10 ** (p["noise_db"] / 20)
    return ClipArrays(frames, np.clip(audio, -1.0, 1.0).astype(np.float32))


# --------------------------------------------------------------------------------------- encoding


def encode_clip(arrays: ClipArrays, out: Path, cfg: SyntheticConfig) -> None:
    """Encode frames + audio into an MP4 at `out` with one ffmpeg process. Raises `MediaError`.

    Frames go through stdin as raw rgb24; the audio through a temporary raw float32 file beside
    `out` (named like every temporary, so an interrupted run's leftovers are cleaned up).
    """
    raw_audio = out.with_name(out.name + ".f32")
    try:
        arrays.audio.astype("<f4").tofile(raw_audio)
        cmd = [
            ffmpeg_exe(),
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{cfg.width}x{cfg.height}",
            "-r",
            str(cfg.fps),
            "-i",
            "pipe:0",
            "-f",
            "f32le",
            "-ar",
            str(cfg.sample_rate),
            "-ac",
            "1",
            "-i",
            str(raw_audio),
            "-map",
            "0:v:0",
            "-map",
            "1:a:0",
            *VIDEO_CODEC,
            *AUDIO_CODEC,
            *BITEXACT,
            "-f",
            "mp4",
            str(out),
        ]
        proc = subprocess.run(cmd, input=arrays.frames.tobytes(), capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise MediaError(f"ffmpeg took over 600 s to encode {out.name}") from None
    finally:
        raw_audio.unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"]
        raise MediaError(f"ffmpeg failed with exit code {proc.returncode}: {lines[-1]}")


def _make_clip(
    cfg: SyntheticConfig, clips_dir: Path, spec: ClipSpec, seed: int, attempts: int
) -> ClipRecord:
    """Render, encode, verify and move one clip into place; failures become a record."""
    rel = video_path(spec.clip_id)
    record = ClipRecord(
        clip_id=spec.clip_id,
        source=SOURCE,
        label=spec.label,
        split=spec.split,
        attempts=attempts + 1,
    )
    try:
        arrays = render_clip(cfg, spec, seed=seed)
        with io.atomic_path(clips_dir / rel) as tmp:
            encode_clip(arrays, tmp, cfg)
            info = probe(tmp)
            if not (info.has_video and info.has_audio and info.duration_s):
                raise MediaError(f"{spec.clip_id}: the encoded file lacks a video or audio stream")
    except (MediaError, OSError) as err:
        record.status, record.error = "other", str(err)
        return record
    record.status, record.path = "ok", rel
    record.size_bytes = (clips_dir / rel).stat().st_size
    record.duration_s = float(info.duration_s)
    return record


def _reusable(record: ClipRecord | None, clips_dir: Path) -> bool:
    return (
        record is not None
        and record.status == "ok"
        and record.source == SOURCE
        and bool(record.path)
        and (clips_dir / record.path).is_file()
    )


def made_with(cfg: SyntheticConfig, seed: int) -> dict:
    """What decides a clip's content: the seed, the settings and this module's code."""
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return {"seed": seed, "settings": dataclasses.asdict(cfg), "code_sha256": code}


def _settings_changed(clips_dir: Path, settings: dict) -> bool:
    try:
        return io.read_json(clips_dir / SETTINGS_NAME) != settings
    except (OSError, ValueError):
        return True


def _forget(clips_dir: Path, previous: list[ClipRecord]) -> int:
    """Delete the videos of the previous synthetic records; returns how many there were."""
    count = 0
    for record in previous:
        if record.source == SOURCE and record.path:
            path = io.inside(clips_dir, record.path)
            if path.is_file():
                path.unlink()
                count += 1
    return count


def generate_dataset(
    cfg: SyntheticConfig,
    clips_dir: Path,
    *,
    seed: int,
    splits: tuple[str, ...],
    classes: tuple[str, ...],
    limit: int,
    previous: list[ClipRecord],
    workers: int = 0,
) -> list[ClipRecord]:
    """Write the selected synthetic clips as MP4s under `clips_dir` and return their records.

    `splits` and `classes` (labels; empty: all) filter the clips, then `limit` (0: all) keeps a
    class-balanced prefix (see `clip_specs`). A clip whose file exists and whose record in
    `previous` is ok is kept as it is, as long as `SETTINGS_NAME` in the folder says that the
    same seed, settings and code made it (otherwise the previous videos are deleted first);
    every other selected clip is rendered and encoded, in `workers` threads (0: one per core),
    each running one ffmpeg. Returns one record per selected clip, in selection order; a clip
    that failed has status "other" and the error.
    """
    clips_dir = Path(clips_dir)
    specs = select_clips(
        clip_specs(cfg), splits=splits, classes=classes, limit=limit, source="the synthetic set"
    )
    clips_dir.mkdir(parents=True, exist_ok=True)
    stale = io.remove_stale_temporaries(clips_dir)
    if stale:
        log.info("removed %d temporaries of an interrupted run", stale)
    settings = made_with(cfg, seed)
    if _settings_changed(clips_dir, settings):
        # before the new settings are recorded, so that no old clip can pass for a new one
        removed = _forget(clips_dir, previous)
        if removed:
            log.info("synthetic: seed, settings or code changed; deleted %d old clips", removed)
        io.write_json(clips_dir / SETTINGS_NAME, settings)
        previous = []
    before = {r.clip_id: r for r in previous}
    done: dict[str, ClipRecord] = {}
    todo = []
    for spec in specs:
        old = before.get(spec.clip_id)
        if _reusable(old, clips_dir):
            done[spec.clip_id] = old
        else:
            todo.append((spec, old.attempts if old else 0))
    if todo:
        threads = min(workers or os.cpu_count() or 1, len(todo))
        with (
            ThreadPoolExecutor(threads) as pool,
            tqdm(total=len(todo), desc="synthetic clips", unit="clip") as bar,
        ):
            futures = [
                pool.submit(_make_clip, cfg, clips_dir, spec, seed, attempts)
                for spec, attempts in todo
            ]
            for future in as_completed(futures):
                record = future.result()
                done[record.clip_id] = record
                if record.status != "ok":
                    log.warning("%s: %s", record.clip_id, record.error)
                bar.update()
    log.info(
        "synthetic: %d clips selected, %d reused, %d written, %d failed",
        len(specs),
        len(specs) - len(todo),
        sum(done[s.clip_id].status == "ok" for s, _ in todo),
        sum(done[s.clip_id].status != "ok" for s, _ in todo),
    )
    return [done[spec.clip_id] for spec in specs]
