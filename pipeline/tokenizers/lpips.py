"""LPIPS (VGG16 trunk) with taming-transformers' module names, for the image VQGAN's perceptual loss.

The state-dict keys are taming's `loss.perceptual_loss.*` without that prefix:
`scaling_layer.{shift,scale}` (buffers, (1, 3, 1, 1)), `net.slice1..slice5` holding torchvision's
`vgg16().features` layers at their original indices (slice1 = features[0:4], slice2 = [4:9],
slice3 = [9:16], slice4 = [16:23], slice5 = [23:30]; e.g. `net.slice2.5.weight` is conv2_2) and
`lin0..lin4.model.1.weight` (1x1 convs C -> 1 without bias). The VGG16 is written out here, so
torchvision is not needed; the weights come from a local file (`load_lpips`), never a download.

Distance (taming's `LPIPS.forward`): both inputs in [-1, 1] are shifted and scaled, run through
the five slices, each feature map is unit-normalised over channels, the squared difference is
weighted by `lin_k` and averaged over space, and the five values are summed: (B, 1, 1, 1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pipeline import checkpoint

log = logging.getLogger(__name__)

CHANNELS = (
    64,
    128,
    256,
    512,
    512,
)  # output channels of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# torchvision's vgg16 "D" configuration: conv widths, "M" = 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # [start, end) into vgg16().features
PREFIXES = ("loss.perceptual_loss.", "perceptual_loss.")


def vgg16_features() -> list[nn.Module]:
    """torchvision's `vgg16().features[:30]` as a list (conv 3x3 pad 1, ReLU, max-pool 2)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU()]
            channels = int(item)
    return layers


class ScalingLayer(nn.Module):
    """[-1, 1] RGB -> the input statistics the LPIPS VGG was calibrated with."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGG16Slices(nn.Module):
    """The five VGG16 stages; `forward` returns their last ReLU outputs."""

    def __init__(self) -> None:
        super().__init__()
        features = vgg16_features()
        for k, (start, end) in enumerate(SLICES, start=1):
            stage = nn.Sequential()
            for index in range(start, end):
                stage.add_module(str(index), features[index])
            setattr(self, f"slice{k}", stage)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k in range(1, len(SLICES) + 1):
            x = getattr(self, f"slice{k}")(x)
            outs.append(x)
        return outs


class NetLinLayer(nn.Module):
    """Dropout then a 1x1 conv C -> 1 without bias (keys `model.1.weight`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Learned perceptual distance: (x, y) (B, 3, H, W) in [-1, 1] -> (B, 1, 1, 1) >= 0."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for k, channels in enumerate(CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats_x = self.net(self.scaling_layer(x))
        feats_y = self.net(self.scaling_layer(y))
        total = torch.zeros((), device=x.device)
        for k, (fx, fy) in enumerate(zip(feats_x, feats_y, strict=True)):
            diff = (_unit(fx) - _unit(fy)) ** 2  # (B, C_k, h, w)
            total = total + getattr(self, f"lin{k}").model(diff).mean(dim=(2, 3), keepdim=True)
        return total


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Normalise each position's feature vector to unit length (dim 1)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients (gradients still flow to the inputs)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_lpips(path: str | Path) -> LPIPS:
    """A frozen LPIPS (eval mode, CPU) with every weight read from `path`, strictly.

    The file holds the full LPIPS state dict (VGG16 slices, lin layers, scaling buffers), bare
    or under `loss.perceptual_loss.` / `perceptual_loss.` (a taming VQGAN checkpoint works;
    keys without the prefix are then ignored). Raises CheckpointError for a missing, unsafe
    or mismatching file.
    """
    state = checkpoint.read_state_dict(path)
    tensors = state.tensors
    for prefix in PREFIXES:
        picked = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if picked:
            tensors = picked
            break
    model = LPIPS()
    checkpoint.load_into(
        model,
        checkpoint.StateDict(tensors, state.sha256, state.path),
        "LPIPS (VGG16 slices + lin layers, as in a taming checkpoint's loss.perceptual_loss.*)",
        drop_prefixes=(),
    )
    log.info("LPIPS loaded from %s (sha256 %s)", path, state.sha256[:12])
    return freeze(model)
