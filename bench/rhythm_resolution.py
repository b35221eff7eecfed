"""How much time and frequency detail the rhythm score needs: the real test mels, averaged over
blocks of k frames (or k mel bands) and stretched back, scored like reconstructions.

    python bench/rhythm_resolution.py [--factors 2 4 8 16]

Runs on what the DAG's extract stage left (params.yaml's `paths.extract`). The scorer is the
tokenizers' report's (`pipeline.tokenizers.train.fit_rhythm`: up to 64 train mels per label).
A codec whose ids each stand for k frames cannot do better than its decoder places detail inside
those k frames; a block average is what a decoder that places none gives back. Prints
`acc_rhythm` and `period_err` of each version and the share of each label's clips scored right.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from pipeline.config import load_params  # noqa: E402


def block_average(mels: np.ndarray, k: int, axis: int) -> np.ndarray:
    """mels (N, F, T) averaged over blocks of k along `axis` (1: bands, 2: frames) and repeated
    back to the input's size (a last short block is averaged on its own)."""
    size = mels.shape[axis]
    edges = list(range(0, size, k)) + [size]
    parts = [
        np.repeat(np.take(mels, range(a, b), axis=axis).mean(axis=axis, keepdims=True), b - a, axis)
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    ]
    return np.concatenate(parts, axis=axis)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factors", type=int, nargs="+", default=[2, 4, 8, 16])
    args = ap.parse_args()

    from pipeline.data.extracted import iter_examples
    from pipeline.tokenizers.train import fit_rhythm

    extract = Path(load_params(Path("params.yaml")).paths.extract)
    scorer = fit_rhythm(extract)
    if scorer is None:
        sys.exit(f"{extract} has no train split: run `dvc repro extract` first")
    examples = list(iter_examples(extract, "test"))
    mels = np.stack([e.mel.astype(np.float32) for e in examples])
    labels = [e.label for e in examples]
    print(machine())
    print(f"{len(mels)} test mels of {mels.shape[1]}x{mels.shape[2]}; labels: {scorer.labels}")
    versions = [("real", mels)]
    versions += [(f"frames / {k}", block_average(mels, k, 2)) for k in args.factors]
    versions += [(f"bands / {k}", block_average(mels, k, 1)) for k in args.factors]
    for name, version in versions:
        rows = scorer.describe(list(version))
        scores = scorer.score_rows(rows, labels)
        right = rows[:, 0].astype(int) == np.array([scorer.labels.index(y) for y in labels])
        per_label = [np.mean(right[np.array(labels) == y]) for y in scorer.labels]
        print(
            f"{name:>12}: acc_rhythm {scores['acc_rhythm']:.1%}, period_err "
            f"{scores['period_err']:.3f}; per label " + " ".join(f"{v:.0%}" for v in per_label)
        )


if __name__ == "__main__":
    main()
