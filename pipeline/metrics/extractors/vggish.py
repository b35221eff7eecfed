"""VGGish as audioldm_eval's FAD runs it (docs/references.md, "Paper-protocol metrics"): 128-d per 0.96 s example.

The network mirrors harritaylor/torchvggish's `VGG` (keys `features.*`, `embeddings.{0,2,4}.*`,
so `vggish-10086976.pth` loads strictly) with the last ReLU removed, as audioldm_eval's
`use_activation=False` does, and without the PCA/quantisation postprocessor (`use_pca=False`).

The log-mel examples are computed here in NumPy from the VGGish parameters (the TF reference's
`mel_features.py` math) rather than by depending on PyPI torchvggish 0.2: that sdist pulls in
resampy, and its `waveform_to_examples` adds nothing at 16 kHz input, which is what the
evaluation feeds (audioldm_eval resamples before VGGish).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from pipeline.metrics.extractors.common import (
    OfficialExtractor,
    empty_model,
    load_strict,
    one_clip,
    read_official,
)

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 400  # 25 ms
HOP_SAMPLES = 160  # 10 ms
FFT_LENGTH = 512  # next power of two above the window
MEL_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s
EXAMPLE_HOP_FRAMES = 96  # no overlap
EMBEDDING_DIM = 128
VGG_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")
PARAMETERS = 72_141_184


def _frame(x: np.ndarray, window: int, hop: int) -> np.ndarray:
    """(L, ...) → (1 + (L − window) // hop, window, ...): windows along axis 0, no padding."""
    count = 1 + (x.shape[0] - window) // hop if x.shape[0] >= window else 0
    index = hop * np.arange(count)[:, None] + np.arange(window)[None, :]
    return x[index]


def periodic_hann(n: int) -> np.ndarray:
    """The periodic ("DFT-even") Hann window of length n, float64."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi / n * np.arange(n))


def hertz_to_mel(hertz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 1127 · ln(1 + f / 700)."""
    return 1127.0 * np.log(1.0 + np.asarray(hertz, dtype=np.float64) / 700.0)


def mel_matrix(
    num_spectrogram_bins: int = FFT_LENGTH // 2 + 1,
    sample_rate: int = SAMPLE_RATE,
    num_mel_bins: int = MEL_BANDS,
    lower_hz: float = MEL_MIN_HZ,
    upper_hz: float = MEL_MAX_HZ,
) -> np.ndarray:
    """(num_spectrogram_bins, num_mel_bins) triangular HTK-mel weights, peak 1, no area
    normalisation, DC row zeroed."""
    bins_mel = hertz_to_mel(np.linspace(0.0, sample_rate / 2.0, num_spectrogram_bins))[:, None]
    edges = np.linspace(hertz_to_mel(lower_hz), hertz_to_mel(upper_hz), num_mel_bins + 2)
    low, centre, high = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel - low) / (centre - low)
    falling = (high - bins_mel) / (high - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


def log_mel_examples(wave: ArrayLike) -> np.ndarray:
    """16 kHz mono wave (T,) → VGGish input examples (n, 96, 64), float64.

    STFT magnitude (400-sample periodic Hann, hop 160, FFT 512, no centring) → 64 HTK mel bands
    → log(mel + 0.01) → non-overlapping 96-frame patches; n = 1 + (frames − 96) // 96 with
    frames = 1 + (T − 400) // 160.
    """
    x = np.asarray(wave)
    if x.ndim != 1:
        raise ValueError(f"a mono wave (T,) expected, got shape {x.shape}")
    frames = _frame(x, WINDOW_SAMPLES, HOP_SAMPLES)  # (F, 400)
    spectrum = np.abs(np.fft.rfft(frames * periodic_hann(WINDOW_SAMPLES), FFT_LENGTH))  # (F, 257)
    log_mel = np.log(spectrum @ mel_matrix(spectrum.shape[1]) + LOG_OFFSET)  # (F, 64)
    examples = _frame(log_mel, EXAMPLE_FRAMES, EXAMPLE_HOP_FRAMES)
    if examples.shape[0] == 0:
        raise ValueError(
            f"a clip of {x.shape[0]} samples is shorter than one VGGish example (15600 samples)"
        )
    return examples


class VGGish(nn.Module):
    """VGGish body: 96×64 log-mel example → 128-d embedding (pre-ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for v in VGG_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU()]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 6 * 4, 4096),
            nn.ReLU(),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Linear(4096, EMBEDDING_DIM),
        )

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """examples (N, 1, 96, 64) → (N, 128)."""
        x = self.features(examples)  # (N, 512, 6, 4)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # NHWC flatten, as the TF original
        return self.embeddings(x)


class VggishExtractor(OfficialExtractor):
    """Frame-level VGGish embeddings for FAD: every 0.96 s example of a clip is one row."""

    name: ClassVar[str] = "vggish"
    sample_rate: ClassVar[int] = SAMPLE_RATE
    dim: ClassVar[int] = EMBEDDING_DIM

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device | None = None
    ) -> VggishExtractor:
        """Load torchvggish's `vggish-10086976.pth` strictly."""
        state = read_official(path)
        model = empty_model(VGGish)
        load_strict(model, state, "VGGish network")
        return cls(model, state.sha256, device)

    @torch.inference_mode()
    def embed(self, wave: ArrayLike | torch.Tensor) -> np.ndarray:
        """wave (T,) or (1, T) at 16 kHz → (n_examples, 128) float32."""
        x = one_clip(wave, torch.device("cpu"))[0].numpy()
        examples = torch.from_numpy(log_mel_examples(x)).float()[:, None]  # (n, 1, 96, 64)
        return self.model(examples.to(self.device)).cpu().numpy()
