"""How much of the demo's class accuracy is generation luck: image→audio for the test split,
scored by the offline evaluator, under several generation seeds.

    python bench/accuracy_spread.py [--seeds 3] [--guidance 3 1]

Runs on what the DAG left (params.yaml's paths: transformer, tokenizers, evaluator, extract) with
the settings under `generate:` and the evaluate stage's batching and seeding (batches of
`generate.batch_size`, each seeded with its base seed + its first row), so seed 0 gives the
`acc_local` that `evaluate` reported. Prints `acc_local` for each seed and CFG scale, their mean
and standard deviation, and the accuracy per label of the condition, averaged over the seeds.
The samples differ in floating point from CPU to CPU, so it prints the machine too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from pipeline.config import load_params  # noqa: E402

SEED_STRIDE = 1_000_003  # base seeds far apart: batch seeds (base + first row) never repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="generation seeds (first: evaluate's)")
    ap.add_argument("--guidance", type=float, nargs="+", help="CFG scales (default: evaluate's)")
    args = ap.parse_args()

    from pipeline.config import as_dict
    from pipeline.evaluation.evaluate import evaluated_rows, load_test_set
    from pipeline.evaluation.local import LocalEvaluator
    from pipeline.inference.generate import GenerateBatch
    from pipeline.metrics.math import accuracy, confusion_matrix

    params = load_params()
    paths, gen_cfg = params.paths, params.generate
    evaluator = LocalEvaluator.load(paths.evaluator)
    rows = evaluated_rows(paths.extract, params.evaluate.max_clips)
    test = load_test_set(paths.extract, evaluator, rows, keep=set(range(len(rows))))
    frames = test.frames(list(range(len(test))))
    labels = evaluator.label_index(test.labels)
    scales = [float(s) for s in args.guidance or params.evaluate.guidance]
    runs = [("image2audio", s) for s in scales]
    k, n, bs = len(evaluator.labels), len(test), gen_cfg.batch_size
    print(f"{machine()}; {n} test clips, N={gen_cfg.steps}, T={gen_cfg.temperature:g}")
    accs: dict[float, list[float]] = {s: [] for s in scales}
    per_label = {s: np.zeros(k) for s in scales}
    # evaluate's own actor class, so the batches are seeded as there (base seed + first row)
    generate = GenerateBatch(paths.transformer, paths.tokenizers, as_dict(gen_cfg), runs,
                             vocode=False)  # fmt: skip
    for i in range(args.seeds):
        generate.seed = params.base.seed + i * SEED_STRIDE
        start = time.perf_counter()
        batches = [generate({"image": frames[row : row + bs],
                             "row": np.arange(row, min(row + bs, n))})
                   for row in range(0, n, bs)]  # fmt: skip
        for s in scales:
            column = GenerateBatch.column("image2audio", s, "gen_mel")
            mels = np.concatenate([b[column] for b in batches])
            predicted = evaluator.audio_outputs(mels).predicted
            accs[s].append(accuracy(predicted, labels))
            matrix = confusion_matrix(predicted, labels, k)
            per_label[s] += matrix.diagonal() / np.maximum(matrix.sum(1), 1) / args.seeds
            print(f"s={s:g} seed {i}: acc_local {accs[s][-1]:.1%}", flush=True)
        print(f"  ({time.perf_counter() - start:.0f} s for seed {i})", flush=True)
    for s in scales:
        sd = np.std(accs[s], ddof=1) if args.seeds > 1 else float("nan")
        print(
            f"s={s:g}: acc_local mean {np.mean(accs[s]):.1%}, sd {sd:.1%} over {args.seeds} seeds"
        )
        for label, acc in zip(evaluator.labels, per_label[s], strict=True):
            print(f"    {label[:40]:40s} {acc:.0%}")


if __name__ == "__main__":
    main()
