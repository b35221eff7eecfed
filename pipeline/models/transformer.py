"""The unified audio-visual masked generative transformer (paper §3.3): ids in, logits out.

Sequence: the audio ids then the image ids, `[a, v]` (TokenLayout). Per modality an embedding
table of C + 1 rows (the last is that modality's [MASK]), a learnable positional embedding and a
modality embedding, added before the encoder and again before the decoder. The encoder (pre-LN
ViT blocks) sees only the kept positions; before the decoder every dropped or masked position is
replaced by one learnable mask embedding shared by both modalities. The head is MAGE's MlmLayer
(Linear → GELU → LayerNorm) and the logits are the dot product with the modality's embedding
table (codes only, no [MASK] row) plus a bias. No loss, no I/O: see `pipeline.training.objective`
for the loss and `pipeline.models.saved` for the reading `from_pretrained` hands on.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig
from pipeline.tokenizers.layout import MODALITIES, TokenLayout

LN_EPS = 1e-6  # as MAGE / timm ViT


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_dropout: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (B, N, 3, nh, hs) -> 3 x (B, nh, N, hs)
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN ViT block: 12·d² + 13·d parameters at MLP ratio 4."""

    def __init__(self, dim: int, num_heads: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """Blocks then a final LayerNorm, optionally recomputing activations in the backward pass."""

    def __init__(self, dim: int, depth: int, num_heads: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, cfg) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.checkpointing = cfg.activation_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


class AudioVisualTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: TokenLayout) -> None:
        super().__init__()
        self.cfg, self.layout = cfg, layout
        d, dd, seq = cfg.embed_dim, cfg.decoder_embed_dim, layout.seq_len
        self.token_embed = nn.ModuleDict(
            {m: nn.Embedding(layout.modality(m).vocab_size, d) for m in MODALITIES}
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, seq, d))
        self.modality_embed = nn.Parameter(torch.zeros(len(MODALITIES), d))
        self.embed_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.encoder = Stack(d, cfg.depth, cfg.num_heads, cfg)

        self.decoder_embed = nn.Linear(d, dd)
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, seq, dd))
        self.decoder_modality_embed = nn.Parameter(torch.zeros(len(MODALITIES), dd))
        self.decoder = Stack(dd, cfg.decoder_depth, cfg.decoder_num_heads, cfg)

        self.head_fc = nn.Linear(dd, d)
        self.head_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.head_bias = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(layout.modality(m).codebook_size)) for m in MODALITIES}
        )
        # Modality index of each position of [a, v]; not a parameter, not saved.
        modality = torch.cat(
            [torch.full((layout.modality(m).length,), i) for i, m in enumerate(MODALITIES)]
        )
        self.register_buffer("modality_index", modality, persistent=False)
        self.reset_parameters()

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu"
    ) -> AudioVisualTransformer:
        """The model saved in `folder` (model.safetensors + config.json), rebuilt from its
        config alone, in eval mode on `device`. The reading is `pipeline.models.saved`'s."""
        from pipeline.models.saved import load_transformer

        return load_transformer(folder, device)[0]

    def reset_parameters(self) -> None:
        """MAGE's init: xavier-uniform Linear weights, zero biases, N(0, 0.02) embeddings."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for p in (
            self.pos_embed,
            self.modality_embed,
            self.mask_embed,
            self.decoder_pos_embed,
            self.decoder_modality_embed,
        ):
            nn.init.normal_(p, std=0.02)
        for bias in self.head_bias.values():
            nn.init.zeros_(bias)

    def forward(
        self,
        audio_ids: torch.Tensor,
        image_ids: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Logits for every position.

        audio_ids: (B, L_a), image_ids: (B, L_v) int64, [MASK] ids where masked.
        keep: (B, L_a + L_v) bool, the positions the encoder sees, the same count in every row
            (None: all, as in decoding).
        Returns {"audio": (B, L_a, C_a), "image": (B, L_v, C_v)} logits.
        """
        latent, hidden = self.forward_encoder({"audio": audio_ids, "image": image_ids}, keep)
        return self.forward_decoder(latent, hidden, keep)

    def forward_encoder(
        self, ids: dict[str, torch.Tensor], keep: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder over the kept positions: (latent (B, L_kept, d), hidden (B, L) bool, the
        positions the decoder fills with the mask embedding: [MASK] ids and dropped ones)."""
        hidden = torch.cat([ids[m] == self.layout.modality(m).mask_id for m in MODALITIES], 1)
        x = torch.cat([self.token_embed[m](ids[m]) for m in MODALITIES], dim=1)  # (B, L, d)
        x = x + self.pos_embed + self.modality_embed[self.modality_index]  # (B, L, d)
        x = self.embed_drop(self.embed_norm(x))
        if keep is not None:
            b, kept = x.shape[0], int(keep[0].sum())
            x = x[keep].view(b, kept, -1)  # (B, L_kept, d), sequence order preserved
            hidden = hidden | ~keep
        return self.encoder(x), hidden

    def forward_decoder(
        self, latent: torch.Tensor, hidden: torch.Tensor, keep: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """latent (B, L_kept, d) back to all L positions, decoded to per-modality logits."""
        x = self.decoder_embed(latent)  # (B, L_kept, dd)
        if keep is not None:
            full = x.new_zeros(*hidden.shape, x.shape[-1])  # (B, L, dd)
            x = full.masked_scatter(keep.unsqueeze(-1), x)
        x = torch.where(hidden.unsqueeze(-1), self.mask_embed.to(x.dtype), x)  # (B, L, dd)
        x = x + self.decoder_pos_embed + self.decoder_modality_embed[self.modality_index]
        h = self.head_norm(F.gelu(self.head_fc(self.decoder(x))))  # (B, L, d)
        logits = {}
        for m in MODALITIES:
            table = self.token_embed[m].weight[: self.layout.modality(m).codebook_size]  # (C, d)
            if self.cfg.detach_head_embedding:
                table = table.detach()
            logits[m] = h[:, self.layout.span(m)] @ table.t() + self.head_bias[m]  # (B, L_m, C)
        return logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
