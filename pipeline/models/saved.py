"""Loading an exported transformer (`models/transformer/`): it rebuilds from its meta.json alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoint
from pipeline.config import ModelConfig
from pipeline.models.transformer import AudioVisualTransformer
from pipeline.tokenizers.layout import TokenLayout


def load_transformer(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[AudioVisualTransformer, dict[str, Any]]:
    """Rebuild the exported model from its meta.json alone and load the weights strictly."""
    state, meta = checkpoint.load(folder)
    model = AudioVisualTransformer(
        ModelConfig(**meta["model"]), TokenLayout.from_dict(meta["layout"])
    )
    checkpoint.load_into(model, state, "transformer", drop_prefixes=())
    return model.to(device).eval(), meta
