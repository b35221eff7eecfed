"""The eight classes of the procedural dataset, each one object: what it looks and sounds like.

A class is a `SynthClass`: its signature as data (label, foreground colour, scene hue, base size
and pitch, and a sentence on each of its picture and sound) and, together in one place, what turns
one clip's random parameters into its picture and its sound: `own_params` draws the class's
parameters, `pose` and `extent` say where its object is, `draw` paints it and `waveform` makes its
sound. `CLASSES` holds one instance of each, its position the class index.

A clip's content follows from the order in which its random numbers are drawn: the background and
the draws every class shares (`SynthClass.params`), then the class's own (`own_params`), then its
sound's (`waveform`, after the frames, which draw none), then the background noise
(`pipeline.data.synthetic.render_clip`). Rearranging this code must keep that order, or every
clip of a seed changes (tests/test_synthetic.py fingerprints one clip of each class).

`p`, everywhere, is one clip's parameters as `SynthClass.params` returns them: python floats and
float32 arrays, so that the frame maths stays float32. Coordinates are in height units on a
`Canvas`; times `t` in seconds, one per frame (float32) or per audio sample (float64).
"""

from __future__ import annotations

import colorsys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pipeline.config import SyntheticConfig

# ------------------------------------------------------------------------------------- the canvas


class Canvas:
    """Pixel-centre coordinates in height units: y in [0, 1] downwards, x in [0, W/H].

    A crop keeps the frame's units, so that drawing into it gives the same pixels as drawing
    the whole frame and cutting them out.
    """

    def __init__(self, width: int, height: int) -> None:
        self.height, self.width = height, width
        self.aspect = width / height
        self.y = ((np.arange(height, dtype=np.float32) + 0.5) / height)[None, :, None]  # (1,H,1)
        self.x = ((np.arange(width, dtype=np.float32) + 0.5) / height)[None, None, :]  # (1,1,W)

    def crop(self, rows: slice, cols: slice) -> Canvas:
        sub = object.__new__(Canvas)
        sub.height, sub.width, sub.aspect = self.height, self.width, self.aspect
        sub.y, sub.x = self.y[:, rows], self.x[:, :, cols]
        return sub

    def cover(self, distance: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage of a signed distance (positive inside, height units)."""
        return np.clip(distance * self.height + 0.5, 0.0, 1.0)


def background(cv: Canvas, p: dict) -> np.ndarray:
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


def _rotated(cv: Canvas, cx: np.ndarray, cy: np.ndarray, angle: np.ndarray | float):
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


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Blend `colour` over `img` with coverage `alpha` (n,H,W); all broadcast to (n,H,W,3)."""
    return img + alpha[..., None] * (colour - img)


# -------------------------------------------------------------------------------------- the sound


def band_noise(
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


# ------------------------------------------------------------------------------- the class object

Pose = tuple[np.ndarray, np.ndarray, float]  # centre x (n,), centre y (n,), reach


@dataclass(frozen=True)
class SynthClass(ABC):
    """One audio-visual class: its signature as data, its picture and its sound as methods.

    A subclass sets the class attributes and implements `own_params`, `draw` and `waveform`; a
    compact object also `pose`, and an object that fills part of the frame its own `extent`.
    """

    index: int  # its position in CLASSES: the class index of a clip id

    label: ClassVar[str]
    colour: ClassVar[tuple[float, float, float]]  # RGB in [0, 1] of the foreground object
    scene_hue: ClassVar[float]  # HSV hue of the background (the scene), jittered per clip
    visual: ClassVar[str]  # what it looks like, in words
    sound: ClassVar[str]  # what it sounds like, in words
    size: ClassVar[float | None] = None  # the object's size in height units, before jitter
    f0: ClassVar[float | None] = None  # its pitch in Hz before jitter; a bigger object is lower
    dark_scene: ClassVar[bool] = False  # a background from the darker range
    phase_span: ClassVar[float] = 2 * np.pi  # p["phase"] is drawn from [0, phase_span)

    def params(self, rng: np.random.Generator, cfg: SyntheticConfig) -> dict:
        """The random parameters of one clip: the background, the shared draws, the class's own."""
        p: dict = {
            "bg_hue": (self.scene_hue + rng.uniform(-0.04, 0.04)) % 1.0,
            "bg_sat": rng.uniform(0.25, 0.55),
            "bg_val": rng.uniform(0.08, 0.22) if self.dark_scene else rng.uniform(0.15, 0.55),
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
        p["colour"] = np.clip(np.asarray(self.colour) * jitter, 0, 1).astype(np.float32)
        # drawn for every class, used or not: skipping them would shift every later draw
        scale = rng.uniform(0.7, 1.3)  # object size
        pitch = scale**-0.5 * rng.uniform(0.97, 1.03)  # bigger sounds lower, within the band
        p["phase"] = rng.uniform(0, self.phase_span)
        if self.size is not None:
            p["size"] = self.size * scale
        if self.f0 is not None:
            p["f0"] = self.f0 * pitch
        p |= self.own_params(rng, p, cfg.width / cfg.height, cfg.duration_s)
        # numpy float64 scalars and arrays would promote the float32 frame maths to float64
        return {
            k: float(v)
            if isinstance(v, np.floating)
            else v.astype(np.float32)
            if isinstance(v, np.ndarray) and v.dtype == np.float64
            else v
            for k, v in p.items()
        }

    @abstractmethod
    def own_params(self, rng: np.random.Generator, p: dict, aspect: float, duration: float) -> dict:
        """The class's own parameters of a clip, drawn after the shared ones in `p`."""

    def pose(self, p: dict, t: np.ndarray, aspect: float) -> Pose | None:
        """Centre (cx, cy), each (n,), and reach (the farthest painted distance from the centre)
        of a compact object at times `t` (n,); None for the classes that fill the frame."""
        return None

    def extent(self, p: dict, t: np.ndarray, aspect: float) -> tuple[float, ...]:
        """(top, bottom, left, right) in height units of all that is drawn over the background
        at times `t`: the box its pose reaches, or the whole frame."""
        pose = self.pose(p, t, aspect)
        if pose is None:
            return 0.0, 1.0, 0.0, aspect
        cx, cy, reach = pose
        return cy.min() - reach, cy.max() + reach, cx.min() - reach, cx.max() + reach

    def _centre(self, p: dict, cv: Canvas, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pose's centre, each (n, 1, 1) for broadcasting over the pixels of `cv`."""
        cx, cy, _ = self.pose(p, t, cv.aspect)
        return _col(cx), _col(cy)

    @abstractmethod
    def draw(self, p: dict, cv: Canvas, t: np.ndarray, bg: np.ndarray) -> np.ndarray:
        """Frames at times `t` (n,) as float RGB in [0, 1], shape (n, h, w, 3) of canvas `cv`,
        drawn over `bg` (h, w, 3)."""

    def audio(self, p: dict, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
        """The class's sound, float64 (n,) with unit peak."""
        out = self.waveform(p, rng, np.arange(n) / sr, sr)
        return out / (np.abs(out).max() + 1e-9)

    @abstractmethod
    def waveform(self, p: dict, rng: np.random.Generator, t: np.ndarray, sr: int) -> np.ndarray:
        """The class's sound at the sample times `t` (n,), float64 (n,) at any level."""


# ------------------------------------------------------------------------------------ the classes


class BouncingBall(SynthClass):
    label = "red bouncing ball / low thumps"
    colour = (0.88, 0.12, 0.10)
    scene_hue = 0.375
    visual = "red shaded disc bouncing on an invisible floor"
    sound = "150-220 Hz soft square-wave thump with a pitch drop at each floor contact"
    size = 0.11
    f0 = 180.0
    phase_span = 1.0  # in bounce periods

    def own_params(self, rng, p, aspect, duration):
        own = {
            "period": rng.uniform(0.45, 0.8),
            "floor": rng.uniform(0.85, 0.97),
            "height": rng.uniform(0.3, 0.5),
            "x0": rng.uniform(0.25, aspect - 0.25),
            "drift": rng.uniform(0.0, 0.12),
        }
        # the ball is on the floor where sin(pi (t / period + phase)) == 0
        first = (np.ceil(p["phase"]) - p["phase"]) * own["period"]
        own["onsets"] = np.arange(first, duration, own["period"])
        return own

    def pose(self, p, t, aspect):
        # the ball is on the floor where |sin| is 0: at each thump onset
        lift = np.abs(np.sin(np.pi * (t / p["period"] + p["phase"])))
        cx = p["x0"] + p["drift"] * np.sin(2 * np.pi * t / 7.0 + p["phase"])
        return cx, p["floor"] - p["size"] - p["height"] * lift, p["size"]

    def draw(self, p, cv, t, bg):
        cx, cy = self._centre(p, cv, t)
        r = p["size"]
        u, v = _rotated(cv, cx, cy, 0.0)
        dist = np.sqrt(u * u + v * v)
        alpha = cv.cover(r - dist)
        highlight = np.sqrt((u + 0.35 * r) ** 2 + (v + 0.35 * r) ** 2) / (1.6 * r)
        shade = np.clip(1.15 - 0.7 * highlight, 0.25, 1.2)[..., None]
        return _paint(bg, alpha, shade * p["colour"])

    def waveform(self, p, rng, t, sr):
        out = np.zeros(len(t))
        kt = np.arange(int(0.3 * sr)) / sr
        freq = p["f0"] * (1.0 + 0.6 * np.exp(-kt / 0.03))  # a fast pitch drop
        # a soft square (tanh) keeps the harmonics low: a thump, not a broadband click
        wave = np.tanh(2.5 * np.sin(2 * np.pi * np.cumsum(freq) / sr)) * np.exp(-kt / 0.12)
        wave *= np.minimum(1.0, kt / 0.003)
        gains = rng.uniform(0.7, 1.0, len(p["onsets"]))
        _add_events(out, p["onsets"], sr, lambda k: gains[k] * wave)
        return out


class SlidingBox(SynthClass):
    label = "green sliding box / steady hum"
    colour = (0.15, 0.75, 0.20)
    scene_hue = 0.875
    visual = "green checkered square sliding left and right"
    sound = "steady 340-490 Hz tone with two harmonics, Doppler wobble with the speed"
    size = 0.12
    f0 = 400.0

    def own_params(self, rng, p, aspect, duration):
        return {
            "amp": rng.uniform(0.5, 1.0) * (aspect / 2 - p["size"] * 1.5),
            "x0": aspect / 2,
            "y0": rng.uniform(0.3, 0.7),
            "tilt": rng.uniform(-0.25, 0.25),
            "period": rng.uniform(2.0, 4.0),
        }

    def pose(self, p, t, aspect):
        cx = p["x0"] + p["amp"] * np.sin(2 * np.pi * t / p["period"] + p["phase"])
        return cx, p["y0"] * np.ones_like(t), p["size"] * np.sqrt(2)

    def draw(self, p, cv, t, bg):
        cx, cy = self._centre(p, cv, t)
        s = p["size"]
        u, v = _rotated(cv, cx, cy, p["tilt"])
        alpha = cv.cover(s - np.maximum(np.abs(u), np.abs(v)))
        cells = (np.floor((u + s) / (2 * s) * 3) + np.floor((v + s) / (2 * s) * 3)) % 2
        return _paint(bg, alpha, (1.0 - 0.4 * cells)[..., None] * p["colour"])

    def waveform(self, p, rng, t, sr):
        # Doppler wobble: the box's horizontal speed, the derivative of its pose's sine
        speed = np.cos(2 * np.pi * t / p["period"] + p["phase"])
        freq = p["f0"] * (1.0 + 0.03 * speed)
        phase = 2 * np.pi * np.cumsum(freq) / sr
        out = np.sin(phase) + 0.35 * np.sin(2 * phase) + 0.15 * np.sin(3 * phase)
        out *= 1.0 + 0.1 * np.sin(2 * np.pi * 0.7 * t)
        return out


class PulsingRing(SynthClass):
    label = "blue pulsing ring / high chirps"
    colour = (0.15, 0.30, 0.95)
    scene_hue = 0.125
    visual = "blue ring that swells at a steady 2-3.5 Hz pulse"
    sound = "1.3-1.8 kHz chirp rising by 30% at each pulse"
    size = 0.17
    f0 = 1500.0

    def own_params(self, rng, p, aspect, duration):
        return {
            "width": rng.uniform(0.025, 0.045),
            "x0": rng.uniform(0.3, aspect - 0.3),
            "y0": rng.uniform(0.3, 0.7),
            "onsets": _regular_onsets(rng, rng.uniform(2.0, 3.5), duration, 0.0),
            "chirp_s": rng.uniform(0.1, 0.16),
        }

    def pose(self, p, t, aspect):
        ones = np.ones_like(t)
        return p["x0"] * ones, p["y0"] * ones, p["size"] * 1.3 + p["width"]

    def draw(self, p, cv, t, bg):
        cx, cy = self._centre(p, cv, t)
        swell = np.exp(-_since_last(t, p["onsets"]) / 0.12)
        r = _col(p["size"] * (1.0 + 0.3 * swell))
        u, v = _rotated(cv, cx, cy, 0.0)
        dist = np.sqrt(u * u + v * v)
        alpha = cv.cover(p["width"] - np.abs(dist - r))
        glow = _col(0.8 + 0.3 * swell)[..., None]
        return _paint(bg, alpha, np.clip(glow * p["colour"], 0, 1))

    def waveform(self, p, rng, t, sr):
        out = np.zeros(len(t))
        kt = np.arange(int(p["chirp_s"] * sr)) / sr
        freq = p["f0"] * (1.0 + 0.3 * kt / p["chirp_s"])
        wave = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.sin(np.pi * kt / p["chirp_s"]) ** 2
        _add_events(out, p["onsets"], sr, lambda k: wave)
        return out


class SpinningTriangle(SynthClass):
    label = "yellow spinning triangle / buzzy drone"
    colour = (0.95, 0.85, 0.10)
    scene_hue = 0.625
    visual = "yellow shaded triangle rotating about its centre"
    sound = "195-285 Hz band-limited sawtooth, amplitude beating three times per turn"
    size = 0.2
    f0 = 230.0

    def own_params(self, rng, p, aspect, duration):
        return {
            "x0": rng.uniform(0.3, aspect - 0.3),
            "y0": rng.uniform(0.35, 0.65),
            "angle0": rng.uniform(0, 2 * np.pi),
            "turns": rng.uniform(0.3, 0.8) * rng.choice([-1.0, 1.0]),
        }

    def pose(self, p, t, aspect):
        return p["x0"] + 0.03 * np.sin(2 * np.pi * t / 3.0), p["y0"] * np.ones_like(t), p["size"]

    def draw(self, p, cv, t, bg):
        cx, cy = self._centre(p, cv, t)
        radius = p["size"]
        angle = _col(p["angle0"] + 2 * np.pi * p["turns"] * t)
        u, v = _rotated(cv, cx, cy, angle)
        # three half-planes around the centre: the triangle is where all three hold
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
        return _paint(bg, alpha, np.clip(shade * p["colour"], 0, 1))

    def waveform(self, p, rng, t, sr):
        out = np.zeros(len(t))
        phase = 2 * np.pi * p["f0"] * t + p["phase"]
        for h in range(1, int(5000 / p["f0"]) + 1):  # harmonics up to 5 kHz: band-limited
            out += np.sin(h * phase) / h
        out *= 0.6 + 0.4 * np.cos(2 * np.pi * 3 * p["turns"] * t)  # three beats per turn
        return out


class FallingRain(SynthClass):
    label = "white falling rain / hiss"
    colour = (0.95, 0.95, 0.95)
    scene_hue = 0.75
    visual = "white streaks falling over a dark background"
    sound = "5-7.6 kHz noise hiss with scattered drip ticks, louder when denser"
    dark_scene = True  # rain falls at night: the white streaks need a dark sky

    def own_params(self, rng, p, aspect, duration):
        count = int(rng.integers(25, 70))
        return {
            "streak_x": rng.uniform(0, aspect, count),
            "streak_speed": rng.uniform(0.8, 1.6, count),
            "streak_offset": rng.uniform(0, 1.4, count),
            "streak_len": rng.uniform(0.06, 0.16, count),
            "density_gain": 0.5 + 0.5 * (count - 25) / 45,
        }

    def draw(self, p, cv, t, bg):
        # streaks in fixed columns, each falling with its own speed and offset
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
        return _paint(bg, alpha, p["colour"])

    def waveform(self, p, rng, t, sr):
        n = len(t)
        # hiss, fluttering slowly, with drips
        flutter = 0.8 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6.3))
        out = p["density_gain"] * flutter * band_noise(rng, n, sr, 5000, 7600)
        drips = np.sort(rng.uniform(0, n / sr, rng.poisson(5 * n / sr)))
        kt = np.arange(int(0.03 * sr)) / sr
        tick = (
            np.sin(2 * np.pi * rng.uniform(5000, 6500) * kt)
            * np.exp(-kt / 0.006)
            * np.minimum(1.0, kt / 0.001)
        )  # a 1-ms attack: no broadband splatter
        _add_events(out, drips, sr, lambda k: 0.5 * tick)
        return out


class DriftingStar(SynthClass):
    label = "magenta drifting star / bell strikes"
    colour = (0.85, 0.15, 0.80)
    scene_hue = 0.25
    visual = "magenta five-pointed star drifting, popping at each strike"
    sound = "680-990 Hz bell (partials x1.2, x1.5, x2: minor third, fifth, octave) struck at irregular times"
    size = 0.13
    f0 = 800.0

    def own_params(self, rng, p, aspect, duration):
        own = {
            "x0": rng.uniform(0.2, aspect - 0.2),
            "y0": rng.uniform(0.2, 0.8),
            "vx": rng.uniform(0.05, 0.15) * rng.choice([-1.0, 1.0]),
            "vy": rng.uniform(0.02, 0.08) * rng.choice([-1.0, 1.0]),
            "angle0": rng.uniform(0, 2 * np.pi),
        }
        gaps = np.maximum(rng.exponential(1.0 / rng.uniform(1.0, 2.0), 40), 0.25)
        onsets = rng.uniform(0, 0.5) + np.concatenate([[0.0], np.cumsum(gaps)])
        own["onsets"] = onsets[onsets < duration]
        return own

    def pose(self, p, t, aspect):
        half = p["size"] * 1.1
        return (
            _bounce(p["x0"] + p["vx"] * t, half, aspect - half),
            _bounce(p["y0"] + p["vy"] * t, half, 1.0 - half),
            p["size"] * 1.3,
        )

    def draw(self, p, cv, t, bg):
        cx, cy = self._centre(p, cv, t)
        pop = np.exp(-_since_last(t, p["onsets"]) / 0.2)
        angle = _col(p["angle0"] + 0.2 * t)
        u, v = _rotated(cv, cx, cy, angle)
        dist = np.sqrt(u * u + v * v)
        # radius (0.45 .. 1) x size: a triangle wave over the angle puts five sharp points
        spoke = np.mod(np.arctan2(v, u) * (5 / (2 * np.pi)), 1.0)
        star = p["size"] * _col(1.0 + 0.3 * pop) * (1.0 - 1.1 * np.abs(spoke - 0.5))
        alpha = cv.cover(star - dist)
        glow = _col(0.85 + 0.35 * pop)[..., None]
        return _paint(bg, alpha, np.clip(glow * p["colour"], 0, 1))

    def waveform(self, p, rng, t, sr):
        out = np.zeros(len(t))
        # a church bell's prime, tierce, quint and nominal
        kt = np.arange(int(1.5 * sr)) / sr
        wave = sum(
            a * np.sin(2 * np.pi * p["f0"] * r * kt) * np.exp(-kt / d)
            for r, a, d in ((1.0, 1.0, 1.2), (1.2, 0.6, 0.9), (1.5, 0.5, 0.7), (2.0, 0.4, 0.6))
        )
        wave = wave * np.minimum(1.0, kt / 0.002)
        gains = rng.uniform(0.6, 1.0, len(p["onsets"]))
        _add_events(out, p["onsets"], sr, lambda k: gains[k] * wave)
        return out


class FlashingStripes(SynthClass):
    label = "orange flashing stripes / rapid clicks"
    colour = (1.00, 0.50, 0.05)
    scene_hue = 0.5
    visual = "orange horizontally striped panel flashing at 3-6 Hz"
    sound = "2.5-4 kHz noise burst at each flash"
    size = 0.15

    def own_params(self, rng, p, aspect, duration):
        return {
            "x0": rng.uniform(0.35, aspect - 0.35),
            "y0": rng.uniform(0.3, 0.7),
            "tilt": rng.uniform(-0.2, 0.2),
            "stripes": int(rng.integers(3, 7)),
            "onsets": _regular_onsets(rng, rng.uniform(3.0, 6.0), duration, 0.01),
        }

    def pose(self, p, t, aspect):
        ones = np.ones_like(t)
        return p["x0"] * ones, p["y0"] * ones, p["size"] * np.hypot(1.3, 0.9)

    def draw(self, p, cv, t, bg):
        cx, cy = self._centre(p, cv, t)
        flash = np.exp(-_since_last(t, p["onsets"]) / 0.08)
        u, v = _rotated(cv, cx, cy, p["tilt"])
        a, b = p["size"] * 1.3, p["size"] * 0.9  # the panel's half width and half height
        alpha = cv.cover(np.minimum(a - np.abs(u), b - np.abs(v)))
        stripes = np.floor((v + b) / (2 * b) * p["stripes"] * 2) % 2
        level = (0.6 + 0.4 * stripes) * _col(0.6 + 0.4 * flash)
        return _paint(bg, alpha, np.clip(level[..., None] * p["colour"], 0, 1))

    def waveform(self, p, rng, t, sr):
        out = np.zeros(len(t))
        # a short noise burst at each flash, each cut from one long band-limited noise
        m = int(0.12 * sr)
        clicks = band_noise(rng, m * len(p["onsets"]) + 1, sr, 2500, 4000).reshape(-1)
        env = np.exp(-np.arange(m) / sr / 0.04) * np.minimum(1.0, np.arange(m) / sr / 0.002)
        _add_events(out, p["onsets"], sr, lambda k: clicks[k * m : (k + 1) * m] * env)
        return out


class Waves(SynthClass):
    label = "cyan waves / low rumble"
    colour = (0.10, 0.80, 0.85)
    scene_hue = 0.0
    visual = "cyan water with a rolling wave surface and a foam line"
    sound = "100-450 Hz rumbling noise that swells with the waves"

    def own_params(self, rng, p, aspect, duration):
        own = {
            "level": rng.uniform(0.45, 0.7),
            "amp": rng.uniform(0.02, 0.07),
            "k": 2 * np.pi / rng.uniform(0.5, 1.2),
            "period": rng.uniform(1.5, 4.0),
        }
        own["amp_gain"] = 0.4 + 0.6 * (own["amp"] - 0.02) / 0.05  # higher waves rumble louder
        return own

    def extent(self, p, t, aspect):
        # the water and its foam line lie below the highest crest
        return p["level"] - 1.3 * p["amp"] - 0.02, 1.0, 0.0, aspect

    def draw(self, p, cv, t, bg):
        # cyan water under a rolling wave surface with a foam line
        x, tt = cv.x, _col(t)
        surface = (
            p["level"]
            + p["amp"] * np.sin(p["k"] * x - 2 * np.pi * tt / p["period"] + p["phase"])
            + 0.3 * p["amp"] * np.sin(2.3 * p["k"] * x + 1.7 * 2 * np.pi * tt / p["period"])
        )  # (n, 1, w)
        depth = cv.y - surface  # (n, h, w)
        alpha = cv.cover(depth)
        ripple = 0.8 + 0.2 * np.sin(40 * depth + 3 * x)
        img = _paint(bg, alpha, np.clip(ripple[..., None] * p["colour"], 0, 1))
        foam = cv.cover(0.012 - np.abs(depth))
        return _paint(img, foam, np.float32(0.95))

    def waveform(self, p, rng, t, sr):
        # rumble swelling with the waves
        swell = 0.6 + 0.4 * np.sin(2 * np.pi * t / p["period"] - p["phase"])
        return p["amp_gain"] * swell * band_noise(rng, len(t), sr, 100, 450, tilt=-1.0)


CLASSES: tuple[SynthClass, ...] = tuple(
    kind(index)
    for index, kind in enumerate(
        (
            BouncingBall,
            SlidingBox,
            PulsingRing,
            SpinningTriangle,
            FallingRain,
            DriftingStar,
            FlashingStripes,
            Waves,
        )
    )
)
