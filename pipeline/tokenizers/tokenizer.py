"""A trained or imported VQGAN with its input convention: the unit the pipeline tokenizes with.

A tokenizer folder (`<paths.tokenizers>/<modality>/`) holds `model.safetensors`, `config.json`
with the VQGAN config, the input spec and where the weights came from, and a `README.md` model
card (`pipeline.checkpoint`; folders of the legacy `weights.pt` + `meta.json` layout load too).
`Tokenizer.load` rebuilds the model from the config alone. Images enter as uint8 (B, H, W, 3)
and mels as [0, 1] float (B, 80, 848); both are mapped to [-1, 1] as taming and SpecVQGAN
expect. Ids leave flat, row-major: (B, rows * cols).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline import checkpoint
from pipeline.config import VQGANArch
from pipeline.tokenizers.layout import MODALITIES, ModalityLayout
from pipeline.tokenizers.vqgan import VQGANConfig, VQModel

KIND = {"image": "image", "audio": "mel"}


@dataclass(frozen=True)
class InputSpec:
    """What the VQGAN eats: `kind` image (3, S, S) or mel (1, n_mels, frames)."""

    kind: Literal["image", "mel"]
    shape: tuple[int, int, int]


def vqgan_config(arch: VQGANArch, spec: InputSpec) -> VQGANConfig:
    """The VQGANConfig for `arch` on inputs of `spec` (channels and attention width from the input)."""
    channels, height, width = spec.shape
    if arch.temporal and spec.kind != "mel":
        raise ValueError("a temporal codec (arch.temporal: true) is for mels, not images")
    bands = channels * height if arch.temporal else channels  # a temporal codec's input channels
    cfg = VQGANConfig(
        in_channels=bands,
        out_channels=bands,
        ch=arch.ch,
        ch_mult=tuple(arch.ch_mult),
        num_res_blocks=arch.num_res_blocks,
        attn_resolutions=tuple(arch.attn_resolutions),
        resolution=width,  # the originals track attention placement along the width
        z_channels=arch.z_channels,
        embed_dim=arch.embed_dim,
        n_embed=arch.n_embed,
        dropout=arch.dropout,
        norm_groups=arch.norm_groups,
        temporal=arch.temporal,
    )
    cfg.grid(height, width)  # raises if the input does not divide
    return cfg


class Tokenizer:
    """One modality's VQGAN in eval mode plus its pre/post-processing."""

    def __init__(self, modality: str, model: VQModel, spec: InputSpec, meta: dict[str, Any]):
        self.modality = modality
        self.model = model.eval()
        self.spec = spec
        self.meta = meta

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def grid(self) -> tuple[int, int]:
        return self.model.config.grid(*self.spec.shape[1:])

    def layout(self) -> ModalityLayout:
        return ModalityLayout(self.modality, self.model.config.n_embed, self.grid)

    def preprocess(self, batch: np.ndarray) -> torch.Tensor:
        """uint8 images (B, H, W, 3) or [0, 1] mels (B, F, T) -> float (B, C, H, W) in [-1, 1]."""
        x = torch.as_tensor(np.ascontiguousarray(batch), device=self.device)
        if self.spec.kind == "image":
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        else:
            x = x.float().unsqueeze(1) * 2.0 - 1.0
        if tuple(x.shape[1:]) != self.spec.shape:
            raise ValueError(
                f"{self.modality} tokenizer expects {self.spec.shape}, got {tuple(x.shape[1:])}"
            )
        return x

    @torch.no_grad()
    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Raw inputs -> ids (B, rows * cols) int64."""
        ids = self.model.encode(self.preprocess(batch))
        return ids.reshape(ids.shape[0], -1).cpu().numpy()

    @torch.no_grad()
    def decode(self, ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """ids (B, rows * cols) -> uint8 images (B, H, W, 3) or [0, 1] mels (B, F, T) float32."""
        ids = torch.as_tensor(np.asarray(ids), device=self.device, dtype=torch.long)
        out = self.model.decode(ids.reshape(ids.shape[0], *self.grid)).clamp(-1.0, 1.0)
        if self.spec.kind == "image":
            return ((out + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return ((out[:, 0] + 1.0) / 2.0).float().cpu().numpy()

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the tokenizer folder: weights and config (`meta` with `extra`, the VQGAN config
        and the input spec); the tokenizers stage adds the card (`pipeline.cards`)."""
        meta = {
            **self.meta,
            **(extra or {}),
            "modality": self.modality,
            "vqgan": dataclasses.asdict(self.model.config),
            "input": {"kind": self.spec.kind, "shape": list(self.spec.shape)},
        }
        self.meta = meta
        return checkpoint.save(folder, self.model, meta)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Tokenizer:
        """Rebuild from the folder's config and load its weights strictly."""
        state, meta = checkpoint.load(folder, "tokenizer")
        cfg_dict = dict(meta["vqgan"])
        for key in ("ch_mult", "attn_resolutions"):
            cfg_dict[key] = tuple(cfg_dict[key])
        model = VQModel(VQGANConfig(**cfg_dict))
        checkpoint.load_into(model, state, f"{meta['modality']} tokenizer", drop_prefixes=())
        spec = InputSpec(meta["input"]["kind"], tuple(meta["input"]["shape"]))
        return cls(meta["modality"], model.to(device), spec, meta)


def load_tokenizers(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, Tokenizer]:
    """Both tokenizers of a `tokenizers` stage output, {"image": ..., "audio": ...}.

    A missing folder, or one holding the other modality, is a `CheckpointError` in one sentence.
    """
    out = {}
    for modality in MODALITIES:
        sub = Path(folder) / modality
        if checkpoint.config_path(sub) is None:
            raise checkpoint.CheckpointError(
                f"{sub} is not a tokenizer folder; run the tokenizers stage first"
            )
        out[modality] = Tokenizer.load(sub, device)
        if out[modality].modality != modality:
            raise checkpoint.CheckpointError(
                f"{sub} holds the {out[modality].modality} tokenizer, not the {modality} one"
            )
    return out
