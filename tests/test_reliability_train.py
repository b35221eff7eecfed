"""Faults injected into training: a corrupted or unsafe latest checkpoint (plain loop and Ray's
storage), one Ray Train worker process killed mid-run (FailureConfig restarts the group from the
last checkpoint), and the whole `train` stage killed with SIGKILL, then rerun (it resumes)."""

from __future__ import annotations

import dataclasses
import logging
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_params
from pipeline.data.tokens import load_token_meta
from pipeline.models.saved import load_transformer
from pipeline.profiles import load_profile
from pipeline.training.loop import FolderEnvironment, TrainError, TrainJob, run_training

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")
MODEL = load_profile(ROOT / "profiles/tiny.yaml", ROOT / "params.yaml").model
TRAIN = dataclasses.replace(
    PARAMS.train, steps=12, batch_size=8, warmup_steps=2, log_every=4, eval_every=0,
    figure_every=0, checkpoint_every=4, keep_checkpoints=2, num_workers=0,
)  # fmt: skip


class Payload:
    """Unpickling this would create `marker`: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """A micro model gains nothing from 2 threads, and on a busy 2-core machine their spinning
    makes each step 10-50 times slower. (Module-wide: results are bit-equal only at one count.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, make_token_dir) -> Path:
    return make_token_dir(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def straight(tokens, tmp_path_factory) -> dict:
    """The final state of an uninterrupted run of `_job(tokens)`."""
    return run_training(_job(tokens), FolderEnvironment(tmp_path_factory.mktemp("straight")))


def _job(tokens: Path, **train) -> TrainJob:
    layout, _ = load_token_meta(tokens)
    cfg = dataclasses.replace(TRAIN, **train)
    return TrainJob(MODEL, cfg, layout.to_dict(), str(tokens), seed=3, fingerprint="f")


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ------------------------------------------------------------------ corrupt latest checkpoint


@pytest.mark.parametrize("damage", ["truncated", "garbage", "unsafe pickle"])
def test_a_bad_latest_checkpoint_falls_back_to_the_previous_one(
    tokens, straight, tmp_path, caplog, damage
):
    job = _job(tokens)
    run = tmp_path / "run"
    run_training(job, FolderEnvironment(run), stop_after=8)  # checkpoints at 4 and 8
    latest = run / "checkpoint_00000008" / "state.pt"
    marker = tmp_path / "code-ran"
    if damage == "truncated":  # a crash while the disk filled, a cut copy
        latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])
    elif damage == "garbage":
        latest.write_bytes(b"\0" * 4096)
    else:
        torch.save({"step": 8, "model": {}, "extra": Payload(marker)}, latest)

    with caplog.at_level(logging.WARNING, logger="pipeline.training.loop"):
        resumed = run_training(job, FolderEnvironment(run))
    assert any("falling back to checkpoint_00000004" in m for m in caplog.messages)
    assert resumed["history"]["resumed"] == [{"step": 4}]  # not step 0, not the bad 8
    assert resumed["step"] == 12 and _same_weights(resumed, straight)
    assert not marker.exists()
    # the bad checkpoint was replaced by a good one; only `keep` checkpoints are left
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_00000008", "checkpoint_00000012"]
    assert FolderEnvironment(run).restore()["step"] == 12


def test_no_readable_checkpoint_is_one_clear_error(tokens, tmp_path):
    run = tmp_path / "run"
    run_training(_job(tokens), FolderEnvironment(run), stop_after=8)
    for state in run.glob("checkpoint_*/state.pt"):
        state.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="no checkpoint of this run can be read") as info:
        run_training(_job(tokens), FolderEnvironment(run))
    assert "\n" not in str(info.value) and str(run) in str(info.value)


def test_ray_storage_checkpoints_fall_back_too(tokens, tmp_path, caplog):
    """The same fallback for a checkpoint Ray hands back (`ray.train.get_checkpoint()`): Ray
    names them `checkpoint_<timestamp>`; the earlier siblings of the run are tried in order."""
    import ray.train

    from pipeline.training.ray_train import restore_checkpoint

    scratch = FolderEnvironment(tmp_path / "scratch")
    run_training(_job(tokens), scratch, stop_after=8)
    storage = tmp_path / "ray" / "train-run"
    for step, stamp in ((4, "2026-01-01_10-00-00.000001"), (8, "2026-01-01_10-05-00.000002")):
        (storage / f"checkpoint_{stamp}").mkdir(parents=True)
        src = tmp_path / "scratch" / f"checkpoint_{step:08d}" / "state.pt"
        (storage / f"checkpoint_{stamp}" / "state.pt").write_bytes(src.read_bytes())
    newest = storage / "checkpoint_2026-01-01_10-05-00.000002"
    (newest / "state.pt").write_bytes(b"\0" * 100)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.ray_train"):
        state = restore_checkpoint(ray.train.Checkpoint(str(newest)))
    assert state["step"] == 4
    assert any(
        "falling back to checkpoint_2026-01-01_10-00-00.000001" in m for m in caplog.messages
    )
    (storage / "checkpoint_2026-01-01_10-00-00.000001" / "state.pt").write_bytes(b"")
    with pytest.raises(TrainError, match="no checkpoint of this run can be read"):
        restore_checkpoint(ray.train.Checkpoint(str(newest)))


# ------------------------------------------------------------- a Ray Train worker is killed


def _train_workers() -> list:
    """This test process's live Ray Train worker processes (never anyone else's)."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_run_resumes_from_its_checkpoint(
    tokens, tmp_path, monkeypatch
):
    from pipeline.ray_runtime import ray_session
    from pipeline.training.ray_train import run_train

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local instance of this test's own
    cfg = dataclasses.replace(
        TRAIN, steps=100, num_workers=2, max_failures=1, checkpoint_every=10, log_every=10,
        run_name="kill-a-worker", storage_path=str(tmp_path / "ray"),
    )  # fmt: skip
    storage = tmp_path / "ray" / "kill-a-worker"
    snapshot = storage / "checkpoint_manager_snapshot.json"
    registered = lambda: snapshot.is_file() and "checkpoint_" in snapshot.read_text()  # noqa: E731
    result: dict = {}

    def fit() -> None:
        try:
            result["summary"] = run_train(
                MODEL, cfg, 3, tokens, tmp_path / "none", tmp_path / "model", tmp_path / "reports"
            )
        except BaseException as err:  # reported by the main thread
            result["error"] = err

    with ray_session():
        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        deadline = time.monotonic() + 240
        # Ray knows a checkpoint only once its controller has collected the report (it then
        # writes its snapshot); a worker killed before that restarts the run from scratch.
        while not registered() or len(_train_workers()) < 2:
            assert thread.is_alive(), result.get("error")
            assert time.monotonic() < deadline, "training never reached its first checkpoint"
            time.sleep(0.05)
        victim = _train_workers()[-1]
        victim.kill()  # SIGKILL, mid-run
        thread.join(300)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary.steps == 100
    assert 0 < summary.resumed_from < 100  # restarted from a checkpoint, not from step 0
    assert not victim.is_running()
    _, meta = load_transformer(tmp_path / "model")
    assert meta["step"] == 100


# ------------------------------------------------------------------ the whole stage killed


@pytest.mark.slow
def test_sigkill_of_the_train_stage_then_rerun_resumes_from_the_last_checkpoint(
    stage_project, make_token_dir
):
    make_token_dir(stage_project.root / "data" / "tokens")
    stage_project.params({
        "model": {"embed_dim": 16, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16,
                  "decoder_depth": 1, "decoder_num_heads": 2},
        "train": {"steps": 60, "batch_size": 8, "warmup_steps": 2, "log_every": 10,
                  "eval_every": 0, "figure_every": 0, "checkpoint_every": 10,
                  "keep_checkpoints": 2, "num_workers": 0, "run_name": "killed"},
    })  # fmt: skip
    runs = stage_project.root / "data" / ".cache" / "ray_train" / "killed"
    saved = lambda: sorted(runs.glob("checkpoint_*/state.pt"))  # noqa: E731
    proc = stage_project.start("train", RAY_ADDRESS="")
    stage_project.wait_for(proc, lambda: len(saved()) >= 1, timeout=240)
    stage_project.stop(proc, signal.SIGKILL)
    last = int(saved()[-1].parent.name.split("_")[1])
    assert 0 < last < 60 and not (stage_project.root / "models" / "transformer").exists()

    code, out, err = stage_project.run("train", RAY_ADDRESS="")
    assert code == 0, err
    assert re.search(rf"train: 60 steps, resumed at step {last} in ", out), out
    assert "train: resuming at step" in err
