"""FLOPs of one training sample of the transformer (docs/references.md, "The transformer's size and cost").

One multiply-add is 2 FLOPs. A pre-LN block over L tokens of width d with MLP ratio r costs
(8 + 4r)·L·d² in its matrix products (QKV 6, projection 2, MLP 4r) plus 4·L²·d in attention
(QKᵀ and AV); norms, softmax and embeddings are ignored. Training = 3 × forward (the backward
pass costs two forwards), without recomputation: activation checkpointing adds one more encoder
and decoder forward, which is *not* counted as useful work in MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ModelConfig
from pipeline.masking import drop_count
from pipeline.tokenizers.layout import MODALITIES, TokenLayout


def block_flops(length: int, width: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one block."""
    return (8 + 4 * mlp_ratio) * length * width**2 + 4 * length**2 * width


@dataclass(frozen=True)
class FlopCount:
    encoder: float
    decoder: float
    head: float

    @property
    def forward(self) -> float:
        return self.encoder + self.decoder + self.head

    @property
    def training(self) -> float:
        return 3 * self.forward


def flops_per_sample(cfg: ModelConfig, layout: TokenLayout, drop_ratio: float) -> FlopCount:
    """Forward FLOPs per sample when `drop_ratio` of each modality is dropped (0: decoding)."""
    length = layout.seq_len
    kept = length - sum(drop_count(drop_ratio, layout.modality(m).length) for m in MODALITIES)
    d, dd = cfg.embed_dim, cfg.decoder_embed_dim
    encoder = cfg.depth * block_flops(kept, d, cfg.mlp_ratio)
    decoder = cfg.decoder_depth * block_flops(length, dd, cfg.mlp_ratio)
    logits = sum(
        2 * layout.modality(m).length * d * layout.modality(m).codebook_size for m in MODALITIES
    )
    head = 2 * kept * d * dd + 2 * length * dd * d + logits
    return FlopCount(encoder, decoder, head)
