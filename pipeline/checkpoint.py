"""Checkpoints: reading weight files safely, and the project's weights + meta.json.

Reading. `safe_load` is the one place a checkpoint file is unpickled, and nothing in a file is
ever imported or executed. Official files come as their authors' training code saved them
(docs/references.md, "Official weight files"): Lightning checkpoints whose `callbacks` are keyed
by the callback class (Lightning < 1.5) and whose `hyper_parameters` may hold OmegaConf
containers, PANNs' `{"iteration", "model", "sampler"}` with NumPy arrays in the sampler state, bare
state dicts, in the zip format or the legacy one (torch < 1.6). Before a byte is unpickled, every
global the pickle names (its GLOBAL opcodes: the module and name of a class or function) is put in
one of four kinds:

1. torch's own weights-only allowlist: tensor and storage rebuilders, dtypes, `torch.Size`,
   `collections.OrderedDict`, ...;
2. readers of plain data, the real functions: NumPy arrays, scalars and dtypes
   (`numpy.core.multiarray._reconstruct` / `scalar`, also spelt `numpy._core...` by NumPy >= 2,
   `numpy.ndarray`, `numpy.dtype` and its DType classes), and `collections.defaultdict`, read as a
   plain dict (its default factory is dropped);
3. inert placeholders: a class name (CapWords) from any module outside Python's standard library,
   torch and NumPy, i.e. the producers' own classes (`pytorch_lightning.callbacks.model_checkpoint
   .ModelCheckpoint`, `omegaconf.dictconfig.DictConfig`, `omegaconf.nodes.AnyNode`, ...), the type
   names such containers hold as values (`typing.Any`, `builtins.dict`, ...) and NumPy random
   generator state (`numpy.random.*`). Each becomes a `Placeholder` subclass made here under the
   same dotted name: building it, calling it or setting its state only records what the file
   gave; it has no other behaviour, and its module is never imported;
4. anything else is refused before loading, with a CheckpointError naming the global: functions
   and private names (`os.system`, `builtins.eval`, `torch.load`, `numpy.load`, ...) and every
   other part of the standard library (`subprocess.Popen`, `builtins.getattr`, ...).

The file is then read by `torch.load(weights_only=True)` with kinds 2 and 3 registered under their
exact names (`torch.serialization.safe_globals`): torch's restricted unpickler stays the only code
that interprets the bytes, and it refuses on its own anything the scan missed. `read_state_dict`
then flattens the nestings (`{"state_dict": ...}`, `{"model": ...}`, DDP's `module.` and
torch.compile's `_orig_mod.` prefixes) to the tensors.

Saving. The project's own checkpoints are a folder with `model.safetensors` (the unwrapped state
dict in the safetensors format: a JSON header and raw tensor bytes, nothing to execute),
`config.json` (everything that rebuilds the model: its config, layout, step, source revision,
and the sha256 of the weights) and, for the models a user takes away, a `README.md` model card.
Folders of the layout before it (`weights.pt` + `meta.json`) still load, through `safe_load`;
`visual-echoes export` rewrites them in the current layout.
"""

from __future__ import annotations

import io as stdio
import pickle
import pickletools
import re
import sys
import threading
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import io
from pipeline.errors import PipelineError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
# The layout before safetensors: read, never written.
LEGACY_WEIGHTS_NAME, LEGACY_CONFIG_NAME = "weights.pt", io.META_NAME
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_ZIP_MAGIC = b"PK\x03\x04"
# The legacy format is five pickles in a row (magic number, protocol, system info, the object,
# storage keys) followed by raw storage bytes.
_LEGACY_PICKLES = 5
# Type objects that training code keeps as values (OmegaConf's metadata holds `ref_type=Any`,
# `object_type=dict`, ...): read as placeholders, never as the real types.
_TYPE_NAMES = frozenset(
    ["typing.Any"]
    + [f"builtins.{t}" for t in ("object", "dict", "list", "tuple", "set", "str", "bytes")]
    + [f"builtins.{t}" for t in ("int", "float", "bool", "complex", "type")]
)
_MAX_NAMED = 3
_LOAD_LOCK = threading.Lock()


class CheckpointError(PipelineError):
    """A checkpoint file that is missing, corrupt, unsafe or for another architecture."""


class Placeholder:
    """Stands in for a class that a checkpoint names and this reader never imports.

    Subclasses are made per dotted name (`placeholder`); an instance records the arguments it
    was built or called with (`args`) and the state the pickle set (`state`), nothing else: it
    has no other attribute a file could set (`__slots__`).
    """

    __slots__ = ("args", "state")

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder {type(self).__module__}.{type(self).__qualname__}>"


def placeholder(full_name: str) -> type[Placeholder]:
    """A new `Placeholder` subclass named `full_name` ("module.Class": the protocol-2 pickles of
    torch.save name no nested class)."""
    module, _, name = full_name.rpartition(".")
    attrs = {"__module__": module, "__qualname__": name, "__slots__": ()}
    return type(name, (Placeholder,), attrs)


def _plain_dict(*args: Any) -> dict:
    """`collections.defaultdict(factory)` read as an empty plain dict; the pickle's SETITEMS
    fill it."""
    return {}


def _readers() -> dict[str, Any]:
    """Kind 2 of the module doc: dotted name -> the real function or class that builds it."""
    reconstruct, scalar = np.ndarray((0,)).__reduce__()[0], np.int64(0).__reduce__()[0]
    readers: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        readers[f"{module}._reconstruct"] = reconstruct
        readers[f"{module}.scalar"] = scalar
    # torch lets a pickle set the state (BUILD) of registered types only: a dtype's is its DType.
    for code in np.typecodes["All"]:
        kind = type(np.dtype(code))
        readers[f"{kind.__module__}.{kind.__qualname__}"] = kind
    readers["collections.defaultdict"] = _plain_dict
    return readers


def _renamed(full_name: str, modules: Mapping[str, str], names: Mapping) -> str:
    module, _, name = full_name.rpartition(".")
    if (module, name) in names:
        return ".".join(names[(module, name)])
    return f"{modules.get(module, module)}.{name}"


def _as_torch_reads(full_name: str) -> str:
    """The name torch's reader looks up for a global as written (torch.save writes protocol 2,
    with Python 2 module names such as `__builtin__`)."""
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING

    return _renamed(full_name, IMPORT_MAPPING, NAME_MAPPING)


def _as_python_reads(full_name: str) -> str:
    """The object Python's own unpickler would import for it (it maps more Python 2 names than
    torch, e.g. `commands` to `subprocess`): what the name means, for judging it."""
    import _compat_pickle

    return _renamed(full_name, _compat_pickle.IMPORT_MAPPING, _compat_pickle.NAME_MAPPING)


def _torch_allowed() -> set[str]:
    """torch's default weights-only allowlist (the table behind `weights_only=True`;
    `torch.serialization.get_unsafe_globals_in_checkpoint` reads it too, for zip files only)."""
    from torch import _weights_only_unpickler

    return set(_weights_only_unpickler._get_allowed_globals())


def _refused(full_name: str) -> bool:
    """Kind 4 of the module doc; called only for names that are not of kinds 1 and 2."""
    if full_name in _TYPE_NAMES:
        return False
    module, _, name = full_name.rpartition(".")
    top = module.partition(".")[0]
    if top == "numpy" and (module == "numpy.random" or module.startswith("numpy.random.")):
        return False
    if top in sys.stdlib_module_names or top in ("torch", "numpy"):
        return True
    parts = full_name.split(".")
    return not (all(p.isidentifier() for p in parts) and parts[-1][:1].isupper())


def pickle_globals(path: str | Path) -> set[str]:
    """Every global ("module.name", as written) that the pickles of a torch.save file name.

    Zip format: its `<archive>/data.pkl`; legacy format: its leading pickles. Raises
    CheckpointError for a file that is neither.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) == _ZIP_MAGIC:
                with zipfile.ZipFile(f) as archive:
                    names = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
                    if not names:
                        raise ValueError("a zip file without data.pkl")
                    return _globals_in(stdio.BytesIO(archive.read(names[0])), 1)
            f.seek(0)
            return _globals_in(f, _LEGACY_PICKLES)
    except (ValueError, EOFError, zipfile.BadZipFile, OSError) as err:
        first = _first_sentence(err)
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({first})") from None


def _globals_in(stream: Any, pickles: int) -> set[str]:
    """The globals of the next `pickles` pickles in `stream` (torch's reader supports no other
    opcode that names one)."""
    found: set[str] = set()
    for _ in range(pickles):
        for opcode, arg, _pos in pickletools.genops(stream):
            if opcode.name == "GLOBAL":
                module, name = arg.split(" ", 1)
                found.add(f"{module}.{name}")
    return found


@dataclass(frozen=True)
class StateDict:
    """Tensors read from a file, with the file's sha256 for provenance."""

    tensors: dict[str, torch.Tensor]
    sha256: str
    path: str


def read_state_dict(path: str | Path) -> StateDict:
    """Load a weights file safely and return its flat state dict: a torch.save file as the module
    doc says, a `.safetensors` file by `read_safetensors`.

    Raises CheckpointError with one sentence for a missing, truncated, non-checkpoint or
    code-carrying (unsafe pickle) file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    tensors = _flatten(safe_load(path))
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    return StateDict(tensors, io.sha256_file(path), str(path))


def safe_load(path: str | Path) -> Any:
    """The object a torch.save file holds, read on the CPU as the module doc says: tensors, plain
    containers, NumPy arrays, and placeholders for other classes.

    Raises CheckpointError with one sentence for a missing, truncated or non-checkpoint file, and
    for one that names a global that could run code (the sentence names it).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    readers = _readers()
    stand_ins, refused = _sort_globals(pickle_globals(path), readers)
    if refused:
        shown = ", ".join(refused[:_MAX_NAMED])
        more = f" and {len(refused) - _MAX_NAMED} more" if len(refused) > _MAX_NAMED else ""
        raise CheckpointError(
            f"checkpoint {path} was refused: it names {shown}{more}, which loading would import "
            "or call (only tensors, plain containers, NumPy arrays and inert stand-ins for other "
            "classes are read)"
        )
    registered = [(obj, name) for name, obj in readers.items()]
    registered += [(placeholder(name), name) for name in stand_ins]
    try:
        # safe_globals edits a process-wide table: one load at a time keeps each load's own.
        with _LOAD_LOCK, torch.serialization.safe_globals(registered):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Only what the scan cannot see gets here (an opcode torch's reader does not support).
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(err), re.S)
        detail = " ".join(found[1].split()) if found else _first_sentence(err)
        raise CheckpointError(
            f"checkpoint {path} was refused by torch's weights-only reader ({detail})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = _first_sentence(err)
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({first})") from None


def _sort_globals(
    written: Iterable[str], readers: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """(names to read as placeholders, as torch looks them up; refused names, as Python would
    import them) of the globals a file names; kinds 1 and 2 of the module doc are in neither."""
    allowed = _torch_allowed()
    stand_ins, refused = [], []
    for name in sorted(written):
        looked_up, meaning = _as_torch_reads(name), _as_python_reads(name)
        if looked_up in allowed or looked_up in readers:
            continue
        if _refused(looked_up) or _refused(meaning):
            refused.append(meaning if meaning == looked_up else f"{meaning} (written {name})")
        else:
            stand_ins.append(looked_up)
    return stand_ins, refused


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


def save(
    folder: str | Path, model: nn.Module, config: Mapping[str, Any], card: str | None = None
) -> Path:
    """Write `model.safetensors` (the unwrapped state dict), `config.json` (`config` and the
    weights' sha256) and, given `card`, `README.md`, each atomically; files of the legacy layout
    in `folder` are removed. Returns `folder`."""
    return save_tensors(folder, unwrap(model).state_dict(), config, card)


def save_tensors(
    folder: str | Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    card: str | None = None,
) -> Path:
    """`save` for a state dict already at hand."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_NAME
    with io.atomic_path(weights) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})  # fmt: skip
    write_config(folder, {**config, "weights_sha256": io.sha256_file(weights)}, card)
    return folder


def copy(src: str | Path, dst: str | Path) -> Path:
    """The checkpoint folder `src`, either layout, written to `dst` in the current one (weights
    checked and, from a legacy folder, converted; the card kept). Returns `dst`."""
    src, dst = Path(src), Path(dst)
    config = read_config(src)
    card = (src / CARD_NAME).read_text() if (src / CARD_NAME).is_file() else None
    if not weights_path(src).is_file():  # a folder with a config only (Griffin-Lim's vocoder)
        dst.mkdir(parents=True, exist_ok=True)
        write_config(dst, config, card)
        return dst
    state, config = load(src)
    return save_tensors(dst, state.tensors, config, card)


def write_config(folder: str | Path, config: Mapping[str, Any], card: str | None = None) -> None:
    """`config.json` (and `README.md` given `card`) of a checkpoint folder without weights of
    its own (Griffin-Lim's vocoder), or after `save` wrote them; legacy files are removed."""
    folder = Path(folder)
    io.write_json(folder / CONFIG_NAME, dict(config))
    if card is not None:
        write_card(folder, card)
    for name in (LEGACY_WEIGHTS_NAME, LEGACY_CONFIG_NAME):
        (folder / name).unlink(missing_ok=True)


def write_card(folder: str | Path, card: str) -> Path:
    """The model card `README.md` of a checkpoint folder (`pipeline.cards`), atomically."""
    path = Path(folder) / CARD_NAME
    io.write_bytes(path, card.encode())
    return path


def config_path(folder: str | Path) -> Path | None:
    """The `config.json` of a checkpoint folder, or the `meta.json` of a legacy one; None when
    `folder` holds neither."""
    for name in (CONFIG_NAME, LEGACY_CONFIG_NAME):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def read_config(folder: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """The config of a checkpoint folder (see `config_path`); CheckpointError naming `what`
    when there is none or it is not JSON."""
    path = config_path(folder)
    if path is None:
        raise CheckpointError(f"{folder} is not a {what} folder (no {CONFIG_NAME})")
    try:
        config = io.read_json(path)
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is not JSON ({_first_sentence(err)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config


def weights_path(folder: str | Path) -> Path:
    """The weights file of a checkpoint folder, in the layout its config file says."""
    legacy = config_path(folder) == Path(folder) / LEGACY_CONFIG_NAME
    return Path(folder) / (LEGACY_WEIGHTS_NAME if legacy else WEIGHTS_NAME)


def read_safetensors(path: str | Path) -> StateDict:
    """The tensors of a safetensors file, on the CPU. Reading one parses a JSON header and
    copies bytes: nothing in it is executed. CheckpointError for a missing or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        first = _first_sentence(err)
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({first})") from None
    return StateDict(tensors, io.sha256_file(path), str(path))


def load(folder: str | Path, what: str = "checkpoint") -> tuple[StateDict, dict[str, Any]]:
    """Read a project checkpoint folder, current or legacy layout: (state dict, config). Checks
    the recorded sha256; CheckpointError (one sentence naming `what`) for a folder that is not
    one, weights that are missing, corrupt, unsafe or not the ones the config was written with."""
    config = read_config(folder, what)
    path = weights_path(folder)
    state = read_state_dict(path)
    if config.get("weights_sha256") not in (None, state.sha256):
        raise CheckpointError(f"{path} does not match the sha256 in {config_path(folder).name}")
    return state, config
