"""pipeline.metrics.math: Gaussian stats, Fréchet distance, Inception Score, KL, CLIP score, accuracy."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.metrics import math as metrics_math
from pipeline.metrics.math import (
    GaussianStats,
    StatsAccumulator,
    StatsFileError,
    accuracy,
    clip_score,
    confusion_matrix,
    frechet_distance,
    frechet_distance_eig,
    inception_score,
    inception_split_scores,
    kl_divergence,
    topk_accuracy,
)

FRECHET = [frechet_distance, frechet_distance_eig]


def _features(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    mixing = rng.randn(d, d) / math.sqrt(d)
    return shift + scale * rng.randn(n, d) @ mixing


def _stats(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> GaussianStats:
    return GaussianStats.from_features(_features(n, d, seed, scale, shift))


# ------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_a_direct_scipy_computation():
    fa, fb = _features(300, 12, 0), _features(250, 12, 1, scale=1.5, shift=0.3)
    mu_a, mu_b = fa.mean(axis=0), fb.mean(axis=0)
    sigma_a, sigma_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    expected = (
        np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(root)
    )
    got = frechet_distance(GaussianStats.from_features(fa), GaussianStats.from_features(fb))
    assert got == pytest.approx(expected, rel=1e-12)
    assert got > 1.0


@pytest.mark.parametrize("fd", FRECHET)
def test_identical_stats_give_zero(fd):
    stats = _stats(200, 16, 0, shift=2.0)
    assert abs(fd(stats, stats)) < 1e-10


@pytest.mark.parametrize("fd", FRECHET)
def test_diagonal_gaussians_match_the_closed_form(fd):
    var_a, var_b = np.array([0.5, 1.0, 2.0, 4.0]), np.array([3.0, 1.0, 0.25, 9.0])
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    a = GaussianStats(mu_a, np.diag(var_a), 100)
    b = GaussianStats(mu_b, np.diag(var_b), 100)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert fd(a, b) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("fd", FRECHET)
def test_shifting_the_mean_adds_its_squared_norm(fd):
    a, b = _stats(300, 10, 0), _stats(300, 10, 1, scale=2.0)
    b = GaussianStats(a.mu, b.sigma, b.n)  # same mean: FD is the covariance term only
    v = np.linspace(-1.0, 2.0, 10)
    shifted = GaussianStats(a.mu + v, a.sigma, a.n)
    assert fd(shifted, b) - fd(a, b) == pytest.approx(v @ v, rel=1e-10)


@pytest.mark.parametrize("fd", FRECHET)
def test_frechet_distance_is_symmetric(fd):
    a, b = _stats(300, 10, 0), _stats(200, 10, 1, scale=0.5, shift=1.0)
    assert fd(a, b) == pytest.approx(fd(b, a), rel=1e-12)


def test_singular_covariances_n_below_d_give_a_finite_distance():
    # rank-5 and rank-7 covariances in 24 dims; relu features as PANNs' embedding has
    a = GaussianStats.from_features(np.maximum(_features(6, 24, 0), 0))
    b = GaussianStats.from_features(np.maximum(_features(8, 24, 1, shift=0.5), 0))
    assert np.linalg.matrix_rank(a.sigma) == 5
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 0
    # docs/references.md reports about 2e-10 relative at d = 2048; at this small d the ~1e-8 square roots of the
    # noise eigenvalues are a larger share of the distance, measured here at about 4e-9.
    assert frechet_distance_eig(a, b) == pytest.approx(value, rel=2e-8)


def test_eig_formula_agrees_with_sqrtm_for_full_rank_covariances():
    # docs/references.md reports ≤ 3e-15 relative (d = 128 and 2048); measured here at about 6e-15.
    for seed in range(3):
        a, b = _stats(400, 16, seed), _stats(300, 16, seed + 10, scale=1.3, shift=0.2)
        assert frechet_distance_eig(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-13)


def test_eps_offset_is_added_to_both_covariances_when_sqrtm_is_not_finite(monkeypatch):
    a, b = _stats(100, 6, 0), _stats(100, 6, 1, shift=1.0)
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(metrics_math.scipy.linalg, "sqrtm", sqrtm)
    value = frechet_distance(a, b)
    offset = 1e-6 * np.eye(6)
    np.testing.assert_array_equal(calls[1], (a.sigma + offset) @ (b.sigma + offset))
    root = real_sqrtm(calls[1]).real
    diff = a.mu - b.mu
    expected = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(root)
    assert value == pytest.approx(expected, rel=1e-12)


def test_imaginary_part_is_dropped_up_to_1e_3_on_the_diagonal(monkeypatch):
    a = GaussianStats(np.zeros(3), np.eye(3), 10)
    b = GaussianStats(np.ones(3), 4 * np.eye(3), 10)
    for imag, ok in [(0.9e-3, True), (1.1e-3, False)]:
        root = 2 * np.eye(3) + 1j * imag * np.eye(3)
        monkeypatch.setattr(metrics_math.scipy.linalg, "sqrtm", lambda m, root=root: root)
        if ok:
            assert frechet_distance(a, b) == pytest.approx(3 + 3 + 12 - 2 * 6)
        else:
            with pytest.raises(ValueError, match="imaginary"):
                frechet_distance(a, b)


def test_stats_of_different_dims_are_refused():
    with pytest.raises(ValueError, match="dims"):
        frechet_distance(_stats(50, 4, 0), _stats(50, 5, 1))


# -------------------------------------------------------------------------- Gaussian statistics


def test_from_features_is_np_mean_and_unbiased_np_cov():
    f = _features(50, 7, 0, shift=3.0).astype(np.float32)
    stats = GaussianStats.from_features(f)
    f64 = f.astype(np.float64)
    np.testing.assert_array_equal(stats.mu, f64.mean(axis=0))
    np.testing.assert_array_equal(stats.sigma, np.cov(f64, rowvar=False))
    assert stats.n == 50 and stats.mu.dtype == stats.sigma.dtype == np.float64


def test_accumulator_equals_from_features_on_concatenated_batches():
    # a large common mean, where plain Σxxᵀ − n·μμᵀ would lose digits
    f = _features(157, 9, 0, shift=1e3)
    acc = StatsAccumulator(9)
    for lo, hi in [(0, 1), (1, 40), (40, 40), (40, 100), (100, 157)]:
        acc.add(f[lo:hi].astype(np.float32) if lo == 40 else f[lo:hi])
    f[40:100] = f[40:100].astype(np.float32)
    streamed, direct = acc.stats(), GaussianStats.from_features(f)
    assert streamed.n == direct.n == 157
    np.testing.assert_allclose(streamed.mu, direct.mu, rtol=1e-14, atol=0)
    np.testing.assert_allclose(streamed.sigma, direct.sigma, rtol=0, atol=1e-11)


def test_accumulator_needs_two_rows_and_the_right_width():
    acc = StatsAccumulator(3)
    with pytest.raises(ValueError):
        acc.add(np.zeros((2, 4)))
    acc.add(np.zeros((1, 3)))
    with pytest.raises(ValueError):
        acc.stats()


def test_save_load_round_trip(tmp_path):
    stats = _stats(40, 5, 0)
    path = tmp_path / "ref" / "stats.npz"
    stats.save(path, key="panns-cnn14-16k@0123abcd|ae-main2024|16k")
    loaded = GaussianStats.load(path, key="panns-cnn14-16k@0123abcd|ae-main2024|16k")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.n == 40
    assert [p.name for p in path.parent.iterdir()] == ["stats.npz"]


def test_load_refuses_stats_made_under_another_key(tmp_path):
    path = tmp_path / "stats.npz"
    _stats(40, 5, 0).save(path, key="vggish@10086976|frames|16k")
    with pytest.raises(ValueError, match="recompute"):
        GaussianStats.load(path, key="vggish@10086976|frames|32k")
    with pytest.raises(StatsFileError, match="does not exist"):
        GaussianStats.load(tmp_path / "missing.npz", key="x")


# ------------------------------------------------------------------------------ Inception Score


def _isc_reference(logits: np.ndarray, splits: int, seed: int) -> tuple[float, float]:
    """torch-fidelity `isc_features_to_metric` as audioldm_eval uses it, in torch (float64)."""
    n = logits.shape[0]
    x = torch.from_numpy(logits)[np.random.RandomState(seed).permutation(n), :].double()
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_chunk, log_p_chunk = p[lo:hi], log_p[lo:hi]
        q = p_chunk.mean(dim=0, keepdim=True)
        scores.append((p_chunk * (log_p_chunk - q.log())).sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _logits(n: int = 103, c: int = 11) -> np.ndarray:
    return 3.0 * np.random.RandomState(0).randn(n, c)


def test_uniform_predictions_score_one():
    assert inception_score(np.zeros((40, 527))) == pytest.approx((1.0, 0.0), abs=1e-12)
    uniform = np.full((40, 4), 0.25)
    assert inception_score(uniform, from_logits=False) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_one_hot_predictions_spread_evenly_score_k():
    k, splits = 5, 10
    labels = np.tile(np.arange(k), 2 * splits)  # every split of 10 rows holds each class twice
    one_hot = np.eye(k)[labels]
    assert inception_score(one_hot, shuffle=False, from_logits=False) == pytest.approx((k, 0.0))
    assert inception_score(60.0 * one_hot, shuffle=False)[0] == pytest.approx(k, rel=1e-12)
    # shuffled, each split scores exp(entropy of its class histogram), at most k
    perm = np.random.RandomState(2020).permutation(labels.size)
    expected = []
    for i in range(splits):
        counts = np.bincount(labels[perm][i * 10 : (i + 1) * 10], minlength=k) / 10
        expected.append(math.exp(-sum(c * math.log(c) for c in counts if c > 0)))
    scores = inception_split_scores(one_hot, from_logits=False)
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert scores.max() <= k and scores.min() < k


def test_split_bounds_are_i_times_n_floor_divided_by_splits():
    # 23 rows into 10 splits: bounds 0,2,4,6,9,11,13,16,18,20,23 (torch.chunk would make 8 of 3)
    alternating = np.eye(2)[np.arange(23) % 2]
    mixed_3 = math.exp(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    expected = [2, 2, 2, mixed_3, 2, 2, mixed_3, 2, 2, mixed_3]
    scores = inception_split_scores(alternating, shuffle=False, from_logits=False)
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


def test_shuffle_is_the_randomstate_2020_permutation():
    x = _logits()
    permuted = x[np.random.RandomState(2020).permutation(len(x))]
    np.testing.assert_array_equal(
        inception_split_scores(x), inception_split_scores(permuted, shuffle=False)
    )
    assert inception_score(x) != inception_score(x, shuffle=False)
    assert inception_score(x) != inception_score(x, seed=2021)


def test_inception_score_regression_against_an_independent_implementation():
    x = _logits()
    reference = _isc_reference(x, splits=10, seed=2020)
    assert inception_score(x) == pytest.approx(reference, rel=1e-12)
    # computed once with _isc_reference
    assert reference == pytest.approx((3.176908057197268, 0.5157973778145731), rel=1e-12)


def test_fewer_rows_than_splits_are_refused():
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((9, 3)))


# ----------------------------------------------------------------------------- KL divergence


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_kl_is_audioldm_evals_kl_div_call(activation):
    gen, target = _logits(20, 7), _logits(20, 7)[::-1].copy() * 0.5
    act = (lambda t: t.softmax(dim=1)) if activation == "softmax" else torch.sigmoid
    g, t = torch.from_numpy(gen), torch.from_numpy(target)
    expected = torch.nn.functional.kl_div((act(g) + 1e-6).log(), act(t), reduction="sum") / 20
    assert kl_divergence(gen, target, activation) == pytest.approx(expected.item(), rel=1e-12)
    assert kl_divergence(gen, target, activation) > 0.1


def test_kl_of_identical_logits_is_minus_c_times_eps():
    # Σ_c q·log(q / (q + 1e-6)) ≈ −C·1e-6 per row when every q ≫ 1e-6: the ε shifts the zero
    x = 0.3 * _logits(30, 7)
    assert kl_divergence(x, x) == pytest.approx(-7e-6, rel=1e-3)


# -------------------------------------------------------------------------------- CLIP score


def test_clip_score_of_identical_opposite_and_orthogonal_vectors():
    e = _features(8, 16, 0)
    assert clip_score(e, e) == pytest.approx(100.0, rel=1e-12)
    assert clip_score(e, -e) == pytest.approx(-100.0, rel=1e-12)  # no clamp at 0
    assert clip_score(np.eye(4)[:2], np.eye(4)[2:]) == pytest.approx(0.0, abs=1e-12)
    rows = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert clip_score(rows, np.array([[0.6, 0.8], [-0.6, -0.8]])) == pytest.approx(0.0, abs=1e-12)


def test_clip_score_is_invariant_to_the_scale_of_each_row():
    a, b = _features(8, 16, 0), _features(8, 16, 1)
    scales = np.linspace(0.1, 50.0, 8)[:, None]
    assert clip_score(a * scales, b / scales) == pytest.approx(clip_score(a, b), rel=1e-12)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert clip_score(a, b) == pytest.approx(100 * cos.mean(), rel=1e-12)


# ---------------------------------------------------------------------------------- accuracy


def test_accuracy_and_topk_accuracy():
    assert accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == 0.75
    logits = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.9, 0.0, 0.1]])
    labels = np.array([2, 1, 0, 0])
    # ties rank the lower class first, as argmax: row 1's label 1 is second, not first
    assert topk_accuracy(logits, labels, 1) == accuracy(logits.argmax(1), labels) == 0.25
    assert topk_accuracy(logits, labels, 2) == 0.75
    assert topk_accuracy(logits, labels, 3) == 1.0
    with pytest.raises(ValueError):
        topk_accuracy(logits, labels, 4)


def test_confusion_matrix_counts_true_rows_against_predicted_columns():
    pred, true = np.array([0, 1, 2, 2, 0]), np.array([0, 1, 1, 2, 2])
    m = confusion_matrix(pred, true, 4)
    assert m.tolist() == [[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert np.trace(m) / m.sum() == accuracy(pred, true)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(pred, true, 2)
    with pytest.raises(ValueError):
        confusion_matrix(pred, true[:3], 4)
