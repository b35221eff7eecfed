"""MLflow tracking: default URI, tags, params, run id file, secrets kept out, failure status."""

from __future__ import annotations

import json

import mlflow
import pytest

from pipeline import tracking


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


def test_a_logged_model_is_listed_with_its_metrics_and_comes_back_by_uri(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the store's artifact root (./mlruns) lands here
    folder = tmp_path / "exported"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text("{}")
    (folder / "README.md").write_text("the card")
    report = tmp_path / "reports" / "train"
    with tracking.stage_run("train", "unit", {"train": {"steps": 4}}, report, tmp_path) as run:
        run.log_metrics({"loss": 3.0}, step=2)
        run.log_metrics({"loss": 2.5}, step=4)
        run.log_artifact(folder / "README.md")
        model_id = run.log_model("model", folder, step=4)
    client = MlflowClient(tracking.tracking_uri(tmp_path))
    model = client.get_logged_model(model_id)
    assert (model.name, model.source_run_id, str(model.status)) == ("model", run.run_id, "READY")
    assert model.params == {"train.steps": "4"}
    assert [(m.key, m.value, m.step) for m in model.metrics] == [("loss", 2.5, 4)]
    history = client.get_metric_history(run.run_id, "loss")  # linking added no entry to it
    assert [(m.value, m.step) for m in history] == [(3.0, 2), (2.5, 4)]
    outputs = client.get_run(run.run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(model_id, 4)]
    for uri in (f"runs:/{run.run_id}/model", f"models:/{model_id}"):
        data = tracking.download_model(uri, tmp_path / uri.replace("/", "_"), tmp_path)
        assert (data / "README.md").read_text() == "the card"
        assert (data / "transformer" / "config.json").is_file()
    # each way it can go wrong is one sentence
    other = client.create_logged_model(model.experiment_id, name="other", source_run_id=run.run_id)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "MLmodel").write_text("flavors:\n  pytorch: {}\n")
    client.log_model_artifacts(other.model_id, str(tmp_path / "other"))
    wrong = {
        f"runs:/{run.run_id[::-1]}/model": f"cannot give runs:/{run.run_id[::-1]}/model",
        f"runs:/{run.run_id}/README.md": "logged no model named 'README.md'",  # a run artifact
        f"runs:/{run.run_id}/other": "is not a model the train stage of this project logged",
        "models:/nobody/1": "cannot give models:/nobody/1",
    }
    for uri, message in wrong.items():
        with pytest.raises(tracking.TrackingError, match=message) as info:
            tracking.download_model(uri, tmp_path / "x", tmp_path)
        assert "\n" not in str(info.value)
    with pytest.raises(tracking.TrackingError, match="no MLflow store at"):
        tracking.download_model(f"runs:/{run.run_id}/model", tmp_path / "y", tmp_path / "other")
    assert not (tmp_path / "other" / "mlflow.db").exists()  # looking made no store
