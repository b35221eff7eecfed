"""Peak memory of the evaluate stage's driver against the size of the test split.

    python bench/memory.py [--repo .] [--clips 200 2000] [--steps 2] [--guidance 3] [--batch-size N]

On a project where `dvc repro evaluator` has run (transformer, tokenizers, evaluator, extract
output), it writes for each count an extract output whose test split holds that many clips (the
project's own test clips repeated under new ids, in shards of the project's `rows_per_shard`;
no train split), then runs `run_evaluate` on it in a fresh process with the project's own code
and params (image→audio at one CFG scale, `--steps` unmasking steps, `generate.batch_size` or
`--batch-size`: generation time grows with the first two, its memory with neither) and prints that process's peak resident memory (`ru_maxrss`) per
count and their ratio: resident in all, and its anonymous part (the process's own heap) apart from
the pages of Ray's shared object store it has touched (up to the store's size, shared with Ray's
processes). Ray's own processes (raylet, object store, workers) are not counted: they hold
batches in flight, not the split. The scratch folders go under the project's paths.cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402

SCRATCH = "bench-memory"

# Run in the project (its code first on sys.path) by `measure`; argv: extract dir, report dir,
# steps, guidance, batch size (0: params'). Prints one JSON line.
CHILD = """
import dataclasses, json, resource, sys, threading, time
from pathlib import Path
from pipeline.config import load_params
from pipeline.evaluation.evaluate import run_evaluate

def rss_kb():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssShmem")}

peak = {"RssAnon": 0, "RssShmem": 0}
def sample():
    while True:
        for k, v in rss_kb().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()

extract, report, steps, guidance, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
params = load_params()
paths = dataclasses.replace(params.paths, extract=extract)
cfg = dataclasses.replace(params.evaluate, tasks=("image2audio",), guidance=(guidance,),
                          max_clips=0, repeats=1)
gen = dataclasses.replace(params.generate, steps=steps,
                          batch_size=batch or params.generate.batch_size)
start = time.monotonic()
summary = run_evaluate(cfg, gen, params.evaluator, paths, seed=params.base.seed, report_dir=report)
print(json.dumps({"clips": summary.metrics["clips"], "seconds": time.monotonic() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_anon_mb": peak["RssAnon"] / 1024, "peak_shmem_mb": peak["RssShmem"] / 1024}))
"""


def scaled_extract(repo: Path, clips: int, out: Path) -> Path:
    """An extract output at `out` whose test split is `clips` rows: the project's test rows in
    turn, clip ids suffixed `-rNNNNN` (so still sorted), cut into shards as extract cuts them."""
    import pyarrow as pa

    from pipeline import io
    from pipeline.data.extracted import SHARD_SCHEMA, load_meta

    source = repo / _paths(repo)["extract"]
    meta = load_meta(source)
    rows = [row for e in meta["shards"]["test"]
            for row in io.read_table(source / e["path"]).to_pylist()]  # fmt: skip
    copies = [dict(rows[i % len(rows)], clip_id=f"{rows[i % len(rows)]['clip_id']}-r{i:05d}")
              for i in range(clips)]  # fmt: skip
    copies.sort(key=lambda r: r["clip_id"])
    shutil.rmtree(out, ignore_errors=True)
    size, shards = int(meta["rows_per_shard"]), []
    for n, start in enumerate(range(0, clips, size)):
        part = copies[start : start + size]
        rel = f"test/part-{n:05d}.parquet"
        io.write_table(out / rel, pa.Table.from_pylist(part, schema=SHARD_SCHEMA))
        shards.append({"path": rel, "rows": len(part), "first": part[0]["clip_id"]})
    io.write_json(out / io.META_NAME,
                  meta | {"counts": {"test": clips}, "shards": {"test": shards}})  # fmt: skip
    return out


def measure(
    repo: Path, clips: int, steps: int, guidance: float, batch_size: int = 0
) -> dict[str, float]:
    """Peak RSS (MB), seconds and clip count of evaluate's driver on `clips` test clips."""
    repo = repo.resolve()
    scratch = Path(_paths(repo)["cache"]) / SCRATCH
    extract = scaled_extract(repo, clips, repo / scratch / f"extract-{clips}")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(scratch / f"extract-{clips}"),
         str(scratch / f"report-{clips}"), str(steps), str(guidance), str(batch_size)],
        cwd=repo, capture_output=True, text=True, timeout=3600,
        env=_env(repo),
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"evaluate on {clips} clips failed:\n{proc.stderr[-4000:]}")
    shutil.rmtree(extract, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _paths(repo: Path) -> dict[str, str]:
    """The project's `paths:` as written (read without this checkout's params checks, so that
    a project on older code can be measured too)."""
    import yaml

    return yaml.safe_load((repo / "params.yaml").read_text())["paths"]


def _env(repo: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(repo)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", type=Path, default=Path("."), help="a project after `evaluator`")
    ap.add_argument("--clips", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--steps", type=int, default=2, help="unmasking steps (params: 12)")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=0, help="generation batch (0: params')")
    args = ap.parse_args(argv)
    print(
        f"{machine()}; evaluate (image2audio, s={args.guidance:g}, N={args.steps}) in {args.repo}"
    )
    results = [measure(args.repo, n, args.steps, args.guidance, args.batch_size)
               for n in args.clips]  # fmt: skip
    for r in results:
        print(f"{r['clips']:>6} test clips: peak RSS {r['peak_rss_mb']:6.0f} MB (anonymous "
              f"{r['peak_anon_mb']:4.0f} MB, object store pages {r['peak_shmem_mb']:4.0f} MB), "
              f"{r['seconds']:5.0f} s")  # fmt: skip
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"ratio {last['peak_rss_mb'] / first['peak_rss_mb']:.2f} (anonymous "
              f"{last['peak_anon_mb'] / first['peak_anon_mb']:.2f}), {last['clips']} vs "
              f"{first['clips']} clips")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
