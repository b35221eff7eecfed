"""Which generation settings (N, T, s, drop ratio) a `visual-echoes` command uses.

The settings belong to the model, not to its training: the train stage does not depend on
`generate:` (a decoding knob must never retrain), so they are looked up beside the checkpoint.
`resolve` takes the first of:

1. `--params FILE`: its `generate:` section;
2. `<checkpoint>/generation.json` (`GENERATION_NAME`): what `write_generation` puts beside a
   model handed on outside its checkout ({"generate": {"steps": ..., "temperature": ...,
   "guidance": ..., "drop_ratio": ...}}; `batch_size` and `device` belong to the machine);
3. the params.yaml of the checkout the checkpoint belongs to (the nearest folder above it with a
   params.yaml, when its `paths.transformer` is this checkpoint): the settings that checkout's
   evaluate stage measures the model with;
4. params.yaml in the working directory;
5. the paper's N=30, T=9, s=3, drop ratio 0 (`PAPER`), with a note saying so.

`--steps`, `--temperature`, `--guidance`, `--batch-size` and `--device` override any of them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline import io
from pipeline.config import PARAMS_FILE, ConfigError, GenerateConfig, load_params, parse_section

GENERATION_NAME = "generation.json"
# The settings a model is measured with; batch_size and device are the machine's.
MODEL_KEYS = ("steps", "temperature", "guidance", "drop_ratio")
PAPER = GenerateConfig(
    steps=30, temperature=9.0, guidance=3.0, batch_size=16, device="auto", drop_ratio=0.0
)


@dataclass(frozen=True)
class Settings:
    """The settings found, where they come from (a file, or "the paper's defaults") and the
    note to show before generating (None when they come from a file)."""

    config: GenerateConfig
    source: str
    note: str | None = None


def write_generation(folder: str | Path, cfg: GenerateConfig) -> Path:
    """Write `cfg`'s MODEL_KEYS to `folder`/generation.json, atomically; returns the path."""
    path = Path(folder) / GENERATION_NAME
    io.write_json(path, {"generate": {k: getattr(cfg, k) for k in MODEL_KEYS}})
    return path


def read_generation(path: str | Path) -> GenerateConfig:
    """The settings of a generation.json, the keys it leaves out from PAPER. Raises ConfigError
    for a file that is not such JSON or holds an unknown or invalid key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not readable JSON ({err})") from None
    section = data.get("generate") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f'{path}: must hold {{"generate": {{...}}}}')
    try:
        return parse_section(GenerateConfig, {**dataclasses.asdict(PAPER), **section}, "generate")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def resolve(checkpoint: str | Path, params: str | Path | None = None) -> Settings:
    """The settings for the model in `checkpoint` (see the module doc for the order).
    Raises ConfigError for a named `params` that is missing and for any file found invalid."""
    if params is not None:
        return Settings(load_params(params).generate, str(params))
    beside = Path(checkpoint) / GENERATION_NAME
    if beside.is_file():
        return Settings(read_generation(beside), str(beside))
    for found in (checkout_params(Path(checkpoint)), Path(PARAMS_FILE)):
        if found is not None and found.is_file():
            return Settings(load_params(found).generate, str(found))
    p = PAPER
    return Settings(
        PAPER,
        "the paper's defaults",
        f"no generation settings beside {checkpoint} ({GENERATION_NAME} or its checkout's "
        f"{PARAMS_FILE}) or in ./{PARAMS_FILE}: using the paper's N={p.steps}, "
        f"T={p.temperature:g}, s={p.guidance:g}, drop ratio {p.drop_ratio:g}",
    )


def checkout_params(checkpoint: Path) -> Path | None:
    """The params.yaml of the checkout whose `paths.transformer` is `checkpoint`, if any."""
    target = checkpoint.resolve()
    for folder in target.parents:
        candidate = folder / PARAMS_FILE
        if candidate.is_file():
            theirs = (folder / load_params(candidate).paths.transformer).resolve()
            return candidate if theirs == target else None
    return None
