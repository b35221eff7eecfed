"""`visual-echoes compare`: a table of MLflow runs (key params and metrics) to compare experiments.

Reads the tracking store the stages write to (`tracking.tracking_uri()`: $MLFLOW_TRACKING_URI or
the embedded sqlite store) with `mlflow.search_runs`, keeps the runs of the chosen stages, and
prints one row per run, newest first or sorted by a metric. Metric columns are matched by suffix
(`fd` picks `fd_local` of the headline setting), so `--sort fd` works on every store.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

from pipeline.errors import PipelineError

DEFAULT_STAGES = ("evaluate", "sweep-trial")
# Columns shown, in order: (header, candidate column names in the runs frame).
PARAM_COLUMNS = (
    ("T", ("params.temperature", "params.generate.temperature")),
    ("N", ("params.steps", "params.generate.steps")),
    ("s", ("params.guidance", "params.evaluate.guidance")),
    ("mask_mean", ("params.train.masking.mean",)),
)
METRIC_SUFFIXES = ("acc_local", "fd_local", "is_local", "cs_local")


class CompareError(PipelineError):
    """No experiment or no runs to compare, or an unknown sort key."""


def _headline_key(row: Any) -> str:
    """The metrics key of an evaluate run's headline setting: the first of evaluate.guidance."""
    raw = row.get("params.evaluate.guidance")
    if not isinstance(raw, str):
        return ""
    from pipeline.evaluation.evaluate import setting_key

    first = raw.strip("[]() ").split(",")[0].strip()
    try:
        return setting_key(float(first))
    except ValueError:
        return ""


def _metric(row: Any, columns: Sequence[str], suffix: str) -> float | None:
    """This run's value of a metric: an evaluate run's image→audio headline setting, a sweep
    trial's bare metric, else the first `*/<suffix>` column it has."""
    names = [f"metrics.image2audio/{_headline_key(row)}/{suffix}", f"metrics.{suffix}"]
    names += sorted(c for c in columns if c.startswith("metrics.") and c.endswith("/" + suffix))
    for name in names:
        v = row.get(name)
        if v is not None and not _isnan(v):
            return float(v)
    return None


def _value(row: Any, names: Sequence[str]) -> str:
    for name in names:
        v = row.get(name)
        if v is not None and not _isnan(v):
            return str(v)
    return ""


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def compare(
    experiment: str, stages: Sequence[str], sort: str | None, limit: int, tracking_uri: str
) -> str:
    """The table of the newest `limit` runs of `stages` in `experiment` (see the module doc)."""
    from pipeline import tracking

    runs = tracking.search_runs(experiment, tracking_uri)
    if runs is None:
        raise CompareError(
            f"no MLflow experiment {experiment!r} at {tracking.redact(tracking_uri)}"
        )
    rows = [r for r in runs if r.get("tags.stage") in stages]
    if not rows:
        raise CompareError(
            f"experiment {experiment!r} has no runs of stage {', '.join(stages)}; "
            "run `dvc repro` first"
        )
    columns = sorted({c for r in rows for c in r})
    values = [{s: _metric(r, columns, s) for s in METRIC_SUFFIXES} for r in rows]
    order = list(range(len(rows)))
    if sort:
        key = next((s for s in METRIC_SUFFIXES if s.split("_")[0] == sort or s == sort), None)
        if key is None:
            raise CompareError(f"--sort {sort!r}: no metric of that name (try fd, acc, is, cs)")
        sign = 1.0 if key == "fd_local" else -1.0  # FD: lower is better; the others higher
        order.sort(key=lambda i: (values[i][key] is None, sign * (values[i][key] or 0.0)))
    header = ["run", "stage", "started", *(h for h, _ in PARAM_COLUMNS), *METRIC_SUFFIXES]
    table = []
    for i in order[:limit]:
        row = rows[i]
        started = row.get("start_time")
        cells = [row["run_id"][:8], row.get("tags.stage", ""),
                 started.strftime("%Y-%m-%d %H:%M") if started is not None else ""]  # fmt: skip
        cells += [_value(row, names) for _, names in PARAM_COLUMNS]
        cells += ["" if values[i][s] is None else f"{values[i][s]:.3f}" for s in METRIC_SUFFIXES]
        table.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *table]]  # fmt: skip
    note = (
        "(*_local: the project's offline evaluator; not on the scale of the paper's FD/FAD/IS/CS)"
    )
    return "\n".join([*lines, note])


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser("compare", help="table of MLflow runs: key params and metrics")
    p.add_argument(
        "--experiment", default=None, help="MLflow experiment (default: params base.experiment)"
    )
    p.add_argument("--sort", default=None, help="metric to sort by: fd, acc, is or cs")
    p.add_argument("--stage", action="append", default=None,
                   help=f"stages to list (repeatable; default {' and '.join(DEFAULT_STAGES)})")  # fmt: skip
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> str:
    from pipeline import tracking

    experiment = args.experiment
    if experiment is None:
        from pipeline.config import load_params

        experiment = load_params(args.params).base.experiment
    stages = tuple(args.stage) if args.stage else DEFAULT_STAGES
    return compare(experiment, stages, args.sort, args.limit, tracking.tracking_uri())
