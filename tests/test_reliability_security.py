"""Security: untrusted names never escape their folder or reach a command line as anything but a
file name; no checkpoint load can run code; local services listen on localhost only; no
credential reaches MLflow, a manifest or a log."""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline import checkpoint
from pipeline.config import ExtractConfig, LocalConfig
from pipeline.data import extract, manifest
from pipeline.data.local import download_local
from pipeline.data.manifest import ClipRecord, video_path
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").rglob("*.py")])
CFG = ExtractConfig(
    num_frames=2, image_size=16, jpeg_quality=90, sample_rate=22050, clip_seconds=2.0,
    n_fft=1024, hop_length=256, n_mels=80, fmin=125.0, fmax=7600.0, mel_frames=160,
    rows_per_shard=4, workers=1,
)  # fmt: skip


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


# ------------------------------------------------------------------------- code, statically


def test_every_checkpoint_load_is_weights_only_and_in_one_place():
    loads = []
    for path in SOURCES:
        text = path.read_text()
        assert "from torch import load" not in text and "serialization.load(" not in text, path
        for call, name in _calls(path):
            if name == "torch.load":
                kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
                loads.append((path.relative_to(ROOT).as_posix(), kw.get("weights_only")))
            unsafe = ("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "eval")
            assert name not in unsafe, f"{path}:{call.lineno}: {name}"
            if name == "np.load":
                kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
                assert kw.get("allow_pickle") == "False", f"{path}:{call.lineno}"
    # one unpickler for every checkpoint: checkpoint.safe_load, which allows tensors only
    assert loads == [("pipeline/checkpoint.py", "True")]


def test_no_command_line_is_ever_a_string_for_a_shell():
    runners = ("subprocess.run", "subprocess.Popen", "subprocess.check_output",
               "subprocess.check_call", "subprocess.call")  # fmt: skip
    seen = 0
    for path in SOURCES:
        for call, name in _calls(path):
            assert name not in ("os.system", "os.popen", "subprocess.getoutput",
                                "subprocess.getstatusoutput"), f"{path}: {name}"  # fmt: skip
            for kw in call.keywords:
                assert not (kw.arg == "shell" and ast.unparse(kw.value) != "False"), path
            if name in runners and call.args:
                seen += 1
                assert not isinstance(call.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)), (
                    f"{path}:{call.lineno}: a command line built as a string"
                )
    assert seen >= 6  # the scan does find the ffmpeg calls


# ------------------------------------------------------------------- pickles that run code


class Payload:
    """Unpickling this opens (creates) `marker` for writing: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _folder(folder: Path, weights_name: str, marker: Path, meta: dict | None) -> Path:
    folder.mkdir(parents=True)
    torch.save({"w": torch.zeros(2), "evil": Payload(marker)}, folder / weights_name)
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_a_pickle_that_runs_code_is_refused_by_every_loader(tmp_path):
    from pipeline.evaluation.local import LocalEvaluator
    from pipeline.metrics.extractors.common import read_official
    from pipeline.models.saved import load_transformer
    from pipeline.tokenizers.tokenizer import Tokenizer
    from pipeline.tokenizers.vocoder import Vocoder
    from pipeline.training.loop import FolderEnvironment, load_state

    # the payload is live: an unsafe load does run it
    live = _folder(tmp_path / "live", "w.pt", tmp_path / "live" / "ran", None)
    torch.load(live / "w.pt", weights_only=False)
    assert (live / "ran").exists()

    marker = tmp_path / "code-ran"
    mel = {k: getattr(CFG, k) for k in CFG.__dataclass_fields__}
    loaders = {
        "official weights": lambda d: checkpoint.read_state_dict(d / "weights.pt"),
        "official extractor weights": lambda d: read_official(d / "weights.pt"),
        "checkpoint folder": checkpoint.load,
        "transformer": load_transformer,
        "tokenizer": Tokenizer.load,
        "vocoder": Vocoder.load,
        "evaluator": LocalEvaluator.load,
    }
    for what, load in loaders.items():
        folder = _folder(tmp_path / what, "weights.pt", marker, {"kind": "melgan", "mel": mel})
        with pytest.raises(checkpoint.CheckpointError, match="was refused") as info:
            load(folder)
        assert "names io.open," in str(info.value) and "\n" not in str(info.value), what
    # training state: refused too, and restore() then has nothing it may load
    run = tmp_path / "run"
    _folder(run / "checkpoint_00000004", "state.pt", marker, None)
    with pytest.raises(checkpoint.CheckpointError, match="was refused"):
        load_state(run / "checkpoint_00000004")
    with pytest.raises(PipelineError, match="no checkpoint of this run can be read.*refused"):
        FolderEnvironment(run).restore()
    assert not marker.exists()


class Reduce:
    """Pickles as `func(*args)`: what unpickling it would call."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _payloads(marker: Path, tmp_path: Path) -> dict[str, tuple[object, str]]:
    """name -> (an object whose unpickling writes `marker`, the global the refusal must name)."""
    import builtins
    import subprocess
    import sys

    inner = tmp_path / "inner.pt"
    torch.save({"evil": Payload(marker)}, inner)
    writes = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": (Reduce(os.system, f"touch '{marker}'"), "posix.system"),
        "builtins.eval": (Reduce(builtins.eval, writes), "builtins.eval"),
        "builtins.exec": (Reduce(builtins.exec, writes), "builtins.exec"),
        "subprocess.Popen": (
            Reduce(subprocess.Popen, [sys.executable, "-c", writes]),
            "subprocess.Popen (written commands.Popen)",
        ),
        "builtins.__import__": (Reduce(builtins.__import__, "antigravity"), "builtins.__import__"),
        "builtins.getattr": (
            Reduce(builtins.getattr, Reduce(builtins.__import__, "os"), "system"),
            "builtins.__import__, builtins.getattr",
        ),
        "torch.load of a nested pickle": (
            Reduce(torch.load, str(inner)),
            "torch.serialization.load",
        ),
    }


@pytest.mark.parametrize(
    "payload",
    ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "builtins.__import__",
     "builtins.getattr", "torch.load of a nested pickle"],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
def test_a_code_running_global_is_refused_by_name(payload, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    obj, named = _payloads(marker, tmp_path)[payload]
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": {"x": obj}}, path)
    if payload not in ("builtins.__import__", "builtins.getattr"):  # these only fetch a function
        # live: an unpickler that runs code does write the marker (the nested load too, once
        # the environment lets torch.load default to running code)
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        loaded = torch.load(path, weights_only=False)
        if payload == "subprocess.Popen":
            loaded["callbacks"]["x"].wait(30)
        assert marker.exists(), payload
        marker.unlink()
        monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} was refused: it names {named}, which loading")
    assert "\n" not in message and not marker.exists()


# --------------------------------------------------------------- untrusted names and fields


HOSTILE_FILES = {  # file name in the labels CSV: label
    "-rf.mp4": "dog; rm -rf ~",
    "--help.mp4": "$(reboot)",
    "$(touch PWNED).mp4": "`touch PWNED`",
    "a;touch PWNED;b.mp4": "../../etc/passwd",
    "x|y&z>w.mp4": "<script>alert(1)</script>",
    "ünï cödé 名前.mp4": "гитара, café",
    "concat:a.mp4|b.mp4": "file:///etc/passwd",
    "-i.mov": "-i",
}


def _video(path: Path) -> None:
    import subprocess

    from pipeline.media import ffmpeg_exe

    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         "testsrc2=size=48x32:rate=10", "-f", "lavfi", "-i", "sine=sample_rate=22050", "-t", "2",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-f", "mp4", f"file:{path}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def _local_config(videos: Path, labels: Path):
    from pipeline.config import DownloadConfig, SyntheticConfig, VGGSoundConfig

    return DownloadConfig(
        source="local", limit=0, splits=("train", "test"), classes=(), retry_failed=False,
        synthetic=SyntheticConfig(2, 1, 1, 64, 48, 10, 16000, 10.0),
        vggsound=VGGSoundConfig(
            csv="unused.csv", split="test", url_template="http://127.0.0.1:9/{id}.mp4", format="b",
            workers=1, sleep_requests=0.0, sleep_interval=0.0, max_sleep_interval=0.0,
            socket_timeout=2.0, retries=1, backoff_s=1.0, max_backoff_s=1.0, cookiefile="",
        ),
        local=LocalConfig(str(videos), str(labels)),
    )  # fmt: skip


def test_hostile_file_names_and_labels_stay_data(tmp_path, monkeypatch):
    import csv

    monkeypatch.chdir(tmp_path)  # a command that ran would leave PWNED here
    videos = tmp_path / "videos"
    for name in HOSTILE_FILES:
        _video(videos / name)
    outside = tmp_path / "secret.mp4"
    _video(outside)
    (videos / "link.mp4").symlink_to(outside)  # a symlink out of videos_dir
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "split"])
        for name, label in HOSTILE_FILES.items():
            writer.writerow([name, label, "train"])
        writer.writerow(["link.mp4", "dog", "train"])
        writer.writerow(["../secret.mp4", "dog", "train"])
    clips = tmp_path / "clips"
    cfg = _local_config(videos, tmp_path / "labels.csv")
    records = {r.clip_id: r for r in download_local(cfg, clips, previous=[])}
    manifest.write_manifest(clips, records.values())
    ok = [r for r in records.values() if r.status == "ok"]
    assert sorted(r.label for r in ok) == sorted(HOSTILE_FILES.values())  # kept verbatim
    refused = [r for r in records.values() if r.status != "ok"]
    assert len(refused) == 2 and all("outside" in r.error for r in refused)
    for r in ok:  # ids and paths are tame, whatever the name was
        assert re.fullmatch(r"[A-Za-z0-9_-]+", r.clip_id) and r.path == video_path(r.clip_id)

    out = tmp_path / "extract"
    summary = extract.run_extract(CFG, clips, out, tmp_path / "cache")
    assert summary.counts == {"train": len(HOSTILE_FILES)} and summary.failures == {}
    labels = [x for f in out.glob("train/*.parquet") for x in pq.read_table(f)["label"].to_pylist()]
    assert sorted(labels) == sorted(HOSTILE_FILES.values())
    made = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert not any(p.name == "PWNED" for p in tmp_path.rglob("*"))  # no command ever ran
    expected_roots = ("videos/", "clips/", "extract/", "labels.csv", "secret.mp4")
    assert all(m.startswith(expected_roots) for m in made), made


def test_a_tampered_manifest_cannot_steer_extract(tmp_path):
    clips, out = tmp_path / "data" / "clips", tmp_path / "data" / "extract"
    _video(clips / video_path("good"))
    _video(tmp_path / "outside.mp4")
    rows = [
        ClipRecord("good", "local", "dog", "train", status="ok", path=video_path("good")),
        ClipRecord("../../evil", "local", "dog", "train", status="ok", path=video_path("good")),
        ClipRecord("bad_split", "local", "dog", "../../x", status="ok", path=video_path("good")),
        ClipRecord("up", "local", "dog", "train", status="ok", path="../../outside.mp4"),
        ClipRecord("abs", "local", "dog", "train", status="ok", path=str(tmp_path / "outside.mp4")),
        ClipRecord("opt", "local", "dog", "train", status="ok", path="-i"),
    ]
    manifest.write_manifest(clips, rows)
    summary = extract.run_extract(CFG, clips, out, tmp_path / "cache")
    assert summary.counts == {"train": 1}
    failures = {f["clip_id"]: f for f in pq.read_table(out / "failures.parquet").to_pylist()}
    assert "not a safe file name" in failures["../../evil"]["detail"]
    assert "not a valid folder name" in failures["bad_split"]["detail"]
    assert "would leave" in failures["up"]["detail"] and "would leave" in failures["abs"]["detail"]
    assert failures["opt"]["reason"] == "unreadable"
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith("data/")] == ["outside.mp4"]
    assert sorted(p.name for p in out.iterdir()) == ["failures.parquet", "meta.json", "train"]


# --------------------------------------------------------------------------- local services


def test_local_ray_and_mlflow_listen_on_localhost_only(monkeypatch):
    import click
    import ray
    from mlflow.cli import cli

    from pipeline.ray_runtime import ray_session

    started = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: started.update(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with ray_session():
        pass
    assert started["address"] is None and started["include_dashboard"] is False
    # the README's `mlflow ui` (an alias of `mlflow server`) keeps MLflow's default host
    ui = cli.get_command(click.Context(cli), "ui")
    assert next(p.default for p in ui.params if p.name == "host") == "127.0.0.1"
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^mlflow (?:ui|server)\b.*$", readme, flags=re.M)
    assert commands and not any("--host" in c or "0.0.0.0" in c for c in commands)


# ------------------------------------------------------------------------------ credentials


def test_no_credential_reaches_mlflow_a_manifest_or_a_log(
    tmp_path, download_server, stage_project, monkeypatch, caplog, capsys
):
    from mlflow.tracking import MlflowClient

    import stages.download
    from pipeline import tracking
    from pipeline.stage import stage_main

    cookie, aws_secret = "s3cr3t-c00kie-value", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    cookies = tmp_path / "private" / "cookies.txt"
    cookies.parent.mkdir()
    cookies.write_text(
        f"# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t4102444800\tSID\t{cookie}\n"
    )
    (tmp_path / "list.csv").write_text("abcdefghijk,1,dog,train\n")
    stage_project.params({"download": {"source": "vggsound", "vggsound": {
        "csv": str(tmp_path / "list.csv"), "url_template": download_server.url_template,
        "format": "b", "workers": 1, "sleep_requests": 0.0, "sleep_interval": 0.0,
        "max_sleep_interval": 0.0, "socket_timeout": 5.0, "cookiefile": str(cookies)}}})  # fmt: skip
    monkeypatch.chdir(stage_project.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{stage_project.root / 'mlflow.db'}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    with caplog.at_level(logging.DEBUG):
        assert stage_main("download", stages.download.main) == 0
    assert any(cookie in c for c in download_server.cookies)  # the cookie was used

    out = capsys.readouterr()
    text = caplog.text + out.out + out.err
    for secret in (cookie, aws_secret, str(cookies)):
        assert secret not in text
        for path in stage_project.root.rglob("*"):
            if path.is_file() and path.name != "params.yaml":  # params.yaml names the file
                assert secret.encode() not in path.read_bytes(), (secret, path)
    run_id = json.loads((stage_project.root / "reports/download/mlflow_run.json").read_text())
    params = MlflowClient(tracking.tracking_uri()).get_run(run_id["run_id"]).data.params
    assert "vggsound.cookiefile" not in params and params["vggsound.workers"] == "1"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(params)
    # a credential written into a URI param is cut out before it is logged
    flat = tracking.flatten(
        {"train": {"storage_path": f"s3://AKIAIOSFODNN7EXAMPLE:{aws_secret}@b/p"}}
    )
    assert flat == {"train.storage_path": "s3://AKIAIOSFODNN7EXAMPLE@b/p"}


def test_a_storage_password_does_not_travel_with_the_exported_weights(tmp_path, make_token_dir):
    import dataclasses

    from pipeline.data.tokens import load_token_meta
    from pipeline.profiles import load_profile
    from pipeline.training import loop, reports

    params = load_profile(ROOT / "profiles/tiny.yaml", ROOT / "params.yaml")
    layout, _ = load_token_meta(make_token_dir(tmp_path / "tokens"))
    train = dataclasses.replace(params.train, storage_path="s3://AKIAEXAMPLE:wJalr/K7+x@b/p")
    job = loop.TrainJob(params.model, train, layout.to_dict(), str(tmp_path / "tokens"), 0, "f")
    state = {
        "model": loop.build_model(job).state_dict(),
        "step": 0,
        "history": {"train": [], "val": []},
    }
    reports.export_model(state, job, "run", tmp_path / "out")
    meta = (tmp_path / "out" / "config.json").read_text()
    assert "wJalr" not in meta and "s3://AKIAEXAMPLE@b/p" in meta
    assert "wJalr" not in (tmp_path / "out" / "README.md").read_text()  # nor in the card
