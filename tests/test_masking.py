"""pipeline.masking: the training mask-ratio distribution, the mask and the 50% drop."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.config import MaskingConfig
from pipeline.masking import (
    count_for,
    drop_count,
    mask_fixed_ratio,
    mask_for_training,
    random_subset,
    ratio_distribution,
    sample_ratios,
)
from pipeline.tokenizers.layout import ModalityLayout, TokenLayout

PAPER = MaskingConfig(mean=0.7, std=0.25, low=0.2, high=1.0, drop_ratio=0.5)
# The paper's grids: 5x53 mel ids and 16x16 image ids.
LAYOUT = TokenLayout(
    ModalityLayout("audio", 1024, (5, 53)), ModalityLayout("image", 1024, (16, 16))
)


def _ids(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "audio": torch.randint(0, 1024, (batch, LAYOUT.audio.length), generator=g),
        "image": torch.randint(0, 1024, (batch, LAYOUT.image.length), generator=g),
    }


def test_ratios_follow_scipy_truncnorm_with_the_paper_parameters():
    ratios = sample_ratios(PAPER, 20_000, torch.Generator().manual_seed(0)).numpy()
    assert ratios.min() >= 0.2 and ratios.max() <= 1.0
    a, b = (0.2 - 0.7) / 0.25, (1.0 - 0.7) / 0.25
    result = stats.kstest(ratios, stats.truncnorm(a, b, loc=0.7, scale=0.25).cdf)
    assert result.pvalue > 0.01
    # μ is the location before truncation: the realised mean is lower (docs/references.md, "Masking and decoding details").
    assert 0.64 < ratios.mean() < 0.68
    # ... and the KS test can tell a wrong distribution apart at this sample size.
    wrong = stats.truncnorm(a, b, loc=0.7, scale=0.15)
    assert stats.kstest(ratios, wrong.cdf).pvalue < 1e-6


def test_ratio_distribution_mean_matches_scipy():
    assert ratio_distribution(PAPER).mean() == pytest.approx(0.6597, abs=1e-3)


def test_ratios_are_per_sample_and_per_modality():
    batch = mask_for_training(LAYOUT, _ids(64), PAPER, torch.Generator().manual_seed(1))
    a, v = batch.ratios["audio"], batch.ratios["image"]
    assert len(set(a.tolist())) == 64 and not torch.equal(a, v)


def test_masked_counts_follow_the_ratios_and_masked_ids_are_the_mask_id():
    ids = _ids(32)
    batch = mask_for_training(LAYOUT, ids, PAPER, torch.Generator().manual_seed(2))
    for m in ("audio", "image"):
        length = LAYOUT.modality(m).length
        expected = torch.ceil(batch.ratios[m] * length - 1e-9).long()
        assert torch.equal(batch.masked[m].sum(1), expected)
        mask_id = LAYOUT.modality(m).mask_id
        assert torch.all(batch.inputs[m][batch.masked[m]] == mask_id)
        assert torch.equal(batch.inputs[m][~batch.masked[m]], ids[m][~batch.masked[m]])
        assert torch.equal(batch.targets[m], ids[m])


def test_exactly_half_of_each_modality_is_dropped_independently_of_the_mask():
    batch = mask_for_training(LAYOUT, _ids(256), PAPER, torch.Generator().manual_seed(3))
    dropped_a = ~batch.keep[:, : LAYOUT.audio.length]
    dropped_v = ~batch.keep[:, LAYOUT.audio.length :]
    assert torch.all(dropped_a.sum(1) == math.ceil(0.5 * 265))  # 133 of 265
    assert torch.all(dropped_v.sum(1) == 128)
    # Dropped tokens may be unmasked (paper Fig. 1), and masked tokens may be kept.
    masked_a = batch.masked["audio"]
    assert (dropped_a & ~masked_a).any() and (~dropped_a & masked_a).any()
    # Independence: P(dropped | masked) ≈ P(dropped) = 133/265.
    p = (dropped_a & masked_a).sum() / masked_a.sum()
    assert abs(float(p) - 133 / 265) < 0.01


def test_same_generator_seed_gives_the_same_mask():
    one = mask_for_training(LAYOUT, _ids(8), PAPER, torch.Generator().manual_seed(5))
    two = mask_for_training(LAYOUT, _ids(8), PAPER, torch.Generator().manual_seed(5))
    three = mask_for_training(LAYOUT, _ids(8), PAPER, torch.Generator().manual_seed(6))
    assert torch.equal(one.keep, two.keep) and torch.equal(one.inputs["image"], two.inputs["image"])
    assert not torch.equal(one.keep, three.keep)


def test_fixed_ratio_masks_that_fraction_and_drops_nothing():
    batch = mask_fixed_ratio(LAYOUT, _ids(4), 0.5, torch.Generator().manual_seed(0))
    assert batch.keep is None
    assert torch.all(batch.masked["audio"].sum(1) == 133)
    assert torch.all(batch.masked["image"].sum(1) == 128)


def test_counts_and_subsets():
    assert count_for(0.2, 265).item() == 53 and count_for(1.0, 256).item() == 256
    assert count_for(0.0001, 10).item() == 1 and count_for(0.0, 10).item() == 0
    assert drop_count(0.5, 256) == 128 and drop_count(0.0, 256) == 0
    rows = random_subset(3, 10, torch.tensor([0, 4, 10]), torch.Generator().manual_seed(0))
    assert rows.sum(1).tolist() == [0, 4, 10]
    # Uniform over positions: each of 10 positions is chosen about 40% of the time.
    many = random_subset(20_000, 10, 4, torch.Generator().manual_seed(1)).float().mean(0)
    assert np.allclose(many.numpy(), 0.4, atol=0.02)


def test_conditional_samples_mask_one_modality_fully_and_show_the_other():
    """masking.conditional 0.5 (not in the paper): about half the samples are pure audio→image
    or image→audio, split evenly; the rest follow the truncated Gaussian; 0 keeps the paper's
    random stream unchanged."""
    cfg = MaskingConfig(mean=0.7, std=0.25, low=0.2, high=1.0, drop_ratio=0.5, conditional=0.5)
    batch = mask_for_training(LAYOUT, _ids(4000), cfg, torch.Generator().manual_seed(0))
    full = {m: batch.masked[m].all(1) for m in ("audio", "image")}
    shown = {m: ~batch.masked[m].any(1) for m in ("audio", "image")}
    audio_target = full["audio"] & shown["image"]
    image_target = full["image"] & shown["audio"]
    assert 0.22 < audio_target.float().mean() < 0.28
    assert 0.22 < image_target.float().mean() < 0.28
    rest = ~(audio_target | image_target)
    assert (batch.ratios["audio"][rest] >= 0.2).all() and (batch.ratios["image"][rest] >= 0.2).all()
    # The drop is untouched: still half of each modality.
    assert (batch.keep[:, : LAYOUT.audio.length].sum(1) == LAYOUT.audio.length // 2).all()

    plain = mask_for_training(LAYOUT, _ids(8), PAPER, torch.Generator().manual_seed(3))
    zero = MaskingConfig(mean=0.7, std=0.25, low=0.2, high=1.0, drop_ratio=0.5, conditional=0.0)
    same = mask_for_training(LAYOUT, _ids(8), zero, torch.Generator().manual_seed(3))
    assert all(torch.equal(plain.masked[m], same.masked[m]) for m in ("audio", "image"))
