"""PANNs Cnn14 at 16 kHz, the network behind the paper's FD and IS (docs/references.md, "Paper-protocol metrics").

`Cnn14` re-declares the audioset_tagging_cnn / audioldm_eval module with the same attribute names,
so `Cnn14_16k_mAP=0.438.pth` (`{"model": state_dict, "iteration": ..., ...}`) loads strictly. The
STFT and mel front end come from torchlibrosa, as in the original: its kernels (`spectrogram_
extractor.stft.conv_{real,imag}.weight`) and `logmel_extractor.melW` are frozen nn.Parameters
that are stored in the checkpoint and overwritten by it. Forward gives audioldm_eval's "2048"
(post-ReLU fc1) and "logits" (fc_audioset, pre-sigmoid) outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import nn
from torchlibrosa.stft import LogmelFilterBank, Spectrogram

from pipeline.metrics.extractors.common import (
    OfficialExtractor,
    load_strict,
    one_clip,
    read_official,
)

SAMPLE_RATE = 16000
WINDOW_SIZE = 512
HOP_SIZE = 160
MEL_BINS = 64
FMIN = 50
FMAX = 8000
CLASSES_NUM = 527
CHANNELS = (64, 128, 256, 512, 1024, 2048)
EMBEDDING_DIM = 2048
# Trainable parameters of Cnn14; the frozen STFT kernels (2 × 257 × 512) and melW (257 × 64)
# add 279,616 more that `parameters()` also lists, with requires_grad=False.
TRAINABLE_PARAMETERS = 80_753_615
FROZEN_PARAMETERS = 279_616


class ConvBlock(nn.Module):
    """conv3×3–BN–ReLU twice (no conv bias), then average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool_size: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool_size)


class Cnn14(nn.Module):
    """PANNs Cnn14 (16 kHz configuration by default); eval-mode forward only.

    SpecAugment and dropout act only in training and hold no weights, so they are left out.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        window_size: int = WINDOW_SIZE,
        hop_size: int = HOP_SIZE,
        mel_bins: int = MEL_BINS,
        fmin: int = FMIN,
        fmax: int = FMAX,
        classes_num: int = CLASSES_NUM,
    ) -> None:
        super().__init__()
        self.spectrogram_extractor = Spectrogram(
            n_fft=window_size,
            hop_length=hop_size,
            win_length=window_size,
            window="hann",
            center=True,
            pad_mode="reflect",
            freeze_parameters=True,
        )
        self.logmel_extractor = LogmelFilterBank(
            sr=sample_rate,
            n_fft=window_size,
            n_mels=mel_bins,
            fmin=fmin,
            fmax=fmax,
            ref=1.0,
            amin=1e-10,
            top_db=None,
            freeze_parameters=True,
        )
        self.bn0 = nn.BatchNorm2d(mel_bins)
        widths = (1, *CHANNELS)
        for k in range(len(CHANNELS)):
            setattr(self, f"conv_block{k + 1}", ConvBlock(widths[k], widths[k + 1]))
        self.fc1 = nn.Linear(CHANNELS[-1], EMBEDDING_DIM)
        self.fc_audioset = nn.Linear(EMBEDDING_DIM, classes_num)

    def logmel(self, wave: torch.Tensor) -> torch.Tensor:
        """wave (B, T) → log-mel in dB (B, 1, frames, mel_bins), frames = 1 + T // hop."""
        return self.logmel_extractor(self.spectrogram_extractor(wave))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wave (B, T) → (embedding (B, 2048) = relu(fc1), logits (B, classes_num))."""
        x = self.logmel(wave)  # (B, 1, frames, mel)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # BN over the mel axis
        for k in range(1, 7):
            x = getattr(self, f"conv_block{k}")(x, pool_size=(2, 2) if k < 6 else (1, 1))
        x = x.mean(dim=3)  # (B, 2048, frames'): mean over frequency
        x = x.max(dim=2).values + x.mean(dim=2)  # (B, 2048)
        embedding = F.relu(self.fc1(x))
        return embedding, self.fc_audioset(embedding)


class PannsExtractor(OfficialExtractor):
    """Clip-level PANNs features for FD (2048-d embedding) and IS (527 logits).

    One clip per call, as audioldm_eval runs it (batch size 1).
    """

    name: ClassVar[str] = "panns-cnn14-16k"
    sample_rate: ClassVar[int] = SAMPLE_RATE
    dim: ClassVar[int] = EMBEDDING_DIM
    num_classes: ClassVar[int] = CLASSES_NUM

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device | None = None
    ) -> PannsExtractor:
        """Load `Cnn14_16k_mAP=0.438.pth` (or a bare state dict) strictly."""
        state = read_official(path)
        model = Cnn14()
        load_strict(model, state, "PANNs Cnn14 (16 kHz)")
        return cls(model, state.sha256, device)

    @torch.inference_mode()
    def features(self, wave: ArrayLike | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """wave (T,) or (1, T) at 16 kHz → (embedding (1, 2048), logits (527,)), float32."""
        embedding, logits = self.model(one_clip(wave, self.device))
        return embedding.cpu().numpy(), logits[0].cpu().numpy()

    def embed(self, wave: ArrayLike | torch.Tensor) -> np.ndarray:
        """The FD rows of one clip: (1, 2048)."""
        return self.features(wave)[0]

    def logits(self, wave: ArrayLike | torch.Tensor) -> np.ndarray:
        """The IS input of one clip: (527,) AudioSet logits."""
        return self.features(wave)[1]
