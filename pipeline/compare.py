"""`visual-echoes compare`: a table of MLflow runs with what produced them, to compare experiments.

Reads the tracking store the stages write to (`tracking.tracking_uri()`: $MLFLOW_TRACKING_URI or
the embedded sqlite store), keeps the runs of the chosen stages, and prints one row per run,
newest first or sorted by a metric. Metric columns are matched by suffix (`fd` picks `fd_local`
of the headline setting), so `--sort fd` works on every store.

Lineage is flattened: each row also shows the params of the runs that made its inputs, found by
following the `lineage.<stage>.run_id` tags (`pipeline.tracking`) from the row back to download
(a sweep trial through its sweep run): the train run's mask mean, drop ratio, steps and model
size (encoder width x depth), the tokenizers' origin, the data source and its number of clips.
A row of one of those stages shows its own. `--where` filters on any column (`mask_mean>0.6`,
`train.mask_mean>0.6`, `status=FAILED`) and on any param, metric or tag: the row's own as
`params.<name>` / `metrics.<name>` / `tags.<name>`, those of a run it came from as
`<stage>.<name>` (`train.masking.mean`, `download.synthetic.num_classes`).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections.abc import Callable, Sequence
from io import StringIO
from typing import Any

from pipeline.errors import PipelineError

DEFAULT_STAGES = ("evaluate", "sweep-trial")
STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
# The row's own settings: (header, candidate column names in the run's flat dict).
OWN_COLUMNS = (
    ("T", ("params.temperature", "params.generate.temperature")),
    ("N", ("params.steps", "params.generate.steps")),
    ("s", ("params.guidance", "params.evaluate.guidance")),
)
METRIC_SUFFIXES = ("acc_local", "fd_local", "is_local", "cs_local")
LINEAGE_TAG = re.compile(r"tags\.lineage\.([\w-]+)\.run_id")
_WHERE = re.compile(r"\s*([\w.\-/]+)\s*(<=|>=|==|!=|=|<|>)\s*(.*?)\s*")


class CompareError(PipelineError):
    """No experiment or no runs to compare, an unknown sort key, or a filter that cannot apply."""


def _first(run: dict[str, Any], *names: str) -> Any:
    return next((run[n] for n in names if run.get(n) is not None and not _isnan(run[n])), None)


def _model_size(run: dict[str, Any]) -> str | None:
    width, depth = _first(run, "params.model.embed_dim"), _first(run, "params.model.depth")
    return f"{width}x{depth}" if width is not None and depth is not None else None


def _tokenizers(run: dict[str, Any]) -> str | None:
    image, audio = _first(run, "tags.image_tokenizer"), _first(run, "tags.audio_tokenizer")
    if image is None and audio is None:
        return None
    return image if image == audio else f"{image or '?'}/{audio or '?'}"


def _param(*names: str) -> Callable[[dict[str, Any]], Any]:
    return lambda run: _first(run, *names)


# Columns read off the run of one stage among the row and the runs it came from:
# (header, stage, value of that stage's run).
LINEAGE_COLUMNS: tuple[tuple[str, str, Callable[[dict[str, Any]], Any]], ...] = (
    ("mask_mean", "train", _param("params.train.masking.mean")),
    ("drop", "train", _param("params.train.masking.drop_ratio")),
    ("steps", "train", _param("params.train.steps")),
    ("model", "train", _model_size),
    ("tokenizers", "tokenizers", _tokenizers),
    ("source", "download", _param("tags.source", "params.source")),
    ("clips", "download", _param("metrics.ok")),
)


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
    v = _first(row, *names)
    return None if v is None else float(v)


def _cell(v: Any) -> str:
    """A param or count as the table shows it: whole floats (a metric count) without '.0'."""
    if v is None:
        return ""
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def lineage(row: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """stage -> the run of that stage this row's results come from: the row itself, then the runs
    its `lineage.*` tags name, transitively (the first found per stage). A run with no lineage
    of its own (a sweep trial) is followed through its parent run."""
    found: dict[str, dict[str, Any]] = {}
    queue, seen = [row], set()
    while queue:
        run = queue.pop(0)
        if run["run_id"] in seen:
            continue
        seen.add(run["run_id"])
        if run.get("tags.stage"):
            found.setdefault(run["tags.stage"], run)
        ids = [v for k, v in run.items() if LINEAGE_TAG.fullmatch(k)]
        if not ids and run.get("tags.mlflow.parentRunId"):
            ids = [run["tags.mlflow.parentRunId"]]
        queue += [by_id[i] for i in ids if i in by_id]
    return found


def _fields(row: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What `--where` can name for a row (see the module doc), the columns first."""
    fields: dict[str, Any] = {}
    for stage, run in runs.items():
        for key, value in run.items():
            kind, _, name = key.partition(".")
            if kind in ("params", "metrics", "tags") and name:
                qualified = name if name.startswith(f"{stage}.") else f"{stage}.{name}"
                fields.setdefault(qualified, value)
    fields |= {k: v for k, v in row.items() if k.partition(".")[0] in ("params", "metrics", "tags")}
    return fields


def _where(expr: str) -> tuple[str, str, str]:
    m = _WHERE.fullmatch(expr)
    if m is None or not m[3]:
        raise CompareError(f"--where {expr!r}: write NAME OP VALUE, e.g. 'train.mask_mean>0.6'")
    return m[1], m[2], m[3]


def _matches(value: Any, op: str, wanted: str, expr: str) -> bool:
    try:
        a, b = float(value), float(wanted)
    except (TypeError, ValueError):
        if op in ("<", ">", "<=", ">="):
            raise CompareError(f"--where {expr!r}: {value!r} is not a number") from None
        a, b = str(value), wanted
    return {"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b, "!=": a != b}.get(op, a == b)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]  # fmt: skip


def compare(
    experiment: str,
    stages: Sequence[str],
    sort: str | None,
    limit: int,
    tracking_uri: str,
    *,
    statuses: Sequence[str] = (),
    where: Sequence[str] = (),
    as_csv: bool = False,
) -> str:
    """The table (or CSV) of the newest `limit` runs of `stages` in `experiment` whose status is
    one of `statuses` (any when empty) and that meet every `where` filter (see the module doc)."""
    from pipeline import tracking

    runs = tracking.search_runs(experiment, tracking_uri)
    if runs is None:
        raise CompareError(
            f"no MLflow experiment {experiment!r} at {tracking.redact(tracking_uri)}"
        )
    wanted = {s.upper() for s in statuses}
    if wanted - set(STATUSES):
        raise CompareError(
            f"--status {', '.join(sorted(wanted - set(STATUSES)))}: not a run status "
            f"(one of {', '.join(STATUSES)})"
        )
    rows = [r for r in runs if r.get("tags.stage") in stages]
    if not rows:
        raise CompareError(
            f"experiment {experiment!r} has no runs of stage {', '.join(stages)}; "
            "run `dvc repro` first"
        )
    by_id = {r["run_id"]: r for r in runs}
    columns = sorted({c for r in rows for c in r})
    records = []
    for row in rows:
        origin = lineage(row, by_id)
        record: dict[str, Any] = {"run_id": row["run_id"], "stage": row.get("tags.stage"),
                                  "status": row.get("status"), "started": row.get("start_time")}  # fmt: skip
        record |= {h: _first(row, *names) for h, names in OWN_COLUMNS}
        for header, stage, value in LINEAGE_COLUMNS:
            record[header] = value(origin[stage]) if stage in origin else None
            record[f"{stage}.{header}"] = record[header]
        record |= {s: _metric(row, columns, s) for s in METRIC_SUFFIXES}
        records.append((record, _fields(row, origin)))
    if wanted:
        records = [(r, f) for r, f in records if r["status"] in wanted]
    for expr in where:
        name, op, value = _where(expr)
        if not any(r.get(name, f.get(name)) is not None for r, f in records):
            raise CompareError(f"--where {expr!r}: no listed run has {name!r}")
        records = [(r, f) for r, f in records
                   if (v := r.get(name, f.get(name))) is not None and _matches(v, op, value, expr)]  # fmt: skip
    if sort:
        key = next((s for s in METRIC_SUFFIXES if s.split("_")[0] == sort or s == sort), None)
        if key is None:
            raise CompareError(f"--sort {sort!r}: no metric of that name (try fd, acc, is, cs)")
        sign = 1.0 if key == "fd_local" else -1.0  # FD: lower is better; the others higher
        records.sort(key=lambda rf: (rf[0][key] is None, sign * (rf[0][key] or 0.0)))
    chosen = [r for r, _ in records[:limit]]
    names = ["stage", "status", "started", *(h for h, _ in OWN_COLUMNS),
             *(h for h, _, _ in LINEAGE_COLUMNS), *METRIC_SUFFIXES]  # fmt: skip
    if as_csv:
        out = StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["run_id", *names])
        writer.writerows([[r["run_id"], *("" if r[n] is None else r[n] for n in names)]
                          for r in chosen])  # fmt: skip
        return out.getvalue().rstrip("\n")
    table = []
    for r in chosen:
        cells = [r["run_id"][:8], r["stage"] or "", (r["status"] or "").lower(),
                 r["started"].strftime("%Y-%m-%d %H:%M") if r["started"] is not None else ""]  # fmt: skip
        cells += [_cell(r[h]) for h in names[3 : -len(METRIC_SUFFIXES)]]
        cells += ["" if r[s] is None else f"{r[s]:.3f}" for s in METRIC_SUFFIXES]
        table.append(cells)
    note = (
        "(*_local: the project's offline evaluator; not on the scale of the paper's FD/FAD/IS/CS)"
    )
    return "\n".join([*_table(["run", *names], table), note])


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="table of MLflow runs: key params, what produced them, metrics"
    )
    p.add_argument(
        "--experiment", default=None, help="MLflow experiment (default: params base.experiment)"
    )
    p.add_argument("--sort", default=None, help="metric to sort by: fd, acc, is or cs")
    p.add_argument("--stage", action="append", default=None,
                   help=f"stages to list (repeatable; default {' and '.join(DEFAULT_STAGES)})")  # fmt: skip
    p.add_argument("--status", action="append", default=None,
                   help="only runs with this status (repeatable): " + ", ".join(STATUSES))  # fmt: skip
    p.add_argument("--where", action="append", default=None, metavar="NAME OP VALUE",
                   help="only runs that meet it (repeatable), e.g. 'train.mask_mean>0.6'; "
                        "OP: < <= > >= = !=")  # fmt: skip
    p.add_argument("--csv", action="store_true", help="print CSV (full run ids, raw values)")
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
    statuses = [s for arg in args.status or [] for s in arg.split(",") if s.strip()]
    return compare(experiment, stages, args.sort, args.limit, tracking.tracking_uri(),
                   statuses=[s.strip() for s in statuses], where=args.where or (),
                   as_csv=args.csv)  # fmt: skip
