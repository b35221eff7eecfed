"""The unified masked generative transformer."""

from pipeline.models.transformer import AudioVisualTransformer, count_parameters

__all__ = ["AudioVisualTransformer", "count_parameters"]
