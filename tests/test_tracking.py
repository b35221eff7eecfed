"""MLflow tracking: default URI, tags, params, run id file, secrets kept out, failure status;
lineage by content, one pipeline run per DVC command, the experiment kind, moved stores."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import io, lineage, tracking
from pipeline.config import PathsConfig, load_params
from pipeline.data.manifest import ClipRecord, write_manifest
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
    assert tracking._experiment_id(MlflowClient(uri), "together", uri) == made_by_the_other
    assert looks == ["together", "together"]


# ------------------------------------------------------------------ lineage, grouping, moves

ROOT = Path(__file__).resolve().parents[1]


def test_stage_inputs_follow_dvc_yaml_from_evaluate_back_to_download():
    evaluate = lineage.stage_files("evaluate", ROOT / "dvc.yaml")
    assert evaluate.output is None and evaluate.inputs == {
        "clips": "download", "extract": "extract", "tokenizers": "tokenizers",
        "transformer": "train", "evaluator": "evaluator",
    }  # fmt: skip
    train = lineage.stage_files("train", ROOT / "dvc.yaml")
    assert train == lineage.StageFiles(
        {"tokens": "tokenize", "tokenizers": "tokenizers"}, "transformer"
    )
    chain, stage = ["evaluate"], "train"
    while stage:
        chain.append(stage)
        inputs = lineage.stage_files(stage, ROOT / "dvc.yaml").inputs
        stage = next((s for s in ("tokenize", "tokenizers", "extract", "download")
                      if s in inputs.values() and s not in chain), None)  # fmt: skip
    assert chain == ["evaluate", "train", "tokenize", "tokenizers", "extract", "download"]
    assert lineage.stage_files("download", ROOT / "dvc.yaml") == lineage.StageFiles({}, "clips")
    assert lineage.stage_files("x", tmp := ROOT / "no-such-dvc.yaml") == lineage.StageFiles(
        {}, None
    )
    assert not tmp.exists()


def test_content_digest_covers_every_sidecar_and_nothing_else(tmp_path):
    from pipeline import checkpoint

    assert lineage.MODEL_CONFIG_NAME == checkpoint.CONFIG_NAME
    folder = tmp_path / "tokenizers"  # model folders: config.json beside the weights
    assert lineage.content_digest(folder) is None
    for name in ("image", "audio"):
        io.write_json(folder / name / "config.json", {"modality": name})
    (folder / "image" / "model.safetensors").write_bytes(b"w1")
    first = lineage.content_digest(folder)
    (folder / "image" / "model.safetensors").write_bytes(b"w2")  # its sha256 is in config.json
    assert lineage.content_digest(folder) == first
    io.write_json(folder / "audio" / "config.json", {"modality": "audio", "steps": 2})
    assert lineage.content_digest(folder) not in (first, None)
    data = tmp_path / "extract"  # data folders: meta.json beside the shards
    io.write_json(data / "meta.json", {"counts": {"train": 2}})
    (data / "train-0.parquet").write_bytes(b"rows")
    before = lineage.content_digest(data)
    assert before is not None
    io.write_json(data / "meta.json", {"counts": {"train": 3}})
    assert lineage.content_digest(data) not in (before, None)


def _project(tmp_path, monkeypatch) -> tuple[Path, PathsConfig]:
    """A folder with the repository's dvc.yaml as the working directory, and its paths."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path, load_params(ROOT / "params.yaml").paths


def _download(repo: Path, paths: PathsConfig, clips: int, **env: str) -> str:
    """A download stage run that writes a manifest of `clips` ok train clips + 1 test clip."""
    records = [ClipRecord(f"c{i}", "synthetic", "a", "train", "ok") for i in range(clips)]
    records.append(ClipRecord("t0", "synthetic", "a", "test", "ok"))
    with tracking.stage_run("download", "unit", {"source": "synthetic"}, repo / "r/download",
                            repo_root=repo, paths=paths) as run:  # fmt: skip
        write_manifest(paths.clips, records)
        run.set_tags({"source": "synthetic"})
    return run.run_id


def _extract(repo: Path, paths: PathsConfig) -> tuple[str, object]:
    with tracking.stage_run("extract", "unit", {}, repo / "r/extract", repo_root=repo,
                            paths=paths) as run:  # fmt: skip
        io.write_json(Path(paths.extract) / "meta.json", {"counts": {"train": 2, "test": 1}})
    return run.run_id, MlflowClient(tracking.tracking_uri(repo)).get_run(run.run_id)


def test_lineage_links_the_run_that_made_the_content_even_after_a_restore(tmp_path, monkeypatch):
    """DVC's run cache restores outputs without running the stage: the next stage must link to
    the run that made those bytes, not to the one that ran last."""
    repo, paths = _project(tmp_path, monkeypatch)
    first = _download(repo, paths, clips=2)
    kept = (repo / paths.clips / "manifest.parquet").read_bytes()
    _, extract = _extract(repo, paths)
    tags = extract.data.tags
    client = MlflowClient(tracking.tracking_uri(repo))
    made = client.get_run(first).data.tags[tracking.OUTPUT_TAG]
    assert tags["lineage.download.run_id"] == first and tags["lineage.download.sha256"] == made
    assert tags["source"] == "synthetic" and tags[tracking.OUTPUT_TAG]
    (dataset,) = extract.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("clips", made[:12])
    assert json.loads(dataset.dataset.source) == {"uri": "data/clips"}
    assert json.loads(dataset.dataset.profile) == {"splits": {"test": 1, "train": 2},
                                                   "source": "synthetic"}  # fmt: skip
    assert [t.value for t in dataset.tags] == ["input"]
    # other clips, then the first manifest back as the run cache would put it
    second = _download(repo, paths, clips=3)
    (repo / paths.clips / "manifest.parquet").write_bytes(kept)
    _, again = _extract(repo, paths)
    assert again.data.tags["lineage.download.run_id"] == first != second


def test_one_dvc_command_is_one_pipeline_run(tmp_path, monkeypatch):
    """The stages a DVC command starts are children of one parent run, which ends with the
    last stage's status; another command (here: another invocation id) starts another."""
    repo, paths = _project(tmp_path, monkeypatch)
    monkeypatch.setattr(lineage, "invocation_id", lambda: "first-repro")
    monkeypatch.setenv("DVC_EXP_NAME", "tubby-pipe")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    download = _download(repo, paths, clips=2)
    extract, _ = _extract(repo, paths)
    client = MlflowClient(tracking.tracking_uri(repo))
    runs = [client.get_run(r) for r in (download, extract)]
    parent = runs[0].data.tags["mlflow.parentRunId"]
    assert {r.data.tags[tracking.PIPELINE_RUN_TAG] for r in runs} == {parent}
    assert runs[1].data.tags["mlflow.parentRunId"] == parent
    group = client.get_run(parent)
    assert group.info.run_name == "tubby-pipe" and group.info.status == "FINISHED"
    assert group.data.tags[tracking.INVOCATION_TAG] == "first-repro"
    assert group.data.tags["dvc_exp"] == "tubby-pipe"
    assert group.data.tags["dvc_exp_baseline"] == "abc123"
    assert group.data.tags[tracking.PIPELINE_RUN_TAG] == parent
    assert "stage" not in group.data.tags  # not a stage run: compare and the benches skip it
    # The next command reruns only extract: a new group that links to the earlier download.
    monkeypatch.setattr(lineage, "invocation_id", lambda: "second-repro")
    monkeypatch.delenv("DVC_EXP_NAME")
    with (
        pytest.raises(RuntimeError),
        tracking.stage_run("extract", "unit", {}, repo / "r/x", repo_root=repo, paths=paths),
    ):
        raise RuntimeError("boom")
    (failed,) = client.search_runs(
        [runs[0].info.experiment_id], "tags.stage = 'extract' and attributes.status = 'FAILED'"
    )
    second = client.get_run(failed.data.tags["mlflow.parentRunId"])
    assert second.info.run_id != parent and second.info.status == "FAILED"
    assert second.info.run_name.startswith("dvc repro ")
    assert failed.data.tags["lineage.download.run_id"] == download
    assert second.data.tags["reused.download"] == download


def test_the_invocation_id_is_the_dvc_process_that_started_the_stage(tmp_path):
    """Two stage commands of one parent process (through a shell, as DVC runs them) share an
    id; those of another process do not; outside DVC there is none."""
    probe = f"{sys.executable} -c 'from pipeline import lineage; print(lineage.invocation_id())'"
    env = {**os.environ, "DVC_STAGE": "x", "PYTHONPATH": str(ROOT)}

    def stage_command(**extra: str) -> str:
        return subprocess.run(["bash", "-c", probe], env={**env, **extra}, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip

    first, second = stage_command(), stage_command()
    assert first == second and re.fullmatch(r"[0-9a-f]{16}", first)
    other = subprocess.run(
        [sys.executable, "-c", f"import subprocess; subprocess.run(['bash', '-c', {probe!r}])"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert re.fullmatch(r"[0-9a-f]{16}", other) and other != first
    assert stage_command(DVC_EXP_NAME="exp-2") != first
    assert stage_command(DVC_STAGE="") == "None"


def test_the_experiment_is_a_model_training_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri(tmp_path)
    client = MlflowClient(uri)
    client.create_experiment("old")  # made before the kind existed
    for name in ("new", "old"):
        with tracking.stage_run("x", name, {}, tmp_path / "r", repo_root=tmp_path):
            pass
        tags = client.get_experiment_by_name(name).tags
        assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_a_copied_or_moved_store_logs_into_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    original = tmp_path / "original"
    (original / "x.txt").parent.mkdir()
    (original / "x.txt").write_text("x")
    with tracking.stage_run("x", "unit", {}, original / "r", repo_root=original) as run:
        run.log_artifact(original / "x.txt")
    db_bytes, artifacts = (original / "mlflow.db").read_bytes(), _tree(original / "mlruns")
    for copy, move in ((tmp_path / "copy", False), (tmp_path / "moved", True)):
        shutil.copytree(original, copy)
        if move:
            shutil.rmtree(original)
        monkeypatch.chdir(copy)
        with tracking.stage_run(
            "x", "unit", {"file": str(copy / "x.txt")}, copy / "r", repo_root=copy
        ) as run:
            run.log_artifact(copy / "x.txt")
        client = MlflowClient(tracking.tracking_uri(copy))
        exp = client.get_experiment_by_name("unit")
        assert exp.artifact_location == (copy / "mlruns" / exp.experiment_id).as_posix()
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 2
        for r in runs:  # the copied run too: the UI shows the copy's own files
            assert r.info.artifact_uri.startswith(f"{copy}/mlruns/")
            assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["x.txt"]
        assert client.get_run(run.run_id).data.params == {"file": "x.txt"}
        if not move:
            assert (original / "mlflow.db").read_bytes() == db_bytes
            assert _tree(original / "mlruns") == artifacts


def test_a_location_the_user_chose_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.tracking_uri(tmp_path / "repo")
    (tmp_path / "repo").mkdir()
    client = MlflowClient(uri)
    elsewhere = tmp_path / "shared" / "artifacts"
    client.create_experiment("chosen", artifact_location=str(elsewhere))
    other = tmp_path / "data" / "mlruns"  # MLflow's layout, but a folder with no store
    exp_id = client.create_experiment("layout", artifact_location=str(other / "9"))
    client.create_run(exp_id)
    for name in ("chosen", "layout"):
        exp = client.get_experiment_by_name(name)
        assert tracking.follow_store(uri, exp.experiment_id) is False
    assert client.get_experiment_by_name("chosen").artifact_location == str(elsewhere)


def test_trial_tags_carry_the_parent_commit_and_pipeline_run(tmp_path, monkeypatch):
    repo, paths = _project(tmp_path, monkeypatch)
    monkeypatch.setattr(lineage, "invocation_id", lambda: "repro")
    with tracking.stage_run("sweep", "unit", {}, repo / "r", repo_root=repo) as run:
        tags = tracking.trial_tags(run.run_id, tracking.tracking_uri(repo), "sweep-trial")
    parent = MlflowClient(tracking.tracking_uri(repo)).get_run(run.run_id).data.tags
    assert tags == {"mlflow.parentRunId": run.run_id, "stage": "sweep-trial",
                    "git_commit": parent["git_commit"],
                    "pipeline_run": parent["pipeline_run"]}  # fmt: skip


def test_run_url_opens_the_model_training_view():
    assert tracking.run_url("sqlite:////x/mlflow.db", "1", "abc") == (
        "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
    )
    assert tracking.run_url("https://me:pw@127.0.0.1:8443/", "7", "r") == (
        "https://me@127.0.0.1:8443/#/experiments/7/runs/r?workflowType=machine_learning"
    )


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
