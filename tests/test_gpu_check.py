"""bench/gpu_check.sh and bench/gpu_check.py: the device overrides, the report's judgement of
each target, the prepared media check, and the CPU dry run of the whole script (what keeps it
from rotting between GPU windows)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline.config import Params, merge, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _device_keys(cls, prefix: str = "") -> set[str]:
    """Every field of the params dataclasses whose name says device or GPU."""
    keys = set()
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(field.type) or (
            isinstance(field.type, str) and field.type in _CLASSES
        ):
            keys |= _device_keys(_CLASSES.get(field.type, field.type), f"{prefix}{field.name}.")
        elif "device" in field.name or "gpu" in field.name:
            keys.add(f"{prefix}{field.name}")
    return keys


def _classes() -> dict[str, type]:
    import pipeline.config as config

    return {
        name: obj
        for name, obj in vars(config).items()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj)
    }


_CLASSES = _classes()


def test_the_overrides_set_every_device_key_of_params(gpu_check):
    """A device key added to pipeline/config.py and missed here would leave a stage on the CPU
    during the GPU check."""
    found = _device_keys(Params)
    assert {"tokenizers.device", "train.use_gpu", "sweep.gpus_per_trial"} <= found
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    tiny = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    for device in ("cuda", "cpu"):
        overrides = gpu_check.device_overrides(device)
        assert set(gpu_check.flat_keys(overrides)) == found
        params = parse_params(merge(merge(base, tiny), overrides))
        assert params.tokenizers.device == params.generate.device == device
        assert params.train.use_gpu is (device == "cuda")
        assert (params.tokenize.num_gpus_per_actor > 0) is (device == "cuda")


def test_the_scratch_project_is_tiny_with_every_stage_on_the_device(gpu_check, tmp_path):
    project = gpu_check.new_project(tmp_path / "p", "cuda")
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train"]["use_gpu"] is True and params["evaluator"]["device"] == "cuda"
    assert params["evaluate"]["num_gpus_per_actor"] == 1
    assert params["download"]["synthetic"]["num_classes"] == 4  # profiles/tiny.yaml
    assert gpu_check.dag_stages(project)[:2] == list(gpu_check.MEDIA_STAGES)


def test_prepared_media_made_with_other_params_are_refused(gpu_check, tmp_path):
    project = gpu_check.new_project(tmp_path / "p", "cuda")
    prepared = tmp_path / "prepared"
    for rel in gpu_check.MEDIA_OUTPUTS:
        (prepared / rel).mkdir(parents=True)
        (prepared / rel / "x").write_text(rel)
    params = yaml.safe_load((project / "params.yaml").read_text())
    (prepared / "params.yaml").write_text(yaml.safe_dump(params))
    gpu_check.use_prepared(project, prepared)
    assert (project / "data" / "extract" / "x").read_text() == "data/extract"
    params["extract"]["image_size"] = 48
    (prepared / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit, match="other extract params"):
        gpu_check.use_prepared(project, prepared)


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def test_the_report_judges_each_target_and_keeps_failed_steps(gpu_check, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "steps.tsv").write_text(
        "env\t0\t3.2\t90\tpython env\n"
        "train_bf16\t0\t80.0\t150\tpython train\n"
        "train_ckpt\t1\t20.5\t90\tpython train\n"
        "generate\t124\t120.0\t120\tpython generate\n"
        "tokenize\tskipped\t\t\tpython tokenize\n"
    )
    (work / "train_ckpt.log").write_text("line\n" * 40 + "CUDA out of memory\n")
    _write(work / "env.json", {"machine": "m", "gpu": "NVIDIA H100", "torch": "2.11"})
    _write(
        work / "train_bf16.json",
        {"samples_per_s": 560.0, "tflop_per_s": 470.8, "mfu": 0.476, "device": "NVIDIA H100"},
    )
    _write(
        work / "generate.json",
        [
            {"batch": 1, "guidance": 3.0, "s_per_clip": 0.2, "steps": 30,
             "s_per_audio_second": 0.02, "clips_per_s": 5.0},
            {"batch": 64, "guidance": 3.0, "s_per_clip": 0.03, "steps": 30,
             "s_per_audio_second": 0.003, "clips_per_s": 30.0},
        ],
    )  # fmt: skip
    _write(work / "im2wav.json", {"s_per_audio_second": 2.0, "extrapolated": True})
    report = gpu_check.write_report(work, out, dry=False)
    met = {t["target"]: t["met"] for t in report["targets"]}
    assert met["train_mfu"] is True
    assert met["generate_b64"] is True and met["generate_b1"] is False
    assert met["im2wav_ratio"] is None and met["dag"] is None and met["train_memory"] is None
    ratio = next(t for t in report["targets"] if t["target"] == "im2wav_ratio")
    assert ratio["measured"].startswith("100x")
    status = {s["name"]: (s["status"], s["rc"]) for s in report["steps"]}
    assert status == {
        "env": ("ok", 0),
        "train_bf16": ("ok", 0),
        "train_ckpt": ("failed", 1),
        "generate": ("timeout", 124),
        "tokenize": ("skipped", None),
    }
    ckpt = next(s for s in report["steps"] if s["name"] == "train_ckpt")
    assert ckpt["output_tail"][-1] == "CUDA out of memory"
    md = (out / "gpu_check.md").read_text()
    assert "| generate_b1 |" in md and "| **no** |" in md and "NVIDIA H100" in md
    assert "not measured (step tokenize)" in md
    assert json.loads((out / "gpu_check.json").read_text())["targets"] == report["targets"]
    # A dry run reports its figures but judges none of them.
    dry = gpu_check.write_report(work, out, dry=True)
    assert all(t["met"] is None for t in dry["targets"])
    assert (out / "gpu_check.md").read_text().startswith("# GPU check: dry run")


def _probe_wheel(folder: Path) -> Path:
    """A one-module wheel, so that the dry run also installs from a wheel folder as the GPU
    run does from .whl/."""
    folder.mkdir()
    path = folder / "gpu_check_probe-1.0-py3-none-any.whl"
    info = "gpu_check_probe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("gpu_check_probe.py", "WHERE = __file__\n")
        whl.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu_check_probe\nVersion: 1.0\n"
        )
        whl.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        whl.writestr(f"{info}/RECORD", "")
    return folder


@pytest.mark.slow
def test_the_dry_run_exercises_every_step_and_writes_the_report(tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["GPU_CHECK_WHEELS"] = str(_probe_wheel(tmp_path / "wheels"))
    env.pop("OUT", None)
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry"] is True
    steps = [(s["name"], s["status"]) for s in report["steps"]]
    assert steps == [(name, "ok") for name in
                     ("setup", "env", "dag", "train_bf16", "train_ckpt", "generate", "im2wav",
                      "encoders", "tokenize")]  # fmt: skip
    # The setup step installed the wheel folder where the later steps look first.
    assert report["env"]["wheels"] == ["gpu_check_probe-1.0"]
    assert report["env"]["pythonpath"].split(os.pathsep)[0].endswith("/site")
    assert report["env"]["machine"].endswith("CPU cores") and report["env"]["gpu"] is None
    dag = report["results"]["dag"]
    assert dag["ok"] and dag["overrides"]["tokenizers.device"] == "cpu"
    assert [(r["stage"], r["rc"], bool(r.get("prepared"))) for r in dag["runs"]] == [
        ("download", 0, True), ("extract", 0, True),
    ]  # fmt: skip
    targets = {t["target"]: t for t in report["targets"]}
    assert set(targets) == {
        "dag", "train_mfu", "train_memory", "generate_b64", "generate_b1", "im2wav_ratio",
        "encoder_image", "encoder_image_ids", "encoder_audio", "encoder_audio_ids",
        "tokenize_overhead",
    }  # fmt: skip
    for name, target in targets.items():
        assert target["measured"], f"{name} has no figure"
        assert target["met"] is None, name
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check: dry run") and md.count("\n| ") >= len(targets) + 8
    log = (out / "gpu_check.log").read_text()
    assert "=== tokenize: exit 0" in log
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.json",
        "gpu_check.log",
        "gpu_check.md",
    ]
