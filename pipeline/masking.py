"""Masking shared by training and decoding: mask-ratio distributions, random subsets, schedules.

Training (paper §3.3): per sample and per modality a mask ratio r ~ truncated Gaussian on
[low, high] with location `mean` and scale `std` (MAGE's `truncnorm`); ceil(r·L) random positions
become that modality's [MASK] id. Independently, ceil(drop_ratio·L) random positions of each
modality are dropped before the encoder (the paper's Fig. 1: a dropped token may be masked or
not). Every random draw takes an explicit `torch.Generator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from pipeline.config import MaskingConfig
from pipeline.tokenizers.layout import MODALITIES, TokenLayout


def ratio_distribution(cfg: MaskingConfig) -> stats.rv_continuous:
    """The frozen scipy `truncnorm` the mask ratios follow."""
    a, b = (cfg.low - cfg.mean) / cfg.std, (cfg.high - cfg.mean) / cfg.std
    return stats.truncnorm(a, b, loc=cfg.mean, scale=cfg.std)


def sample_ratios(cfg: MaskingConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """n mask ratios, float64 (n,): uniforms from `generator` through the truncnorm quantile."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.from_numpy(np.asarray(ratio_distribution(cfg).ppf(u.numpy()), dtype=np.float64))


def count_for(ratio: torch.Tensor | float, length: int) -> torch.Tensor:
    """Positions that ratio r of `length` covers: ceil(r·L) in [0, L] (r = 0 masks nothing)."""
    r = torch.as_tensor(ratio, dtype=torch.float64)
    # The tiny epsilon keeps 0.5·L = 132.50000000000003 from becoming 133.
    return torch.ceil(r * length - 1e-9).clamp(0, length).long()


def random_subset(
    batch: int, length: int, counts: torch.Tensor | int, generator: torch.Generator
) -> torch.Tensor:
    """Bool (batch, length): in row i exactly counts[i] positions, uniformly at random."""
    noise = torch.rand(batch, length, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    counts = torch.as_tensor(counts).reshape(-1, 1)
    return ranks < counts


@dataclass(frozen=True)
class MaskedBatch:
    """One masked training batch. Per modality (dicts keyed "audio"/"image"):

    inputs: (B, L_m) int64 ids with masked positions set to the modality's [MASK] id
    targets: (B, L_m) int64 original ids
    masked: (B, L_m) bool, True where the loss counts
    ratios: (B,) float64 the drawn mask ratios
    keep: (B, L_a + L_v) bool over the joint sequence [audio, image]: positions the encoder sees
    """

    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    masked: dict[str, torch.Tensor]
    ratios: dict[str, torch.Tensor]
    keep: torch.Tensor | None

    def to(self, device: torch.device | str) -> MaskedBatch:
        def move(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(device, non_blocking=True) for k, v in d.items()}

        return MaskedBatch(
            move(self.inputs),
            move(self.targets),
            move(self.masked),
            self.ratios,
            None if self.keep is None else self.keep.to(device, non_blocking=True),
        )


def apply_mask(
    layout: TokenLayout,
    ids: dict[str, torch.Tensor],
    masked: dict[str, torch.Tensor],
    ratios: dict[str, torch.Tensor],
    keep: torch.Tensor | None,
) -> MaskedBatch:
    """Replace masked positions by each modality's [MASK] id."""
    inputs = {
        m: torch.where(masked[m], layout.modality(m).mask_id, ids[m].long()) for m in MODALITIES
    }
    return MaskedBatch(inputs, {m: ids[m].long() for m in MODALITIES}, masked, ratios, keep)


def mask_for_training(
    layout: TokenLayout,
    ids: dict[str, torch.Tensor],
    cfg: MaskingConfig,
    generator: torch.Generator,
) -> MaskedBatch:
    """The training mask and drop for a batch of ids {"audio": (B, L_a), "image": (B, L_v)}."""
    batch = ids["audio"].shape[0]
    target = None
    if cfg.conditional > 0:
        # Pure conditional samples: the target modality all masked, the condition all visible
        # (ratio 0), as decoding sees them.
        chosen = torch.rand(batch, generator=generator, dtype=torch.float64) < cfg.conditional
        audio = torch.rand(batch, generator=generator, dtype=torch.float64) < 0.5
        target = {"audio": chosen & audio, "image": chosen & ~audio, "any": chosen}
    masked, ratios, keep = {}, {}, []
    for m in MODALITIES:
        length = layout.modality(m).length
        ratios[m] = sample_ratios(cfg, batch, generator)
        if target is not None:
            ratios[m] = torch.where(target[m], 1.0, torch.where(target["any"], 0.0, ratios[m]))
        masked[m] = random_subset(batch, length, count_for(ratios[m], length), generator)
        dropped = random_subset(batch, length, drop_count(cfg.drop_ratio, length), generator)
        keep.append(~dropped)
    return apply_mask(layout, ids, masked, ratios, torch.cat(keep, dim=1))


def mask_fixed_ratio(
    layout: TokenLayout,
    ids: dict[str, torch.Tensor],
    ratio: float,
    generator: torch.Generator,
) -> MaskedBatch:
    """Validation: ratio `ratio` of each modality masked, nothing dropped (as in decoding)."""
    batch = ids["audio"].shape[0]
    masked, ratios = {}, {}
    for m in MODALITIES:
        length = layout.modality(m).length
        ratios[m] = torch.full((batch,), float(ratio), dtype=torch.float64)
        masked[m] = random_subset(batch, length, count_for(ratio, length), generator)
    return apply_mask(layout, ids, masked, ratios, None)


def drop_count(drop_ratio: float, length: int) -> int:
    """Positions dropped per modality: ceil(drop_ratio·L), 0 when drop_ratio is 0."""
    if drop_ratio <= 0:
        return 0
    return min(length - 1, math.ceil(drop_ratio * length - 1e-9))


def cosine_schedule(progress: torch.Tensor | float) -> torch.Tensor:
    """Fraction of target tokens still masked after `progress` in [0, 1] of the decoding steps:
    cos(π/2 · progress) (MaskGIT/MAGE), used by the iterative decoder."""
    return torch.cos(math.pi / 2 * torch.as_tensor(progress, dtype=torch.float64))
