"""The VQGAN of taming-transformers, shared by the image and the audio tokenizer.

One implementation, parameterised by `VQGANConfig`, with the exact module names of the official
checkpoints, so that `vqgan_imagenet_f16_1024` (RGB 256x256 -> 16x16 ids) and SpecVQGAN's
`vggsound_codebook` (mel 80x848 -> 5x53 ids) load strictly once their training-only `loss.*`
keys are dropped. Small configs for the CPU demo use the same code.

Layout: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder. GroupNorm(32), swish,
single-head attention at the resolutions in `attn_resolutions` (tracked along the last axis, as
the originals do), no output activation. Inputs and outputs are in [-1, 1].

`temporal=True` is the CPU demo's rhythm codec, not an official layout: the same blocks with
1x3 kernels over a mel whose bands are the input channels, so only time is downsampled and each
id stands for every band of 2^(levels - 1) frames (80x848 -> 1x212 ids with three levels). Why:
docs/experiments.md, "A codec that keeps the rhythm".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VQGANConfig:
    """Architecture of one VQGAN (taming's `ddconfig` plus the codebook)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups: 32 in the originals; fewer lets CPU demos go narrow
    temporal: bool = False  # a 1-D codec over time, in_channels = mel bands (module doc)

    def __post_init__(self) -> None:
        g = self.norm_groups
        if self.ch % g or any((self.ch * m) % g for m in self.ch_mult) or self.z_channels % g:
            raise ValueError(f"every VQGAN channel count must be a multiple of norm_groups ({g})")

    @property
    def sample_channels(self) -> int:
        """Channels of the inputs and reconstructions (a temporal codec's mel has one)."""
        return 1 if self.temporal else self.out_channels

    @property
    def downsampling(self) -> int:
        """Spatial reduction factor: 2 per level after the first."""
        return 2 ** (len(self.ch_mult) - 1)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid for an input of `height` x `width` (a temporal codec's height is its bands)."""
        f = self.downsampling
        if self.temporal:
            if height != self.in_channels or width % f:
                raise ValueError(
                    f"input {height}x{width} does not suit a temporal codec of {self.in_channels} "
                    f"bands and downsampling {f}"
                )
            return 1, width // f
        if height % f or width % f:
            raise ValueError(f"input {height}x{width} is not divisible by the downsampling {f}")
        return height // f, width // f


# The official configurations (docs/references.md, "Official tokenizer and vocoder configurations").
IMAGENET_F16_1024 = VQGANConfig()
VGGSOUND_CODEBOOK = VQGANConfig(
    in_channels=1, out_channels=1, resolution=848, attn_resolutions=(53,)
)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    # taming writes x * sigmoid(x); F.silu is the same function in one fused kernel.
    return F.silu(x)


def _conv3(in_channels: int, out_channels: int, temporal: bool) -> nn.Conv2d:
    """A 3x3 convolution keeping the size (1x3 along time for a temporal codec)."""
    if temporal:
        return nn.Conv2d(in_channels, out_channels, (1, 3), padding=(0, 1))
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResnetBlock(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, dropout: float, groups: int, temporal: bool
    ) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = _conv3(in_channels, out_channels, temporal)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3(out_channels, out_channels, temporal)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, through 1x1 convolutions."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, 1, HW, C): one head; SDPA scales by C^-0.5 like the original's explicit softmax.
        q, k, v = (t(n).reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        kernel, stride = ((1, 3), (1, 2)) if temporal else (3, 2)
        self.conv = nn.Conv2d(channels, channels, kernel, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric pad, as taming
        return self.conv(F.pad(x, (0, 1, 0, 0) if self.temporal else (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.scale = (1.0, 2.0) if temporal else (2.0, 2.0)
        self.conv = _conv3(channels, channels, temporal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block`, `attn` and an optional `downsample`/`upsample`."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float, groups: int, temporal: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups, temporal)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups, temporal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        g, t = cfg.norm_groups, cfg.temporal
        self.conv_in = _conv3(cfg.in_channels, cfg.ch, t)
        mults = (1, *cfg.ch_mult)
        curr_res = cfg.resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            stage = _Level()
            block_in = cfg.ch * mults[level]
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, cfg.ch * mult, cfg.dropout, g, t))
                block_in = cfg.ch * mult
                if curr_res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, g))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in, t)
                curr_res //= 2
            self.down.append(stage)
        self.mid = _Mid(block_in, cfg.dropout, g, t)
        self.norm_out = _norm(block_in, g)
        self.conv_out = _conv3(block_in, cfg.z_channels, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        g, t = cfg.norm_groups, cfg.temporal
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.resolution // cfg.downsampling
        self.conv_in = _conv3(cfg.z_channels, block_in, t)
        self.mid = _Mid(block_in, cfg.dropout, g, t)
        levels: list[_Level] = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = _Level()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, cfg.dropout, g, t))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, g))
            if level != 0:
                stage.upsample = Upsample(block_in, t)
                curr_res *= 2
            levels.insert(0, stage)
        self.up = nn.ModuleList(levels)  # up[0] is the finest level, as in the checkpoints
        self.norm_out = _norm(block_in, g)
        self.conv_out = _conv3(block_in, cfg.out_channels, t)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation; the key name `quantize.embedding.weight` is the checkpoints'."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, D, h, w) -> ids (B, h, w) int64, argmin of squared distance."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        e = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return dist.argmin(dim=1).reshape(b, h, w)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) -> z_q (B, D, h, w)."""
        return self.embedding(ids).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (z_q with straight-through gradient, codebook + commitment loss, ids)."""
        ids = self.indices(z)
        z_q = self.lookup(ids)
        # taming's "legacy" placement of beta: codebook term plus beta x commitment term.
        loss = F.mse_loss(z_q.detach(), z) + self.beta * F.mse_loss(z_q, z.detach())
        return z + (z_q - z).detach(), loss, ids


class VQModel(nn.Module):
    """encoder -> quant_conv -> quantize -> post_quant_conv -> decoder."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> pre-quantisation latent (B, D, h, w)."""
        if self.config.temporal:  # (B, 1, bands, T) -> bands as channels (B, bands, 1, T)
            x = x.reshape(x.shape[0], -1, 1, x.shape[-1])
        return self.quant_conv(self.encoder(x))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> ids (B, h, w) int64, row-major over the grid."""
        return self.quantize.indices(self.encode_latent(x))

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.post_quant_conv(z_q))
        if self.config.temporal:  # (B, bands, 1, T) -> a mel (B, 1, bands, T)
            out = out.reshape(out.shape[0], 1, -1, out.shape[-1])
        return out

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) -> reconstruction (B, C, H, W), roughly in [-1, 1] (not clamped)."""
        return self.decode_latent(self.quantize.lookup(ids))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction, quantiser loss, ids)."""
        z_q, q_loss, ids = self.quantize(self.encode_latent(x))
        return self.decode_latent(z_q), q_loss, ids
