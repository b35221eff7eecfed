"""AdamW with MAE/MAGE parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import TrainConfig


def peak_lr(cfg: TrainConfig) -> float:
    """The linear scaling rule: base_lr x global batch / 256."""
    return cfg.base_lr * cfg.batch_size / 256


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on 1-D parameters (norms, biases); embeddings and positions are decayed, as timm's
    `add_weight_decay` does for MAE/MAGE."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up, then half-cosine to min_lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.base_lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused on CUDA) and its per-step LambdaLR schedule."""
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=peak_lr(cfg),
        betas=tuple(cfg.betas),
        fused=device.type == "cuda",
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    return opt, schedule
