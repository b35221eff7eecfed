"""OpenAI CLIP ViT-B/32 image tower, the image side of the CS metric (docs/references.md, "Paper-protocol metrics").

Only the vision transformer is built, under the attribute `visual`, so its state-dict names are
OpenAI's own (`visual.conv1.weight`, `visual.transformer.resblocks.0.attn.in_proj_weight`, …) and
the `visual.*` part of `ViT-B-32.pt` loads strictly. The preprocessing is CLIP's: short side to
224 (bicubic), centre crop 224, RGB, scale to [0, 1], normalise with CLIP's mean/std; written with
PIL + NumPy following torchvision's `Resize`/`CenterCrop` size and offset rules.

The weights run in float32 (what `clip.load` does on a CPU; on CUDA it runs float16, so
embeddings there differ by about 1e-3).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from PIL import Image
from torch import nn

from pipeline import io
from pipeline.checkpoint import StateDict
from pipeline.metrics.extractors.common import (
    OfficialExtractor,
    empty_model,
    load_strict,
    read_official,
)

IMAGE_SIZE = 224
PATCH_SIZE = 32
WIDTH = 768
LAYERS = 12
HEADS = 12
EMBED_DIM = 512
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# conv1 2,359,296 + class 768 + positional 38,400 + ln_pre 1,536 + 12 blocks × 7,087,872
# + ln_post 1,536 + proj 393,216.
VISUAL_PARAMETERS = 87_849_216
VISUAL_PREFIX = "visual."


class QuickGELU(nn.Module):
    """x · σ(1.702 x), the GELU approximation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block; attribute names as OpenAI's (attn, ln_1, mlp.c_fc/c_proj, ln_2)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, 4 * width),
                gelu=QuickGELU(),
                c_proj=nn.Linear(4 * width, width),
            )
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, width) → (B, L, width)."""
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """CLIP's ViT image encoder: (B, 3, 224, 224) normalised pixels → (B, 512) (not normalised)."""

    def __init__(
        self,
        input_resolution: int = IMAGE_SIZE,
        patch_size: int = PATCH_SIZE,
        width: int = WIDTH,
        layers: int = LAYERS,
        heads: int = HEADS,
        output_dim: int = EMBED_DIM,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (B, grid², width)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # (B, grid² + 1, width)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # class token → (B, output_dim)


class ClipImageEncoder(nn.Module):
    """The image half of CLIP ViT-B/32; its only child is `visual`, as in OpenAI's model."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = VisionTransformer()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


def preprocess(image: Image.Image | ArrayLike) -> torch.Tensor:
    """An image (PIL, or (H, W, 3) uint8 array) → CLIP input (3, 224, 224) float32.

    Resize the short side to 224 with PIL bicubic (long side int(224 · long / short)), crop the
    centre 224×224 at offsets int(round((size − 224) / 2)), convert to RGB, scale to [0, 1],
    normalise per channel.
    """
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(IMAGE_SIZE * long / short)
    size = (IMAGE_SIZE, new_long) if w <= h else (new_long, IMAGE_SIZE)
    image = image.resize(size, Image.Resampling.BICUBIC)
    left = int(round((size[0] - IMAGE_SIZE) / 2.0))
    top = int(round((size[1] - IMAGE_SIZE) / 2.0))
    image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (pixels - mean) / std


def read_clip_state(path: str | Path) -> StateDict:
    """The `visual.*` tensors of a CLIP checkpoint: the official TorchScript archive
    (`ViT-B-32.pt`) or a plain state dict, as `clip.load(..., jit=False)` accepts both.

    torch.jit.load deserialises TorchScript code and constants without unpickling Python
    objects; a file that is not an archive goes through the weights-only loader instead.
    """
    path = Path(path)
    try:
        archive = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError):
        return read_official(path, keep_prefixes=(VISUAL_PREFIX,))
    tensors = {
        k: v.detach().clone()
        for k, v in archive.state_dict().items()
        if k.startswith(VISUAL_PREFIX)
    }
    return StateDict(tensors, io.sha256_file(path), str(path))


class ClipImageExtractor(OfficialExtractor):
    """L2-normalised CLIP ViT-B/32 image embeddings (512-d), one image per call."""

    name: ClassVar[str] = "clip-vit-b32"
    dim: ClassVar[int] = EMBED_DIM
    image_size: ClassVar[int] = IMAGE_SIZE

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device | None = None
    ) -> ClipImageExtractor:
        """Load the image tower of `ViT-B-32.pt` strictly (float16 weights become float32)."""
        state = read_clip_state(path)
        model = empty_model(ClipImageEncoder)
        load_strict(model, state, "CLIP ViT-B/32 image tower")
        return cls(model, state.sha256, device)

    @torch.inference_mode()
    def embed(self, image: Image.Image | ArrayLike) -> np.ndarray:
        """One image → (512,) float32 with unit L2 norm."""
        pixels = preprocess(image)[None].to(self.device)
        return F.normalize(self.model(pixels), dim=-1)[0].cpu().numpy()
