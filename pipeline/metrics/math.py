"""Metric arithmetic of the evaluation: feature statistics, FD/FAD, IS, KL, CS, accuracy.

No feature extractors and no media I/O live here; inputs are embeddings, logits or labels.
FD, FAD, IS and KL reproduce haoheliu/audioldm_eval as of mid-2023 to mid-2024 ("main-2024",
the code behind the paper's FD/FAD/IS); CS is the Im2Wav-style image-audio cosine. The rules
they reproduce are in docs/references.md, "Paper-protocol metrics".

Deliberate differences from audioldm_eval, all far below the 2 decimals the paper reports:
- means and sums run in float64 (audioldm_eval takes `np.mean` of float32 features, so its μ and
  ‖Δμ‖² are float32; relative difference about 1e-7; its KL runs in float32 as well);
- a failure it would let through as NaN (sqrtm still not finite after the ε retry, an IS split
  with no rows) raises a ValueError here.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.special
from numpy.typing import ArrayLike

from pipeline.errors import PipelineError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

# audioldm_eval metrics/fid.py: ε·I added to both covariances when sqrtm is not finite, and
# the largest |Im| tolerated on the diagonal of sqrtm(Σ1·Σ2) before the real part is kept.
FRECHET_EPS = 1e-6
FRECHET_IMAG_ATOL = 1e-3

# audioldm_eval metrics/isc.py = torch-fidelity isc_features_to_metric.
IS_SPLITS = 10
IS_SEED = 2020

# audioldm_eval calculate_kl: added to the generated probabilities before the log.
KL_EPS = 1e-6

# How far a row of `from_logits=False` input may sum away from 1.
PROB_SUM_ATOL = 1e-6


class StatsFileError(PipelineError, ValueError):
    """A stats file is missing, malformed, or was computed under another key."""


@dataclass(frozen=True, eq=False)
class GaussianStats:
    """Mean and covariance of n feature rows, the inputs of a Fréchet distance.

    mu: (d,) float64; sigma: (d, d) float64, unbiased (divided by n − 1, as `np.cov` with
    rowvar=False in audioldm_eval and pytorch-fid); n: rows behind them (≥ 2). The arrays are
    stored as read-only float64 copies.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def __post_init__(self) -> None:
        mu = np.array(self.mu, dtype=np.float64)
        sigma = np.array(self.sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise ValueError(f"mu (d,) and sigma (d, d) expected, got {mu.shape} and {sigma.shape}")
        if int(self.n) < 2:
            raise ValueError(f"a covariance needs at least 2 rows, got n={self.n}")
        mu.flags.writeable = False
        sigma.flags.writeable = False
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "n", int(self.n))

    @property
    def dim(self) -> int:
        return self.mu.size

    @classmethod
    def from_features(cls, features: ArrayLike) -> GaussianStats:
        """Stats of features (n, d): float64 mean and `np.cov(features, rowvar=False)`."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"features (n ≥ 2, d) expected, got shape {f.shape}")
        return cls(f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False)), f.shape[0])

    def save(self, path: str | Path, key: str) -> None:
        """Write mu, sigma, n and `key` to a .npz at `path`, atomically.

        `key` names what the stats depend on (extractor, checkpoint sha256, protocol version,
        file list), so that stats made under another protocol are refused on load.
        """
        if not key:
            raise ValueError("stats need a non-empty key")
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), key=np.str_(key))

    @classmethod
    def load(cls, path: str | Path, key: str) -> GaussianStats:
        """Read stats written by `save`; a file made under another key raises StatsFileError."""
        try:
            with np.load(path, allow_pickle=False) as data:
                stored, mu, sigma, n = str(data["key"]), data["mu"], data["sigma"], int(data["n"])
        except FileNotFoundError as err:
            raise StatsFileError(f"stats file {path} does not exist") from err
        except (KeyError, OSError, ValueError) as err:
            raise StatsFileError(f"{path} is not a stats file written by save(): {err}") from err
        if stored != key:
            raise StatsFileError(
                f"stats {path} were computed for {stored!r}, not {key!r}; recompute them"
            )
        return cls(mu, sigma, n)


class StatsAccumulator:
    """GaussianStats of many batches without holding them: float64 Σx, Σxxᵀ and n.

    The sums are taken of x − shift, shift being the first batch's mean, so that the
    Σxxᵀ − n·μμᵀ step does not cancel away the variance of features with a large mean.
    `stats()` equals `GaussianStats.from_features` of the concatenated batches to rounding.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"feature dim must be ≥ 1, got {dim}")
        self.dim = dim
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(dim, dtype=np.float64)
        self._outer = np.zeros((dim, dim), dtype=np.float64)

    def add(self, batch: ArrayLike) -> None:
        """Fold in a batch (b, dim) of feature rows (any float dtype; summed in float64)."""
        x = np.asarray(batch, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"batch (b, {self.dim}) expected, got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
        x = x - self._shift
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x
        self.n += x.shape[0]

    def stats(self) -> GaussianStats:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 rows, got {self.n}")
        mean = self._sum / self.n
        sigma = (self._outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return GaussianStats(self._shift + mean, sigma, self.n)


def _check_pair(a: GaussianStats, b: GaussianStats) -> None:
    if a.dim != b.dim:
        raise ValueError(f"stats of different feature dims: {a.dim} and {b.dim}")


def _sqrtm(m: np.ndarray) -> np.ndarray:
    # audioldm_eval's first call passes disp=False, which silences the singular-matrix message;
    # disp is deprecated in SciPy 1.17 (gone in 1.18), so silence its warning instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return scipy.linalg.sqrtm(m)


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2(ΣaΣb)^½), by audioldm_eval's metrics/fid.py rule.

    That is the pytorch-fid / torch-fidelity ≤ 0.3 recipe: C = scipy.linalg.sqrtm(Σa·Σb); if C
    is not all finite, retry once with Σa + εI and Σb + εI (ε = 1e-6); if C is complex, raise
    unless every diagonal imaginary part is within 1e-3 (`np.allclose(..., atol=1e-3)`), then
    keep the real part. A retry that is still not finite raises (audioldm_eval returns NaN).
    Used for both FD (PANNs, one row per clip) and FAD (VGGish, one row per 0.96 s frame).
    """
    _check_pair(a, b)
    diff = a.mu - b.mu
    covmean = _sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        log.warning("Fréchet distance: singular product; adding %g to the covariances", FRECHET_EPS)
        offset = np.eye(a.dim) * FRECHET_EPS
        covmean = _sqrtm((a.sigma + offset) @ (b.sigma + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("Fréchet distance: sqrtm is not finite even with the ε offset")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=FRECHET_IMAG_ATOL):
            worst = np.max(np.abs(covmean.imag))
            raise ValueError(f"Fréchet distance: sqrtm has an imaginary component {worst:g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def frechet_distance_eig(a: GaussianStats, b: GaussianStats) -> float:
    """The same distance with tr(ΣaΣb)^½ = Σ Re √λ over the eigenvalues λ of Σa·Σb.

    The torchmetrics FID / torchaudio.functional.frechet_distance / torch-fidelity 0.4 formula
    (§4): no ε, eigenvalues in complex128 so that tiny negative ones give √ = 0 in the real
    part. Agrees with `frechet_distance` to ≤ 3e-15 relative for full-rank covariances and
    about 2e-10 relative for rank-deficient ones (n < d) (docs/references.md); 4-10× faster at d = 2048.
    """
    _check_pair(a, b)
    diff = a.mu - b.mu
    eigenvalues = np.linalg.eigvals(a.sigma @ b.sigma).astype(np.complex128)
    tr_covmean = np.sqrt(eigenvalues).real.sum()
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def _probabilities(x: np.ndarray, from_logits: bool) -> tuple[np.ndarray, np.ndarray]:
    """(p, log p) per row of x (n, C); log p is −inf where p = 0."""
    if from_logits:
        return scipy.special.softmax(x, axis=1), scipy.special.log_softmax(x, axis=1)
    if (x < 0).any() or not np.allclose(x.sum(axis=1), 1.0, rtol=0, atol=PROB_SUM_ATOL):
        raise ValueError("probabilities must be non-negative and sum to 1 in every row")
    with np.errstate(divide="ignore"):
        return x, np.log(x)


def inception_split_scores(
    logits_or_probs: ArrayLike,
    splits: int = IS_SPLITS,
    shuffle: bool = True,
    seed: int = IS_SEED,
    from_logits: bool = True,
) -> np.ndarray:
    """Per-split Inception Scores (splits,) float64 of predictions (n, C), audioldm_eval's rule.

    The rule of audioldm_eval metrics/isc.py, a copy of torch-fidelity `isc_features_to_metric`:
    rows permuted by `np.random.RandomState(seed).permutation(n)` when `shuffle`; float64
    softmax and log-softmax over the C classes (or the given probabilities); split i holds rows
    i·n//splits to (i+1)·n//splits (sizes differ by at most one; not torch.chunk's ceil-size
    chunks); its score is exp(mean over rows of Σ_c p·(log p − log p̄)), p̄ the split's mean row.
    Terms with p = 0 count as 0 (torch-fidelity gives NaN when a whole split underflows one
    class to 0, which needs logit gaps above ~745). n < splits (an empty split) raises.
    """
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"predictions (n, C) expected, got shape {x.shape}")
    n = x.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"{n} rows cannot fill {splits} splits")
    if shuffle:
        x = x[np.random.RandomState(seed).permutation(n)]
    p, log_p = _probabilities(x, from_logits)
    scores = np.empty(splits, dtype=np.float64)
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_split, log_p_split = p[lo:hi], log_p[lo:hi]
        with np.errstate(divide="ignore", invalid="ignore"):
            log_mean = np.log(p_split.mean(axis=0, keepdims=True))
            kl = np.where(p_split > 0, p_split * (log_p_split - log_mean), 0.0)
        scores[i] = np.exp(kl.sum(axis=1).mean())
    return scores


def inception_score(
    logits_or_probs: ArrayLike,
    splits: int = IS_SPLITS,
    shuffle: bool = True,
    seed: int = IS_SEED,
    from_logits: bool = True,
) -> tuple[float, float]:
    """(mean, std) of `inception_split_scores`; std is np.std, population (ddof = 0), as audioldm_eval does.

    With PANNs logits (n, 527) of the generated set only, this is audioldm_eval's
    `inception_score_mean` / `inception_score_std`.
    """
    scores = inception_split_scores(logits_or_probs, splits, shuffle, seed, from_logits)
    return float(np.mean(scores)), float(np.std(scores))


def kl_divergence(
    generated_logits: ArrayLike, target_logits: ArrayLike, activation: str = "softmax"
) -> float:
    """Paired KL(target ‖ generated), summed over classes and averaged over rows.

    audioldm_eval's `kl_div(log(act(gen) + 1e-6), act(target), reduction="sum") / n`, i.e.
    Σ_n Σ_c q·(log q − log(p + 1e-6)) / n with p = act(generated), q = act(target), and q·log q
    = 0 where q = 0. activation "softmax" over classes (the "AudioGen" form) or "sigmoid" per
    class (not a Bernoulli KL: the 1 − p terms are ignored). Rows i of both inputs (n, C) must
    be the same clip; pairing them (by file name in audioldm_eval) is the caller's job.
    """
    g = np.asarray(generated_logits, dtype=np.float64)
    t = np.asarray(target_logits, dtype=np.float64)
    if g.ndim != 2 or g.shape != t.shape or g.shape[0] == 0:
        raise ValueError(f"paired logits (n, C) expected, got {g.shape} and {t.shape}")
    if activation == "softmax":
        p, q = scipy.special.softmax(g, axis=1), scipy.special.softmax(t, axis=1)
    elif activation == "sigmoid":
        p, q = scipy.special.expit(g), scipy.special.expit(t)
    else:
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    terms = scipy.special.xlogy(q, q) - q * np.log(p + KL_EPS)
    return float(terms.sum() / g.shape[0])


def clip_score(image_emb: ArrayLike, audio_emb: ArrayLike) -> float:
    """100 × mean over rows of cos(image_i, audio_i), both L2-normalised; no clamp at 0.

    image_emb, audio_emb: (n, d), row i of both from the same clip (CLIP ViT-B/32 image and
    Wav2CLIP audio embeddings for the paper's CS). Result in [−100, 100].
    """
    a = np.asarray(image_emb, dtype=np.float64)
    b = np.asarray(audio_emb, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"paired embeddings (n, d) expected, got {a.shape} and {b.shape}")
    norm_a = np.linalg.norm(a, axis=1, keepdims=True)
    norm_b = np.linalg.norm(b, axis=1, keepdims=True)
    if (norm_a == 0).any() or (norm_b == 0).any():
        raise ValueError("an embedding of norm 0 has no direction")
    cosine = np.sum((a / norm_a) * (b / norm_b), axis=1)
    return float(100.0 * cosine.mean())


def accuracy(pred_labels: ArrayLike, true_labels: ArrayLike) -> float:
    """Fraction of rows whose predicted label equals the true one; labels (n,)."""
    pred = np.asarray(pred_labels)
    true = np.asarray(true_labels)
    if pred.ndim != 1 or pred.shape != true.shape or pred.size == 0:
        raise ValueError(f"labels (n,) expected, got {pred.shape} and {true.shape}")
    return float(np.mean(pred == true))


def confusion_matrix(pred_labels: ArrayLike, true_labels: ArrayLike, classes: int) -> np.ndarray:
    """(classes, classes) int64 counts: row = true label, column = predicted; labels (n,) in
    [0, classes)."""
    pred = np.asarray(pred_labels, dtype=np.int64)
    true = np.asarray(true_labels, dtype=np.int64)
    if pred.ndim != 1 or pred.shape != true.shape:
        raise ValueError(f"labels (n,) expected, got {pred.shape} and {true.shape}")
    if pred.size and (min(pred.min(), true.min()) < 0 or max(pred.max(), true.max()) >= classes):
        raise ValueError(f"labels outside [0, {classes})")
    return np.bincount(true * classes + pred, minlength=classes * classes).reshape(classes, classes)


def topk_accuracy(logits: ArrayLike, labels: ArrayLike, k: int) -> float:
    """Fraction of rows whose true label is among the k highest logits (n, C).

    Ties rank the lower class index first, as `argmax` does, so k = 1 equals
    `accuracy(logits.argmax(1), labels)`.
    """
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ValueError(f"logits (n, C) and labels (n,) expected, got {x.shape} and {y.shape}")
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"k must be in 1..{x.shape[1]}, got {k}")
    if not np.issubdtype(y.dtype, np.integer) or (y < 0).any() or (y >= x.shape[1]).any():
        raise ValueError(f"labels must be integers in 0..{x.shape[1] - 1}")
    top = np.argsort(-x, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == y[:, None]).any(axis=1)))
