"""MLflow tracking: the only module that imports mlflow.

Every stage logs one run into the experiment named in `base.experiment`, tagged with the stage
name and the git commit. The tracking URI is `MLFLOW_TRACKING_URI` when set, else a SQLite
database `mlflow.db` at the repository root (MLflow's own default since 3.7, made explicit so it
does not depend on the working directory). Importing this module sets nothing; `stage_run` does.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline import io

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
RUN_ID_FILE = "mlflow_run.json"


def tracking_uri(repo_root: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI if set, else sqlite:///<repo_root>/mlflow.db (absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{(Path(repo_root).resolve() / DEFAULT_DB).as_posix()}"


def redact(uri: str) -> str:
    """`uri` without a password (postgresql://user:secret@host/db -> postgresql://user@host/db)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def git_commit(repo_root: str | Path = ".") -> str:
    """The checked-out commit, with '+dirty' when tracked files changed; 'unknown' outside git."""
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=repo_root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow's flat `a.b.c -> str` form; secrets are never included."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif _is_secret(key):
            continue
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def _is_secret(key: str) -> bool:
    return any(word in key.lower() for word in ("cookie", "token", "password", "secret", "key_id"))


class StageRun:
    """Handle for logging inside `stage_run`: metrics, params, artifacts, tags."""

    def __init__(self, mlflow: Any, run_id: str) -> None:
        self._mlflow = mlflow
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._mlflow.log_params(flatten(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Every file under `folder`, keeping the tree."""
        if Path(folder).is_dir():
            self._mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._mlflow.set_tags(dict(tags))

    def handle(self) -> dict[str, str]:
        """What another process needs to log into this run (see `RunLogger`)."""
        return {"tracking_uri": self._mlflow.get_tracking_uri(), "run_id": self.run_id}


class RunLogger:
    """Logs into an existing run from another process (a Ray Train rank-0 worker) by run id,
    without starting or ending the run: the stage process owns it."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: Mapping[str, Any],
    report_dir: str | Path,
    repo_root: str | Path = ".",
) -> Iterator[StageRun]:
    """One MLflow run for one stage execution.

    Logs `params` (flattened), tags `stage` and `git_commit` (and `dvc_exp` inside `dvc exp run`),
    records the wall time as `seconds`, and writes the run id to `<report_dir>/mlflow_run.json`
    beside the stage's DVC metrics. A failing stage ends its run as FAILED.
    """
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(repo_root))
    mlflow.set_experiment(experiment)
    tags = {"stage": stage, "git_commit": git_commit(repo_root)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
    start = time.monotonic()
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        handle = StageRun(mlflow, run.info.run_id)
        handle.log_params(params)
        yield handle
        handle.log_metrics({"seconds": time.monotonic() - start})
    io.write_json(
        Path(report_dir) / RUN_ID_FILE,
        {
            "run_id": run.info.run_id,
            "experiment": experiment,
            "tracking_uri": redact(tracking_uri(repo_root)),
        },
    )
    log.info("MLflow run %s in experiment %r", run.info.run_id, experiment)


def search_runs(experiment: str, uri: str) -> list[dict[str, Any]] | None:
    """Every run of `experiment` at `uri`, newest first, as flat dicts (`run_id`, `start_time`,
    `params.*`, `metrics.*`, `tags.*`); None when there is no such experiment. Does not change
    the process's tracking URI."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    out, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id], order_by=["attributes.start_time DESC"], page_token=token
        )
        for run in page:
            row: dict[str, Any] = {
                "run_id": run.info.run_id,
                "start_time": datetime.datetime.fromtimestamp(run.info.start_time / 1000),
            }
            row |= {f"params.{k}": v for k, v in run.data.params.items()}
            row |= {f"metrics.{k}": v for k, v in run.data.metrics.items()}
            row |= {f"tags.{k}": v for k, v in run.data.tags.items()}
            out.append(row)
        token = page.token
        if not token:
            return out
