"""Iterative unmasking (MaskGIT / MAGE, the paper's appendix A.2) with classifier-free guidance.

The target positions start as [MASK]. At step t of N (ratio r = (t + 1) / N) the model predicts
every position; an id is sampled from softmax(logits) (temperature 1) at each still-masked
position; its confidence is log p + T·(1 − r)·Gumbel noise (the noise anneals to 0); the
floor(U · cos(π/2 · r)) least confident of them are masked again (U: the target positions at the
start; at least one new token per step; none after the last step), the rest are fixed for good.
Positions given as known never change.

Guidance (Eq. 2) acts on logits, as Im2Wav, muse and 4M do: ℓ = s·ℓ(x, c) + (1 − s)·ℓ(x, M c),
where M c is the condition modality fully masked; both passes run as one batched forward. The
literal probability form can go negative for s > 1 (docs/references.md, "Masking and decoding details").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.devices import autocast
from pipeline.masking import cosine_schedule, drop_count, random_subset
from pipeline.tokenizers.layout import MODALITIES, TokenLayout

Ids = dict[str, torch.Tensor]


def gumbel_noise(shape: torch.Size, generator: torch.Generator, device: torch.device):
    """Standard Gumbel samples from `generator` (on `device`)."""
    u = torch.rand(shape, generator=generator, device=device)
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def remask_count(
    step: int, steps: int, unknown_start: torch.Tensor, unknown_now: torch.Tensor
) -> torch.Tensor:
    """How many target positions stay masked after `step` (0-based) of `steps`, per sample:
    floor(U · cos(π/2 · (step + 1) / steps)), within [1, unknown_now − 1] (0 after the last
    step, and 0 when nothing is left to generate)."""
    if step + 1 >= steps:
        return torch.zeros_like(unknown_now)
    ratio = cosine_schedule((step + 1) / steps).item()
    n = torch.floor(unknown_start.double() * ratio).long()
    upper = (unknown_now - 1).clamp(min=0)
    return torch.minimum(n.clamp(min=1), upper)


def lowest(confidence: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Bool (B, L): the count[b] lowest-confidence positions of each row (exactly that many)."""
    ranks = confidence.argsort(dim=1, stable=True).argsort(dim=1)
    return ranks < count.unsqueeze(1)


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: s·cond + (1 − s)·uncond."""
    return uncond + scale * (cond - uncond)


@dataclass(frozen=True)
class UnmaskingScheduler:
    """N steps, temperature T, guidance s (1: off); `drop_ratio`: fraction of each modality's
    positions hidden from the encoder at every step, at random, as in training (0: none)."""

    steps: int
    temperature: float
    guidance: float = 1.0
    drop_ratio: float = 0.0

    def noise_scale(self, step: int) -> float:
        """T·(1 − r): the Gumbel scale on the confidence at `step`."""
        return self.temperature * (1.0 - (step + 1) / self.steps)


class Unmasker:
    """Runs a scheduler against a model: `model(audio_ids, image_ids)` -> (audio, image) logits.

    The model is only called through its public forward: on the full sequence, or with
    `keep` hiding `scheduler.drop_ratio` of each modality from the encoder (the training-time
    drop; the decoder still predicts every position). `precision` is the autocast precision
    ("fp32", "bf16", "fp16").
    """

    def __init__(
        self,
        model: nn.Module,
        layout: TokenLayout,
        scheduler: UnmaskingScheduler,
        precision: str = "fp32",
    ) -> None:
        self.model, self.layout, self.scheduler = model, layout, scheduler
        self.precision = precision

    def mask_ids(self, batch: int, device: torch.device) -> Ids:
        return {
            m: torch.full(
                (batch, self.layout.modality(m).length),
                self.layout.modality(m).mask_id,
                dtype=torch.long,
                device=device,
            )
            for m in MODALITIES
        }

    def keep(self, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """(B, L_a + L_v) bool: the positions the encoder sees at one step."""
        parts = []
        for m in MODALITIES:
            length = self.layout.modality(m).length
            dropped = random_subset(
                batch, length, drop_count(self.scheduler.drop_ratio, length), generator
            )
            parts.append(~dropped.to(device))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def logits(
        self, tokens: Ids, condition: str | None, generator: torch.Generator | None = None
    ) -> Ids:
        """Per-modality float32 logits; guided when `condition` is set and s != 1."""
        s = self.scheduler.guidance
        use_cfg = condition is not None and not math.isclose(s, 1.0)
        inputs = tokens
        if use_cfg:
            b = tokens["audio"].shape[0]
            blank = self.mask_ids(b, tokens["audio"].device)[condition]
            inputs = {
                m: torch.cat([tokens[m], blank if m == condition else tokens[m]])
                for m in MODALITIES
            }
        device = inputs["audio"].device
        keep = None
        if self.scheduler.drop_ratio > 0:
            if generator is None:
                raise ValueError("a drop_ratio > 0 needs the generator that draws the drop")
            keep = self.keep(inputs["audio"].shape[0], generator, device)
        with autocast(device, self.precision):
            args = (inputs["audio"], inputs["image"]) + ((keep,) if keep is not None else ())
            out = self.model(*args)
        logits = {m: x.float() for m, x in out.items()}
        if use_cfg:
            logits = {m: guided(*x.chunk(2), s) for m, x in logits.items()}
        return logits

    @torch.no_grad()
    def run(
        self,
        ids: Ids,
        known: dict[str, torch.Tensor],
        generator: torch.Generator,
        condition: str | None = None,
        on_step: Callable[[int, Ids], None] | None = None,
    ) -> Ids:
        """Fill every position where `known` is False.

        ids: {"audio": (B, L_a), "image": (B, L_v)} int64 (values at unknown positions ignored);
        known: same shapes, bool. `condition`: the modality masked out for the unconditional
        pass of guidance (None: no guidance, as in co-generation). `on_step(step, tokens)` sees
        the ids after each step ([MASK] where still masked). Returns the filled ids.
        """
        model_was_training = self.model.training
        self.model.eval()
        device = ids["audio"].device
        masks = self.mask_ids(ids["audio"].shape[0], device)
        tokens = {m: torch.where(known[m], ids[m].long(), masks[m]) for m in MODALITIES}
        unknown_start = sum((~known[m]).sum(1) for m in MODALITIES)
        try:
            for step in range(self.scheduler.steps):
                logits = self.logits(tokens, condition, generator)
                sampled, confidence, unknown = [], [], []
                for m in MODALITIES:
                    logp = F.log_softmax(logits[m], dim=-1)
                    draw = (logp + gumbel_noise(logp.shape, generator, device)).argmax(-1)
                    still = tokens[m] == masks[m]
                    draw = torch.where(still, draw, tokens[m])
                    conf = logp.gather(-1, draw.clamp(max=logp.shape[-1] - 1).unsqueeze(-1))
                    conf = torch.where(still, conf.squeeze(-1), torch.inf)
                    sampled.append(draw)
                    confidence.append(conf)
                    unknown.append(still)
                draw, conf = torch.cat(sampled, 1), torch.cat(confidence, 1)
                unknown_now = torch.cat(unknown, 1).sum(1)
                scale = self.scheduler.noise_scale(step)
                if scale > 0:
                    conf = conf + scale * gumbel_noise(conf.shape, generator, device)
                count = remask_count(step, self.scheduler.steps, unknown_start, unknown_now)
                remask = lowest(conf, count)
                joint_mask = torch.cat([masks[m] for m in MODALITIES], 1)
                joint = torch.where(remask, joint_mask, draw)
                tokens = {m: joint[:, self.layout.span(m)] for m in MODALITIES}
                if on_step is not None:
                    on_step(step, tokens)
        finally:
            self.model.train(model_was_training)
        return tokens
