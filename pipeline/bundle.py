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
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import cards, checkpoint, io

TRANSFORMER, TOKENIZERS = "transformer", "tokenizers"
TOKENIZER_PARTS = ("image", "audio", "vocoder")
DEFAULT_TOKENIZERS = Path("models/tokenizers")  # the tokenizers stage output, from the checkout


def is_bundle(folder: str | Path) -> bool:
    """Whether `folder` is an exported model (it has a `transformer/` checkpoint)."""
    return checkpoint.config_path(Path(folder) / TRANSFORMER) is not None


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


@contextlib.contextmanager
def staged(transformer_dir: str | Path, tokenizers_dir: str | Path) -> Iterator[Path]:
    """`write_bundle` into a temporary folder, removed when the block ends (for logging)."""
    with tempfile.TemporaryDirectory(prefix="ve-bundle-") as tmp:
        yield write_bundle(Path(tmp) / "model", transformer_dir, tokenizers_dir)


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
