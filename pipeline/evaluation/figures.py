"""Figures of the evaluation stages: the evaluator's training and confusion matrices, the
paper's Fig. 6 layout (input image, ground-truth mel, generated mels), and the sweep charts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data import audio

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def evaluator_figure(
    history: list[dict[str, float]],
    confusion: Mapping[str, np.ndarray],
    labels: Sequence[str],
    path: str | Path,
) -> Path:
    """Training loss/accuracy per part (left) and the test confusion matrices (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.25 * (2 + len(confusion)), 4), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2 + len(confusion))
    for part in dict.fromkeys(r["part"] for r in history):
        rows = [r for r in history if r["part"] == part]
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["loss"] for r in rows], label=part, marker=".")
        axes[1].plot(epochs, [r["acc"] for r in rows], label=part, marker=".")
    axes[0].set_title("training loss", fontsize=9)
    axes[1].set_title("training accuracy (joint: in-batch retrieval)", fontsize=9)
    for ax in axes[:2]:
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax, (name, matrix) in zip(axes[2:], confusion.items(), strict=True):
        _confusion(ax, matrix, labels, f"test confusion: {name}")
    audio.save_figure(fig, path)
    return Path(path)


def _confusion(ax: Axes, matrix: np.ndarray, labels: Sequence[str], title: str) -> None:
    """A confusion matrix (rows: true label, columns: predicted) with its counts written in."""
    short = [name.split(" / ")[0][:14] for name in labels]
    ax.imshow(matrix, cmap="Blues")
    dark = matrix.max() / 2
    for (i, j), v in np.ndenumerate(matrix):
        colour = "white" if v > dark else "black"
        ax.text(j, i, str(v), ha="center", va="center", fontsize=6, color=colour)
    ax.set_xticks(range(len(short)), short, rotation=60, ha="right", fontsize=6)
    ax.set_yticks(range(len(short)), short, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_title(title, fontsize=9)


def confusion_figure(
    matrices: Mapping[str, np.ndarray], labels: Sequence[str], path: str | Path
) -> Path:
    """One confusion matrix per panel, titled with its key (e.g. "image2audio s3")."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.8 * max(1, len(matrices)), 4.2), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(matrices))))
    for ax, (name, matrix) in zip(axes, matrices.items(), strict=False):
        _confusion(ax, matrix, labels, name)
        ax.set_ylabel("label of the condition", fontsize=8)
    audio.save_figure(fig, path)
    return Path(path)


def generation_figure(
    clip_ids: Sequence[str],
    labels: Sequence[str],
    frames: np.ndarray,
    true_mels: np.ndarray,
    generated: Mapping[str, np.ndarray],
    path: str | Path,
    predicted: Mapping[str, Sequence[str]] | None = None,
    mel_title: str = "ground truth",
) -> Path:
    """One row per clip: the conditioning frame, the ground-truth mel, then one generated mel
    per setting (`generated[name]`: (rows, F, T)), titled with the evaluator's prediction."""
    from matplotlib.figure import Figure

    n, cols = len(clip_ids), 2 + len(generated)
    fig = Figure(figsize=(3.0 + 4.0 * (cols - 1), 2.2 * max(1, n)), dpi=100, layout="constrained")
    grid = fig.add_gridspec(max(1, n), cols, width_ratios=[0.7] + [1.0] * (cols - 1))
    for i in range(n):
        ax = fig.add_subplot(grid[i, 0])
        ax.imshow(frames[i])
        ax.set_axis_off()
        ax.set_title(f"{clip_ids[i][:24]}\n{labels[i][:30]}", fontsize=7)
        audio.plot_mel(fig.add_subplot(grid[i, 1]), true_mels[i], mel_title)
        for j, (name, mels) in enumerate(generated.items()):
            guess = f" → {predicted[name][i][:24]}" if predicted else ""
            audio.plot_mel(fig.add_subplot(grid[i, 2 + j]), mels[i], f"{name}{guess}")
    audio.save_figure(fig, path)
    return Path(path)


def image_grid_figure(
    rows: Sequence[tuple[str, np.ndarray]], path: str | Path, title: str = ""
) -> Path:
    """Rows of images (name, (k, S, S, 3) uint8), e.g. ground truth vs generated frames."""
    from matplotlib.figure import Figure

    k = max(len(images) for _, images in rows)
    fig = Figure(figsize=(1.3 * k + 1, 1.4 * len(rows)), dpi=100, layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), k, squeeze=False))
    for r, (name, images) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(images):
                ax.imshow(images[c])
        axes[r, 0].set_title(name, fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    audio.save_figure(fig, path)
    return Path(path)
