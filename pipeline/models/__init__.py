"""The unified masked generative transformer."""

from pipeline.models.transformer import PAPER_MODEL, AudioVisualTransformer, count_parameters

__all__ = ["PAPER_MODEL", "AudioVisualTransformer", "count_parameters"]
