"""Mel -> waveform: SpecVQGAN's VGGSound MelGAN generator, or Griffin-Lim without a checkpoint.

The generator has the key layout of SpecVQGAN's `vocoder/logs/vggsound/best_netG.pt` (weight-norm
`model.N.weight_g` / `weight_v`), 4,266,050 parameters with the official settings (80 mels, ngf 32,
3 residual layers), and takes the [0, 1] mel of `pipeline.data.audio` at hop 256.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import checkpoint
from pipeline.config import ExtractConfig, VocoderConfig
from pipeline.data import audio


@dataclass(frozen=True)
class MelGANConfig:
    n_mel_channels: int = 80
    ngf: int = 32
    n_residual_layers: int = 3
    ratios: tuple[int, ...] = (8, 8, 2, 2)

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.ratios:
            hop *= r
        return hop


def _wn(module: nn.Module) -> nn.Module:
    # The legacy weight_norm gives the checkpoint's `weight_g` / `weight_v` names; the
    # parametrization API would rename them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(module)


class _Residual(nn.Module):
    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.LeakyReLU(0.2),
            nn.ReflectionPad1d(dilation),
            _wn(nn.Conv1d(dim, dim, kernel_size=3, dilation=dilation)),
            nn.LeakyReLU(0.2),
            _wn(nn.Conv1d(dim, dim, kernel_size=1)),
        )
        self.shortcut = _wn(nn.Conv1d(dim, dim, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


class MelGANGenerator(nn.Module):
    """mel (B, 80, T) in [0, 1] -> waveform (B, 1, T * hop) in [-1, 1]."""

    def __init__(self, cfg: MelGANConfig = MelGANConfig()) -> None:
        super().__init__()
        self.config = cfg
        mult = 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [
            nn.ReflectionPad1d(3),
            _wn(nn.Conv1d(cfg.n_mel_channels, mult * cfg.ngf, kernel_size=7)),
        ]
        for r in cfg.ratios:
            layers += [
                nn.LeakyReLU(0.2),
                _wn(
                    nn.ConvTranspose1d(
                        mult * cfg.ngf,
                        mult * cfg.ngf // 2,
                        kernel_size=2 * r,
                        stride=r,
                        padding=r // 2 + r % 2,
                        output_padding=r % 2,
                    )
                ),
            ]
            layers += [_Residual(mult * cfg.ngf // 2, 3**j) for j in range(cfg.n_residual_layers)]
            mult //= 2
        layers += [
            nn.LeakyReLU(0.2),
            nn.ReflectionPad1d(3),
            _wn(nn.Conv1d(cfg.ngf, 1, kernel_size=7)),
            nn.Tanh(),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.model(mel)


class Vocoder:
    """[0, 1] mels (80, T) -> waveforms at the mel's sample rate, by MelGAN or Griffin-Lim.

    A vocoder folder holds `config.json` (`kind`: "melgan" or "griffin_lim", and the mel settings
    as an ExtractConfig) and, for MelGAN, `model.safetensors` (`pipeline.checkpoint`; the
    legacy `meta.json` + `weights.pt` load too).
    """

    def __init__(self, mel: ExtractConfig, generator: MelGANGenerator | None, iters: int = 32):
        self.mel = mel
        self.generator = generator.eval() if generator is not None else None
        self.iters = iters

    @property
    def kind(self) -> str:
        return "melgan" if self.generator is not None else "griffin_lim"

    @torch.no_grad()
    def __call__(self, spec: np.ndarray, seed: int = 0) -> np.ndarray:
        """spec (n_mels, T) in [0, 1] -> waveform float32 in [-1, 1]."""
        if self.generator is None:
            return audio.mel_to_wave(spec, self.mel, n_iter=self.iters, seed=seed)
        device = next(self.generator.parameters()).device
        x = torch.as_tensor(np.asarray(spec, dtype=np.float32), device=device)[None]
        return self.generator(x)[0, 0].float().cpu().numpy()

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        meta = {
            "kind": self.kind,
            "mel": dataclasses.asdict(self.mel),
            "griffin_lim_iters": self.iters,
            **(extra or {}),
        }
        if self.generator is not None:
            meta["melgan"] = dataclasses.asdict(self.generator.config)
            return checkpoint.save(folder, self.generator, meta)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / checkpoint.WEIGHTS_NAME).unlink(missing_ok=True)
        checkpoint.write_config(folder, meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Vocoder:
        meta = checkpoint.read_config(folder, "vocoder")
        mel = ExtractConfig(**meta["mel"])
        if meta["kind"] != "melgan":
            return cls(mel, None, int(meta.get("griffin_lim_iters", 32)))
        state, meta = checkpoint.load(folder, "vocoder")
        cfg = meta["melgan"]
        generator = MelGANGenerator(MelGANConfig(**{**cfg, "ratios": tuple(cfg["ratios"])}))
        checkpoint.load_into(generator, state, "MelGAN vocoder", drop_prefixes=())
        return cls(mel, generator.to(device), int(meta.get("griffin_lim_iters", 32)))


def build_vocoder(cfg: VocoderConfig, mel: ExtractConfig) -> Vocoder:
    """The configured vocoder: SpecVQGAN's MelGAN from a local `best_netG.pt`, else Griffin-Lim."""
    if not cfg.melgan:
        return Vocoder(mel, None, cfg.griffin_lim_iters)
    if (mel.n_mels, mel.hop_length) != (80, 256):
        raise checkpoint.CheckpointError(
            "the SpecVQGAN MelGAN needs 80 mels at hop 256; extract is configured otherwise"
        )
    generator = MelGANGenerator()
    checkpoint.load_into(generator, checkpoint.read_state_dict(cfg.melgan), "MelGAN vocoder")
    return Vocoder(mel, generator, cfg.griffin_lim_iters)
