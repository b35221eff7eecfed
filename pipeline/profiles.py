"""Profiles: YAML overlays on params.yaml (profiles/tiny.yaml for tests, later the paper's).

Applying a profile rewrites params.yaml in place with ruamel.yaml (already a DVC dependency),
which keeps the file's comments, and validates the result before writing it.
"""

from __future__ import annotations

import io as _io
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

from pipeline import io
from pipeline.config import ConfigError, Params, merge, parse_params


def _overlay(target: Any, overlay: dict[str, Any], key: str = "") -> None:
    for name, value in overlay.items():
        where = f"{key}.{name}" if key else name
        if name not in target:
            raise ConfigError(f"{where}: the profile sets a key params.yaml does not have")
        if isinstance(value, dict):
            _overlay(target[name], value, where)
        else:
            target[name] = value


def _read_overlay(profile: Path) -> dict[str, Any]:
    if not profile.is_file():
        raise ConfigError(f"{profile}: profile file not found")
    overlay = yaml.safe_load(profile.read_text()) or {}
    if not isinstance(overlay, dict):
        raise ConfigError(f"{profile}: a profile must be a mapping of params sections")
    return overlay


def _merged(overlay: dict[str, Any], params_path: Path) -> Params:
    return parse_params(merge(yaml.safe_load(params_path.read_text()), overlay))


# The checkout's profiles: profiles/paper.yaml is the one definition of the paper's settings
# (model size, generation N/T/s, ...); code that needs them reads it through `paper_params`.
PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"


def paper_params() -> Params:
    """The checkout's params.yaml with profiles/paper.yaml applied (the paper's settings)."""
    return load_profile(PROFILES_DIR / "paper.yaml", PROFILES_DIR.parent / "params.yaml")


def load_profile(profile: str | Path, params_path: str | Path = "params.yaml") -> Params:
    """The params `profile` would give `params_path`, validated, without writing anything."""
    return _merged(_read_overlay(Path(profile)), Path(params_path))


def apply_profile(profile: str | Path, params_path: str | Path = "params.yaml") -> None:
    """Write the keys of `profile` into `params_path`, keeping its comments."""
    params_path, profile = Path(params_path), Path(profile)
    overlay = _read_overlay(profile)
    _merged(overlay, params_path)  # invalid: raise before writing anything
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    doc = rt.load(params_path.read_text())
    _overlay(doc, overlay)
    buf = _io.StringIO()
    rt.dump(doc, buf)
    io.write_bytes(params_path, buf.getvalue().encode())
