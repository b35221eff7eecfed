"""What the paper-protocol extractors share: reading an official weights file, strict loading,
device choice.

Official files are read through `pipeline.checkpoint.read_state_dict`, which says what a file may
hold (tensors, plain containers, NumPy arrays such as PANNs' sampler state, inert stand-ins for
other classes) and refuses anything that could run code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from pipeline.checkpoint import CheckpointError, StateDict, load_into, read_state_dict


def read_official(path: str | Path, keep_prefixes: Iterable[str] | None = None) -> StateDict:
    """The flat state dict of an official weights file, optionally only keys under prefixes.

    Raises CheckpointError for a missing, corrupt or code-carrying file.
    """
    state = read_state_dict(path)
    if keep_prefixes is None:
        return state
    keep = tuple(keep_prefixes)
    tensors = {k: v for k, v in state.tensors.items() if k.startswith(keep)}
    if not tensors:
        raise CheckpointError(
            f"checkpoint {state.path} holds no keys under {', '.join(keep)}: "
            "it is not the expected official file"
        )
    return StateDict(tensors, state.sha256, state.path)


def load_strict(model: nn.Module, state: StateDict, what: str) -> None:
    """Load every key of `state` into `model` (names and shapes must match exactly)."""
    load_into(model, state, what, drop_prefixes=())


def empty_model(factory: Callable[[], nn.Module]) -> nn.Module:
    """`factory()` with uninitialised CPU storage: built on the meta device, so no random init.

    Only for a model whose every parameter and buffer is then overwritten by `load_strict`.
    """
    with torch.device("meta"):
        model = factory()
    return model.to_empty(device="cpu")


def as_device(device: str | torch.device | None) -> torch.device:
    """`device`, or the CPU when None."""
    return torch.device("cpu") if device is None else torch.device(device)


def one_clip(wave: ArrayLike | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A mono clip given as (T,) or (1, T), as a (1, T) float32 tensor on `device`."""
    x = wave.detach() if isinstance(wave, torch.Tensor) else torch.as_tensor(np.asarray(wave))
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1 or x.shape[0] < 1:
        raise ValueError(f"one mono clip, (T,) or (1, T), expected; got shape {tuple(x.shape)}")
    return x.to(device, torch.float32)[None]


class OfficialExtractor:
    """Base of the extractor classes: the network in eval mode (float32) on a device, and the
    sha256 of the file it was loaded from (None for a network built in memory)."""

    def __init__(
        self, model: nn.Module, sha256: str | None = None, device: str | torch.device | None = None
    ) -> None:
        self.device = as_device(device)
        self.model = model.float().to(self.device).eval()
        self.sha256 = sha256


@runtime_checkable
class Extractor(Protocol):
    """What the evaluator needs from every extractor (audio ones also have `sample_rate`)."""

    name: str
    dim: int
    sha256: str | None

    def embed(self, item: Any) -> np.ndarray: ...
