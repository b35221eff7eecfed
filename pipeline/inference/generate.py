"""Generation end to end: raw inputs → ids → iterative unmasking → ids → images, mels, waveforms.

`Generator` holds the trained transformer (`models/transformer/`), both tokenizers and the vocoder
(`models/tokenizers/`), each loaded once. Its `run` encodes the given frames (uint8) and mels
([0, 1]), fills what the task asks for, and decodes; inputs are processed `batch_size` at a time.
`GenerateBatch` wraps it as a Ray Data callable class for large-scale generation in evaluation:
one actor runs several (task, CFG scale) settings on each batch, so one pass over the data (and
one actor start: model loading) serves all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.config import ExtractConfig, GenerateConfig
from pipeline.devices import choose_precision, resolve_device
from pipeline.errors import PipelineError
from pipeline.inference.scheduler import Unmasker, UnmaskingScheduler
from pipeline.inference.tasks import TaskSpec, task
from pipeline.models.saved import load_transformer
from pipeline.tokenizers.layout import MODALITIES, TokenLayout
from pipeline.tokenizers.tokenizer import load_tokenizers
from pipeline.tokenizers.vocoder import Vocoder

log = logging.getLogger(__name__)


class GenerateError(PipelineError):
    """A problem with a checkpoint or tokenizer folder the user pointed at."""


@dataclass
class Generation:
    """What `Generator.run` returns, `n` = inputs x samples rows, in input-major order.

    ids: {"audio": (n, L_a), "image": (n, L_v)} int64; images: (n, S, S, 3) uint8;
    mels: (n, n_mels, T) float32 in [0, 1]; waves: (n, samples) float32 at `sample_rate`.
    """

    task: str
    ids: dict[str, np.ndarray]
    images: np.ndarray
    mels: np.ndarray
    waves: np.ndarray
    sample_rate: int


class Generator:
    def __init__(
        self,
        transformer_dir: str | Path,
        tokenizers_dir: str | Path,
        cfg: GenerateConfig,
        device: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(device or cfg.device)
        transformer_dir, tokenizers_dir = Path(transformer_dir), Path(tokenizers_dir)
        if checkpoint.config_path(transformer_dir) is None:
            raise GenerateError(
                f"{transformer_dir} is not a transformer checkpoint (no {checkpoint.CONFIG_NAME}); "
                "point --checkpoint at the train stage output (models/transformer), an exported "
                "model or an MLflow model URI"
            )
        try:
            model, self.meta = load_transformer(transformer_dir, self.device)
        except (checkpoint.CheckpointError, KeyError, TypeError) as err:
            raise GenerateError(f"{transformer_dir}: cannot load the transformer ({err})") from None
        self.model = model.eval()
        self.layout = TokenLayout.from_dict(self.meta["layout"])
        try:
            self.tokenizers = load_tokenizers(tokenizers_dir, self.device)
        except (checkpoint.CheckpointError, KeyError) as err:
            raise GenerateError(
                f"{err}; point --tokenizers at the tokenizers stage output (models/tokenizers)"
            ) from None
        theirs = TokenLayout(
            audio=self.tokenizers["audio"].layout(), image=self.tokenizers["image"].layout()
        )
        if theirs != self.layout:
            raise GenerateError(
                f"the tokenizers in {tokenizers_dir} ({_describe(theirs)}) do not match the "
                f"transformer in {transformer_dir} ({_describe(self.layout)})"
            )
        try:
            self.vocoder = Vocoder.load(tokenizers_dir / "vocoder", self.device)
        except checkpoint.CheckpointError as err:
            raise GenerateError(str(err)) from None
        self.precision = choose_precision("auto", self.device)

    @property
    def extract_config(self) -> ExtractConfig:
        """The extract settings inputs must be prepared with: mel from the vocoder, frame size
        from the image tokenizer."""
        size = self.tokenizers["image"].spec.shape[-1]
        return dataclasses.replace(self.vocoder.mel, image_size=size)

    def unmasker(self, cfg: GenerateConfig | None = None) -> Unmasker:
        cfg = cfg or self.cfg
        scheduler = UnmaskingScheduler(cfg.steps, cfg.temperature, cfg.guidance, cfg.drop_ratio)
        return Unmasker(self.model, self.layout, scheduler, self.precision)

    def encode(self, images: np.ndarray | None, mels: np.ndarray | None, n: int) -> dict:
        """Ids of the given inputs; a missing modality is all [MASK] (it is generated)."""
        ids = {}
        for m, raw in (("image", images), ("audio", mels)):
            if raw is None:
                ids[m] = np.full(
                    (n, self.layout.modality(m).length), self.layout.modality(m).mask_id
                )
            else:
                ids[m] = self.tokenizers[m].encode(raw)
        return ids

    def fill(
        self,
        spec: TaskSpec,
        ids: dict[str, np.ndarray],
        seed: int,
        progress: bool = False,
        guidance: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the unmasker over `ids` in batches; returns the filled ids. `guidance` overrides
        the configured CFG scale s."""
        cfg = self.cfg if guidance is None else dataclasses.replace(self.cfg, guidance=guidance)
        n = len(ids["audio"])
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = {m: [] for m in MODALITIES}
        bar = tqdm(
            total=n * self.cfg.steps, unit="step", desc=spec.name, disable=not progress,
            leave=False,
        )  # fmt: skip
        for start in range(0, n, self.cfg.batch_size):
            part = {
                m: torch.as_tensor(v[start : start + self.cfg.batch_size], device=self.device)
                for m, v in ids.items()
            }
            b = len(part["audio"])
            filled = self.unmasker(cfg).run(
                part, spec.batch_known(b, self.device), g, spec.condition,
                on_step=lambda step, tokens, b=b: bar.update(b),
            )  # fmt: skip
            for m in MODALITIES:
                out[m].append(filled[m].cpu().numpy())
        bar.close()
        return {m: np.concatenate(v) for m, v in out.items()}

    def decode(
        self, task_name: str, ids: dict[str, np.ndarray], seed: int, vocode: bool = True
    ) -> Generation:
        """ids → images, mels and (when `vocode`) waveforms; `waves` is (n, 0) otherwise."""
        images, mels = [], []
        for start in range(0, len(ids["audio"]), self.cfg.batch_size):
            sl = slice(start, start + self.cfg.batch_size)
            images.append(self.tokenizers["image"].decode(ids["image"][sl]))
            mels.append(self.tokenizers["audio"].decode(ids["audio"][sl]))
        mel = np.concatenate(mels)
        if vocode:
            waves = np.stack([self.vocoder(m, seed=seed) for m in mel])
        else:
            waves = np.zeros((len(mel), 0), np.float32)
        return Generation(
            task_name, ids, np.concatenate(images), mel, waves, self.vocoder.mel.sample_rate
        )

    def run(
        self,
        task_name: str,
        images: np.ndarray | None = None,
        mels: np.ndarray | None = None,
        samples: int = 1,
        seed: int = 0,
        audio_span: tuple[float, float] | None = None,
        image_box: tuple[tuple[int, int], tuple[int, int]] | None = None,
        progress: bool = False,
        vocode: bool = True,
        guidance: float | None = None,
    ) -> Generation:
        """Generate for every input (`images` (n, S, S, 3) uint8, `mels` (n, F, T) in [0, 1],
        as the task needs) `samples` times; co-generation takes no input (n = 1). `guidance`:
        the CFG scale s, if not the configured one."""
        spec = task(task_name, self.layout, audio_span=audio_span, image_box=image_box)
        given = [x for x in (images, mels) if x is not None]
        n = len(given[0]) if given else 1
        ids = self.encode(images, mels, n)
        ids = {m: np.repeat(v, samples, axis=0) for m, v in ids.items()}
        filled = self.fill(spec, ids, seed, progress, guidance)
        return self.decode(task_name, filled, seed, vocode)


def _describe(layout: TokenLayout) -> str:
    return ", ".join(
        f"{m.name} {m.grid[0]}x{m.grid[1]} of {m.codebook_size}"
        for m in (layout.audio, layout.image)
    )


class GenerateBatch:
    """Ray Data callable class: loads a Generator once per actor and runs each (task, s) of
    `runs` on every batch. A batch holds `image` frames (uint8, (B, S, S, 3)) and/or `mel`s; each
    task is given only the modality it conditions on. Out: the batch's columns and, per run,
    `column(task, s, name)` for each name in OUTPUTS: `gen_image`, `gen_mel`, `gen_wave` (empty
    rows when `vocode` is false or the task generates no audio), the ids `gen_audio_ids` and
    `gen_image_ids`, and `seconds` (the batch's generation time spread over its rows).

    A batch with a `row` column is seeded with `seed + row[0]` for every run, so batches draw
    different noise and a rerun gives the same samples; co-generation takes a batch of `row`s
    only and makes one pair per row."""

    OUTPUTS = ("gen_image", "gen_mel", "gen_wave", "gen_audio_ids", "gen_image_ids", "seconds")

    def __init__(
        self,
        transformer_dir: str,
        tokenizers_dir: str,
        cfg: dict[str, Any],
        runs: Sequence[tuple[str, float]],
        seed: int = 0,
        device: str | None = None,
        vocode: bool = True,
    ) -> None:
        self.generator = Generator(transformer_dir, tokenizers_dir, GenerateConfig(**cfg), device)
        self.runs = [(str(name), float(s)) for name, s in runs]
        self.seed, self.vocode = seed, vocode
        layout = self.generator.layout
        self.inputs = {name: task(name, layout).known for name, _ in self.runs}

    @staticmethod
    def column(task_name: str, guidance: float, name: str) -> str:
        """The output column of `name` for one run: "image2audio/s3/gen_mel"."""
        return f"{task_name}/s{guidance:g}/{name}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = batch.get("row")
        seed = self.seed + (int(rows[0]) if rows is not None and len(rows) else 0)
        out = dict(batch)
        for task_name, s in self.runs:
            known = self.inputs[task_name]
            images = np.stack(batch["image"]) if known["image"].any() else None
            mels = np.stack(batch["mel"]).astype(np.float32) if known["audio"].any() else None
            samples = 1
            if images is None and mels is None:
                samples = len(rows) if rows is not None else 1
            start = time.perf_counter()
            # Waves only where audio is generated (audio→image would vocode its own input).
            vocode = self.vocode and not bool(known["audio"].all())
            gen = self.generator.run(
                task_name, images, mels, samples=samples, seed=seed, vocode=vocode, guidance=s
            )
            n = len(gen.mels)
            values = (gen.images, gen.mels, gen.waves, gen.ids["audio"], gen.ids["image"],
                      np.full(n, (time.perf_counter() - start) / max(n, 1)))  # fmt: skip
            for name, value in zip(self.OUTPUTS, values, strict=True):
                out[self.column(task_name, s, name)] = value
        return out
