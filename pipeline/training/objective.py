"""The training objective (paper Eq. 1): cross-entropy on masked positions, both modalities.

Per modality, label-smoothed cross-entropy over that modality's C codes, averaged over its masked
positions in the batch (dropped-but-unmasked positions carry no loss); the total is the sum of
the audio and image terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.masking import MaskedBatch
from pipeline.tokenizers.layout import MODALITIES


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """logits (B, L, C), targets (B, L) int64, masked (B, L) bool -> mean CE over masked, fp32;
    0 (with the graph kept) when nothing is masked, e.g. a batch of conditional samples that all
    show this modality."""
    if not masked.any():
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits[masked].float(), targets[masked], label_smoothing=smoothing)


def masked_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor
) -> torch.Tensor:
    """Fraction of masked positions whose argmax is the target (0 when nothing is masked)."""
    if not masked.any():
        return logits.new_zeros(())
    return (logits[masked].argmax(-1) == targets[masked]).float().mean()


def compute_loss(
    model: nn.Module, batch: MaskedBatch, smoothing: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total loss, detached per-modality loss and masked-token accuracy)."""
    logits = model(batch.inputs["audio"], batch.inputs["image"], batch.keep)
    total = torch.zeros((), device=logits["audio"].device)
    parts = {}
    for m in MODALITIES:
        loss = masked_cross_entropy(logits[m], batch.targets[m], batch.masked[m], smoothing)
        total = total + loss
        parts[f"loss_{m}"] = loss.detach()
        parts[f"acc_{m}"] = masked_accuracy(logits[m].detach(), batch.targets[m], batch.masked[m])
    return total, parts
