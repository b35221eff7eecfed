"""The MLflow tracking server unreachable when a stage starts, and vanishing mid-run.

The server is MLflow's own (its Flask app on werkzeug, in a child process with a SQLite store),
killed with SIGKILL to make it vanish. Documented behaviour (pipeline/tracking.py):

* at the start: the stage stops before any work with one sentence (exit status 1);
* mid-run: the stage goes on; everything it could not send is written, one JSON object per
  call, to `<report_dir>/mlflow_unsent.jsonl`, and `mlflow_run.json` says so. Nothing is dropped.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.stage import stage_main

SERVER = """
import os, sys
os.environ["_MLFLOW_SERVER_FILE_STORE"] = sys.argv[1]
os.environ["_MLFLOW_SERVER_ARTIFACT_ROOT"] = sys.argv[2]
from mlflow.server import app
from werkzeug.serving import make_server
srv = make_server("127.0.0.1", 0, app, threaded=True)
print(srv.server_port, flush=True)
srv.serve_forever()
"""


class Server:
    """A real MLflow tracking server in a child process of this test."""

    def __init__(self, folder: Path, db: Path) -> None:
        import shutil

        folder.mkdir(parents=True, exist_ok=True)
        self.db = folder / "server.db"
        shutil.copy(db, self.db)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, f"sqlite:///{self.db}", str(folder / "artifacts")],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.uri = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def vanish(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def recorded(self, run_id: str) -> dict:
        """What the server's own store holds for the run (read from its SQLite file)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{self.db}")
        run = client.get_run(run_id)
        history = {
            k: [m.step for m in client.get_metric_history(run_id, k)] for k in run.data.metrics
        }
        return {"params": run.data.params, "tags": run.data.tags, "metrics": history,
                "status": run.info.status}  # fmt: skip


@pytest.fixture
def server(tmp_path, empty_mlflow_db, monkeypatch):
    # One try and a short timeout instead of MLflow's 7 retries with back-off (minutes).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    srv = Server(tmp_path / "server", empty_mlflow_db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
    yield srv
    if srv.proc.poll() is None:
        srv.vanish()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unsent(report: Path) -> list[dict]:
    path = report / tracking.UNSENT_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("credentials", ["", "me:s3cr3t-pw@"])
def test_unreachable_at_start_stops_the_stage_before_any_work(
    tmp_path, monkeypatch, capsys, credentials
):
    port = _closed_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://{credentials}127.0.0.1:{port}")
    worked: list[bool] = []

    def body() -> str:
        with tracking.stage_run("download", "e", {}, tmp_path / "report", repo_root=tmp_path):
            worked.append(True)
        return "download: done"

    started = time.monotonic()
    assert stage_main("download", body) == 1
    assert time.monotonic() - started < 15 and worked == []
    err = capsys.readouterr().err.strip()
    assert err == (
        f"download: error: the MLflow server at http://{credentials.replace(':s3cr3t-pw', '')}"
        f"127.0.0.1:{port} does not answer (connection refused); start it, fix "
        "MLFLOW_TRACKING_URI, or unset it to log to mlflow.db in the repository"
    )
    assert "s3cr3t" not in err and not (tmp_path / "report").exists()


def test_a_server_vanishing_mid_run_loses_nothing(tmp_path, server, caplog):
    report = tmp_path / "report"
    with tracking.stage_run("extract", "e", {"workers": 2}, report, repo_root=tmp_path) as run:
        run.log_metrics({"loss": 1.0}, step=1)
        worker = tracking.RunLogger(**run.handle())  # what a Ray Train rank-0 worker gets
        worker.log_metrics({"loss_audio": 0.5}, step=1)
        server.vanish()
        run.log_metrics({"loss": 0.5}, step=2)  # the first call that fails: warned once
        run.set_tags({"source": "synthetic"})
        (tmp_path / "preview.png").write_bytes(b"png")
        run.log_artifact(tmp_path / "preview.png")
        worker.log_metrics({"loss_audio": 0.25}, step=2)
        assert run.lost == "connection refused"
    # the stage finished: its run id file says the run is incomplete and where the rest is
    saved = json.loads((report / tracking.RUN_ID_FILE).read_text())
    assert saved["run_id"] == run.run_id and saved["unsent"] == tracking.UNSENT_FILE
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("stopped answering (connection refused)" in w for w in warnings)

    got = server.recorded(run.run_id)  # what arrived before the server went away
    assert got["params"] == {"workers": "2"} and got["status"] == "RUNNING"
    assert got["metrics"] == {"loss": [1], "loss_audio": [1]}
    rest = [(r["kind"], r.get("step"), r.get("metrics") or r.get("tags") or r.get("status"))
            for r in _unsent(report)]  # fmt: skip
    assert rest[:3] == [("metrics", 2, {"loss": 0.5}), ("tags", None, {"source": "synthetic"}),
                        ("artifact", None, None)]  # fmt: skip
    assert ("metrics", 2, {"loss_audio": 0.25}) in rest  # the worker's, same file
    assert rest[-2][0] == "metrics" and set(rest[-2][2]) == {"seconds"}
    assert rest[-1] == ("status", None, "FINISHED")
    assert {r["run_id"] for r in _unsent(report)} == {run.run_id}


def test_a_bad_request_is_not_mistaken_for_a_lost_server(tmp_path, server):
    from mlflow.exceptions import MlflowException

    with (
        pytest.raises(MlflowException),
        tracking.stage_run("x", "e", {"a": 1}, tmp_path / "r", repo_root=tmp_path) as run,
    ):
        run.log_params({"a": 2})  # MLflow refuses to change a logged param: a bug, stays loud
    assert run.lost is None and _unsent(tmp_path / "r") == []
    assert server.recorded(run.run_id)["status"] == "FAILED"
