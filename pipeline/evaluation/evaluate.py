"""The `evaluate` stage's work: generate for the test split with Ray Data, then score it.

Flow: one Ray Data pass for every conditional task and CFG scale s (and one for co-generation):
1. `ray.data.read_parquet` over the extract test shards → `decode_clips` (the middle frame, as
   the condition, and the mel of each clip) → `GenerateBatch` actors (one Generator each, on a
   GPU when `num_gpus_per_actor` > 0; each batch goes through every (task, s) there, so the
   models load once), which also run the offline evaluator on what they generated
   (`EmbedGenerated`): a batch comes back to the driver as embeddings, logits and joint-space
   vectors (a few kB a clip), with the samples of the clips picked as examples only;
2. on the driver, scores against the real test clips (`scoring`), example WAVs/PNGs and
   figures. (The paper-protocol scorers take the vocoded waves on the driver.)

The driver never holds the test split: before generating, it streams the clips evaluated from
the shards once (`train_local.read_chunks`), keeping the evaluator's outputs on them (the
reference) and the frame and mel of the example clips only; generation reads the shards again
through Ray Data.

Rows carry their index (and clip id, for the paper-protocol scorers), so the scores do not depend
on the order Ray returns batches in. Generation noise is seeded per batch (`seed + first row`), so
a rerun gives the same samples. With `evaluate.repeats` > 1 all of it runs that many times, run r
from seed + r x REPEAT_SEED_STRIDE: every metric is the mean over the runs with each run's values
under `runs` (the paper averages two runs); examples, figures and per_class.csv show the first.
"""

from __future__ import annotations

import io as _stdio
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import checkpoint, io
from pipeline.config import EvaluateConfig, EvaluatorConfig, GenerateConfig, PathsConfig, as_dict
from pipeline.data.extracted import decode_row, load_meta, split_size
from pipeline.data.token_dataset import eval_frame
from pipeline.evaluation.local import NAME as LOCAL_NAME
from pipeline.evaluation.local import LocalEvaluator, Outputs
from pipeline.evaluation.official import OfficialMetrics, average_runs
from pipeline.evaluation.scoring import (
    Reference,
    reference_of,
    score_audio,
    score_image,
    score_pairs,
    score_reference,
)
from pipeline.evaluation.train_local import EvaluatorError, read_chunks, split_outputs

log = logging.getLogger(__name__)

READ_COLUMNS = ["clip_id", "label", "frames", "mel"]
# Run r of `evaluate.repeats` seeds its batches from base seed + r x this (+ the batch's first
# row), so no two runs share a seed while a test split has fewer rows.
REPEAT_SEED_STRIDE = 1_000_000


def spread(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over range(n) (all of them when k is 0 or ≥ n). Clip ids sort by
    class in the synthetic set, so a prefix would hold one class only."""
    if k == 0 or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def evaluated_rows(extract_dir: str | Path, max_clips: int = 0) -> np.ndarray:
    """Which test clips are evaluated: `max_clips` of them spread over the split (0: all), as
    indices in clip_id order."""
    n = split_size(load_meta(Path(extract_dir)), "test")
    if not n:
        raise EvaluatorError(f"{extract_dir} has no clips in split 'test'")
    return spread(n, max_clips)


@dataclass
class TestSet:
    """The clips evaluated, read once: ids and labels of all, the evaluator's outputs on them
    (`ref`), and the conditioning frame (S, S, 3) and mel (F, T) float16 of the `kept` rows
    (positions in the set) only."""

    clip_ids: list[str]
    labels: list[str]
    ref: Reference
    kept: dict[int, tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return len(self.clip_ids)

    def frames(self, rows: list[int]) -> np.ndarray:
        """The conditioning frames of kept `rows`, (len(rows), S, S, 3) uint8."""
        return np.stack([self.kept[r][0] for r in rows])

    def mels(self, rows: list[int]) -> np.ndarray:
        """The mels of kept `rows`, (len(rows), F, T) float32."""
        return np.stack([self.kept[r][1] for r in rows]).astype(np.float32)


def load_test_set(
    extract_dir: str | Path, evaluator: LocalEvaluator, rows: np.ndarray, keep: set[int]
) -> TestSet:
    """Stream the test clips at `rows` (`evaluated_rows`) through `evaluator`; keep the inputs
    of the positions in `keep`."""
    out = split_outputs(evaluator, read_chunks(extract_dir, "test", rows.tolist()), keep=keep)
    ref = reference_of(evaluator, out.labels, out.audio, out.image)
    return TestSet(out.clip_ids, out.labels, ref, out.kept)


def picked(n: int, k: int) -> list[int]:
    """`k` positions spread over `n` clips; none for k = 0."""
    return [int(i) for i in spread(n, k)] if k else []


def example_rows(n: int, cfg: EvaluateConfig) -> set[int]:
    """The positions whose samples are kept: those of the WAV/PNG examples and of the figures."""
    return set(picked(n, cfg.samples)) | set(picked(n, cfg.figure_clips))


def codec_reference(held_out: dict[str, Any]) -> dict[str, Any]:
    """What the evaluator stage measured on the codec's reconstructions of the whole test split
    (the ceiling generation inherits from the tokenizers), beside the real mels' figures."""
    keys = ("audio_acc", "audio_acc_rhythm", "audio_period_err")
    out = {f"{k}_local": held_out[k] for k in keys if k in held_out}
    out |= {f"{k}_codec_local": held_out[f"{k}_codec"] for k in keys if f"{k}_codec" in held_out}
    return (out | {"clips": held_out["test_clips"]}) if out else {}


def decode_clips(
    batch: dict[str, np.ndarray], rows: dict[str, int], mel_shape: tuple[int, ...], num_frames: int
) -> dict[str, np.ndarray]:
    """Ray Data batch function: stored rows → `row` (index in the test set), `image` (the middle
    frame) and `mel`; rows not in the test set are dropped. A task, not an actor: a 2-CPU
    machine then still has a CPU for the read tasks beside the generation actor."""
    frame = eval_frame(num_frames)
    out: dict[str, list] = {"row": [], "image": [], "mel": []}
    for clip_id, frames, mel in zip(batch["clip_id"], batch["frames"], batch["mel"], strict=True):
        if clip_id not in rows:
            continue
        images, spec = decode_row(list(frames[frame : frame + 1]), mel, mel_shape)
        out["row"].append(rows[clip_id])
        out["image"].append(images[0])
        out["mel"].append(spec)
    if not out["row"]:
        return {
            "row": np.zeros(0, np.int64),
            "image": np.zeros((0, 1, 1, 3), np.uint8),
            "mel": np.zeros((0, *mel_shape), np.float32),
        }
    return {k: np.stack(v) for k, v in out.items()}


class EmbedGenerated:
    """Ray Data callable class: a `GenerateBatch` whose samples are scored where they are made.
    Per (task, s), the evaluator's outputs on the generated mels and/or frames replace them
    (columns `column(task, s, "audio/embedding")` ...: see `outputs`), and the samples of the
    rows in `examples_at` come back as `column(task, s, "example")`, an .npz of
    EXAMPLE_FIELDS (empty bytes for the other rows). The generated waves stay only with
    `vocode` (the paper-protocol scorers). So the driver receives a few kB per clip instead of a
    generated mel (271 kB) that it would score and drop."""

    FIELDS = ("embedding", "logits", "joint", "rhythm")
    EXAMPLE_FIELDS = ("mel", "image", "audio_ids", "image_ids")

    def __init__(self, evaluator_dir: str, examples_at: list[int], **generate: Any) -> None:
        from pipeline.inference.generate import GenerateBatch

        self.generate = GenerateBatch(**generate)
        self.evaluator = LocalEvaluator.load(evaluator_dir, self.generate.generator.device)
        self.examples_at = {int(r) for r in examples_at}

    @staticmethod
    def column(task_name: str, guidance: float, name: str) -> str:
        from pipeline.inference.generate import GenerateBatch

        return GenerateBatch.column(task_name, guidance, name)

    @classmethod
    def outputs(
        cls, batch: dict[str, np.ndarray], task_name: str, guidance: float, modality: str
    ) -> Outputs:
        """The evaluator's outputs on one run's `modality` ("audio"/"image") samples of a
        returned batch, copied out of it (a column is a view that keeps the batch alive)."""
        parts = {f: batch.get(cls.column(task_name, guidance, f"{modality}/{f}"))
                 for f in cls.FIELDS}  # fmt: skip
        return Outputs(**{f: None if v is None else np.array(v) for f, v in parts.items()})

    @classmethod
    def examples(
        cls, batch: dict[str, np.ndarray], task_name: str, guidance: float
    ) -> dict[int, dict[str, np.ndarray]]:
        """The samples of the example rows of one run in a returned batch, by row."""
        out = {}
        blobs = batch[cls.column(task_name, guidance, "example")]
        for row, blob in zip(batch["row"], blobs, strict=True):
            if len(blob):
                with np.load(_stdio.BytesIO(blob), allow_pickle=False) as npz:
                    out[int(row)] = {name: npz[name] for name in cls.EXAMPLE_FIELDS}
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.generate(batch)
        rows = out["row"]
        for task_name, s in self.generate.runs:
            col = {name: out.pop(self.column(task_name, s, f"gen_{name}"))
                   for name in self.EXAMPLE_FIELDS}  # fmt: skip
            if not self.generate.vocode:
                out.pop(self.column(task_name, s, "gen_wave"))
            scored = {}
            if task_name != "audio2image":
                scored["audio"] = self.evaluator.audio_outputs(col["mel"])
            if task_name != "image2audio":
                scored["image"] = self.evaluator.image_outputs(col["image"])
            for modality, outputs in scored.items():
                for f in self.FIELDS:
                    if getattr(outputs, f) is not None:
                        out[self.column(task_name, s, f"{modality}/{f}")] = getattr(outputs, f)
            blobs = []
            for i, row in enumerate(rows):
                blob = b""
                if int(row) in self.examples_at:
                    buf = _stdio.BytesIO()
                    np.savez(buf, **{name: col[name][i] for name in self.EXAMPLE_FIELDS})
                    blob = buf.getvalue()
                blobs.append(blob)
            out[self.column(task_name, s, "example")] = np.array(blobs, dtype=object)
        return out


@dataclass
class Generated:
    """What the driver keeps of a (task, s) run: evaluator outputs for every row (in row order)
    and the samples of the example rows."""

    rows: np.ndarray
    audio: Outputs | None
    image: Outputs | None
    examples: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    seconds: float = 0.0


class _Parts:
    """What the driver collects of one (task, s) run, batch by batch."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.audio: list[Outputs] = []
        self.image: list[Outputs] = []
        self.examples: dict[int, dict[str, np.ndarray]] = {}
        self.seconds = 0.0

    def finish(self) -> Generated:
        all_rows = np.concatenate(self.rows)
        order = np.argsort(all_rows, kind="stable")
        return Generated(
            all_rows[order],
            Outputs.cat(self.audio).take(order) if self.audio else None,
            Outputs.cat(self.image).take(order) if self.image else None,
            self.examples,
            self.seconds,
        )


def generate_and_embed(
    runs: list[tuple[str, str, float]],
    test: TestSet,
    extract_dir: Path,
    transformer_dir: Path,
    tokenizers_dir: Path,
    gen_cfg: GenerateConfig,
    cfg: EvaluateConfig,
    evaluator_dir: Path,
    seed: int,
    examples_at: set[int],
    count: int = 0,
    official: dict[tuple[str, str], OfficialMetrics] | None = None,
) -> dict[tuple[str, str], Generated]:
    """Run every (task, key, s) of `runs` in one Ray Data pass and keep what scoring needs, by
    (task, key): the outputs of the evaluator at `evaluator_dir`, run by the generation actors,
    and the samples of the rows in `examples_at`. Co-generation (`count` pairs, no input) runs
    alone. `official` maps an image→audio (task, key) to its paper-protocol scorer: its clips
    are vocoded and fed to it."""
    import ray

    if len(runs) > 1 and any(t == "cogenerate" for t, _, _ in runs):
        raise ValueError("co-generation takes no input: it runs in a pass of its own")
    if runs[0][0] == "cogenerate":
        ds = ray.data.range(count).map_batches(
            lambda b: {"row": b["id"].astype(np.int64)}, batch_format="numpy"
        )
    else:
        meta = load_meta(extract_dir)
        paths = [str(extract_dir / e["path"]) for e in meta["shards"].get("test", [])]
        if not paths:
            raise EvaluatorError(f"{extract_dir} has no test shards")
        rows = {clip_id: i for i, clip_id in enumerate(test.clip_ids)}
        ds = (
            ray.data.read_parquet(paths)
            .select_columns(READ_COLUMNS)
            .map_batches(
                decode_clips,
                fn_kwargs={
                    "rows": rows,
                    "mel_shape": tuple(meta["mel"]["shape"]),
                    "num_frames": meta["num_frames"],
                },
                batch_format="numpy",
            )
        )
    ds = ds.map_batches(
        EmbedGenerated,
        fn_constructor_kwargs={
            "evaluator_dir": str(evaluator_dir),
            "examples_at": sorted(examples_at),
            "transformer_dir": str(transformer_dir),
            "tokenizers_dir": str(tokenizers_dir),
            "cfg": as_dict(gen_cfg),
            "runs": [(task_name, s) for task_name, _, s in runs],
            "seed": seed,
            "vocode": bool(official),
        },
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=cfg.num_gpus_per_actor,
        batch_size=gen_cfg.batch_size,
        batch_format="numpy",
    )
    if runs[0][0] != "cogenerate":  # the driver needs no input back (but the paper's CS frame)
        ds = ds.drop_columns(["mel"] if official else ["mel", "image"])
    parts = {(task_name, key): _Parts() for task_name, key, _ in runs}
    sample_rate = _vocoder_rate(tokenizers_dir)
    clips = count if runs[0][0] == "cogenerate" else len(test)
    desc = "evaluate " + ", ".join(f"{t} s={s:g}" if t != "cogenerate" else t for t, _, s in runs)
    # disable=None: a bar on a terminal; under DVC the stage's log lines say what runs.
    bar = tqdm(total=clips, desc=desc, unit="clip", disable=None)
    for batch in ds.iter_batches(batch_size=gen_cfg.batch_size, batch_format="numpy"):
        bar.update(len(batch["row"]))
        for task_name, key, s in runs:
            part = parts[(task_name, key)]
            # Copies: a column of a batch Ray hands back is a view that keeps the whole batch's
            # buffers alive (until the end).
            part.rows.append(np.array(batch["row"]))
            part.seconds += float(batch[EmbedGenerated.column(task_name, s, "seconds")].sum())
            if official and (task_name, key) in official:
                waves = batch[EmbedGenerated.column(task_name, s, "gen_wave")]
                for wave, image, row in zip(waves, batch["image"], batch["row"], strict=True):
                    official[(task_name, key)].add_generated(
                        wave, sample_rate, image, test.clip_ids[int(row)]
                    )
            if task_name != "audio2image":
                part.audio.append(EmbedGenerated.outputs(batch, task_name, s, "audio"))
            if task_name != "image2audio":
                part.image.append(EmbedGenerated.outputs(batch, task_name, s, "image"))
            part.examples |= EmbedGenerated.examples(batch, task_name, s)
    bar.close()
    return {name: part.finish() for name, part in parts.items()}


def _vocoder_rate(tokenizers_dir: Path) -> int:
    return int(checkpoint.read_config(tokenizers_dir / "vocoder", "vocoder")["mel"]["sample_rate"])


def add_references(official: OfficialMetrics, test: TestSet, clips_dir: Path) -> None:
    """The ground-truth audio of every evaluated clip, decoded from its video (paper protocol)."""
    from pipeline.evaluation.official import reference_audio

    manifest = io.read_table(clips_dir / "manifest.parquet", columns=["clip_id", "path"])
    where = dict(zip(*(manifest.column(c).to_pylist() for c in ("clip_id", "path")), strict=True))
    for clip_id in tqdm(test.clip_ids, desc="reference audio", unit="clip", leave=False):
        if not where.get(clip_id):
            raise EvaluatorError(f"{clip_id} has no video in {clips_dir}/manifest.parquet")
        official.add_reference(*reference_audio(clips_dir / where[clip_id]))


def score(task_name: str, gen: Generated, ref: Reference) -> dict[str, float]:
    """The task's `_local` scores of one generated set."""
    if task_name == "image2audio":
        return score_audio(gen.audio, ref, gen.rows)
    if task_name == "audio2image":
        return score_image(gen.image, ref, gen.rows)
    return score_pairs(gen.image, gen.audio, ref)


def setting_key(guidance: float) -> str:
    """The metrics.json / MLflow key of a CFG scale: 3 → "s3", 1.5 → "s1_5"."""
    return f"s{guidance:g}".replace(".", "_")


def iter_settings(guidance: tuple[float, ...]) -> Iterator[tuple[str, float]]:
    """("s3", 3.0), ("s1", 1.0), ... in the configured order."""
    for s in guidance:
        yield setting_key(s), s


def describe_settings(gen_cfg: GenerateConfig) -> dict[str, Any]:
    return {"steps": gen_cfg.steps, "temperature": gen_cfg.temperature}


# ---------------------------------------------------------------------------------- the stage


@dataclass
class EvaluateSummary:
    metrics: dict[str, Any]
    report_dir: Path
    seconds: float

    def describe(self, experiment: str, uri: str) -> str:
        """The stage's closing lines: the headline and where everything is."""
        report = self.report_dir
        return (
            f"evaluate: {self.headline()}\n"
            f"  metrics: {report}/metrics.json (dvc metrics show)\n"
            f"  samples: {report}/samples/, figures: {report}/*.png, sweep: reports/sweep/\n"
            f"  MLflow: experiment {experiment!r} at {uri} "
            f"(visual-echoes compare; mlflow ui --backend-store-uri {uri})"
        )

    @property
    def comparable_to_paper(self) -> bool:
        """Whether every paper-protocol number is comparable to the paper's Table 1."""
        paper = self.metrics.get("paper_protocol", {}).values()
        return bool(paper) and all(v["comparable_to_paper"] for v in paper)

    def artifacts(self) -> list[Path]:
        """The report files the stage's MLflow run keeps (the samples folder aside)."""
        names = ("metrics.json", "per_class.csv", "image2audio.png", "audio2image.png",
                 "cogenerate.png", "confusion.png")  # fmt: skip
        return [self.report_dir / n for n in names if (self.report_dir / n).is_file()]

    def headline(self) -> str:
        parts = []
        for task_name in EVAL_ORDER:
            for key, values in self.metrics.get(task_name, {}).items():
                acc = values.get("acc_local", values.get("agreement_local"))
                fd = values.get("fd_local", values.get("fid_local"))
                rhythm = (
                    f", rhythm {values['acc_rhythm_local']:.1%}"
                    if "acc_rhythm_local" in values
                    else ""
                )
                parts.append(f"{task_name} {key}: accuracy {acc:.1%}{rhythm}, FD {fd:.2f}")
        return "; ".join(parts)


EVAL_ORDER = ("image2audio", "audio2image", "cogenerate")


def whole_vggsound_test(clips_dir: Path, max_clips: int) -> bool:
    """Whether the test clips are VGGSound's whole official test list: download selected every
    row of it (the manifest records the clips it could not fetch too) and evaluate caps none."""
    from pipeline.data.manifest import read_manifest
    from pipeline.data.vggsound import TEST_LIST_CLIPS

    test = [r for r in read_manifest(clips_dir) if r.split == "test"]
    vggsound = bool(test) and all(r.source == "vggsound" for r in test)
    return vggsound and len(test) in TEST_LIST_CLIPS and max_clips == 0


def run_evaluate(
    cfg: EvaluateConfig,
    gen_cfg: GenerateConfig,
    evaluator_cfg: EvaluatorConfig,
    paths: PathsConfig,
    *,
    seed: int,
    report_dir: Path,
    tracking_run: Any | None = None,
    cluster_wait_s: float = 0.0,
) -> EvaluateSummary:
    """Generate and score every task and CFG scale of `cfg`; write metrics, samples and figures
    under `report_dir` (see the module doc). Of `evaluator_cfg` it reads the device and the
    paper-protocol extractors (`official`). The generation actors' GPUs must be in the cluster,
    or come within `cluster_wait_s` from its autoscaler."""
    from pipeline.devices import resolve_device
    from pipeline.ray_runtime import ray_session, require_resources
    from pipeline.tokenizers.vocoder import Vocoder

    start = time.monotonic()
    extract_dir, tokenizers_dir = Path(paths.extract), Path(paths.tokenizers)
    device = resolve_device(evaluator_cfg.device)
    evaluator = LocalEvaluator.load(paths.evaluator, device)
    rows = evaluated_rows(extract_dir, cfg.max_clips)
    examples_at = example_rows(len(rows), cfg)
    test = load_test_set(extract_dir, evaluator, rows, examples_at)
    ref = test.ref
    cogenerated = set(range(min(cfg.cogenerate_samples, max(cfg.samples, cfg.figure_clips))))
    metrics: dict[str, Any] = {
        "comparable_to_paper": False,
        "extractor": f"{LOCAL_NAME}@{evaluator.sha256[:8]}",
        "clips": len(test),
        **describe_settings(gen_cfg),
        "reference": score_reference(ref),
        "codec": codec_reference(evaluator.held_out),
    }
    for section in ("reference", "codec"):
        _log(tracking_run, section, metrics[section])
    official = OfficialMetrics.load(evaluator_cfg.official, device)
    if official is not None:
        add_references(official, test, Path(paths.clips))
        # Comparable only on the whole VGGSound test list (docs/references.md).
        full_test = whole_vggsound_test(Path(paths.clips), cfg.max_clips)
    # The conditional tasks share one pass over the test clips; co-generation has its own.
    settings = list(iter_settings(cfg.guidance))
    conditional = [(t, key, g) for t in EVAL_ORDER if t in cfg.tasks and t != "cogenerate"
                   for key, g in settings]  # fmt: skip
    passes = [conditional] if conditional else []
    if "cogenerate" in cfg.tasks:
        passes.append([("cogenerate", "free", 1.0)])  # nothing to guide by: one run
    # Per generation run (repeat): what it generated and its paper-protocol scorers.
    generated: list[dict[tuple[str, str], Generated]] = []
    scorers: list[dict[tuple[str, str], OfficialMetrics]] = []
    with ray_session():
        require_resources(
            [{"GPU": cfg.num_gpus_per_actor}] * cfg.num_actors,
            f"evaluate asks for {cfg.num_actors} actor(s) x {cfg.num_gpus_per_actor:g} GPU",
            "set evaluate.num_gpus_per_actor to 0 to generate on CPU",
            cluster_wait_s,
        )
        for repeat in range(cfg.repeats):
            run_seed = seed + repeat * REPEAT_SEED_STRIDE
            generated.append({})
            scorers.append({(t, key): official.fresh_generated() for t, key, _ in conditional
                            if t == "image2audio"} if official is not None else {})  # fmt: skip
            for runs in passes:
                log.info(
                    "evaluate: %s on %d clips%s",
                    ", ".join(f"{t} at s={g:g}" if t != "cogenerate" else t for t, _, g in runs),
                    len(test),
                    f" (run {repeat + 1} of {cfg.repeats})" if cfg.repeats > 1 else "",
                )
                cogenerate = runs[0][0] == "cogenerate"
                generated[repeat] |= generate_and_embed(
                    runs, test, extract_dir, Path(paths.transformer), tokenizers_dir, gen_cfg,
                    cfg, Path(paths.evaluator), run_seed,
                    cogenerated if cogenerate else examples_at,
                    count=cfg.cogenerate_samples, official=None if cogenerate else scorers[repeat],
                )  # fmt: skip
    examples: dict[str, dict[str, Generated]] = {}
    for runs in passes:
        for task_name, key, _ in runs:
            each = [score(task_name, gen[(task_name, key)], ref)
                    | {"seconds": round(gen[(task_name, key)].seconds, 1)}
                    for gen in generated]  # fmt: skip
            values = mean_of_runs(each)
            metrics.setdefault(task_name, {})[key] = values
            if (task_name, key) in scorers[0]:
                paper = average_runs([run[(task_name, key)].scores(full_vggsound_test=full_test)
                                      for run in scorers])  # fmt: skip
                metrics.setdefault("paper_protocol", {})[key] = paper
                _log(tracking_run, f"paper/{key}", paper)
            examples.setdefault(task_name, {})[key] = generated[0][(task_name, key)]
            _log(tracking_run, f"{task_name}/{key}", values)
    vocoder = Vocoder.load(tokenizers_dir / "vocoder")
    write_examples(examples, test, ref, evaluator, vocoder, report_dir, cfg)
    write_per_class(generated[0], ref, evaluator.labels, report_dir)
    io.write_json(report_dir / "metrics.json", metrics)
    return EvaluateSummary(metrics, report_dir, time.monotonic() - start)


def write_examples(
    examples: dict[str, dict[str, Generated]],
    test: TestSet,
    ref: Reference,
    evaluator: LocalEvaluator,
    vocoder: Any,
    report_dir: Path,
    cfg: EvaluateConfig,
) -> None:
    """Sample WAVs + mel PNGs of the headline setting, and one figure per task."""
    from pipeline.data import audio
    from pipeline.evaluation.figures import generation_figure, image_grid_figure

    samples = report_dir / "samples"
    shutil.rmtree(samples, ignore_errors=True)  # a rerun with fewer samples keeps no stale ones
    shown, kept = picked(len(test), cfg.figure_clips), picked(len(test), cfg.samples)
    for task_name, runs in examples.items():
        headline_key, headline = next(iter(runs.items()))
        folder = samples / task_name
        if task_name == "image2audio":
            for row in kept:
                mel = headline.examples[row]["mel"]
                name = f"{test.clip_ids[row]}.{headline_key}"
                audio.save_wav(
                    folder / f"{name}.wav", vocoder(mel, seed=row), vocoder.mel.sample_rate
                )
                audio.save_mel_png(
                    folder / f"{name}.png", mel, f"{test.labels[row]} ({headline_key})"
                )
            if not shown:  # figure_clips: 0
                continue
            gen = {k: np.stack([g.examples[r]["mel"] for r in shown]) for k, g in runs.items()}
            guess = {k: [evaluator.labels[i] for i in evaluator.audio_outputs(v).predicted]
                     for k, v in gen.items()}  # fmt: skip
            generation_figure(
                [test.clip_ids[r] for r in shown], [test.labels[r] for r in shown],
                test.frames(shown), test.mels(shown), gen,
                report_dir / "image2audio.png", guess,
            )  # fmt: skip
        elif task_name == "audio2image":
            if shown:
                rows = [("ground truth", test.frames(shown))]
                rows += [
                    (k, np.stack([g.examples[r]["image"] for r in shown])) for k, g in runs.items()
                ]
                image_grid_figure(rows, report_dir / "audio2image.png", "audio → image")
            for row in kept:
                _save_png(folder / f"{test.clip_ids[row]}.{headline_key}.png",
                          headline.examples[row]["image"])  # fmt: skip
        else:
            pairs = sorted(headline.examples)[: max(cfg.figure_clips, 1)]
            frames = np.stack([headline.examples[r]["image"] for r in pairs])
            mels = np.stack([headline.examples[r]["mel"] for r in pairs])
            guess = [evaluator.labels[i] for i in evaluator.image_outputs(frames).predicted]
            generation_figure(
                [f"pair {r}" for r in pairs], guess, frames, mels, {},
                report_dir / "cogenerate.png", mel_title="co-generated mel",
            )  # fmt: skip
            for r in pairs[: cfg.samples]:
                audio.save_wav(folder / f"pair-{r}.wav", vocoder(headline.examples[r]["mel"], seed=r),
                               vocoder.mel.sample_rate)  # fmt: skip
                _save_png(folder / f"pair-{r}.png", headline.examples[r]["image"])


PER_CLASS_COLUMNS = ("task", "setting", "label", "clips", "correct", "acc_local")


def write_per_class(
    generated: dict[tuple[str, str], Generated],
    ref: Reference,
    labels: list[str],
    report_dir: Path,
) -> None:
    """Where the conditional tasks fail: `per_class.csv` (class accuracy of the generated sample
    for each label of the conditioning clip, task and CFG scale) and `confusion.png` (one matrix
    per task and scale; rows: the condition's label, columns: the evaluator's class)."""
    from pipeline.evaluation.figures import confusion_figure
    from pipeline.metrics.math import confusion_matrix

    rows, matrices = [], {}
    for (task_name, key), gen in generated.items():
        out = {"image2audio": gen.audio, "audio2image": gen.image}.get(task_name)
        if out is None:  # co-generation has no condition to be right about
            continue
        matrix = confusion_matrix(out.predicted, ref.labels[gen.rows], len(labels))
        matrices[f"{task_name} {key}"] = matrix
        for i, label in enumerate(labels):
            clips, correct = int(matrix[i].sum()), int(matrix[i, i])
            acc = round(correct / clips, 4) if clips else ""
            rows.append(dict(zip(PER_CLASS_COLUMNS, (task_name, key, label, clips, correct, acc),
                                 strict=True)))  # fmt: skip
    if not matrices:  # no conditional task this time: leave no stale table or figure
        for name in ("per_class.csv", "confusion.png"):
            (report_dir / name).unlink(missing_ok=True)
        return
    io.write_csv(report_dir / "per_class.csv", rows, PER_CLASS_COLUMNS)
    confusion_figure(matrices, labels, report_dir / "confusion.png")


def mean_of_runs(runs: list[dict[str, float]]) -> dict[str, Any]:
    """One run's scores as they are; several runs' as their mean, with each run under `runs`."""
    if len(runs) == 1:
        return runs[0]
    mean = {k: float(np.mean([run[k] for run in runs])) for k in runs[0]}
    return mean | {"runs": runs}


def _log(tracking_run: Any | None, prefix: str, values: dict[str, Any]) -> None:
    """The numbers of `values` to MLflow under `prefix/`, each run's under `prefix/run<i>/`."""
    if tracking_run is None:
        return
    numbers = {f"{prefix}/{k}": v for k, v in values.items() if _is_number(v)}
    for i, run in enumerate(values.get("runs", []), start=1):
        numbers |= {f"{prefix}/run{i}/{k}": v for k, v in run.items() if _is_number(v)}
    tracking_run.log_metrics(numbers)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    buf = _stdio.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    io.write_bytes(path, buf.getvalue())
