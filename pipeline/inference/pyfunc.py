"""The MLflow python_function face of the models the train stage logs: `mlflow.pyfunc.load_model`
imports this module (the MLmodel's `loader_module`) and calls `_load_pyfunc` with the folder of
the exported model (`pipeline.bundle`); nothing is unpickled.

    model = mlflow.pyfunc.load_model("runs:/<run_id>/model")
    waves = model.predict(["cat.jpg", "dog.png"])   # (2, samples) float32 at model.sample_rate

`visual-echoes image2audio --checkpoint runs:/<run_id>/model` reads the same folder without
MLflow's loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bundle import TOKENIZERS, TRANSFORMER
from pipeline.inference import inputs, settings
from pipeline.inference.generate import Generator


class ImageToAudio:
    """Sound for images with an exported model and its own generation settings (or, without
    them, those `settings.resolve` finds)."""

    def __init__(self, folder: str | Path, device: str | None = None) -> None:
        folder = Path(folder)
        found = settings.resolve(folder / TRANSFORMER)
        self.generator = Generator(folder / TRANSFORMER, folder / TOKENIZERS, found.config, device)
        self.sample_rate = self.generator.vocoder.mel.sample_rate

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """model_input: image or video file paths (a list, or a DataFrame whose first column
        holds them); params: {"seed": int}. Returns waveforms (n, samples) float32 in [-1, 1]."""
        if hasattr(model_input, "iloc"):  # a pandas DataFrame or Series
            model_input = model_input.iloc[:, 0] if model_input.ndim == 2 else model_input
        files = [Path(str(f)) for f in list(model_input)]
        extract = self.generator.extract_config
        images = np.stack([inputs.load_image(f, extract) for f in files])
        seed = int((params or {}).get("seed", 0))
        return self.generator.run("image2audio", images, seed=seed).waves


def _load_pyfunc(data_path: str) -> ImageToAudio:
    """What MLflow calls with the local copy of the logged model's data folder."""
    return ImageToAudio(data_path)
