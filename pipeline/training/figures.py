"""Figures of the transformer during training: masked-token reconstructions and loss curves.

`make_reconstruction` draws the paper's Fig. 5: for a few validation clips, the image and the mel
as decoded from their original ids, with the masked token cells covered, and as decoded from the
model's one-step prediction (argmax at masked positions, the original ids elsewhere).
`loss_figure` draws logged scalars against the step. Both write PNGs atomically through
matplotlib's Agg canvas (no pyplot state), with the look of `pipeline.data.audio.plot_mel`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline.data import audio
from pipeline.errors import PipelineError
from pipeline.masking import MaskedBatch, mask_fixed_ratio
from pipeline.tokenizers.layout import MODALITIES, TokenLayout

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from pipeline.data.token_dataset import TokenSplit
    from pipeline.tokenizers.tokenizer import Tokenizer

MASK_FACE = "0.6"  # grey over a masked token cell
MASK_HATCH = "0.3"  # its hatch lines, so a cell stays visible on a grey image or a quiet mel
IMAGE_INCHES = 1.6  # width and height of one image panel
MEL_INCHES = 3.2  # width of one mel panel (mels are much wider than tall)
ROW_INCHES = 1.6


@torch.no_grad()
def predict_masked(
    model: nn.Module, batch: MaskedBatch, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """One forward pass on `batch.inputs` with nothing dropped (keep=None), in eval mode.

    `model` must already be on `device`; its train/eval mode is restored afterwards.
    Returns {"audio": (B, L_a), "image": (B, L_v)} int64 on the CPU: the argmax code at masked
    positions, the target id everywhere else, so every id is in [0, C) of its modality.
    """
    was_training = model.training
    model.eval()
    try:
        batch = batch.to(device)
        logits = model(batch.inputs["audio"], batch.inputs["image"], None)
    finally:
        model.train(was_training)
    return {
        m: torch.where(batch.masked[m], logits[m].argmax(-1), batch.targets[m]).long().cpu()
        for m in MODALITIES
    }


def _cover_masked(
    ax: Axes, masked: np.ndarray, grid: tuple[int, int], shape: tuple[int, ...]
) -> None:
    """Grey, hatched boxes over the masked cells of a token grid drawn with `imshow`.

    masked: (rows * cols,) bool, row-major like the ids; shape: (H, W) of the decoded array. Id
    (i, j) decodes to pixels [i·H/rows, (i+1)·H/rows) x [j·W/cols, (j+1)·W/cols); imshow puts
    array element (r, c) at data (c, r) whichever way `origin` points, hence the -0.5 edges.
    """
    from matplotlib.patches import Rectangle

    rows, cols = grid
    cell_h, cell_w = shape[0] / rows, shape[1] / cols
    for k in np.flatnonzero(masked):
        i, j = divmod(int(k), cols)
        ax.add_patch(
            Rectangle(
                (j * cell_w - 0.5, i * cell_h - 0.5),
                cell_w,
                cell_h,
                facecolor=MASK_FACE,
                edgecolor=MASK_HATCH,
                hatch="///",
                linewidth=0.0,
            )
        )


def _decode(tokenizer: Tokenizer, ids: torch.Tensor) -> np.ndarray:
    """ids (B, L) on any device -> the tokenizer's decoded arrays (it reads them via numpy)."""
    return tokenizer.decode(ids.detach().cpu())


def reconstruction_figure(
    tokenizers: dict[str, Tokenizer],
    layout: TokenLayout,
    batch: MaskedBatch,
    predicted: dict[str, torch.Tensor],
    path: str | Path,
    labels: list[str] | None = None,
    title: str = "",
) -> Path:
    """The paper's Fig. 5 as a PNG at `path` (written atomically); returns `path`.

    One row per example b of `batch`, six columns: image original (decoded `batch.targets`),
    image masked (the same picture with the masked cells of `batch.masked` covered), image
    prediction (decoded `predicted`), then the same three for the mel.
    tokenizers: {"audio", "image"} with grids equal to `layout`'s; predicted: {"audio": (B, L_a),
    "image": (B, L_v)} ids as `predict_masked` returns them; labels: B row names, or None.
    """
    from matplotlib.figure import Figure

    n = batch.targets["audio"].shape[0]
    if n == 0:
        raise ValueError("a reconstruction figure needs at least one example")
    for m in MODALITIES:
        grid = layout.modality(m).grid
        if tuple(tokenizers[m].grid) != grid:
            raise ValueError(f"{m} tokenizer grid {tokenizers[m].grid} != layout grid {grid}")
        if tuple(predicted[m].shape) != tuple(batch.targets[m].shape):
            raise ValueError(f"{m}: predicted {tuple(predicted[m].shape)} != targets' shape")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} examples")

    decoded = {
        (m, kind): _decode(tokenizers[m], ids[m])
        for m in MODALITIES
        for kind, ids in (("original", batch.targets), ("prediction", predicted))
    }
    masked = {m: batch.masked[m].detach().cpu().numpy() for m in MODALITIES}
    # Columns: (modality, what is decoded, whether masked cells are covered, title).
    columns = []
    for m in ("image", "audio"):
        share = float(masked[m].mean())
        columns += [
            (m, "original", False, f"{m}: original"),
            (m, "original", True, f"{m}: masked ({share:.0%})"),
            (m, "prediction", False, f"{m}: prediction"),
        ]

    fig = Figure(
        figsize=(3 * (IMAGE_INCHES + MEL_INCHES) + 0.6, ROW_INCHES * n + 0.6),
        dpi=100,
        layout="constrained",
    )
    ratios = [IMAGE_INCHES if m == "image" else MEL_INCHES for m, *_ in columns]
    axes = fig.subplots(n, len(columns), squeeze=False, width_ratios=ratios)
    for b in range(n):
        for c, (m, kind, cover, heading) in enumerate(columns):
            ax, picture = axes[b, c], decoded[m, kind][b]
            head = heading if b == 0 else ""
            if m == "image":
                ax.imshow(picture, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if head:
                    ax.set_title(head, fontsize=8)
            else:
                audio.plot_mel(ax, picture, head)
                ax.tick_params(labelsize=6)
                ax.xaxis.label.set_size(8)
                ax.yaxis.label.set_size(8)
                # One axis label per grid, not per panel.
                if c != 3:
                    ax.set_ylabel("")
                if b != n - 1:
                    ax.set_xlabel("")
            if cover:
                _cover_masked(ax, masked[m][b], layout.modality(m).grid, picture.shape)
        if labels is not None:
            axes[b, 0].set_ylabel(textwrap.fill(str(labels[b]), 20), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    audio.save_figure(fig, path)
    return Path(path)


def make_reconstruction(
    model: nn.Module,
    split: TokenSplit,
    layout: TokenLayout,
    tokenizers: dict[str, Tokenizer],
    path: str | Path,
    examples: int,
    ratio: float,
    seed: int,
    device: torch.device | str,
    title: str = "",
) -> Path:
    """`reconstruction_figure` for `examples` clips spread evenly over `split` (sorted by clip id,
    so the rows show different classes) at the evaluation frame, with ratio `ratio` of each modality masked by `mask_fixed_ratio` from a generator seeded
    with `seed`: the same model, split and seed give the same picture. Returns `path`.
    """
    if examples < 1:
        raise ValueError(f"examples must be at least 1, got {examples}")
    if len(split) == 0:
        raise PipelineError("the split has no clips to draw reconstructions of")
    index = torch.linspace(0, len(split) - 1, min(examples, len(split))).round().long()
    ids = split.eval_take(index)
    batch = mask_fixed_ratio(layout, ids, ratio, torch.Generator().manual_seed(seed))
    predicted = predict_masked(model, batch, device)
    return reconstruction_figure(
        tokenizers, layout, batch, predicted, path, [split.labels[i] for i in index.tolist()], title
    )


def loss_figure(
    rows: list[dict[str, float]], path: str | Path, keys: list[str], title: str = ""
) -> Path:
    """Each of `keys` against the rows' "step" on linear axes, as a PNG at `path` (atomic).

    A row without a key (or without "step") gives no point for it; a key in no row gives no line.
    Returns `path`.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for key in keys:
        points = [(row["step"], row[key]) for row in rows if key in row and "step" in row]
        if points:
            # Markers keep short series (and a single point) visible; long ones read as lines.
            marker = "." if len(points) <= 30 else None
            ax.plot(*zip(*points, strict=True), label=key, marker=marker)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    audio.save_figure(fig, path)
    return Path(path)
