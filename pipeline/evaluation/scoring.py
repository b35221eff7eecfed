"""Scores of generated samples against the test split, from the offline evaluator.

Every key ends in `_local`: FD on the evaluator's embeddings, IS on its softmax over the
dataset's labels, class accuracy of the generated sample against the label of the clip that
conditioned it, a CS-style 100 x cosine in the evaluator's joint space, and for mels the time
structure alone (`acc_rhythm_local`, `period_err_local`: `pipeline.metrics.rhythm`). None of them
is on the scale of the paper's PANNs/VGGish/CLIP numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.evaluation.local import LocalEvaluator, Outputs
from pipeline.evaluation.train_local import EvaluatorError
from pipeline.metrics.math import (
    IS_SPLITS,
    GaussianStats,
    accuracy,
    clip_score,
    frechet_distance,
    inception_score,
)
from pipeline.metrics.rhythm import RhythmScorer


@dataclass
class Reference:
    """The evaluator's outputs on the real test clips the generated ones are compared with."""

    labels: np.ndarray  # (n,) evaluator class index of each clip
    audio: Outputs  # real mels
    image: Outputs  # conditioning frames
    audio_stats: GaussianStats
    image_stats: GaussianStats
    rhythm: RhythmScorer | None = None  # the evaluator's, with its label names
    names: tuple[str, ...] = ()


def reference(
    ev: LocalEvaluator, labels: list[str], mels: np.ndarray, frames: np.ndarray
) -> Reference:
    """The evaluator on the real test clips: mels (n, F, T) and conditioning frames (n, S, S, 3)."""
    return reference_of(ev, labels, ev.audio_outputs(mels), ev.image_outputs(frames))


def reference_of(
    ev: LocalEvaluator, labels: list[str], audio: Outputs, image: Outputs
) -> Reference:
    """The `Reference` of real test clips from the evaluator's outputs on them (streamed:
    `train_local.split_outputs`)."""
    index = ev.label_index(labels)
    if (index < 0).any():
        unknown = sorted({lab for lab, i in zip(labels, index, strict=True) if i < 0})
        raise EvaluatorError(
            f"the evaluator was not trained on label(s) {', '.join(unknown[:3])}: rerun the "
            "evaluator stage on the same extract output"
        )
    return Reference(
        index,
        audio,
        image,
        GaussianStats.from_features(audio.embedding),
        GaussianStats.from_features(image.embedding),
        ev.rhythm,
        tuple(ev.labels),
    )


def _is(logits: np.ndarray) -> float:
    splits = min(IS_SPLITS, len(logits))
    return inception_score(logits, splits=splits)[0]


def _fd(features: np.ndarray, ref: GaussianStats) -> float:
    return frechet_distance(GaussianStats.from_features(features), ref)


def rhythm_scores(out: Outputs, ref: Reference, rows: np.ndarray) -> dict[str, float]:
    """acc_rhythm and period_err of mels (row i judged against reference clip `rows[i]`'s
    label); nothing when the evaluator has no rhythm scorer."""
    if ref.rhythm is None or out.rhythm is None:
        return {}
    labels = [ref.names[i] for i in ref.labels[rows]]
    return ref.rhythm.score_rows(out.rhythm, labels)


def score_audio(out: Outputs, ref: Reference, rows: np.ndarray) -> dict[str, float]:
    """Evaluator outputs of generated mels; row i was conditioned on reference clip `rows[i]`."""
    return {
        "acc_local": accuracy(out.predicted, ref.labels[rows]),
        "fd_local": _fd(out.embedding, ref.audio_stats),
        "is_local": _is(out.logits),
        "cs_local": clip_score(ref.image.joint[rows], out.joint),
    } | {f"{k}_local": v for k, v in rhythm_scores(out, ref, rows).items()}


def score_image(out: Outputs, ref: Reference, rows: np.ndarray) -> dict[str, float]:
    """Evaluator outputs of generated frames; row i was conditioned on clip `rows[i]`'s audio."""
    return {
        "acc_local": accuracy(out.predicted, ref.labels[rows]),
        "fid_local": _fd(out.embedding, ref.image_stats),
        "is_local": _is(out.logits),
        "cs_local": clip_score(out.joint, ref.audio.joint[rows]),
    }


def score_pairs(img: Outputs, aud: Outputs, ref: Reference) -> dict[str, float]:
    """Co-generated (frame, mel) pairs: quality of each side, and whether they agree."""
    return {
        "fd_local": _fd(aud.embedding, ref.audio_stats),
        "fid_local": _fd(img.embedding, ref.image_stats),
        "is_audio_local": _is(aud.logits),
        "is_image_local": _is(img.logits),
        "agreement_local": accuracy(img.predicted, aud.predicted),
        "cs_local": clip_score(img.joint, aud.joint),
    }


def score_reference(ref: Reference) -> dict[str, float]:
    """What the evaluator gives the real test clips: the ceiling a generator is measured against."""
    rows = np.arange(len(ref.labels))
    return {
        "audio_acc_local": accuracy(ref.audio.predicted, ref.labels),
        "image_acc_local": accuracy(ref.image.predicted, ref.labels),
        "audio_is_local": _is(ref.audio.logits),
        "cs_local": clip_score(ref.image.joint[rows], ref.audio.joint[rows]),
        "cs_shuffled_local": clip_score(ref.image.joint, np.roll(ref.audio.joint, 1, axis=0)),
    } | {f"audio_{k}_local": v for k, v in rhythm_scores(ref.audio, ref, rows).items()}
