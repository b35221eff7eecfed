"""Autoregressive sampling speed of an Im2Wav-sized prior: seconds per second of generated audio.

    python bench/im2wav_sampler.py [--device auto] [--seconds 4.096] [--batch 1] [--tokens N]
                                   [--precision auto] [--dense] [--threads N] [--json F]

What it stands for (every size below: docs/references.md, "Im2Wav, for the speed comparison"): two cascaded
decoder-only transformers sampled token by token. "Low" generates the coarse VQ-VAE level
(hop 32 at 16 kHz: 500 tokens per second of audio, n_ctx 2,048); "Up" the fine level (hop 8:
2,000 tokens/s, n_ctx 8,192); one 4.096 s clip is 2,048 + 8,192 = 10,240 sequential steps. Each
is 48 pre-LN blocks of width 1,024 with 1 head, Jukebox's `m_attn 0.25` (q, k, v of width 256)
and `m_mlp 1.0` (MLP width 1,024), ≈ 3·d² parameters per block, over 2,048 codes per level.
Factorised attention `attn_order 2, blocks 64` (the published configuration's numbers; which pattern each layer
gets is Jukebox's, not stated there): even blocks attend within their block of n_ctx / 64
positions (32 for Low, 128 for Up), odd blocks to the earlier positions at the same offset of
every block (stride n_ctx / 64); `--dense` attends to the whole prefix instead. Low
samples with classifier-free guidance (cfg_s 3: its batch is doubled, the unconditional rows
starting from a null embedding instead of the image's); Up without (its training command has
none).

Here: random weights, a KV cache per block (one `scaled_dot_product_attention` of the new query
against the cached keys and values per block and token), a multinomial draw from the softmax.
Left out, so the time is a lower bound on Im2Wav's: the CLIP image encoder (the condition is one
random vector), Up's conditioner on the upsampled coarse tokens (`cond_width 512, cond_depth
16`, run once per window, not per token) and the VQ-VAE decode. Weights are cast to the
precision (auto: bf16 on a recent GPU, fp32 on CPU) rather than autocast per step.

Timing: per level, a few warm-up tokens, then the first `--tokens` tokens (default: all of them
on CUDA, 64 on CPU) timed from position 0 and ended by a device synchronisation. When fewer
than the level's tokens are timed, its time is extrapolated linearly per token, and the output
says so: per-token cost is nearly flat under factorised attention (at most 128 keys), but grows
with the prefix under `--dense`, where the extrapolation underestimates. Seconds per second of
audio = the two levels' time / (batch x seconds), the figure bench/generate.py compares with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.devices import AUTOCAST_DTYPES, choose_precision, resolve_device  # noqa: E402

SAMPLE_RATE = 16_000
CLIP_SECONDS = 65_536 / SAMPLE_RATE  # `sample_length 65536`: 4.096 s, one context window
GUIDANCE = 3.0  # cfg_s
WARMUP_TOKENS = 4
CPU_TOKENS = 64


@dataclass(frozen=True)
class PriorConfig:
    """One of Im2Wav's two priors (docs/references.md)."""

    name: str
    hop: int  # waveform samples per token of this VQ-VAE level
    n_ctx: int
    guided: bool
    codes: int = 2048
    width: int = 1024
    depth: int = 48
    heads: int = 1
    attn_width: int = 256  # m_attn 0.25 x width
    mlp_width: int = 1024  # m_mlp 1.0 x width
    blocks: int = 64  # factorised attention: n_ctx / blocks positions per block

    @property
    def tokens_per_second(self) -> float:
        return SAMPLE_RATE / self.hop

    @property
    def block_len(self) -> int:
        return self.n_ctx // self.blocks


LOW = PriorConfig("Low", hop=32, n_ctx=2048, guided=True)
UP = PriorConfig("Up", hop=8, n_ctx=8192, guided=False)


class Block(nn.Module):
    """Pre-LN block, one new token at a time against its KV cache."""

    def __init__(self, cfg: PriorConfig, layer: int, dense: bool) -> None:
        super().__init__()
        self.heads, self.block_len = cfg.heads, cfg.block_len
        # attn_order 2: block attention on even layers, transposed (strided) on odd ones.
        self.pattern = "dense" if dense else ("block", "transpose")[layer % 2]
        self.norm1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.attn_width)
        self.proj = nn.Linear(cfg.attn_width, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def visible(self, t: int) -> slice:
        """Cache positions the token at position t attends to (itself included)."""
        if self.pattern == "dense":
            return slice(0, t + 1)
        if self.pattern == "block":
            return slice(t - t % self.block_len, t + 1)
        return slice(t % self.block_len, t + 1, self.block_len)

    def forward(self, x: torch.Tensor, cache: torch.Tensor, t: int) -> torch.Tensor:
        """x: (B, 1, d) the token at position t; cache: (2, B, nh, T, hs) keys and values,
        written at t."""
        b = x.shape[0]
        # (B, 1, 3, nh, hs) -> 3 x (B, nh, 1, hs)
        q, k, v = self.qkv(self.norm1(x)).view(b, 1, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        cache[0, :, :, t] = k[:, :, 0]
        cache[1, :, :, t] = v[:, :, 0]
        seen = self.visible(t)
        # Every visible position is at or before t: no causal mask is needed.
        y = F.scaled_dot_product_attention(q, cache[0, :, :, seen], cache[1, :, :, seen])
        x = x + self.proj(y.transpose(1, 2).reshape(b, 1, -1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Prior(nn.Module):
    """Decoder-only transformer over one VQ-VAE level: ids in, next-id logits out."""

    def __init__(self, cfg: PriorConfig, dense: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.codes, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(cfg.n_ctx, cfg.width) * 0.01)
        # The first input: the image's embedding for conditional rows, this one for the
        # unconditional rows of guidance.
        self.null_condition = nn.Parameter(torch.randn(cfg.width) * 0.01)
        self.blocks = nn.ModuleList(Block(cfg, i, dense) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.codes, bias=False)

    def empty_cache(self, rows: int, length: int) -> torch.Tensor:
        """(depth, 2, rows, nh, length, hs): keys and values of every block."""
        c = self.cfg
        w = self.head.weight
        shape = (c.depth, 2, rows, c.heads, length, c.attn_width // c.heads)
        return torch.empty(shape, dtype=w.dtype, device=w.device)

    def step(self, x: torch.Tensor, cache: torch.Tensor, t: int) -> torch.Tensor:
        """x: (B, 1, d) input embedding at position t -> (B, codes) float32 logits."""
        x = x + self.pos_embed[t]
        for block, block_cache in zip(self.blocks, cache, strict=True):
            x = block(x, block_cache, t)
        return self.head(self.norm(x))[:, 0].float()


@torch.no_grad()
def sample(
    prior: Prior, condition: torch.Tensor, tokens: int, generator: torch.Generator
) -> torch.Tensor:
    """The first `tokens` ids of each row, (B, tokens) int64. condition: (B, d) the image
    embedding; with guidance the batch runs twice, the second half unconditioned."""
    b = condition.shape[0]
    guided = prior.cfg.guided
    x = condition
    if guided:
        x = torch.cat([condition, prior.null_condition.expand(b, -1).to(condition.dtype)])
    x = x.unsqueeze(1)  # (rows, 1, d)
    cache = prior.empty_cache(x.shape[0], tokens)
    out = torch.empty(b, tokens, dtype=torch.long, device=condition.device)
    for t in range(tokens):
        logits = prior.step(x, cache, t)
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + GUIDANCE * (cond - uncond)
        ids = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
        out[:, t] = ids[:, 0]
        x = prior.token_embed(ids.repeat(2, 1) if guided else ids)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_level(
    cfg: PriorConfig,
    needed: int,
    timed: int,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    dense: bool,
) -> tuple[float, int]:
    """Seconds to sample `needed` tokens of this level (extrapolated when `timed` < `needed`),
    and the parameter count."""
    torch.manual_seed(0)
    prior = Prior(cfg, dense).to(device=device, dtype=dtype).eval()
    condition = torch.randn(batch, cfg.width, device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    sample(prior, condition, min(WARMUP_TOKENS, timed), generator)
    sync(device)
    start = time.perf_counter()
    sample(prior, condition, timed, generator)
    sync(device)
    seconds = (time.perf_counter() - start) / timed * needed
    return seconds, sum(p.numel() for p in prior.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--seconds",
        type=float,
        default=CLIP_SECONDS,
        help=f"audio to generate, at most one window of {CLIP_SECONDS} s",
    )
    ap.add_argument("--batch", type=int, default=1, help="clips sampled together")
    ap.add_argument(
        "--tokens", type=int, help="time only the first N tokens of each level (CPU default 64)"
    )
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--dense", action="store_true", help="attend to the whole prefix")
    ap.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's, one per core)"
    )
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    if not 0 < args.seconds <= CLIP_SECONDS:
        raise SystemExit(
            f"--seconds must be in (0, {CLIP_SECONDS}]: longer audio is sampled window by "
            "window, at about the same seconds per second of audio"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    precision = choose_precision(args.precision, device)
    dtype = AUTOCAST_DTYPES.get(precision, torch.float32)
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    limit = args.tokens if args.tokens is not None else (None if on_cuda else CPU_TOKENS)

    levels = []
    for cfg in (LOW, UP):
        needed = max(1, round(args.seconds * cfg.tokens_per_second))
        timed = needed if limit is None else min(limit, needed)
        seconds, parameters = time_level(cfg, needed, timed, args.batch, dtype, device, args.dense)
        levels.append(
            {
                "level": cfg.name,
                "parameters": parameters,
                "guided": cfg.guided,
                "tokens": needed,
                "tokens_timed": timed,
                "ms_per_token": round(seconds / needed * 1e3, 3),
                "seconds": round(seconds, 3),
                "extrapolated": timed < needed,
            }
        )
    total = sum(level["seconds"] for level in levels)
    per_audio_second = total / (args.batch * args.seconds)
    extrapolated = any(level["extrapolated"] for level in levels)
    result = {
        "device": name,
        "precision": precision,
        "attention": "dense" if args.dense else "factorised",
        "batch": args.batch,
        "audio_seconds": args.seconds,
        "levels": levels,
        "seconds": round(total, 3),
        "s_per_audio_second": round(per_audio_second, 4),
        "extrapolated": extrapolated,
    }
    load = (
        f" ({torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} cores)"
        if not on_cuda
        else ""
    )
    parts = ", ".join(
        f"{lv['level']} {lv['tokens']:,} tokens{' CFG' if lv['guided'] else ''} "
        f"{lv['ms_per_token']:.2f} ms/token"
        + (f" (first {lv['tokens_timed']} timed)" if lv["extrapolated"] else "")
        for lv in levels
    )
    sizes = " + ".join(f"{lv['parameters'] / 1e6:.1f}M" for lv in levels)
    how = (
        "EXTRAPOLATED linearly per token from the timed tokens"
        if extrapolated
        else "all tokens measured"
    )
    print(
        f"Im2Wav-size priors ({sizes} params, "
        f"{result['attention']} attention, random weights) batch {args.batch} {precision} on "
        f"{name}{load}: {parts}; {total:.1f} s for {args.seconds:g} s of audio x {args.batch}: "
        f"{per_audio_second:.3g} s per second of audio ({how}; conditioner, CLIP and VQ-VAE "
        "decode left out)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
