"""Where the time of the last `dvc repro` went, stage by stage, read from the MLflow store.

    python bench/dag_time.py [--repo .] [--experiment NAME] [--target-min 15]

For every stage of dvc.yaml, in DAG order, its MLflow run in the newest pipeline run (the runs
one `dvc repro` made, pipeline/tracking.py; in a store from before pipeline runs, the latest run
tagged with that stage): its `seconds` metric (the stage's own work, as the stage measured it; the run's open time when it
has none) and the gap since the stage before it closed its run (DVC, the process's start and
its imports). The span from the first stage's start to the last stage's end is
the DAG's time but for DVC's own start-up and each stage process's imports before its run opens;
it is only one `dvc repro` when every stage started after the one before it ended (said when
not, e.g. when DVC restored a stage from its run cache instead of running it).

Sweep trials are child runs with their own tag and are left out. Prints the machine it ran on.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.tracking import INVOCATION_TAG, PIPELINE_RUN_TAG, tracking_uri  # noqa: E402


def latest_runs(uri: str, experiment: str, stages: list[str]) -> tuple[dict[str, object], str]:
    """(stage -> its run in the newest pipeline run, or the newest run tagged `stage=<stage>` in
    a store without pipeline runs; stages with no run left out), and which of the two it is."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}, "this store"
    newest = dict(order_by=["attributes.start_time DESC"], max_results=1)
    group = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.{INVOCATION_TAG} LIKE '%'", **newest
    )
    scope = f" and tags.{PIPELINE_RUN_TAG} = '{group[0].info.run_id}'" if group else ""
    runs = {}
    for stage in stages:
        found = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.stage = '{stage}'{scope}", **newest
        )
        if found:
            runs[stage] = found[0]
    where = f"pipeline run {group[0].info.run_name!r}" if group else "this store"
    return runs, where


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", type=Path, default=Path("."), help="the project (dvc.yaml, params)")
    ap.add_argument("--experiment", help="default: base.experiment in params.yaml")
    ap.add_argument("--target-min", type=float, default=15.0)
    args = ap.parse_args(argv)

    repo = args.repo.resolve()
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    experiment = args.experiment or load_params(repo / "params.yaml").base.experiment
    uri = tracking_uri(repo)
    runs, where = latest_runs(uri, experiment, stages)
    print(f"machine: {machine()}")
    print(f"store: {uri}, experiment {experiment!r}, {where}")
    print(f"{'stage':<11} {'started':<19} {'seconds':>8} {'gap':>5}")
    order_broken, starts, ends = [], [], []
    previous_end = None
    for stage in stages:
        run = runs.get(stage)
        if run is None:
            print(f"{stage:<11} no run in {where}")
            continue
        info = run.info
        started = datetime.fromtimestamp(info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
        end = info.end_time or info.start_time
        seconds = run.data.metrics.get("seconds", (end - info.start_time) / 1000)
        gap = "" if previous_end is None else f"{(info.start_time - previous_end) / 1000:.0f}"
        print(f"{stage:<11} {started:<19} {seconds:>8.0f} {gap:>5}")
        if previous_end is not None and info.start_time < previous_end:
            order_broken.append(stage)
        previous_end = end
        starts.append(info.start_time)
        ends.append(end)
    if not runs:
        print("no stage runs: run `dvc repro` first")
        return 1
    span = (max(ends) - min(starts)) / 60_000
    print(
        f"span: {span:.1f} min from the first stage's start to the last one's end "
        f"(target {args.target_min:g} min: {'met' if span <= args.target_min else 'not met'})"
    )
    missing = [s for s in stages if s not in runs]
    if order_broken or missing:
        why = [f"{s} started before the stage before it ended" for s in order_broken]
        why += [f"{s} has no run" for s in missing]
        print(f"not one `dvc repro` from scratch: {'; '.join(why)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
