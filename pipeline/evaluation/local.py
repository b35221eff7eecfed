"""The offline evaluator: an audio classifier, an image classifier and a contrastive pair, all
trained by the pipeline on its own train split, because no pretrained extractor can be fetched.

- `AudioNet` reads a mel (n_mels, T) in [0, 1], `ImageNet` a frame (S, S, 3) uint8. Both are
  small PANNs-style CNNs (conv blocks, then mean over the vertical axis, max + mean over the
  horizontal one); their penultimate `embedding` gives Fréchet distances, their softmax over
  the dataset's labels gives IS and the **class accuracy** of generated samples.
- `Projection` heads map both embeddings into one space, trained with a symmetric InfoNCE loss
  on matching (frame, mel) pairs, for a CS-style score (100 x mean cosine).
- `rhythm`, a `pipeline.metrics.rhythm.RhythmScorer` fit on the same train mels, scores time
  structure only (`acc_rhythm_local`, `period_err_local`), which the classifier's accuracy,
  earned by the band envelope alone, would not notice.

Numbers from these networks are named `*_local` and flagged `comparable_to_paper: false`: their
scale has nothing to do with the paper's PANNs/VGGish/CLIP figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import checkpoint
from pipeline.metrics.rhythm import RhythmScorer

NAME = "local-v1"


class ConvBlock(nn.Module):
    """conv3x3-BN-ReLU twice, then average pooling (the PANNs block)."""

    def __init__(self, c_in: int, c_out: int, pool: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, self.pool)


class _Tower(nn.Module):
    """Conv blocks → mean over H → max + mean over W → embedding (ReLU) → class logits."""

    def __init__(
        self, c_in: int, channels: tuple[int, ...], pools: tuple[tuple[int, int], ...],
        embed_dim: int, num_classes: int, dropout: float,
    ) -> None:  # fmt: skip
        super().__init__()
        widths = (c_in, *channels)
        self.blocks = nn.Sequential(
            *(ConvBlock(a, b, p) for a, b, p in zip(widths[:-1], widths[1:], pools, strict=True))
        )
        self.fc = nn.Linear(channels[-1], embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding (B, D), logits (B, classes))."""
        h = self.blocks(self.prepare(x)).mean(dim=2)
        h = h.amax(dim=2) + h.mean(dim=2)
        emb = F.relu(self.fc(self.dropout(h)))
        return emb, self.classifier(self.dropout(emb))


class AudioNet(_Tower):
    """Mel (B, n_mels, T) in [0, 1] → (embedding, logits)."""

    def __init__(self, embed_dim: int, num_classes: int, dropout: float = 0.2) -> None:
        # The mel is averaged over 2 bands x 4 frames first (80 x 848 → 40 x 212, ~46 ms per
        # column): the blocks then see 40 x 212 → 20 x 106 → 10 x 53 → 5 x 26 → 5 x 26.
        pools = ((2, 2), (2, 2), (2, 2), (1, 1))
        super().__init__(1, (16, 32, 64, 128), pools, embed_dim, num_classes, dropout)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d((x * 2.0 - 1.0).unsqueeze(1), (2, 4))


class ImageNet(_Tower):
    """Frames (B, S, S, 3) uint8 → (embedding, logits)."""

    def __init__(self, embed_dim: int, num_classes: int, dropout: float = 0.2) -> None:
        pools = ((2, 2), (2, 2), (2, 2), (1, 1))
        super().__init__(3, (16, 32, 64, 128), pools, embed_dim, num_classes, dropout)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Projection(nn.Module):
    """Embedding → unit vector in the shared image–audio space."""

    def __init__(self, embed_dim: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, dim)
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(emb), dim=-1)


class LocalEvaluator(nn.Module):
    """The four networks together, with the label list they were trained on."""

    def __init__(self, labels: list[str], embed_dim: int, joint_dim: int) -> None:
        super().__init__()
        self.labels = list(labels)
        self.embed_dim, self.joint_dim = embed_dim, joint_dim
        self.audio = AudioNet(embed_dim, len(labels))
        self.image = ImageNet(embed_dim, len(labels))
        self.audio_proj = Projection(embed_dim, joint_dim)
        self.image_proj = Projection(embed_dim, joint_dim)
        self.sha256 = ""
        self.rhythm: RhythmScorer | None = None
        self.held_out: dict[str, Any] = {}  # the evaluator stage's metrics on the test split

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def label_index(self, labels: list[str]) -> np.ndarray:
        """Indices of `labels` in the evaluator's list; -1 for a label it was not trained on."""
        where = {name: i for i, name in enumerate(self.labels)}
        return np.array([where.get(name, -1) for name in labels], dtype=np.int64)

    @torch.no_grad()
    def _run(self, net: nn.Module, proj: nn.Module, x: np.ndarray, batch_size: int) -> Outputs:
        was = self.training
        self.eval()
        embs, logits, joint = [], [], []
        for start in range(0, len(x), batch_size):
            part = torch.from_numpy(np.array(x[start : start + batch_size]))  # a writable copy
            emb, logit = net(part.to(self.device))
            embs.append(emb.float().cpu())
            logits.append(logit.float().cpu())
            joint.append(proj(emb).float().cpu())
        self.train(was)
        if not len(x):
            widths = (self.embed_dim, len(self.labels), self.joint_dim)
            return Outputs(*(np.zeros((0, w), np.float32) for w in widths))
        return Outputs(torch.cat(embs).numpy(), torch.cat(logits).numpy(), torch.cat(joint).numpy())

    def audio_outputs(self, mels: np.ndarray, batch_size: int = 32) -> Outputs:
        out = self._run(self.audio, self.audio_proj, mels.astype(np.float32), batch_size)
        if self.rhythm is not None:
            out.rhythm = self.rhythm.describe(mels)
        return out

    def image_outputs(self, frames: np.ndarray, batch_size: int = 64) -> Outputs:
        return self._run(self.image, self.image_proj, frames, batch_size)

    def save(self, folder: str | Path, extra: dict[str, Any]) -> Path:
        meta = {"name": NAME, "labels": self.labels, "embed_dim": self.embed_dim,
                "joint_dim": self.joint_dim} | extra  # fmt: skip
        if self.rhythm is not None:
            meta["rhythm"] = self.rhythm.to_dict()
        return checkpoint.save(folder, self, meta)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> LocalEvaluator:
        """The evaluator stage's output folder; CheckpointError if missing or corrupt."""
        state, meta = checkpoint.load(folder, "local evaluator")
        if meta.get("name") != NAME:
            raise checkpoint.CheckpointError(
                f"{folder} is not a local evaluator (its config names {meta.get('name')!r})"
            )
        model = cls(meta["labels"], meta["embed_dim"], meta["joint_dim"])
        checkpoint.load_into(model, state, "local evaluator")
        model.sha256 = state.sha256
        if "rhythm" in meta:  # evaluators saved before the rhythm score have none
            model.rhythm = RhythmScorer.from_dict(meta["rhythm"])
        model.held_out = dict(meta.get("metrics", {}))
        return model.to(device).eval()


@dataclass
class Outputs:
    """Per-row embedding (n, D), class logits (n, classes), joint-space unit vector (n, d);
    for mels scored by an evaluator with a rhythm scorer, its `describe` rows (n, 3)."""

    embedding: np.ndarray
    logits: np.ndarray
    joint: np.ndarray
    rhythm: np.ndarray | None = None

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @staticmethod
    def cat(parts: list[Outputs]) -> Outputs:
        """The rows of `parts` one after the other (at least one part)."""
        joined = [np.concatenate([getattr(p, f) for p in parts])
                  for f in ("embedding", "logits", "joint")]  # fmt: skip
        rhythm = [p.rhythm for p in parts]
        if any(r is None for r in rhythm):
            return Outputs(*joined)
        return Outputs(*joined, rhythm=np.concatenate(rhythm))

    def take(self, index: np.ndarray) -> Outputs:
        """The rows at `index`, in its order."""
        rhythm = None if self.rhythm is None else self.rhythm[index]
        return Outputs(self.embedding[index], self.logits[index], self.joint[index], rhythm)
