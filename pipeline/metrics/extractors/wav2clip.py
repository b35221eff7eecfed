"""Wav2CLIP audio encoder, the audio side of the CS metric (docs/references.md, "Paper-protocol metrics").

Mirrors the released wav2clip 0.1.0 (the PyPI wheel that Im2Wav pins, whose `get_model` loads
`Wav2CLIP.pt` from the v0.1.0-alpha GitHub release) as `ResNetExtractor(scenario="frozen",
transform=True)`: the module names equal the checkpoint's (`audio_encoder.*`, the ResNet-18 with
its spectrogram window buffer and no classifier, and `audio_transform.sequential.{0,3}.*`), so the
tensors of `Wav2CLIP.pt` under those prefixes load strictly. Some other revisions of the GitHub
repository declare an unused `fc` classifier and read `checkpoint["state_dict"]` of a different
file (`ResNet_CX.ckpt`); they are not what 0.1.0 runs.

The input standardisation uses the mean and std of the whole input tensor, so an embedding
depends on everything in the batch; `Wav2ClipExtractor` therefore embeds one clip per call.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from pipeline.checkpoint import StateDict
from pipeline.metrics.extractors.common import (
    OfficialExtractor,
    empty_model,
    load_strict,
    one_clip,
    read_official,
)

SAMPLE_RATE = 16000
N_FFT = 512
HOP_LENGTH = 353
EMBED_DIM = 512
LOG_EPS = 1e-7
STD_EPS = 1e-9
PREFIXES = ("audio_encoder.", "audio_transform.")
# ResNet-18 without classifier and with a 1-channel stem (11,170,240) + the audio_transform MLP
# 2 × (512 · 512 + 512) = 525,312.
PARAMETERS = 11_695_552


class Spectrogram(nn.Module):
    """torchaudio.transforms.Spectrogram(n_fft=512, hop_length=353): centred (reflect) STFT with a
    periodic Hann window (the buffer `window`), power 2."""

    def __init__(self, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(n_fft))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """wave (..., T) → power (..., n_fft // 2 + 1, 1 + T // hop)."""
        shape = wave.shape
        spec = torch.stft(
            wave.reshape(-1, shape[-1]),
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.n_fft,
            window=self.window,
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        return spec.abs().pow(2.0).reshape(*shape[:-1], *spec.shape[-2:])


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs (no bias) with BN, identity or 1×1 projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNetAudio(nn.Module):
    """Wav2CLIP's ResNet-18 on a standardised log spectrogram: wave (B, T) → (B, 512)."""

    def __init__(self) -> None:
        super().__init__()
        self.spectrogram = Spectrogram()
        self.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = torch.log(self.spectrogram(wave[:, None]) + LOG_EPS)  # (B, 1, 257, frames)
        x = (x - x.mean()) / (x.std() + STD_EPS)  # statistics of the whole batch
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


class MLPLayers(nn.Module):
    """Linear–ReLU–Dropout–Linear (512 → 512 → 512) under the name `sequential`."""

    def __init__(self, width: int = EMBED_DIM, dropout: float = 0.1) -> None:
        super().__init__()
        self.sequential = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sequential(x)


class Wav2Clip(nn.Module):
    """Wav2CLIP's frozen, transformed audio embedding: wave (B, T) at 16 kHz → (B, 512)."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = ResNetAudio()
        self.audio_transform = MLPLayers()

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.audio_transform(self.audio_encoder(wave))


class Wav2ClipExtractor(OfficialExtractor):
    """Wav2CLIP audio embeddings (512-d, not normalised), one clip per call."""

    name: ClassVar[str] = "wav2clip"
    sample_rate: ClassVar[int] = SAMPLE_RATE
    dim: ClassVar[int] = EMBED_DIM

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device | None = None
    ) -> Wav2ClipExtractor:
        """Load the `audio_encoder.*` and `audio_transform.*` tensors of `Wav2CLIP.pt` strictly
        (a flat state dict as released, or nested under `"state_dict"`).

        Like the official loader, which rebuilds the dict and so lets BatchNorm fill in a missing
        `num_batches_tracked` (a counter that eval mode never reads), absent counters are set to 0;
        every other key must be present with its exact shape.
        """
        state = read_official(path, keep_prefixes=PREFIXES)
        model = empty_model(Wav2Clip)
        tensors = dict(state.tensors)
        for key in model.state_dict():
            if key.endswith(".num_batches_tracked") and key not in tensors:
                tensors[key] = torch.tensor(0, dtype=torch.long)
        load_strict(model, StateDict(tensors, state.sha256, state.path), "Wav2CLIP audio encoder")
        return cls(model, state.sha256, device)

    @torch.inference_mode()
    def embed(self, wave: ArrayLike | torch.Tensor) -> np.ndarray:
        """wave (T,) or (1, T) at 16 kHz → (512,) float32."""
        return self.model(one_clip(wave, self.device))[0].cpu().numpy()
