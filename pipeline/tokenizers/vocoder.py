"""Mel -> waveform: SpecVQGAN's VGGSound MelGAN generator, or Griffin-Lim without a checkpoint.

The generator has the key layout of SpecVQGAN's `vocoder/logs/vggsound/best_netG.pt` (weight-norm
`model.N.weight_g` / `weight_v`), 4,266,050 parameters with the official settings (80 mels, ngf 32,
3 residual layers), and takes the [0, 1] mel of `pipeline.data.audio` at hop 256.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn


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
