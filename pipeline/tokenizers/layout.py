"""TokenLayout: the one owner of the token vocabulary and the joint sequence.

Per modality: codebook size C, id grid (rows, cols) in row-major order, and the [MASK] id, which
is C (the extra row of that modality's embedding table). The transformer's sequence is the audio
ids followed by the image ids, `[a, v]` as in the paper; no other code does id arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODALITIES = ("audio", "image")


@dataclass(frozen=True)
class ModalityLayout:
    name: str
    codebook_size: int
    grid: tuple[int, int]

    def __post_init__(self) -> None:
        if self.name not in MODALITIES:
            raise ValueError(f"unknown modality {self.name!r}")
        if self.codebook_size < 2 or min(self.grid) < 1:
            raise ValueError(f"{self.name}: codebook size and grid must be positive")

    @property
    def length(self) -> int:
        """Tokens per example (rows x cols)."""
        return self.grid[0] * self.grid[1]

    @property
    def mask_id(self) -> int:
        """The [MASK] id: one past the last code."""
        return self.codebook_size

    @property
    def vocab_size(self) -> int:
        """Rows of this modality's embedding table: the codes plus [MASK]."""
        return self.codebook_size + 1


@dataclass(frozen=True)
class TokenLayout:
    audio: ModalityLayout
    image: ModalityLayout

    def __post_init__(self) -> None:
        if self.audio.name != "audio" or self.image.name != "image":
            raise ValueError("TokenLayout needs an audio and an image ModalityLayout")

    def modality(self, name: str) -> ModalityLayout:
        if name not in MODALITIES:
            raise ValueError(f"unknown modality {name!r}")
        return getattr(self, name)

    @property
    def seq_len(self) -> int:
        return self.audio.length + self.image.length

    def span(self, name: str) -> slice:
        """Positions of modality `name` in the joint sequence [audio, image]."""
        if name == "audio":
            return slice(0, self.audio.length)
        return slice(self.audio.length, self.seq_len)

    def to_dict(self) -> dict[str, Any]:
        return {
            m.name: {"codebook_size": m.codebook_size, "grid": list(m.grid), "mask_id": m.mask_id}
            for m in (self.audio, self.image)
        } | {"order": list(MODALITIES), "seq_len": self.seq_len}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenLayout:
        """Inverse of `to_dict`; checks that the stored mask ids agree."""
        parts = {}
        for name in MODALITIES:
            d = data[name]
            parts[name] = ModalityLayout(name, int(d["codebook_size"]), tuple(d["grid"]))
            if "mask_id" in d and d["mask_id"] != parts[name].mask_id:
                raise ValueError(f"{name}: stored mask id {d['mask_id']} != codebook size")
        return cls(**parts)
