"""Loading a saved transformer (`models/transformer/`, or the `transformer/` of an exported
model): it rebuilds from its config.json alone (`pipeline.checkpoint`, either layout)."""

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
    """Rebuild the saved model from its config alone and load the weights strictly: (model in
    eval mode on `device`, config). CheckpointError for a folder that is not one, or weights
    that do not fit; KeyError or TypeError for a config without the model or layout."""
    state, config = checkpoint.load(folder, "transformer")
    model = AudioVisualTransformer(
        ModelConfig(**config["model"]), TokenLayout.from_dict(config["layout"])
    )
    checkpoint.load_into(model, state, "transformer", drop_prefixes=())
    return model.to(device).eval(), config
