"""MLflow tracking: the only module that imports mlflow.

Every stage logs one run into the experiment named in `base.experiment`, tagged with the stage
name and the git commit. The tracking URI is `MLFLOW_TRACKING_URI` when set, else a SQLite
database `mlflow.db` at the repository root (MLflow's own default since 3.7, made explicit so it
does not depend on the working directory). Importing this module sets nothing, and no global
MLflow state is used: runs are logged through an `MlflowClient` for that URI.

An http(s) server that does not answer when a stage starts stops the stage before any work, in
one sentence (`TrackingError`). One that stops answering mid-run does not stop it: after MLflow's
own retries (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`) the stage warns once and writes every later call
to `<report_dir>/mlflow_unsent.jsonl` (one JSON object per call) instead of dropping it, and
`mlflow_run.json` says the run is incomplete.

**The experiment** is created as a model-training experiment (MLflow's experiment-kind tag, by
which MLflow's UI picks the runs table over the GenAI trace pages). The 3.17 UI installed here
picks by a GenAI / Model training switch kept in the browser instead (GenAI at first), so each
stage also logs its run's page with the switch set in the URL (`run_url`). docs/references.md
("DVC and MLflow behaviour") has this and the other MLflow and DVC facts below.

**One `dvc repro` is one pipeline run.** DVC runs each stage as its own process and gives a plain
`repro` no id. What the stages of one command share is the `dvc` process that launched them
(`lineage.invocation_id`: host, pid and start time, plus `DVC_EXP_NAME` in `dvc exp run`), so
that is the key: the first stage a DVC command runs creates a parent run for it (tag
`dvc_invocation`; named after the experiment in `dvc exp run`, so that MLflow and `dvc exp show`
name it alike, else "dvc repro <time>"), every stage run of that command is its child, and all
of them carry `pipeline_run` = the parent's id. The parent is RUNNING while one of its stages
runs and ends with the last one's status (DVC stops at the first failure). The alternatives need
a stage to guess whether its upstream runs belong to its own repro: by time, or by their
`reports/<stage>/mlflow_run.json`, which DVC's run cache does not restore and so may name a run
of another repro. A parent run also needs no set-up in the UI: the runs table nests the stages
under it. Outside DVC a stage run has no parent.

**Lineage.** A run records, for each input that dvc.yaml says another stage makes
(`pipeline.lineage`), the input's content digest (`lineage.<stage>.sha256`) and the run that
made that content (`lineage.<stage>.run_id`): the newest FINISHED run of that stage whose
`output_sha256` tag (set by each run on its output when it finishes) matches, one of the same
pipeline run first. Matching on content is what keeps lineage right when DVC restores a stage
from its run cache: the stage does not run (no run is made, none duplicated), its outputs come
back byte for byte, and the next stage links to the run that first made them. An input made by
an earlier pipeline run is also named on the parent (`reused.<stage>`). Data inputs (clips,
extracted frames and mels, token ids) are logged as MLflow datasets, shown in the runs table's
Dataset column: name = the `paths` key, digest = the content digest, source = the path in the
repository, profile = rows per split and the data source (synthetic, vggsound, local), which each
run also tags as `source`, taken from its inputs' runs.

**Moved checkouts.** A SQLite store records absolute artifact locations, so a copied or moved
checkout would log artifacts into the original's `mlruns/`. Before each run the experiment's
locations are made to follow the store (`follow_store`); MLflow has no call for that, so the
SQLite tables are updated directly. Params hold paths relative to the checkout.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline import io, lineage
from pipeline.errors import PipelineError
from pipeline.media import ffmpeg_version

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlruns"  # MLflow's artifact folder beside a local store
RUN_ID_FILE = "mlflow_run.json"
UNSENT_FILE = "mlflow_unsent.jsonl"
# MLflow's experiment kind; its UI calls "custom_model_development" "Model training".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
PIPELINE_RUN_TAG = "pipeline_run"
INVOCATION_TAG = "dvc_invocation"
OUTPUT_TAG = "output_sha256"
LINEAGE_PREFIX = "lineage."
# How a stage used its data inputs, shown beside each dataset in the UI.
DATASET_CONTEXT = {"tokenizers": "training", "train": "training", "evaluator": "training",
                   "sweep": "evaluation", "evaluate": "evaluation"}  # fmt: skip
UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
CHECK_TIMEOUT_S = 10.0  # a server that takes longer than this to answer at the start is down
_USERINFO = re.compile(r"(://[^/@:\s]*):[^@\s]*@")  # "://user:password@" of a URI


def tracking_uri(repo_root: str | Path | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else sqlite:///<repo_root>/mlflow.db (absolute).

    `repo_root` defaults to the DVC repository the stage belongs to: DVC_ROOT, which DVC sets
    for every stage command and, for `dvc exp run --temp` and queued experiments, points at the
    user's workspace rather than the throwaway copy the stage runs in (else the runs would be
    deleted with it); outside DVC, the working directory.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    if repo_root is None:
        repo_root = os.environ.get("DVC_ROOT") or "."
    return f"sqlite:///{(Path(repo_root).resolve() / DEFAULT_DB).as_posix()}"


def redact(uri: str) -> str:
    """`uri` without a password (postgresql://user:secret@host/db -> postgresql://user@host/db).

    A pattern, not a URL parser: a secret with unescaped '/' or '+' (AWS keys have them) breaks
    `urlsplit`'s idea of where the host starts and would slip through.
    """
    return _USERINFO.sub(r"\1@", uri)


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
    """Nested params as MLflow's flat `a.b.c -> str` form; secrets are never included: keys
    that name one are dropped, passwords in URIs (s3://id:secret@bucket) removed."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif _is_secret(key):
            continue
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = redact(text) if "://" in text else text
    return flat


def _is_secret(key: str) -> bool:
    return any(word in key.lower() for word in ("cookie", "token", "password", "secret", "key_id"))


class TrackingError(PipelineError):
    """The MLflow tracking server does not answer when a stage starts."""


def check_server(uri: str, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """For an http(s) tracking URI, one request to the server; TrackingError (one sentence)
    when nothing answers. Any HTTP answer counts as reachable; local URIs are not checked."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as err:
        raise TrackingError(
            f"the MLflow server at {redact(uri)} does not answer ({_reason(err)}); start it, "
            "fix MLFLOW_TRACKING_URI, or unset it to log to mlflow.db in the repository"
        ) from None


def _reason(err: BaseException) -> str:
    """A short cause: the OS error text ('Connection refused') or the exception's type."""
    if (m := re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(err))) is not None:
        return m[1].strip().lower()
    return "no answer in time" if "timeout" in type(err).__name__.lower() else type(err).__name__


def _unreachable(err: BaseException) -> bool:
    """True for an error that says the server went away (no connection, a timeout, 5xx after
    MLflow's own retries), False for a bad request, which is a bug and must stay loud."""
    import requests

    e: BaseException | None = err
    for _ in range(8):
        if e is None:
            break
        if isinstance(e, (requests.ConnectionError, requests.Timeout)):
            return True
        e = e.__cause__ or e.__context__
    text = str(err)
    return "API request to" in text and (
        "failed with exception" in text or re.search(r"error code 5\d\d", text) is not None
    )


class _Sender:
    """Sends to MLflow until the server stops answering, then writes what it could not send to
    a JSON-lines file instead (one object per call), so that nothing is lost silently."""

    def __init__(self, uri: str, run_id: str, unsent: Path | None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.uri, self.run_id, self.unsent = uri, run_id, unsent
        self.lost: str | None = None

    def send(self, kind: str, payload: dict[str, Any], call: Callable[[], object]) -> None:
        if self.lost is None:
            try:
                call()
                return
            except Exception as err:
                if not _unreachable(err):
                    raise
                self.lost = _reason(err)
                where = f"; what is not sent goes to {self.unsent}" if self.unsent else ""
                log.warning(
                    "the MLflow server at %s stopped answering (%s): run %s is incomplete%s",
                    redact(self.uri), self.lost, self.run_id, where,
                )  # fmt: skip
        if self.unsent is None:
            log.warning("MLflow unreachable, not sent: %s %s", kind, json.dumps(payload))
            return
        record = {"time": time.time(), "run_id": self.run_id, "kind": kind, **payload}
        self.unsent.parent.mkdir(parents=True, exist_ok=True)
        with open(self.unsent, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")


class StageRun:
    """Handle for logging inside `stage_run`: metrics, params, artifacts, tags.

    When the server stops answering mid-run, the stage goes on and every later call is written
    to `<report_dir>/mlflow_unsent.jsonl` instead (see `_Sender`).
    """

    def __init__(self, sender: _Sender) -> None:
        self._sender = sender
        self.run_id = sender.run_id

    @property
    def lost(self) -> str | None:
        """Why the server was given up on, None while it answers."""
        return self._sender.lost

    def log_params(self, params: Mapping[str, Any]) -> None:
        """`params` flattened (see `flatten`); a path inside the working directory (the
        checkout the stage runs in) is logged relative to it."""
        from mlflow.entities import Param

        flat = {k: _relative(v) for k, v in flatten(params).items()}
        batch = [Param(k, v) for k, v in flat.items()]
        self._sender.send(
            "params",
            {"params": flat},
            lambda: self._sender.client.log_batch(self.run_id, params=batch),
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in clean.items()]
        self._sender.send(
            "metrics",
            {"step": step, "metrics": clean},
            lambda: self._sender.client.log_batch(self.run_id, metrics=batch),
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._sender.send(
                "artifact",
                {"path": str(path), "artifact_path": artifact_path},
                lambda: self._sender.client.log_artifact(self.run_id, str(path), artifact_path),
            )

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Every file under `folder`, keeping the tree."""
        if Path(folder).is_dir():
            self._sender.send(
                "artifacts",
                {"path": str(folder), "artifact_path": artifact_path},
                lambda: self._sender.client.log_artifacts(self.run_id, str(folder), artifact_path),
            )

    def log_datasets(self, datasets: list[Any], context: str) -> None:
        """MLflow `Dataset` entities as inputs of this run, tagged with how it used them."""
        from mlflow.entities import DatasetInput, InputTag

        if not datasets:
            return
        tag = [InputTag("mlflow.data.context", context)]
        inputs = [DatasetInput(d, tags=tag) for d in datasets]
        self._sender.send(
            "datasets",
            {"datasets": [d.to_dictionary() for d in datasets], "context": context},
            lambda: self._sender.client.log_inputs(self.run_id, datasets=inputs),
        )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._sender.send(
            "tags",
            {"tags": dict(tags)},
            lambda: self._sender.client.log_batch(self.run_id, tags=batch),
        )

    def log_model(self, name: str, folder: str | Path, step: int = 0) -> str | None:
        """Log the exported model in `folder` (`pipeline.bundle`) as this run's MLflow logged
        model `name`, linked to the run's metrics at `step`: the UI lists it with them and
        `runs:/<run_id>/<name>` names it (see `log_bundle`). Returns its model id; None when the
        server stopped answering (the call is written to the unsent file instead)."""
        logged: dict[str, str] = {}

        def call() -> None:
            client, run_id = self._sender.client, self.run_id
            logged["id"] = log_bundle(client, run_id, name, Path(folder), step)

        self._sender.send("model", {"name": name, "path": str(folder), "step": step}, call)
        return logged.get("id")

    def handle(self) -> dict[str, str]:
        """What another process needs to log into this run (see `RunLogger`)."""
        handle = {"tracking_uri": self._sender.uri, "run_id": self.run_id}
        if self._sender.unsent is not None:
            handle["unsent"] = str(self._sender.unsent.resolve())
        return handle

    def _end(self, status: str) -> None:
        self._sender.send(
            "status",
            {"status": status},
            lambda: self._sender.client.set_terminated(self.run_id, status),
        )


class RunLogger(StageRun):
    """Logs into an existing run from another process (a Ray Train rank-0 worker) by run id,
    without starting or ending the run: the stage process owns it. Gives up on a server that
    stopped answering as `StageRun` does, writing to `unsent` instead."""

    def __init__(self, tracking_uri: str, run_id: str, unsent: str | None = None) -> None:
        super().__init__(_Sender(tracking_uri, run_id, Path(unsent) if unsent else None))


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: Mapping[str, Any],
    report_dir: str | Path,
    repo_root: str | Path | None = None,
    paths: Any | None = None,
) -> Iterator[StageRun]:
    """One MLflow run for one stage execution.

    Logs `params` (flattened), tags `stage`, `git_commit`, `ffmpeg` (the version line of the
    ffmpeg the stages run) and `dvc_exp` inside `dvc exp run`,
    records the wall time as `seconds`, and writes the run id to `<report_dir>/mlflow_run.json`
    beside the stage's DVC metrics. Under DVC the run is a child of its command's pipeline run.
    With `paths` (the params' `PathsConfig`), it records its lineage and data inputs and, when it
    finishes, its output's digest (see the module doc). A failing stage ends its run as FAILED
    (KILLED when interrupted). A server that does not answer at the start is a TrackingError
    before any work; one that stops answering later is written around (see `StageRun`).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(repo_root)
    check_server(uri)
    # The ffmpeg too: the same clip decodes to other samples with another build.
    tags = {"stage": stage, "git_commit": git_commit(repo_root or "."), "ffmpeg": ffmpeg_version()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
    tags = resolve_tags(tags)  # + user, source: what mlflow.start_run adds
    files = lineage.stage_files(stage) if paths is not None else lineage.StageFiles({}, None)
    client = MlflowClient(uri)
    try:
        experiment_id = _experiment_id(client, experiment, uri)
        parent = _join_pipeline_run(client, experiment_id, tags)
        inputs = [_Input.resolve(client, experiment_id, key, producer, getattr(paths, key), parent)
                  for key, producer in files.inputs.items()]  # fmt: skip
        run_id = _create_run(client, experiment_id, stage, tags, parent, inputs)
    except MlflowException as err:
        if not _unreachable(err):
            raise
        raise TrackingError(
            f"the MLflow server at {redact(uri)} failed while starting the run "
            f"({_reason(err)}); rerun when it answers, or unset MLFLOW_TRACKING_URI"
        ) from None
    unsent = Path(report_dir) / UNSENT_FILE
    unsent.unlink(missing_ok=True)  # an earlier run's leftovers belong to that run
    handle = StageRun(_Sender(uri, run_id, unsent))
    start = time.monotonic()
    try:
        handle.log_params(params)
        datasets = [i.dataset() for i in inputs if i.key in lineage.DATASETS]
        handle.log_datasets(datasets, DATASET_CONTEXT.get(stage, "input"))
        yield handle
        handle.log_metrics({"seconds": time.monotonic() - start})
        if files.output is not None and (
            digest := lineage.content_digest(getattr(paths, files.output))
        ):
            handle.set_tags({OUTPUT_TAG: digest})
    except BaseException as err:
        _end(handle, parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    _end(handle, parent, "FINISHED")
    record = {"run_id": run_id, "experiment": experiment, "tracking_uri": redact(uri)}
    if handle.lost:
        record["unsent"] = UNSENT_FILE
        log.warning(
            "MLflow run %s is incomplete (the server stopped answering): the rest is in %s",
            run_id, unsent,
        )  # fmt: skip
    io.write_json(Path(report_dir) / RUN_ID_FILE, record)
    log.info("MLflow run %s in experiment %r: %s", run_id, experiment,
             run_url(uri, experiment_id, run_id))  # fmt: skip


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (the server at `uri`, else `mlflow ui`'s default address),
    in the UI's model-training view: MLflow 3.17 opens the GenAI view unless the URL or the
    user's last choice in the browser says otherwise (docs/references.md)."""
    base = redact(uri).rstrip("/") if urlsplit(uri).scheme in ("http", "https") else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _create_run(
    client: Any,
    experiment_id: str,
    stage: str,
    tags: dict[str, str],
    parent: str | None,
    inputs: list[_Input],
) -> str:
    """The stage's run, with its lineage tags, as a child of `parent` when there is one; the
    inputs that an earlier pipeline run made are named on the parent (`reused.<stage>`)."""
    from mlflow.entities import RunTag

    tags = tags | _lineage_tags(inputs)
    if parent is not None:
        tags |= {"mlflow.parentRunId": parent, PIPELINE_RUN_TAG: parent}
        reused = [RunTag(f"reused.{i.stage}", i.run_id) for i in inputs
                  if i.run_id and i.pipeline_run != parent]  # fmt: skip
        if reused:
            client.log_batch(parent, tags=reused)
    return client.create_run(experiment_id, tags=tags, run_name=stage).info.run_id


def _end(handle: StageRun, parent: str | None, status: str) -> None:
    """End the stage run, and its pipeline run with the same status (until the next stage)."""
    handle._end(status)
    if parent is not None:
        sender = handle._sender
        sender.send("pipeline_status", {"pipeline_run": parent, "status": status},
                    lambda: sender.client.set_terminated(parent, status))  # fmt: skip


def trial_tags(parent_run_id: str, uri: str, stage: str) -> dict[str, str]:
    """Tags for child runs that another library creates (Ray Tune's MLflowLoggerCallback for the
    sweep trials): the parent, `stage`, and the parent's git_commit, dvc_exp and pipeline_run."""
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(uri).get_run(parent_run_id).data.tags
    kept = {k: parent[k] for k in ("git_commit", "dvc_exp", PIPELINE_RUN_TAG) if k in parent}
    return {"mlflow.parentRunId": parent_run_id, "stage": stage, **kept}


@dataclass(frozen=True)
class _Input:
    """One input of a stage run: the `paths` key, the stage that makes it, its path, its content
    digest, and the run that made that content (with its pipeline run and data source)."""

    key: str
    stage: str
    path: str
    sha256: str | None
    run_id: str | None = None
    pipeline_run: str | None = None
    source: str | None = None

    @classmethod
    def resolve(
        cls, client: Any, experiment_id: str, key: str, stage: str, path: str, pipeline: str | None
    ) -> _Input:
        sha = lineage.content_digest(path)
        if sha is None:
            return cls(key, stage, path, None)
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.stage = '{stage}' and tags.{OUTPUT_TAG} = '{sha}' "
            "and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
        if not found:
            return cls(key, stage, path, sha)
        run = next((r for r in found if r.data.tags.get(PIPELINE_RUN_TAG) == pipeline), found[0])
        t = run.data.tags
        return cls(key, stage, path, sha, run.info.run_id, t.get(PIPELINE_RUN_TAG), t.get("source"))

    def dataset(self) -> Any:
        """This input as an MLflow dataset (see the module doc)."""
        from mlflow.entities import Dataset

        profile = {"splits": lineage.split_sizes(self.path), "source": self.source}
        return Dataset(
            name=self.key,
            digest=(self.sha256 or "")[:12],
            source_type="local",
            source=json.dumps({"uri": Path(self.path).as_posix()}),
            profile=json.dumps(profile),
        )


def _lineage_tags(inputs: list[_Input]) -> dict[str, str]:
    """`lineage.<stage>.sha256` / `.run_id` of each input, and the data `source` they carry."""
    tags: dict[str, str] = {}
    for i in inputs:
        if i.sha256:
            tags[f"{LINEAGE_PREFIX}{i.stage}.sha256"] = i.sha256
        if i.run_id:
            tags[f"{LINEAGE_PREFIX}{i.stage}.run_id"] = i.run_id
    source = next((i.source for i in inputs if i.source), None)
    if source:
        tags["source"] = source
    return tags


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment `name`, created as a model-training experiment when missing (the kind
    added to one that has none); its artifact locations made to follow the store. Stages that
    start together on a new server (Tune trials, parallel `dvc exp` runs) may both find it
    missing: the one whose create loses reads the other's."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            created = client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
            found = client.get_experiment(created)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    follow_store(uri, found.experiment_id)
    return found.experiment_id


def _join_pipeline_run(client: Any, experiment_id: str, tags: Mapping[str, str]) -> str | None:
    """The id of the pipeline run of the DVC command that started this stage, created by its
    first stage and set RUNNING again by each later one; None outside DVC."""
    invocation = lineage.invocation_id()
    if invocation is None:
        return None
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.{INVOCATION_TAG} = '{invocation}'", max_results=1
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    exp_name = os.environ.get("DVC_EXP_NAME")
    name = exp_name or f"dvc repro {datetime.datetime.now():%Y-%m-%d %H:%M:%S}"
    kept = {k: tags[k] for k in ("git_commit", "dvc_exp", "mlflow.user") if k in tags}
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        kept["dvc_exp_baseline"] = os.environ["DVC_EXP_BASELINE_REV"]
    run_id = client.create_run(
        experiment_id, tags={INVOCATION_TAG: invocation, **kept}, run_name=name
    ).info.run_id
    client.set_tag(run_id, PIPELINE_RUN_TAG, run_id)
    return run_id


def follow_store(uri: str, experiment_id: str) -> bool:
    """For a SQLite store: make the experiment's artifact locations follow the store (see the
    module doc); True when they were rewritten.

    A location is rewritten only when it has MLflow's layout `<folder>/mlruns/<id>` and
    `<folder>` is not this store's, and `<folder>` is gone, holds another `mlflow.db`, or the
    experiment has no runs yet (created by a process working elsewhere, as in `dvc exp run
    --temp`); a location the user chose elsewhere is left alone.
    """
    db = _sqlite_file(uri)
    if db is None or not db.is_file():
        return False
    want = db.resolve().parent / ARTIFACTS_DIR / str(experiment_id)
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        row = con.execute(
            "SELECT artifact_location FROM experiments WHERE experiment_id = ?", (experiment_id,)
        ).fetchone()
        recorded = row[0] if row else None
        old = _local_path(recorded)
        if old is None or old == want or old.parent.name != ARTIFACTS_DIR:
            return False
        if old.name != str(experiment_id):
            return False
        other = old.parent.parent
        elsewhere = not other.exists() or (
            (other / DEFAULT_DB).is_file() and not (other / DEFAULT_DB).samefile(db)
        )
        empty = (
            con.execute(
                "SELECT COUNT(*) FROM runs WHERE experiment_id = ?", (experiment_id,)
            ).fetchone()[0]
            == 0
        )
        if not (elsewhere or empty):
            return False
        new = want.as_posix()
        con.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
            (new, experiment_id),
        )
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, column in (("runs", "artifact_uri"), ("logged_models", "artifact_location")):
            if table in tables:
                con.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE experiment_id = ? AND substr({column}, 1, ?) = ?",
                    (new, len(recorded) + 1, experiment_id, len(recorded), recorded),
                )
    log.info("MLflow artifacts of experiment %s: %s -> %s (the checkout moved)", experiment_id,
             recorded, new)  # fmt: skip
    return True


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///") :].split("?", 1)[0]))


def _local_path(location: str | None) -> Path | None:
    """A local artifact location (a path or file: URI) as an absolute path, else None."""
    if not location:
        return None
    parts = urlsplit(location)
    if parts.scheme not in ("", "file"):
        return None
    path = Path(unquote(parts.path) if parts.scheme else location)
    return path if path.is_absolute() else None


def _relative(text: str) -> str:
    """`text` relative to the working directory when it is an absolute path inside it."""
    if not os.path.isabs(text):
        return text
    try:
        return Path(text).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (ValueError, OSError):
        return text


def search_runs(experiment: str, uri: str) -> list[dict[str, Any]] | None:
    """Every run of `experiment` at `uri`, newest first, as flat dicts (`run_id`, `status`,
    `start_time`, `params.*`, `metrics.*`, `tags.*`); None when there is no such experiment.
    Does not change the process's tracking URI."""
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
                "status": run.info.status,
                "start_time": datetime.datetime.fromtimestamp(run.info.start_time / 1000),
            }
            row |= {f"params.{k}": v for k, v in run.data.params.items()}
            row |= {f"metrics.{k}": v for k, v in run.data.metrics.items()}
            row |= {f"tags.{k}": v for k, v in run.data.tags.items()}
            out.append(row)
        token = page.token
        if not token:
            return out


# ------------------------------------------------------------------- models: log and fetch

PYFUNC_LOADER = "pipeline.inference.pyfunc"  # its `_load_pyfunc(data_path)` serves the model
MODEL_URI_SCHEMES = ("runs", "models")


def log_bundle(client: Any, run_id: str, name: str, folder: Path, step: int) -> str:
    """Log `folder` as the logged model `name` of run `run_id` through `client`: an MLflow
    python_function model whose data is the folder, read back by `PYFUNC_LOADER` (no pickle), with
    the run's params, linked to the run as an output at `step` with the run's metrics of that
    step (as MLflow's own `log_model` links them: the same values and times, so the run's
    history gains no entry). Returns the model id; a failure leaves the model marked FAILED and
    raises."""
    import tempfile
    from importlib import metadata

    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model

    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, params=run.data.params
    )
    try:
        with tempfile.TemporaryDirectory(prefix="ve-mlflow-model-") as tmp:
            local = Path(tmp) / name
            # Requirements are named, not inferred: inferring them loads the model in a child.
            pins = [f"{pkg}=={metadata.version(pkg)}" for pkg in ("torch", "safetensors", "numpy")]
            mlflow.pyfunc.save_model(
                str(local),
                loader_module=PYFUNC_LOADER,
                data_path=str(folder),
                pip_requirements=pins,
                mlflow_model=Model(
                    artifact_path=model.artifact_location, run_id=run_id, model_id=model.model_id
                ),
            )
            client.log_model_artifacts(model.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        linked = [
            Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id)
            for key in run.data.metrics
            for m in client.get_metric_history(run_id, key)
            if m.step == step
        ]
        client.log_batch(run_id, metrics=linked)
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def is_model_uri(text: str) -> bool:
    """Whether `text` names an MLflow model (`runs:/<run_id>/<name>`, `models:/<name>/<version>`,
    `models:/<model_id>`) rather than a folder."""
    return urlsplit(str(text)).scheme in MODEL_URI_SCHEMES


def download_model(uri: str, dst: str | Path, repo_root: str | Path | None = None) -> Path:
    """Download the logged model `uri` from the tracking server of `tracking_uri(repo_root)` into
    the folder `dst`; returns the folder its data (the exported model) is in. Reads the MLmodel
    file as YAML: nothing downloaded is imported or run. TrackingError, in one sentence, for a
    store that is not there, a URI it does not know, or a model this project did not log."""
    import yaml
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    store = tracking_uri(repo_root)
    local_db = store.removeprefix("sqlite:///") if store.startswith("sqlite:///") else None
    if local_db is not None and not Path(local_db).is_file():
        raise TrackingError(
            f"no MLflow store at {local_db} to find {uri} in; run the command where the "
            "pipeline ran (its mlflow.db), or set MLFLOW_TRACKING_URI"
        )
    check_server(store)
    from mlflow.tracking import MlflowClient

    registry = os.environ.get("MLFLOW_REGISTRY_URI", "").strip() or store
    client = MlflowClient(tracking_uri=store, registry_uri=registry)
    try:
        location = _model_location(client, uri)
        local = Path(download_artifacts(artifact_uri=location, dst_path=str(dst)))
    except (MlflowException, OSError) as err:
        raise TrackingError(
            f"MLflow at {redact(store)} cannot give {uri} ({_first_line(err)})"
        ) from None
    try:
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        data = local / flavor["data"]
        if flavor.get("loader_module") != PYFUNC_LOADER or not data.is_dir():
            raise KeyError("loader_module")
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise TrackingError(
            f"{uri} is not a model the train stage of this project logged (no exported model "
            "in its MLmodel)"
        ) from None
    return data


def _model_location(client: Any, uri: str) -> str:
    """Where the artifacts of the logged model `uri` names are, found through `client` alone
    (MLflow's own resolution of `models:/` reads the process-wide tracking URI, which may name
    another store). MlflowException when there is no such run, model or version."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    if urlsplit(uri).scheme == "runs":
        run_id, _, name = uri.removeprefix("runs:").strip("/").partition("/")
        if not re.fullmatch(r"[\w.-]+", name):
            raise MlflowException(f"{name!r} is not a model name")
        experiment = client.get_run(run_id).info.experiment_id
        query = f"name = '{name}' AND source_run_id = '{run_id}'"
        found = client.search_logged_models([experiment], filter_string=query)
        if not found:
            raise MlflowException(f"run {run_id} logged no model named {name!r}")
        return found[0].artifact_location
    parts = get_model_name_and_version(client, uri)
    if len(parts) == 1:  # models:/<model_id>
        return client.get_logged_model(parts[0]).artifact_location
    location = client.get_model_version_download_uri(*parts)
    return _model_location(client, location) if is_model_uri(location) else location


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
