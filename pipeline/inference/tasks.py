"""The generation tasks as (known positions, guidance condition) for the `Unmasker`.

- image→audio: all image ids known, all audio ids generated, guided by the image.
- audio→image: the symmetric one.
- co-generation: nothing known, both generated together, no guidance (there is no condition).
- audio inpainting / outpainting: the image and the audio outside a time span known; the span
  (columns of the 5×53 audio grid) generated, guided by the image. Image inpainting: a box of the
  image grid generated, guided by the audio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.tokenizers.layout import MODALITIES, ModalityLayout, TokenLayout

TASKS = ("image2audio", "audio2image", "cogenerate", "inpaint_audio", "inpaint_image")


@dataclass(frozen=True)
class TaskSpec:
    """known: {"audio": (L_a,), "image": (L_v,)} bool; condition: the guiding modality or None."""

    name: str
    known: dict[str, torch.Tensor]
    condition: str | None

    def batch_known(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {m: k.to(device).expand(batch, -1) for m, k in self.known.items()}


def grid_region(
    modality: ModalityLayout, rows: tuple[int, int] | None, cols: tuple[int, int] | None
) -> torch.Tensor:
    """Bool (L,) over a modality's row-major grid: True inside rows [r0, r1) x cols [c0, c1)."""
    r, c = modality.grid
    r0, r1 = rows if rows is not None else (0, r)
    c0, c1 = cols if cols is not None else (0, c)
    inside = torch.zeros(r, c, dtype=torch.bool)
    inside[r0:r1, c0:c1] = True
    return inside.reshape(-1)


def time_columns(modality: ModalityLayout, start: float, end: float) -> tuple[int, int]:
    """Audio grid columns covering [start, end) as fractions of the clip (0..1), widened to
    whole columns: each of the 53 columns is 16 mel frames, about 0.19 s of 10 s."""
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"span [{start}, {end}) must satisfy 0 <= start < end <= 1")
    cols = modality.grid[1]
    return math.floor(start * cols), max(math.floor(start * cols) + 1, math.ceil(end * cols))


def task(
    name: str,
    layout: TokenLayout,
    audio_span: tuple[float, float] | None = None,
    image_box: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> TaskSpec:
    """The TaskSpec of `name` (one of TASKS). audio_span: (start, end) fractions of the clip for
    inpaint_audio; image_box: ((r0, r1), (c0, c1)) grid cells for inpaint_image."""
    everything = {m: torch.ones(layout.modality(m).length, dtype=torch.bool) for m in MODALITIES}
    nothing = {m: ~v for m, v in everything.items()}
    if name == "image2audio":
        return TaskSpec(name, {"audio": nothing["audio"], "image": everything["image"]}, "image")
    if name == "audio2image":
        return TaskSpec(name, {"audio": everything["audio"], "image": nothing["image"]}, "audio")
    if name == "cogenerate":
        return TaskSpec(name, nothing, None)
    if name == "inpaint_audio":
        if audio_span is None:
            raise ValueError("inpaint_audio needs audio_span=(start, end)")
        cols = time_columns(layout.audio, *audio_span)
        hole = grid_region(layout.audio, None, cols)
        return TaskSpec(name, {"audio": ~hole, "image": everything["image"]}, "image")
    if name == "inpaint_image":
        if image_box is None:
            raise ValueError("inpaint_image needs image_box=((r0, r1), (c0, c1))")
        hole = grid_region(layout.image, *image_box)
        return TaskSpec(name, {"audio": everything["audio"], "image": ~hole}, "audio")
    raise ValueError(f"unknown task {name!r}; one of {', '.join(TASKS)}")
