"""MLflow tracking: default URI, tags, params, run id file, secrets kept out, failure status."""

from __future__ import annotations

import json

import mlflow
import pytest

from pipeline import tracking
from pipeline.media import ffmpeg_version


def test_default_uri_is_sqlite_at_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_flatten_drops_secrets_and_keeps_lists():
    flat = tracking.flatten(
        {
            "vggsound": {"cookiefile": "/home/me/cookies.txt", "workers": 4},
            "splits": ["train", "test"],
        }
    )
    assert flat == {"vggsound.workers": "4", "splits": '["train", "test"]'}


def test_redact_removes_passwords_only():
    assert (
        tracking.redact("postgresql://me:hunter2@db:5432/mlflow")
        == "postgresql://me@db:5432/mlflow"
    )
    assert tracking.redact("sqlite:////x/mlflow.db") == "sqlite:////x/mlflow.db"


def test_stage_run_logs_one_tagged_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    report = tmp_path / "reports" / "download"
    with tracking.stage_run(
        "download",
        "unit",
        {"source": "synthetic", "cookiefile": "c.txt"},
        report,
        repo_root=tmp_path,
    ) as run:
        run.log_metrics({"clips_ok": 12})
    assert (tmp_path / "mlflow.db").exists()
    saved = json.loads((report / tracking.RUN_ID_FILE).read_text())
    assert saved["run_id"] == run.run_id
    mlflow.set_tracking_uri(tracking.tracking_uri(tmp_path))
    got = mlflow.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["stage"] == "download"
    assert got.data.tags["dvc_exp"] == "exp-1"
    assert "git_commit" in got.data.tags
    assert got.data.tags["ffmpeg"] == ffmpeg_version()
    assert got.data.tags["ffmpeg"].startswith("ffmpeg version ")
    assert got.data.params == {"source": "synthetic"}
    assert got.data.metrics["clips_ok"] == 12
    assert got.data.metrics["seconds"] >= 0


def test_a_failing_stage_marks_its_run_failed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    report = tmp_path / "reports" / "x"
    with (
        pytest.raises(RuntimeError),
        tracking.stage_run("x", "unit", {}, report, repo_root=tmp_path),
    ):
        raise RuntimeError("boom")
    mlflow.set_tracking_uri(tracking.tracking_uri(tmp_path))
    runs = mlflow.search_runs(experiment_names=["unit"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (report / tracking.RUN_ID_FILE).exists()


def test_stages_that_start_together_share_one_new_experiment(tmp_path, monkeypatch):
    """Both find no experiment on a new store; the one whose create loses takes the other's."""
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri(tmp_path)
    made_by_the_other = MlflowClient(uri).create_experiment("together")
    looks: list[str] = []
    real = MlflowClient.get_experiment_by_name

    def before_the_other_made_it(self, name):
        looks.append(name)
        return None if len(looks) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", before_the_other_made_it)
    assert tracking._experiment_id(MlflowClient(uri), "together") == made_by_the_other
    assert looks == ["together", "together"]
