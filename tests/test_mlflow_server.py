"""MLflow as the cluster runs it (infra/): `mlflow server` on a PostgreSQL backend store.

The module starts a real PostgreSQL server (the distribution's `initdb` and `postgres`, as the
user `nobody` when the tests run as root, since PostgreSQL refuses root) on a free port of
127.0.0.1 with its data in a temporary folder, then `mlflow server` on it, and tears both down
by killing exactly the processes it started. Against that server: one real stage of the tiny
DAG (download, as `python -m stages.download`), and two stage processes logging params and
metrics at the same time; every run, param and metric must arrive, in PostgreSQL. The module
is skipped only where no PostgreSQL server binaries are installed (`.ci/run` installs them).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from conftest import StageProject

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300  # on a busy 2-core box the server took 100 s to start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    """The folder of `initdb`, `postgres` and `pg_isready`: that of `initdb` on PATH (links
    followed: Debian keeps them in a versioned folder), else Debian's newest such folder."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    need = ("initdb", "postgres", "pg_isready")
    return next((c for c in candidates if all((c / n).is_file() for n in need)), None)


def _as_user() -> dict:
    """subprocess arguments that drop root to `nobody` (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid}


def _stop(proc: subprocess.Popen, sig: int, wait_s: float) -> None:
    """`sig` to the process group `proc` leads, then SIGKILL to whatever of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(wait_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _wait(proc: subprocess.Popen, log: Path, ready, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 (trust auth, no fsync: a test store); its URI."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, postgres): apt-get install postgresql")
    # Under /tmp, not pytest's tmp_path: `nobody` must reach it (pytest's root is private).
    root = Path(tempfile.mkdtemp(prefix="ve-pg-", dir="/tmp"))
    user = _as_user()
    if user:
        os.chown(root, user["user"], user["group"])
    data, log, port = root / "data", root / "postgres.log", _free_port()
    init = subprocess.run(
        [bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync",
         "--encoding=UTF8", "--no-instructions"],
        cwd=root, capture_output=True, text=True, timeout=120, **user,
    )  # fmt: skip
    assert init.returncode == 0, init.stdout + init.stderr
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [bin_dir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", root,
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **user,
        )  # fmt: skip
    uri = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        pg_isready = [bin_dir / "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]
        ready = lambda: subprocess.run(pg_isready, timeout=10).returncode == 0  # noqa: E731
        _wait(proc, log, ready, "PostgreSQL")
        yield uri
    finally:
        _stop(proc, signal.SIGINT, 30)  # PostgreSQL's fast shutdown
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory) -> Iterator[str]:
    """`mlflow server` on the PostgreSQL store, artifacts in a local folder; its URL."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    log, port = folder / "server.log", _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_BACKEND_STORE_URI"] = postgres  # as infra/ hands it over: never on a command line
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--artifacts-destination", (folder / "artifacts").as_uri(),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return requests.get(f"{url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        _wait(proc, log, ready, "mlflow server")
        yield url
    finally:
        # uvicorn waits on SIGTERM for open keep-alive connections (this process's clients).
        _stop(proc, signal.SIGTERM, 5)


def _rows(uri: str, sql: str, *args) -> list[tuple]:
    """Query the store itself: what arrived is in PostgreSQL, not in some local fallback."""
    import psycopg

    with psycopg.connect(uri) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def test_a_stage_of_the_tiny_dag_logs_its_run_to_the_server(mlflow_server, postgres, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.media import ffmpeg_version

    project = StageProject(tmp_path / "project")
    tiny = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    project.params({"download": tiny["download"]})
    code, out, err = project.run("download", MLFLOW_TRACKING_URI=mlflow_server)
    assert code == 0, err
    saved = json.loads((project.root / "reports" / "download" / "mlflow_run.json").read_text())
    assert saved["tracking_uri"] == mlflow_server and "unsent" not in saved
    assert not (project.root / "mlflow.db").exists()

    run = MlflowClient(mlflow_server).get_run(saved["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "download" and run.data.tags["source"] == "synthetic"
    assert run.data.tags["ffmpeg"] == ffmpeg_version()
    assert run.data.params["source"] == "synthetic"
    assert run.data.params["synthetic.num_classes"] == str(
        tiny["download"]["synthetic"]["num_classes"]
    )
    synthetic = tiny["download"]["synthetic"]
    clips = synthetic["num_classes"] * (synthetic["train_per_class"] + synthetic["test_per_class"])
    assert run.data.metrics["ok"] == run.data.metrics["clips"] == clips
    assert run.data.metrics["failed"] == 0 and run.data.metrics["seconds"] > 0
    ((status,),) = _rows(postgres, "SELECT status FROM runs WHERE run_uuid = %s", saved["run_id"])
    assert status == "FINISHED"


# Each writer: a stage run (pipeline.tracking, as every stage logs) with params, then STEPS
# steps of two metrics, started together with the other writer.
WRITER = """
import sys, time
from pathlib import Path
from pipeline import tracking
name, go, report = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
params = {f"p{i}": f"{name}-{i}" for i in range(PARAMS)}
while not go.exists():
    time.sleep(0.01)
with tracking.stage_run(name, "concurrent-writers", params, report) as run:
    for step in range(STEPS):
        run.log_metrics({"loss": 1.0 / (step + 1), "step_twice": 2.0 * step}, step=step)
print(run.run_id)
"""
PARAMS, STEPS = 30, 40


def test_two_concurrent_writers_lose_no_run_param_or_metric(mlflow_server, postgres, tmp_path):
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": str(ROOT)}
    script = WRITER.replace("PARAMS", str(PARAMS)).replace("STEPS", str(STEPS))
    go = tmp_path / "go"
    writers = {
        name: subprocess.Popen(
            [sys.executable, "-c", script, name, str(go), str(tmp_path / name)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in ("writer-a", "writer-b")
    }
    time.sleep(0.5)  # both are importing; the file starts them at once
    go.touch()
    run_ids = {}
    for name, proc in writers.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        run_ids[name] = out.strip().splitlines()[-1]
        assert not (tmp_path / name / "mlflow_unsent.jsonl").exists(), "the server dropped calls"

    client = MlflowClient(mlflow_server)
    for name, run_id in run_ids.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["stage"] == name
        assert run.data.params == {f"p{i}": f"{name}-{i}" for i in range(PARAMS)}
        loss = client.get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in loss) == [(s, 1.0 / (s + 1)) for s in range(STEPS)]
        twice = client.get_metric_history(run_id, "step_twice")
        assert sorted(m.value for m in twice) == [2.0 * s for s in range(STEPS)]
    (experiment,) = _rows(
        postgres, "SELECT experiment_id FROM experiments WHERE name = %s", "concurrent-writers"
    )
    counted = _rows(
        postgres,
        "SELECT r.name,"
        " (SELECT count(*) FROM params p WHERE p.run_uuid = r.run_uuid),"
        " (SELECT count(*) FROM metrics m WHERE m.run_uuid = r.run_uuid"
        "  AND m.key IN ('loss', 'step_twice'))"
        " FROM runs r WHERE r.experiment_id = %s ORDER BY r.name",
        experiment[0],
    )
    assert counted == [(name, PARAMS, 2 * STEPS) for name in sorted(run_ids)]
