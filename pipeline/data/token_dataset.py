"""Token ids in memory and a sampler whose batches depend only on (seed, step, rank).

The tokens are small (uint16: about 5 KB a clip at paper size, 1 GB for all of VGGSound), so
every worker holds its split in memory. A batch is a pure function of the step: sample k of the
run is clip perm_e[k mod n] of epoch e = k // n, with one permutation per epoch drawn from the
seed, and worker `rank` takes its slice of the global batch. The frame of each clip is drawn
from a generator seeded by (seed, step, rank). So a resumed run needs only the step counter to
see the same data in the same order as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.tokens import read_split


def eval_frame(num_frames: int) -> int:
    """The frame every evaluation uses: the middle one (index 5 of 10), here and in `evaluate`."""
    return num_frames // 2


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A distinct 63-bit seed per (seed, step, rank, stream), for torch.Generator.manual_seed."""
    mixed = (seed * 1_000_003 + step) * 65_537 + rank * 257 + stream
    return mixed % (2**63 - 1)


@dataclass(frozen=True)
class TokenSplit:
    """One split in memory: image (n, num_frames, L_v) and audio (n, L_a) ids as int32."""

    clip_ids: list[str]
    labels: list[str]
    image: torch.Tensor
    audio: torch.Tensor

    def __len__(self) -> int:
        return len(self.clip_ids)

    @property
    def num_frames(self) -> int:
        return self.image.shape[1]

    @classmethod
    def load(cls, tokens_dir: str | Path, split: str) -> TokenSplit:
        arrays = read_split(Path(tokens_dir), split)
        return cls(
            arrays.clip_ids,
            arrays.labels,
            torch.from_numpy(arrays.image_ids.astype("int32")),
            torch.from_numpy(arrays.audio_ids.astype("int32")),
        )

    def take(self, index: torch.Tensor, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"audio": (b, L_a), "image": (b, L_v)} int64 for clips `index` at frames `frames`."""
        return {
            "audio": self.audio[index].long(),
            "image": self.image[index, frames].long(),
        }

    def eval_batch(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Clips [start, stop) at the evaluation frame."""
        return self.eval_take(torch.arange(start, min(stop, len(self))))

    def eval_take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Clips `index` at the evaluation frame."""
        return self.take(index, torch.full_like(index, eval_frame(self.num_frames)))


class StepSampler:
    """Global batch `batch_size` split over `world_size` workers; epochs of shuffled clips."""

    def __init__(self, n: int, batch_size: int, world_size: int, rank: int, seed: int) -> None:
        if n < 1:
            raise ValueError("the train split is empty")
        if batch_size % world_size:
            raise ValueError("the global batch must split evenly over the workers")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.world_size, self.rank = world_size, rank
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.world_size

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch, 0, stream=1))
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # keep only the current
        return self._perms[epoch]

    def epoch(self, step: int) -> float:
        return step * self.batch_size / self.n

    def indices(self, step: int) -> torch.Tensor:
        """This worker's clip indices at `step`."""
        first = step * self.batch_size + self.rank * self.local_batch
        k = torch.arange(first, first + self.local_batch)
        epochs = k.div(self.n, rounding_mode="floor")
        out = torch.empty_like(k)
        for epoch in epochs.unique().tolist():  # one, or two at an epoch boundary
            here = epochs == epoch
            out[here] = self._perm(epoch)[k[here] % self.n]
        return out

    def batch(self, split: TokenSplit, step: int) -> dict[str, torch.Tensor]:
        """This worker's ids at `step`: one random frame of each clip."""
        index = self.indices(step)
        g = torch.Generator().manual_seed(step_seed(self.seed, step, self.rank, stream=2))
        frames = torch.randint(split.num_frames, (len(index),), generator=g)
        return split.take(index, frames)
