"""An exported model: the transformer, both tokenizers and the vocoder in one folder that can be
copied to another machine and run there by `visual-echoes`, and how a `--checkpoint` is found.

    <folder>/
        README.md                  model card of the whole (`cards.bundle_card`)
        transformer/               model.safetensors, config.json, README.md
                                   (+ generation.json: `visual-echoes export` writes it)
        tokenizers/{image,audio}/  model.safetensors, config.json, README.md
        tokenizers/vocoder/        config.json (+ model.safetensors for MelGAN)

`write_bundle` builds one from the pipeline's outputs (folders of the legacy checkpoint layout
are converted on the way). The train stage logs one to MLflow (`pipeline.tracking.log_bundle`).
`locate` turns what a user passes as `--checkpoint` (a transformer folder, an exported folder,
or the MLflow URI of a logged one) into the transformer and tokenizer folders to load.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import cards, io

log = logging.getLogger(__name__)

TRANSFORMER, TOKENIZERS = "transformer", "tokenizers"
TOKENIZER_PARTS = ("image", "audio", "vocoder")
DEFAULT_TOKENIZERS = Path("models/tokenizers")  # the tokenizers stage output, from the checkout
# `pipeline.checkpoint` (torch) is imported where weights are read or written: finding a model
# must not load torch, so that the commands refuse bad flags and outputs in a moment.


def is_bundle(folder: str | Path) -> bool:
    """Whether `folder` is laid out as an exported model (`transformer/` and `tokenizers/`)."""
    return (Path(folder) / TRANSFORMER).is_dir() and (Path(folder) / TOKENIZERS).is_dir()


def write_bundle(
    folder: str | Path,
    transformer_dir: str | Path,
    tokenizers_dir: str | Path,
    generate: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> Path:
    """Write the exported model of `transformer_dir` and `tokenizers_dir` (either checkpoint
    layout) into the new folder `folder`, with its card; `generate` (the generation settings it
    will carry), `evaluation` (the evaluate stage's metrics.json) and `source` (the data source)
    go into the card. Raises CheckpointError for a part that is missing or does not load."""
    from pipeline import checkpoint

    folder, tokenizers_dir = Path(folder), Path(tokenizers_dir)
    checkpoint.copy(transformer_dir, folder / TRANSFORMER)
    for part in TOKENIZER_PARTS:
        if checkpoint.config_path(tokenizers_dir / part) is None:
            raise checkpoint.CheckpointError(
                f"{tokenizers_dir / part} is not a tokenizer folder; point --tokenizers at the "
                "tokenizers stage output (models/tokenizers)"
            )
        checkpoint.copy(tokenizers_dir / part, folder / TOKENIZERS / part)
    configs = {p: checkpoint.read_config(folder / TOKENIZERS / p) for p in TOKENIZER_PARTS}
    card = cards.bundle_card(
        checkpoint.read_config(folder / TRANSFORMER),
        {m: configs[m] for m in ("image", "audio")},
        configs["vocoder"],
        generate,
        evaluation,
        source,
    )
    io.write_bytes(folder / checkpoint.CARD_NAME, card.encode())
    return folder


def log_to(
    run: Any,
    transformer_dir: str | Path,
    tokenizers_dir: str | Path,
    step: int,
    name: str = "model",
) -> str | None:
    """Log the exported model of `transformer_dir` and `tokenizers_dir` as the logged model
    `name` of the stage's MLflow run `run` (`tracking.StageRun.log_model`), linked to its metrics
    at `step`; returns the model id. Without loadable tokenizers there is nothing to generate
    with: a warning, and None."""
    from pipeline.checkpoint import CheckpointError

    with tempfile.TemporaryDirectory(prefix="ve-bundle-") as tmp:
        try:
            folder = write_bundle(Path(tmp) / name, transformer_dir, tokenizers_dir)
        except CheckpointError as err:
            log.warning("the model is not logged to MLflow: %s", err)
            return None
        return run.log_model(name, folder, step)


@dataclass(frozen=True)
class Located:
    """The folders to load a model from, and what the user named (for messages)."""

    transformer: Path
    tokenizers: Path
    source: str


@contextlib.contextmanager
def locate(checkpoint_arg: str | Path, tokenizers_arg: str | Path | None) -> Iterator[Located]:
    """The transformer and tokenizer folders for `--checkpoint` and `--tokenizers`.

    `checkpoint_arg` is a transformer folder (tokenizers: `tokenizers_arg`, else
    models/tokenizers), an exported folder (tokenizers: its own unless `tokenizers_arg` is
    given) or an MLflow model URI (`runs:/<run_id>/<name>`, `models:/<name>/<version>`), which
    is downloaded into a temporary folder that lives as long as the block. TrackingError for a
    URI MLflow cannot give."""
    from pipeline import tracking

    source = str(checkpoint_arg)
    with contextlib.ExitStack() as stack:
        folder = Path(checkpoint_arg)
        if tracking.is_model_uri(source):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ve-model-")))
            folder = tracking.download_model(source, tmp)
        if is_bundle(folder):
            tokenizers = Path(tokenizers_arg) if tokenizers_arg else folder / TOKENIZERS
            yield Located(folder / TRANSFORMER, tokenizers, source)
        else:
            yield Located(folder, Path(tokenizers_arg or DEFAULT_TOKENIZERS), source)
