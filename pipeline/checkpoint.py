"""Checkpoints: reading official weight files safely, and the project's weights + meta.json.

Every load goes through `safe_load`, i.e. `torch.load(weights_only=True)`: a file that needs code
execution to unpickle is refused. Official files come in several nestings (Lightning's `{"state_dict": ...}`,
a bare state dict, DDP's `module.` or torch.compile's `_orig_mod.` prefixes); `read_state_dict`
flattens them all. The project's own checkpoints are a folder with `weights.pt` (an unwrapped
state dict) and `meta.json` (model config, layout, step, source revision, sha256).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import io
from pipeline.errors import PipelineError

WEIGHTS_NAME = "weights.pt"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(PipelineError):
    """A checkpoint file that is missing, corrupt, unsafe or for another architecture."""


@dataclass(frozen=True)
class StateDict:
    """Tensors read from a file, with the file's sha256 for provenance."""

    tensors: dict[str, torch.Tensor]
    sha256: str
    path: str


def read_state_dict(path: str | Path) -> StateDict:
    """Load a weights file safely and return its flat state dict.

    Raises CheckpointError with one sentence for a missing, truncated, non-checkpoint or
    code-carrying (unsafe pickle) file.
    """
    path = Path(path)
    tensors = _flatten(safe_load(path))
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    return StateDict(tensors, io.sha256_file(path), str(path))


def safe_load(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU: tensors and plain containers only.

    The one place a checkpoint file is unpickled. Raises CheckpointError with one sentence for a
    missing, truncated or non-checkpoint file, and for one that needs code execution to load.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = _first_sentence(err)
        raise CheckpointError(
            f"checkpoint {path} was refused: it needs more than plain tensors to load "
            f"(weights_only=True: {first})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = _first_sentence(err)
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({first})") from None


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text.split(". ")[0].rstrip(".")


def _flatten(obj: Any) -> dict[str, torch.Tensor]:
    """Unwrap `{"state_dict": ...}` / `{"model": ...}` nesting and wrapper prefixes."""
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in ("state_dict", "model", "generator", "netG"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            break
    if not isinstance(obj, Mapping):
        return {}
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_into(
    model: nn.Module,
    state: StateDict,
    what: str,
    drop_prefixes: Iterable[str] = ("loss.",),
) -> None:
    """Load `state` into `model` strictly, after dropping training-only keys.

    A key or shape mismatch raises CheckpointError naming the first offending keys, so a
    checkpoint of another architecture or config is reported, not half-loaded.
    """
    drop = tuple(drop_prefixes)
    tensors = {k: v for k, v in state.tensors.items() if not k.startswith(drop)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(tensors[k].shape)}, "
            f"model {tuple(expected[k].shape)})"
        )
    if problems:
        raise CheckpointError(f"{state.path} does not fit the {what}: {'; '.join(problems)}")
    model.load_state_dict(tensors, strict=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save(folder: str | Path, model: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write `weights.pt` (unwrapped state dict) and `meta.json` (with its sha256) atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_NAME
    with io.atomic_path(weights) as tmp:
        torch.save(unwrap(model).state_dict(), tmp)
    io.write_json(folder / io.META_NAME, {**meta, "weights_sha256": io.sha256_file(weights)})
    return folder


def load(folder: str | Path) -> tuple[StateDict, dict[str, Any]]:
    """Read a project checkpoint folder: (state dict, meta). Checks the recorded sha256."""
    folder = Path(folder)
    meta_path = folder / io.META_NAME
    if not meta_path.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder (no {io.META_NAME})")
    meta = io.read_json(meta_path)
    state = read_state_dict(folder / WEIGHTS_NAME)
    if meta.get("weights_sha256") not in (None, state.sha256):
        raise CheckpointError(f"{folder / WEIGHTS_NAME} does not match the sha256 in {io.META_NAME}")
    return state, meta
