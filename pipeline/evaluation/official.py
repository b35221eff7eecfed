"""The paper's FD, FAD, IS and CS with the official extractors, streamed one clip at a time.

`OfficialMetrics` holds whichever of the four checkpoints are configured (PANNs Cnn14 16 kHz,
VGGish, CLIP ViT-B/32, Wav2CLIP) and folds in generated and reference clips one by one, so that a
15k-clip test set never sits in memory: every clip goes through audioldm_eval's main-2024 input
path (`prepare_wave`: channel 0, minus its mean, torchaudio's default sinc resampler to 16 kHz,
zero-padded to 32000 samples), then
- PANNs: one 2048-d row per clip into a streaming mean/covariance (FD), and its 527 logits kept
  for IS on the generated set (small: 2 kB a clip);
- VGGish: every 0.96 s frame's 128-d row into a streaming mean/covariance (FAD pools frames, it
  does not average per clip);
- CLIP image x Wav2CLIP: the cosine of the conditioning frame and the generated audio, per clip
  (CS = 100 x mean cosine). Wav2CLIP reads the same 16 kHz padded waveform.

`scores()` labels the numbers (docs/references.md, "Paper-protocol metrics") (extractor in the key, checkpoint
hashes, protocol, N) and says whether they are comparable to the paper's Table 1, with the
failed conditions listed; `average_runs` joins the scores of several generation runs, as the
paper averages two. IS and CS take the generated clips in clip-id order, whatever order they
arrive in. `reference_audio` decodes a test clip's audio track with ffmpeg.
The rules these follow are in docs/references.md, "Paper-protocol metrics".
"""

from __future__ import annotations

import copy
import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from pipeline.config import OfficialExtractorsConfig
from pipeline.errors import PipelineError
from pipeline.media import MediaError, ffmpeg_exe
from pipeline.metrics.extractors.audio_io import EVAL_SAMPLE_RATE, prepare_wave
from pipeline.metrics.extractors.clip_image import ClipImageExtractor
from pipeline.metrics.extractors.panns import PannsExtractor
from pipeline.metrics.extractors.vggish import VggishExtractor
from pipeline.metrics.extractors.wav2clip import Wav2ClipExtractor
from pipeline.metrics.math import (
    IS_SEED,
    IS_SPLITS,
    StatsAccumulator,
    clip_score,
    frechet_distance,
    inception_score,
)

log = logging.getLogger(__name__)

PROTOCOL = "audioldm_eval-main2024"
# torchaudio.functional.resample at its defaults, as audio_io.resample re-implements it.
RESAMPLER = "torchaudio-sinc-hann-w6-r0.99"


def clip_vit_b32_sha256() -> str:
    """OpenAI's ViT-B-32.pt sha256: part of its download URL, which clip._download checks; kept
    once, in pipeline/weights/registry.yaml."""
    from pipeline.weights.registry import load_registry

    return load_registry()["clip_vit_b32"].sha256


SHA_CHARS = 8
# The paper's Table 1 averages two generation runs (docs/references.md, "Visual Echoes").
PAPER_RUNS = 2
METRICS = ("fd_panns", "fad_vggish", "is_panns", "is_panns_std", "cs_clip_wav2clip")

# config field → what the paper needs it for, in the words of the not-comparable reasons.
CHECKPOINT_USES = {
    "panns_cnn14_16k": "FD and IS need Cnn14_16k_mAP=0.438.pth",
    "vggish": "FAD needs vggish-10086976.pth",
    "clip_vit_b32": "CS needs OpenAI ViT-B-32.pt",
    "wav2clip": "CS needs Wav2CLIP.pt",
}
LOADERS = {
    "panns_cnn14_16k": PannsExtractor,
    "vggish": VggishExtractor,
    "clip_vit_b32": ClipImageExtractor,
    "wav2clip": Wav2ClipExtractor,
}


class OfficialMetricsError(PipelineError, ValueError):
    """Scores asked of clip sets too small to give them."""


class ReferenceAudioError(MediaError):
    """A test clip whose audio track cannot be decoded; the message names the file."""


class OfficialMetrics:
    """Paper-protocol FD (PANNs), FAD (VGGish), IS (PANNs) and CS (CLIP x Wav2CLIP) of a generated
    set against a reference set, from any subset of the four extractors.

    Usage: `add_reference` for each ground-truth clip, `add_generated` for each generated one,
    then `scores()`. `reset_generated()` empties the generated side only, and `fresh_generated()`
    gives a second scorer on the same reference side, so one reference pass serves several
    generated sets (tasks, CFG scales), one after another or side by side.
    """

    def __init__(
        self,
        panns: PannsExtractor | None = None,
        vggish: VggishExtractor | None = None,
        clip: ClipImageExtractor | None = None,
        wav2clip: Wav2ClipExtractor | None = None,
    ) -> None:
        if panns is None and vggish is None and clip is None and wav2clip is None:
            raise ValueError("OfficialMetrics needs at least one extractor")
        self.panns = panns
        self.vggish = vggish
        self.clip = clip
        self.wav2clip = wav2clip
        self.n_reference = 0
        self._reference_panns = StatsAccumulator(PannsExtractor.dim)
        self._reference_vggish = StatsAccumulator(VggishExtractor.dim)
        self.reset_generated()

    @classmethod
    def load(
        cls, cfg: OfficialExtractorsConfig, device: str | torch.device | None = None
    ) -> OfficialMetrics | None:
        """The extractors whose paths `cfg` gives, on `device`; None when every path is "".

        A configured path that is missing, corrupt or of another architecture raises the
        loaders' CheckpointError. Nothing is downloaded.
        """
        loaded: dict[str, Any] = {}
        for field, loader in LOADERS.items():
            path = getattr(cfg, field)
            if path:
                loaded[field] = loader.from_checkpoint(Path(path).expanduser(), device)
                log.info("official %s: %s (sha256 %s)", field, path, loaded[field].sha256[:8])
        if not loaded:
            return None
        if ("clip_vit_b32" in loaded) != ("wav2clip" in loaded):
            lone = "clip_vit_b32" if "clip_vit_b32" in loaded else "wav2clip"
            log.warning("%s is configured without its CS partner: CS will not be computed", lone)
        return cls(
            loaded.get("panns_cnn14_16k"),
            loaded.get("vggish"),
            loaded.get("clip_vit_b32"),
            loaded.get("wav2clip"),
        )

    @property
    def has_cs(self) -> bool:
        return self.clip is not None and self.wav2clip is not None

    def reset_generated(self) -> None:
        """Forget the generated clips (the reference side is kept)."""
        self.n_generated = 0
        self._generated_panns = StatsAccumulator(PannsExtractor.dim)
        self._generated_vggish = StatsAccumulator(VggishExtractor.dim)
        self._ids: set[str] = set()
        self._logits: dict[str, np.ndarray] = {}  # clip id -> (527,) float32
        self._cs: dict[str, float] = {}  # clip id -> 100 x cosine

    def fresh_generated(self) -> OfficialMetrics:
        """A scorer sharing this one's extractors and reference side, with an empty generated
        side of its own: one reference pass, several generated sets scored side by side."""
        other = copy.copy(self)
        other.reset_generated()
        return other

    def _audio_features(self, wave: torch.Tensor) -> tuple[np.ndarray | None, ...]:
        """(PANNs embedding (1, 2048), PANNs logits (527,), VGGish rows (n, 128)) of a prepared
        wave; None for an extractor that is not configured."""
        embedding = logits = rows = None
        if self.panns is not None:
            embedding, logits = self.panns.features(wave)
        if self.vggish is not None:
            rows = self.vggish.embed(wave)
        return embedding, logits, rows

    def add_generated(
        self,
        wave: ArrayLike,
        sample_rate: int,
        condition_image: np.ndarray | None = None,
        clip_id: str | None = None,
    ) -> None:
        """Fold in one generated clip: wave (T,) mono (or (C, T), channel 0 used) at
        `sample_rate`, and the frame (S, S, 3) uint8 that conditioned it, needed when CS is
        configured. All features are computed before any is stored, so a failure adds nothing.

        IS and CS are computed over the clips sorted by `clip_id`, so they do not depend on the
        order clips arrive in (Ray returns batches as actors finish them); without an id, a
        clip's arrival index is its id.
        """
        if self.has_cs and condition_image is None:
            raise ValueError("CS is configured: add_generated needs the conditioning image")
        key = clip_id if clip_id is not None else f"#{self.n_generated:09d}"
        if key in self._ids:
            raise ValueError(f"clip {key} was already added to this generated set")
        prepared = prepare_wave(wave, sample_rate)  # (1, T) float32 at 16 kHz
        embedding, logits, rows = self._audio_features(prepared)
        cs = None
        if self.has_cs:
            image_emb = self.clip.embed(condition_image)
            audio_emb = self.wav2clip.embed(prepared)
            cs = clip_score(image_emb[None], audio_emb[None])
        if embedding is not None:
            self._generated_panns.add(embedding)
            self._logits[key] = logits
        if rows is not None:
            self._generated_vggish.add(rows)
        if cs is not None:
            self._cs[key] = cs
        self._ids.add(key)
        self.n_generated += 1

    def add_reference(self, wave: ArrayLike, sample_rate: int) -> None:
        """Fold in one ground-truth clip's audio: wave (T,) or (C, T) at `sample_rate`."""
        embedding, _, rows = self._audio_features(prepare_wave(wave, sample_rate))
        if embedding is not None:
            self._reference_panns.add(embedding)
        if rows is not None:
            self._reference_vggish.add(rows)
        self.n_reference += 1

    def scores(self, full_vggsound_test: bool = False) -> dict[str, Any]:
        """The metrics and their labels, JSON-ready.

        Metric keys (present only when their extractors are configured; FD/FAD only when
        reference clips were added): `fd_panns`, `fad_vggish`, `is_panns`, `is_panns_std`,
        `is_splits` (min(10, n_generated)), `cs_clip_wav2clip`. Labels: `protocol`,
        `sample_rate`, `resampler`, `n_generated`, `n_reference`, `sha256_<config field>` (first
        8 hex of each file loaded), `comparable_to_paper` and `not_comparable_because` (the
        failed conditions, one sentence each). `full_vggsound_test`: the caller's word that the
        clips are the paper's whole VGGSound test list, one generated clip per test clip.
        """
        n_gen, n_ref = self.n_generated, self.n_reference
        if n_gen == 0:
            raise OfficialMetricsError(
                "no generated clips were added, so there is nothing to score"
            )
        if self.panns is not None and n_ref and min(n_gen, n_ref) < 2:
            raise OfficialMetricsError(
                f"FD needs at least 2 clips on each side, got {n_gen} generated and {n_ref} reference"
            )
        out: dict[str, Any] = {
            "protocol": PROTOCOL,
            "sample_rate": EVAL_SAMPLE_RATE,
            "resampler": RESAMPLER,
            "n_generated": n_gen,
            "n_reference": n_ref,
        }
        if self.panns is not None:
            if n_ref:
                out["fd_panns"] = frechet_distance(
                    self._generated_panns.stats(), self._reference_panns.stats()
                )
            splits = min(IS_SPLITS, n_gen)
            logits = np.stack([self._logits[k] for k in sorted(self._logits)])
            mean, std = inception_score(logits, splits=splits, seed=IS_SEED)
            out.update(is_panns=mean, is_panns_std=std, is_splits=splits)
        if self.vggish is not None and n_ref:
            out["fad_vggish"] = frechet_distance(
                self._generated_vggish.stats(), self._reference_vggish.stats()
            )
        if self.has_cs:
            out["cs_clip_wav2clip"] = float(np.mean([self._cs[k] for k in sorted(self._cs)]))
        for field, extractor in self.by_field().items():
            if extractor is not None:
                sha = extractor.sha256[:SHA_CHARS] if extractor.sha256 else None
                out[f"sha256_{field}"] = sha
        reasons = self._not_comparable(full_vggsound_test, out)
        out["comparable_to_paper"] = not reasons
        out["not_comparable_because"] = reasons
        return out

    def by_field(self) -> dict[str, Any]:
        """Each OfficialExtractorsConfig field → its extractor, or None when not configured."""
        return {
            "panns_cnn14_16k": self.panns,
            "vggish": self.vggish,
            "clip_vit_b32": self.clip,
            "wav2clip": self.wav2clip,
        }

    def _not_comparable(self, full_vggsound_test: bool, out: dict[str, Any]) -> list[str]:
        """The comparability conditions (docs/references.md) that fail, one sentence each; empty when the numbers compare."""
        reasons = []
        for field, extractor in self.by_field().items():
            if extractor is None:
                reasons.append(f"{field} is not configured ({CHECKPOINT_USES[field]})")
            elif not extractor.sha256:
                reasons.append(f"{field} was not loaded from a file (no sha256 to record)")
        openai = clip_vit_b32_sha256()
        if self.clip is not None and self.clip.sha256 and self.clip.sha256 != openai:
            reasons.append(
                f"clip_vit_b32 (sha256 {self.clip.sha256[:SHA_CHARS]}) is not OpenAI's "
                f"ViT-B-32.pt (sha256 {openai[:SHA_CHARS]})"
            )
        if self.n_reference == 0 and (self.panns is not None or self.vggish is not None):
            reasons.append("no reference clips were added, so FD and FAD are missing")
        if not full_vggsound_test:
            reasons.append("the clips are not the paper's full VGGSound test list")
        elif self.n_reference and self.n_generated != self.n_reference:
            reasons.append(
                f"{self.n_generated} generated clips for {self.n_reference} reference clips: "
                "the paper generates one clip per test clip"
            )
        if out.get("is_splits", IS_SPLITS) != IS_SPLITS:
            reasons.append(f"IS used {out['is_splits']} splits, not {IS_SPLITS}")
        return reasons


def average_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The `scores()` of one generated set per generation run, as one labelled entry.

    Each of METRICS present is the mean over the runs; `repeats` is the number of runs and, when
    there are several, `runs` holds each run's METRICS. The labels are the first run's
    (`n_generated` counts one run). `not_comparable_because` lists every run's reasons once, plus
    one when the number of runs is not the paper's PAPER_RUNS.
    """
    if not runs:
        raise ValueError("average_runs needs at least one run")
    first = runs[0]
    out = {k: v for k, v in first.items() if k not in METRICS}
    present = [k for k in METRICS if k in first]
    out |= {k: float(np.mean([run[k] for run in runs])) for k in present}
    out["repeats"] = len(runs)
    if len(runs) > 1:
        out["runs"] = [{k: run[k] for k in present} for run in runs]
    reasons = list(dict.fromkeys(r for run in runs for r in run["not_comparable_because"]))
    if len(runs) != PAPER_RUNS:
        reasons.append(
            f"{len(runs)} generation run{'s' if len(runs) > 1 else ''} averaged, "
            f"the paper averages {PAPER_RUNS}"
        )
    out["comparable_to_paper"] = not reasons
    out["not_comparable_because"] = reasons
    return out


# The output stream ffmpeg prints after "Output #0": the rate of the samples it writes.
_OUTPUT_SECTION = re.compile(r"^Output #\d+", re.M)
_AUDIO_RATE = re.compile(r"Stream #\S+.*?: Audio: [^,]+, (\d+) Hz")


def reference_audio(
    video_path: str | Path, seconds: float = 10.0, timeout_s: float = 120.0
) -> tuple[np.ndarray, int]:
    """A clip's audio at its native rate: (wave (T,) float32, sample_rate).

    Channel 0 only (as audioldm_eval reads files), the first `seconds` of the first audio
    stream, decoded by ffmpeg to float32. The rate is the one ffmpeg reports for the samples it
    writes, i.e. the decoded stream's own. Raises ReferenceAudioError naming the file.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    path = Path(video_path)
    if not path.is_file():
        raise ReferenceAudioError(f"reference clip {path} does not exist")
    # An absolute path: neither "-" (stdin) nor "name:" (a protocol) nor an option.
    cmd = [
        ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "info",
        "-i",
        str(path.resolve()),
        "-map",
        "0:a:0",
        "-t",
        f"{seconds:.6f}",
        "-af",
        "pan=mono|c0=c0",  # channel 0 copied, not a downmix
        "-c:a",
        "pcm_f32le",
        "-f",
        "f32le",
        "pipe:1",
    ]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ReferenceAudioError(
            f"decoding the audio of {path} took over {timeout_s:.0f} s"
        ) from None
    text = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        why = lines[-1] if lines else f"ffmpeg exit status {proc.returncode}"
        raise ReferenceAudioError(f"cannot decode the audio of {path} ({why})")
    sections = _OUTPUT_SECTION.split(text, maxsplit=1)
    match = _AUDIO_RATE.search(sections[1]) if len(sections) == 2 else None
    if match is None:
        raise ReferenceAudioError(f"ffmpeg did not report the sample rate of {path}'s audio")
    rate = int(match[1])
    wave = np.frombuffer(proc.stdout, dtype="<f4")[: round(seconds * rate)].astype(np.float32)
    if wave.size == 0:
        raise ReferenceAudioError(f"the audio track of {path} holds no samples")
    return wave, rate
