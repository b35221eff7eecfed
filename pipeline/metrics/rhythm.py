"""Time structure of mels: a rhythm score that a steady drone in the right band cannot pass.

The class-accuracy metrics of the offline evaluator can be earned by the spectral envelope alone
(which band is loud). These features keep only time: from a [0, 1] log-mel (F, T) the per-band
time mean is removed (the spectral envelope), the rest is summed over bands into one temporal
envelope (T,), and of it are kept

  * its modulation spectrum, the share of its energy in 14 log-spaced bands of 0.25-24 Hz;
  * the same of the onset strength (positive frame-to-frame change, summed over bands);
  * the periodicity: the height of the envelope's first strong autocorrelation peak between
    0.15 s and 4.6 s, and that peak's lag (the period), both also for the onset strength;
  * how much the envelope and the onsets vary (log standard deviations, log mean onset).

A steady sound in any band has a flat envelope, so all these features look alike whatever its
band: a drone scores at chance. `RhythmScorer` learns, from real mels of the train split, a
nearest-centroid classifier over the standardised features (`acc_rhythm`) and, per label,
whether its clips are periodic (first-peak height >= `PERIODIC_PEAK`) and the range of their
periods; `period_err` of a mel against its label is 0 when the periodicity matches (none for a
steady label; a period within the label's range, 10 % either side, for a periodic one), the
relative distance to the range for a wrong period (at most 1), and 1 for a missing or spurious
periodicity. Everything is numpy; a scorer is a small JSON document.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MOD_EDGES_HZ = np.geomspace(0.25, 24.0, 15)  # 14 modulation bands
MIN_PERIOD_S, MAX_LAG_S = 0.15, 4.6
STRONG_PEAK = 0.85  # the first autocorrelation peak within 85 % of the highest is the period
PERIODIC_PEAK = 0.7  # the demo's periodic classes peak at 0.73-0.95, the others at <= 0.65
PERIOD_SLACK = 0.1  # a period 10 % outside the label's range still matches


def envelope(mel: np.ndarray) -> np.ndarray:
    """mel (F, T) -> the band-summed temporal envelope (T,) without the spectral envelope."""
    return (mel - mel.mean(axis=1, keepdims=True)).mean(axis=0)


def onsets(mel: np.ndarray) -> np.ndarray:
    """mel (F, T) -> onset strength (T - 1,): the positive change per frame, band-averaged."""
    return np.maximum(np.diff(mel, axis=1), 0.0).mean(axis=0)


def autocorrelation(x: np.ndarray, lags: int) -> np.ndarray:
    """Normalised autocorrelation of x (T,) at lags 1..lags (lags,); zeros for a constant x."""
    x = x - x.mean()
    energy = float(x @ x)
    if energy < 1e-12:
        return np.zeros(lags)
    spectrum = np.fft.rfft(x, n=2 * len(x))
    full = np.fft.irfft(spectrum * np.conj(spectrum))[: lags + 1] / energy  # (lags + 1,)
    out = np.zeros(lags)
    out[: len(full) - 1] = full[1:]
    return out


def periodicity(x: np.ndarray, frame_rate: float) -> tuple[float, float]:
    """(peak height, period in s) of x's first strong autocorrelation peak in [0.15 s, 4.6 s];
    (0, nan) when there is no peak above 0."""
    lo = int(MIN_PERIOD_S * frame_rate)
    acf = autocorrelation(x, int(MAX_LAG_S * frame_rate))[lo - 1 :]  # lag lo at index 0
    peaks = [i for i in range(1, len(acf) - 1) if acf[i - 1] <= acf[i] >= acf[i + 1]]
    if not peaks:
        return 0.0, float("nan")
    best = max(acf[i] for i in peaks)
    if best <= 0:  # only dips below the mean: nothing repeats
        return 0.0, float("nan")
    first = next(i for i in peaks if acf[i] >= STRONG_PEAK * best)
    return float(acf[first]), (first + lo) / frame_rate


def modulation_spectrum(x: np.ndarray, frame_rate: float) -> np.ndarray:
    """Share of x's (mean-removed, Hann-windowed) energy in each modulation band (14,)."""
    x = x - x.mean()
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freq = np.fft.rfftfreq(len(x), 1.0 / frame_rate)
    bands = [
        power[(freq >= a) & (freq < b)].sum()
        for a, b in zip(MOD_EDGES_HZ[:-1], MOD_EDGES_HZ[1:], strict=True)
    ]
    total = sum(bands)
    return np.asarray(bands) / total if total > 1e-12 else np.zeros(len(bands))


def features(mel: np.ndarray, frame_rate: float) -> np.ndarray:
    """The time-only features of one mel (F, T) in [0, 1] -> (35,) float64."""
    return analyse(mel, frame_rate)[0]


def analyse(mel: np.ndarray, frame_rate: float) -> tuple[np.ndarray, float, float]:
    """`features` of one mel, with its envelope's periodicity (peak height, period in s)."""
    mel = np.asarray(mel, dtype=np.float64)
    env, onset = envelope(mel), onsets(mel)
    peak_e, period_e = periodicity(env, frame_rate)
    peak_o, period_o = periodicity(onset, frame_rate)
    log_period = [np.log(p) if np.isfinite(p) else 0.0 for p in (period_e, period_o)]
    feats = np.concatenate(
        [
            modulation_spectrum(env, frame_rate),
            modulation_spectrum(onset, frame_rate),
            [peak_e, peak_o, peak_e * log_period[0], peak_o * log_period[1]],
            [np.log(env.std() + 1e-4), np.log(onset.std() + 1e-5), np.log(onset.mean() + 1e-5)],
        ]
    )
    return feats, peak_e, period_e


@dataclass(frozen=True)
class RhythmScorer:
    """A nearest-centroid classifier over `features` and each label's periodicity (see the
    module doc). centroids (C, D) and mean/scale (D,) are in standardised feature space;
    periods (C, 2) the [low, high] period range in s of a periodic label (nan otherwise)."""

    labels: tuple[str, ...]
    frame_rate: float
    mean: np.ndarray
    scale: np.ndarray
    centroids: np.ndarray
    periodic: np.ndarray
    periods: np.ndarray

    @classmethod
    def fit(
        cls, mels: Iterable[np.ndarray], labels: Sequence[str], frame_rate: float
    ) -> RhythmScorer:
        """Learn from real mels (F, T) of the train split and their labels."""
        rows = [analyse(m, frame_rate) for m in mels]
        feats = np.stack([f for f, _, _ in rows])  # (n, D)
        y = np.asarray(labels)
        names = tuple(sorted(set(labels)))
        mean, scale = feats.mean(axis=0), feats.std(axis=0) + 1e-6
        z = (feats - mean) / scale
        centroids = np.stack([z[y == name].mean(axis=0) for name in names])
        peak, period = np.array([(p, t) for _, p, t in rows]).T  # (n,)
        periodic = np.array([np.mean(peak[y == name] >= PERIODIC_PEAK) >= 0.5 for name in names])
        periods = np.full((len(names), 2), np.nan)
        for i, name in enumerate(names):
            hits = period[(y == name) & (peak >= PERIODIC_PEAK)]
            if periodic[i] and len(hits):
                periods[i] = np.quantile(hits, [0.05, 0.95])
        return cls(names, float(frame_rate), mean, scale, centroids, periodic, periods)

    def predict(self, mels: Iterable[np.ndarray]) -> list[str]:
        """The nearest label of each mel."""
        return [self.labels[i] for i in self._nearest(np.stack([features(m, self.frame_rate)
                                                                for m in mels]))]  # fmt: skip

    def _nearest(self, feats: np.ndarray) -> np.ndarray:
        """Index in `labels` of the nearest centroid of each row of feats (n, D)."""
        z = (feats - self.mean) / self.scale
        return ((z[:, None, :] - self.centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)  # (n,)

    def period_error(self, mel: np.ndarray, label: str) -> float:
        """0 when `mel`'s periodicity matches `label`'s, up to 1 (see the module doc)."""
        peak, period = periodicity(envelope(np.asarray(mel, dtype=np.float64)), self.frame_rate)
        return self._period_error(peak, period, self.labels.index(label))

    def _period_error(self, peak: float, period: float, i: int) -> float:
        if not self.periodic[i]:
            return float(peak >= PERIODIC_PEAK)
        if peak < PERIODIC_PEAK:
            return 1.0
        low, high = self.periods[i] * np.array([1 - PERIOD_SLACK, 1 + PERIOD_SLACK])
        if low <= period <= high:
            return 0.0
        return float(min(1.0, (low - period) / low if period < low else (period - high) / high))

    def describe(self, mels: Sequence[np.ndarray]) -> np.ndarray:
        """Per mel (n, 3) float64: the index of its nearest label in `labels`, and its envelope's
        periodicity (peak height, period in s; nan when none): what `score_rows` needs, small
        enough to keep for every generated clip."""
        if not len(mels):
            return np.zeros((0, 3), np.float64)
        rows = [analyse(m, self.frame_rate) for m in mels]
        nearest = self._nearest(np.stack([f for f, _, _ in rows]))
        return np.column_stack([nearest, [(p, t) for _, p, t in rows]]).astype(np.float64)

    def score_rows(self, rows: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
        """`scores` from `describe`'s rows (n, 3) and each mel's label."""
        kept = [(r, self.labels.index(y)) for r, y in zip(rows, labels, strict=True)
                if y in self.labels]  # fmt: skip
        if not kept:
            return {"acc_rhythm": float("nan"), "period_err": float("nan")}
        return {
            "acc_rhythm": float(np.mean([int(r[0]) == i for r, i in kept])),
            "period_err": float(np.mean([self._period_error(r[1], r[2], i) for r, i in kept])),
        }

    def scores(self, mels: Sequence[np.ndarray], labels: Sequence[str]) -> dict[str, float]:
        """acc_rhythm (share of mels whose nearest label is theirs) and period_err (mean), over
        mels whose label the scorer knows."""
        return self.score_rows(self.describe(mels), labels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "labels": list(self.labels),
            "frame_rate": self.frame_rate,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "centroids": self.centroids.tolist(),
            "periodic": self.periodic.tolist(),
            "periods": [[None if np.isnan(v) else v for v in row] for row in self.periods.tolist()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RhythmScorer:
        """The inverse of `to_dict`."""
        periods = np.array([[np.nan if v is None else v for v in row] for row in data["periods"]])
        return cls(
            tuple(data["labels"]),
            float(data["frame_rate"]),
            np.asarray(data["mean"]),
            np.asarray(data["scale"]),
            np.asarray(data["centroids"]),
            np.asarray(data["periodic"], dtype=bool),
            periods.reshape(len(data["labels"]), 2),
        )
