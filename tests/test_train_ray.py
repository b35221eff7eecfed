"""The `train` stage's Ray Train path: 2 CPU workers (gloo DDP), resume, export, reports, MLflow.

Slow: every `fit` starts a Ray Train controller and a worker group (about 30-50 s here)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint, tracking
from pipeline.config import load_params
from pipeline.models.saved import load_transformer
from pipeline.profiles import load_profile
from pipeline.training.loop import TrainError
from pipeline.training.ray_train import fingerprint, run_name, run_train, worker_device

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")
MODEL = load_profile(ROOT / "profiles/tiny.yaml", ROOT / "params.yaml").model


@pytest.fixture(scope="module")
def ray_up():
    from pipeline.ray_runtime import ray_session

    with ray_session():
        yield


def _train(tmp: Path, **kw):
    return dataclasses.replace(
        PARAMS.train,
        steps=8,
        batch_size=8,
        warmup_steps=2,
        log_every=2,
        eval_every=4,
        checkpoint_every=4,
        figure_every=0,
        storage_path=str(tmp / "ray"),
        **kw,
    )


def test_two_workers_train_resume_and_export(tmp_path, make_token_dir, ray_up, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tokens = make_token_dir(tmp_path / "tokens")
    cfg = _train(tmp_path, num_workers=2)
    out, reports = tmp_path / "model", tmp_path / "reports"
    with tracking.stage_run("train", "test", {}, reports, repo_root=tmp_path) as run:
        first = run_train(
            MODEL,
            cfg,
            0,
            tokens,
            tmp_path / "no-tokenizers",
            out,
            reports,
            tracking=run.handle(),
            stop_after=4,
        )
        run_id = run.run_id
    assert first.steps == 4 and first.resumed_from == 0
    second = run_train(MODEL, cfg, 0, tokens, tmp_path / "no-tokenizers", out, reports)
    assert second.steps == 8 and second.resumed_from == 4
    assert second.run_name == first.run_name

    model, meta = load_transformer(out)
    assert meta["step"] == 8 and meta["layout"]["audio"]["grid"] == [2, 6]
    assert "module." not in "".join(model.state_dict())
    rows = (reports / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and [r.split(",")[0] for r in rows[1:]] == [
        "2",
        "4",
        "6",
        "8",
    ]
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["step"] == 8 and "val/loss_audio_r70" in metrics

    # Rank 0 logged per-step metrics into the stage's MLflow run.
    from mlflow.tracking import MlflowClient

    # An explicit URI: an earlier test may have set MLflow's process-wide one.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "loss_audio")
    assert [m.step for m in history] == [2, 4]


def test_local_mode_resumes_from_its_own_checkpoints(tmp_path, make_token_dir, ray_up):
    tokens = make_token_dir(tmp_path / "tokens")
    cfg = _train(tmp_path, num_workers=0)
    args = (MODEL, cfg, 0, tokens, tmp_path / "none", tmp_path / "m", tmp_path / "r")
    run_train(*args, stop_after=4)
    assert run_train(*args).resumed_from == 4
    straight = _train(tmp_path / "s", num_workers=0)
    run_train(MODEL, straight, 0, tokens, tmp_path / "none", tmp_path / "m2", tmp_path / "r2")
    a = checkpoint.load(tmp_path / "m")[0].tensors
    b = checkpoint.load(tmp_path / "m2")[0].tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_run_name_changes_with_the_optimisation_only():
    meta = {"files": {"train": [{"sha256": "a"}]}}
    base = fingerprint(MODEL, PARAMS.train, meta, 0)
    logging_only = dataclasses.replace(PARAMS.train, log_every=7, num_workers=4)
    assert fingerprint(MODEL, logging_only, meta, 0) == base
    assert fingerprint(MODEL, dataclasses.replace(PARAMS.train, base_lr=1e-3), meta, 0) != base
    assert fingerprint(MODEL, PARAMS.train, {"files": {"train": [{"sha256": "b"}]}}, 0) != base
    assert fingerprint(MODEL, PARAMS.train, meta, 0, code="other") != base
    assert run_name(PARAMS.train, base) == f"train-{base[:12]}"
    assert run_name(dataclasses.replace(PARAMS.train, run_name="mine"), base) == "mine"


def test_the_run_name_follows_the_training_code(tmp_path):
    """A finished run is resumed only by the code that trained it: an edit to the masking (as
    issue 22's ratio-0 fix was) names a new run; an edit elsewhere does not."""
    import shutil

    from pipeline.training.ray_train import OPTIMISATION_CODE, PACKAGE_ROOT, code_digest

    copy = tmp_path / "pipeline"
    shutil.copytree(PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_digest(copy) == code_digest()
    (copy / "stage.py").write_text("# not training code\n")
    assert code_digest(copy) == code_digest()
    masking = copy / "masking.py"
    text = masking.read_text()
    assert "clamp(0, length)" in text and "masking.py" in OPTIMISATION_CODE
    masking.write_text(text.replace("clamp(0, length)", "clamp(1, length)"))
    assert code_digest(copy) != code_digest()


def test_a_worker_trains_where_use_gpu_says():
    """Ray's local mode hands a worker cuda whenever torch sees a GPU (Ray 2.60): use_gpu false
    must still train on the CPU, and use_gpu true without a GPU must say so, not fall back."""
    cuda = torch.device("cuda:0")
    assert worker_device(False, cuda) == torch.device("cpu")
    assert worker_device(False, torch.device("cpu")) == torch.device("cpu")
    assert worker_device(True, cuda) == cuda
    with pytest.raises(TrainError, match="use_gpu is true but this worker has no CUDA GPU"):
        worker_device(True, torch.device("cpu"))
