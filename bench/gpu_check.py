"""The GPU check's Python half: the tiny DAG on one device, and the JSON + markdown report.

    python bench/gpu_check.py env --json F
    python bench/gpu_check.py dag --work DIR --device cuda|cpu [--stages S ...] [--json F]
                                  [--prepared DIR] [--media auto|run|prepared]
    python bench/gpu_check.py prepare --out DIR
    python bench/gpu_check.py report --work DIR --out DIR --mode gpu|dry

bench/gpu_check.sh runs the steps, each under its own `timeout`, and calls `report` after each
one, so that a check cut short still leaves its gpu_check.json and gpu_check.md. This file
imports neither torch nor the pipeline at the top: `report` must work where they are broken.

`env`: the machine line (bench/machine.py), the GPU, torch, CUDA and cuDNN versions, the commit.

`dag`: a scratch copy of the project (code, dvc.yaml, params.yaml) with profiles/tiny.yaml
applied and then every device key of params.yaml set for DEVICE (`device_overrides`), written
with the product's own `apply_profile`; then the stages of dvc.yaml in its order, each its own
`cmd` in the copy (`dvc repro` itself adds only bookkeeping that tests/test_dvc.py checks on
the CPU, and DVC's dependencies do not fit beside Ray in the wheels a GPU machine is sent).
The stages that need ffmpeg and have no device (`MEDIA_STAGES`: download, extract) are taken
from `--prepared` (made by `prepare` on a machine with ffmpeg) when this one has no ffmpeg
(`--media auto`) or when asked to (`--media prepared`).
Afterwards the outputs that record their device are read back (`evidence`).

`report`: gpu_check.json (every step's exit status, time, limit and last output lines, each
bench script's own JSON, and each target of the project's issue beside its figure) and
gpu_check.md (the same as tables).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# What a scratch copy needs to run every stage.
PROJECT_FILES = ("pipeline", "stages", "profiles", "dvc.yaml", "params.yaml")
MEDIA_STAGES = ("download", "extract")  # ffmpeg, no device: may come from `prepare`
# What MEDIA_STAGES leave, relative to the project (params.yaml paths on the tiny profile).
MEDIA_OUTPUTS = ("data/clips", "data/extract", "reports/download", "reports/extract")
# The params sections whose values must match between `prepare` and `dag` for its outputs to
# be the ones this DAG would have made.
MEDIA_SECTIONS = ("base", "paths", "download", "extract")

STEPS = (
    "setup",
    "env",
    "dag",
    "train_bf16",
    "train_ckpt",
    "generate",
    "im2wav",
    "encoders",
    "tokenize",
)
TAIL_LINES = 25

# The targets (H100/H200).
PEAK_TFLOPS = 989.0
MFU_TARGET = 0.45
V100_BYTES = 16e9  # "batch >= 32 within 16 GB"
CLIPS_PER_S_B64 = 25.0
S_PER_CLIP_B1 = 0.15
IMAGES_PER_S_TF32 = 715.0
MELS_PER_S_TF32 = 664.0
IDS_EQUAL_FP32 = 0.995
TOKENIZE_OVERHEAD = 0.15


# ----------------------------------------------------------------------------------- devices


def device_overrides(device: str) -> dict[str, dict[str, Any]]:
    """Every device key of params.yaml set for `device` (cuda or cpu), as a profile overlay.
    tests/test_infra.py checks that this names every device key of pipeline/config.py."""
    if device not in ("cuda", "cpu"):
        raise SystemExit(f"device must be cuda or cpu, not {device!r}")
    gpu = device == "cuda"
    return {
        "tokenizers": {"device": device},
        "tokenize": {"num_gpus_per_actor": 1 if gpu else 0},
        "train": {"use_gpu": gpu},
        "generate": {"device": device},
        "evaluator": {"device": device},
        "evaluate": {"num_gpus_per_actor": 1 if gpu else 0},
        # Four trials share the one GPU, as they share the CPUs.
        "sweep": {"gpus_per_trial": 0.25 if gpu else 0},
    }


def flat_keys(overlay: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in overlay.items():
        if isinstance(value, dict):
            out |= flat_keys(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


# ----------------------------------------------------------------------------------- env


def git_commit(root: Path) -> str:
    """HEAD with '+dirty', or what `--prepare` recorded (a GPU machine gets no .git)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.tracking import git_commit as head

    commit = head(root)
    recorded = root / ".gpu_check" / "commit"
    if commit == "unknown" and recorded.is_file():
        return f"{recorded.read_text().strip()} (recorded by --prepare)"
    return commit


def env_info() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.machine import machine

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": (
            round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None
        ),
        "commit": git_commit(ROOT),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        # What the setup step installed from the carried wheels (gpu_check.sh sets the folder).
        "wheels": sorted(
            d.name.removesuffix(".dist-info")
            for d in Path(os.environ.get("GPU_CHECK_SITE") or "/nonexistent").glob("*.dist-info")
        ),
    }
    for name in ("ray", "mlflow", "dvc", "librosa"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing or broken package is what is reported
            info[name] = None
    return info


# ----------------------------------------------------------------------------------- dag


def dag_stages(project: Path) -> list[str]:
    import yaml

    return list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])


def new_project(dest: Path, device: str) -> Path:
    """A scratch copy of the project at `dest` on the tiny profile with every device key set
    for `device`; the overrides are kept beside it as gpu_overrides.yaml."""
    import yaml

    sys.path.insert(0, str(ROOT))
    from pipeline.profiles import apply_profile

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    apply_profile(dest / "profiles" / "tiny.yaml", dest / "params.yaml")
    overrides = dest / "gpu_overrides.yaml"
    overrides.write_text(yaml.safe_dump(device_overrides(device), sort_keys=False))
    apply_profile(overrides, dest / "params.yaml")
    return dest


def has_ffmpeg() -> bool:
    sys.path.insert(0, str(ROOT))
    from pipeline.media import MediaError, ffmpeg_exe

    try:
        ffmpeg_exe()
    except MediaError:
        return False
    return True


def stage_env(project: Path) -> dict[str, str]:
    """This Python first on PATH (stages run as `python -m ...`), no inherited Ray address (a
    local Ray per stage), and an MLflow file store in the project: MLflow's SQLite store needs
    `cryptography` and SQLAlchemy, which the wheels sent to a GPU machine leave out for room."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env["MLFLOW_TRACKING_URI"] = (project / "mlruns").resolve().as_uri()
    env["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3.x refuses it otherwise
    return env


def run_stage(project: Path, name: str, log: Path) -> dict[str, Any]:
    """One stage's dvc.yaml `cmd` in `project`; its output appended to `log`."""
    import yaml

    cmd = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][name]["cmd"]
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n--- stage {name}: {cmd}\n")
        out.flush()
        proc = subprocess.run(
            cmd,
            shell=True,
            cwd=project,
            env=stage_env(project),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return {
        "stage": name,
        "rc": proc.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "last_line": lines[-1] if lines else "",
    }


def use_prepared(project: Path, prepared: Path) -> None:
    """Copy MEDIA_OUTPUTS from `prepared` into `project`, after checking that they were made
    with the same media params."""
    import yaml

    mine = yaml.safe_load((project / "params.yaml").read_text())
    theirs_file = prepared / "params.yaml"
    if not theirs_file.is_file():
        raise SystemExit(f"{prepared} has no params.yaml: make it with `gpu_check.py prepare`")
    theirs = yaml.safe_load(theirs_file.read_text())
    changed = [s for s in MEDIA_SECTIONS if mine.get(s) != theirs.get(s)]
    if changed:
        raise SystemExit(
            f"{prepared} was made with other {', '.join(changed)} params: run "
            "`bash bench/gpu_check.sh --prepare` again"
        )
    for rel in MEDIA_OUTPUTS:
        src = prepared / rel
        if not src.is_dir():
            raise SystemExit(f"{prepared} has no {rel}: run `bash bench/gpu_check.sh --prepare`")
        shutil.copytree(src, project / rel, dirs_exist_ok=True)


def evidence(project: Path, stages: list[str]) -> dict[str, str]:
    """What the outputs of the stages that ran say about where they ran. The stages whose
    device key is explicit (tokenizers, evaluator, evaluate, sweep through generate.device /
    sweep.gpus_per_trial) stop with an error when that device is missing, so their exit
    status is the evidence; tokenize and train can fall back and record what they used."""
    found: dict[str, str] = {}
    tokens = project / "data" / "tokens" / "meta.json"
    if "tokenize" in stages and tokens.is_file():
        found["tokenize"] = "encoders: " + ", ".join(json.loads(tokens.read_text())["encoders"])
    metrics = project / "reports" / "train" / "metrics.json"
    meta = project / "models" / "transformer" / "config.json"
    if "train" in stages and metrics.is_file() and meta.is_file():
        gib = json.loads(metrics.read_text()).get("gpu_mem_gib")
        precision = json.loads(meta.read_text()).get("precision")
        found["train"] = f"precision {precision}; " + (
            f"peak GPU memory {gib:.2f} GiB" if gib is not None else "no GPU memory recorded"
        )
    return found


def run_dag(
    work: Path,
    device: str,
    stages: list[str] | None,
    prepared: Path | None,
    media: str = "auto",
) -> dict[str, Any]:
    """The `dag` command's work; returns what dag.json holds."""
    project = new_project(work / "project", device)
    order = dag_stages(project)
    chosen = order if not stages else [s for s in order if s in stages]
    unknown = sorted(set(stages or ()) - set(order))
    if unknown:
        raise SystemExit(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(order)}")
    log = work / "stages.log"
    log.write_text("")
    ffmpeg = has_ffmpeg()
    result: dict[str, Any] = {
        "device": device,
        "stages": chosen,
        "overrides": flat_keys(device_overrides(device)),
        "ffmpeg": ffmpeg,
        "runs": [],
    }
    media_stages = [s for s in chosen if s in MEDIA_STAGES]
    if media_stages and (media == "prepared" or (media == "auto" and not ffmpeg)):
        if prepared is None:
            raise SystemExit(
                "no ffmpeg here and no --prepared folder: run `bash bench/gpu_check.sh "
                "--prepare` on a machine with ffmpeg and carry .gpu_check"
            )
        use_prepared(project, prepared)
        result["runs"] += [{"stage": s, "rc": 0, "prepared": str(prepared)} for s in media_stages]
        chosen = [s for s in chosen if s not in MEDIA_STAGES]
    for name in chosen:
        run = run_stage(project, name, log)
        result["runs"].append(run)
        print(f"{name}: rc {run['rc']} in {run['seconds']:.0f} s: {run['last_line']}", flush=True)
        if run["rc"] != 0:
            break
    ran = [r["stage"] for r in result["runs"] if r["rc"] == 0]
    result["ok"] = ran == result["stages"]
    result["evidence"] = evidence(project, ran)
    result["project"] = str(project)
    return result


def prepare(out: Path) -> None:
    """MEDIA_STAGES of the tiny profile (ffmpeg needed) into `out`, for a GPU machine
    without ffmpeg, with the params they were made with."""
    work = out.parent / f"{out.name}.work"
    result = run_dag(work, "cpu", list(MEDIA_STAGES), None, media="run")
    if not result["ok"]:
        raise SystemExit(f"prepare: a stage failed; see {work / 'stages.log'}")
    project = Path(result["project"])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for rel in MEDIA_OUTPUTS:
        # The videos and the preview image are read by no later stage on the tiny profile
        # (only the official extractors, unset there, decode the videos): left out for room.
        shutil.copytree(project / rel, out / rel, ignore=shutil.ignore_patterns("*.mp4", "*.png"))
    shutil.copy(project / "params.yaml", out / "params.yaml")
    shutil.rmtree(work)
    print(f"prepare: {', '.join(MEDIA_STAGES)} of the tiny profile -> {out}")


# ----------------------------------------------------------------------------------- report


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(work: Path) -> list[dict[str, Any]]:
    """steps.tsv (name, rc, seconds, limit, command; written by gpu_check.sh) with each step's
    last output lines."""
    steps = []
    table = work / "steps.tsv"
    if not table.is_file():
        return steps
    for line in table.read_text().splitlines():
        name, rc, seconds, limit, command = line.split("\t", 4)
        rc_int = int(rc) if rc.lstrip("-").isdigit() else None
        status = (
            "skipped"
            if rc == "skipped"
            else "ok"
            if rc_int == 0
            else "timeout"
            if rc_int in (124, 137)
            else "failed"
        )
        log = work / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:] if log.is_file() else []
        steps.append(
            {
                "name": name,
                "status": status,
                "rc": rc_int,
                "seconds": float(seconds) if seconds else None,
                "limit_s": int(limit) if limit else None,
                "command": command,
                "output_tail": tail,
            }
        )
    return steps


def _find(rows: list[dict] | None, **where: Any) -> dict | None:
    for row in rows or []:
        if all(row.get(k) == v for k, v in where.items()):
            return row
    return None


def _dag_figure(dag: dict[str, Any]) -> str:
    ran = [r for r in dag["runs"] if r["rc"] == 0]
    prepared = sum(1 for r in ran if r.get("prepared"))
    return f"{len(ran)} of {len(dag['stages'])} stages ran on {dag['device']}" + (
        f" ({prepared} media stages prepared on a CPU)" if prepared else ""
    )


def _train_figure(train: dict[str, Any]) -> str:
    mfu = "" if train["mfu"] is None else f", MFU {train['mfu']:.1%}"
    return (
        f"{train['samples_per_s']:g} samples/s, {train['tflop_per_s']:g} TFLOP/s{mfu} on "
        f"{train['device']}"
    )


def _memory_figure(ckpt: dict[str, Any]) -> str:
    return (
        f"{ckpt['memory_kind']} {ckpt['peak_memory_gib']:g} GiB at batch {ckpt['batch']} "
        f"{ckpt['precision']}, {ckpt['samples_per_s']:g} samples/s"
    )


def _ratio_figure(pair: tuple[dict[str, Any], dict[str, Any]]) -> str:
    im2wav, ours = pair
    ratio = im2wav["s_per_audio_second"] / ours["s_per_audio_second"]
    return (
        f"{ratio:.3g}x ({im2wav['s_per_audio_second']:g} vs {ours['s_per_audio_second']:g} s "
        f"per second of audio{', Im2Wav extrapolated' if im2wav['extrapolated'] else ''})"
    )


def _encoder_figure(row: dict[str, Any], unit: str) -> str:
    ran_as = (
        "" if row["effective_precision"] == "tf32" else f", ran as {row['effective_precision']}"
    )
    shape = "x".join(map(str, row["shape"]))
    return f"{row['per_s']:g} {unit} ({row['device']}, batch {row['batch']}, input {shape}{ran_as})"


def _tokenize_figure(pipe: dict[str, Any]) -> str:
    parts = (
        f" (fixed {pipe['fixed_s']:g} s/job, {pipe['marginal']:+.1%}/clip)"
        if "fixed_s" in pipe
        else ""
    )
    same = "" if pipe["ids_identical"] else "; ids DIFFER"
    return (
        f"{pipe['overhead']:+.1%} on {pipe['clips']['main']} clips on {pipe['device']}{parts}{same}"
    )


def targets(results: dict[str, Any], dry: bool) -> list[dict[str, Any]]:
    """Each target of the issue beside its figure. `met` is None when there is no figure, when
    the target has no threshold, or in a dry run (CPU, tiny sizes: the code path, not a
    figure)."""
    rows: list[dict[str, Any]] = []

    def add(name, what, goal, step, found, figure, ok=None) -> None:
        """One row; `figure(found)` and `ok(found)` only when the step left `found`."""
        met = None if dry or not found or ok is None else bool(ok(found))
        rows.append(
            {
                "target": name,
                "what": what,
                "goal": goal,
                "measured": figure(found) if found else None,
                "met": met,
                "step": step,
            }
        )

    add(
        "dag",
        "tiny profile's DAG, every stage on cuda",
        "every stage exits 0",
        "dag",
        results.get("dag"),
        _dag_figure,
        lambda d: d["ok"] and d["device"] == "cuda",
    )
    add(
        "train_mfu",
        "train step, paper, batch 128, bf16, compile",
        f">= {MFU_TARGET:.0%} MFU of {PEAK_TFLOPS:g} TFLOP/s",
        "train_bf16",
        results.get("train_bf16"),
        _train_figure,
        lambda t: None if t["mfu"] is None else t["mfu"] >= MFU_TARGET,
    )
    add(
        "train_memory",
        "train step, paper, batch 32, fp16, activation checkpointing",
        f"peak <= 16 GB ({V100_BYTES / 2**30:.1f} GiB) allocated (a V100)",
        "train_ckpt",
        results.get("train_ckpt"),
        _memory_figure,
        lambda c: (
            None
            if c["memory_kind"] != "peak allocated"
            else c["peak_memory_gib"] * 2**30 <= V100_BYTES
        ),
    )
    gen = results.get("generate")
    big = max((r["batch"] for r in gen or []), default=None)
    b1 = _find(gen, batch=1, guidance=3.0)
    add(
        "generate_b64",
        f"image->audio, N = 30, CFG, batch {big if dry and big else 64}",
        f">= {CLIPS_PER_S_B64:g} clips/s",
        "generate",
        _find(gen, batch=big, guidance=3.0),
        lambda r: f"{r['clips_per_s']:g} clips/s at N = {r['steps']}",
        lambda r: r["clips_per_s"] >= CLIPS_PER_S_B64,
    )
    add(
        "generate_b1",
        "image->audio, N = 30, CFG, batch 1",
        f"<= {S_PER_CLIP_B1:g} s/clip",
        "generate",
        b1,
        lambda r: f"{r['s_per_clip']:g} s/clip at N = {r['steps']}",
        lambda r: r["s_per_clip"] <= S_PER_CLIP_B1,
    )
    im2wav = results.get("im2wav")
    add(
        "im2wav_ratio",
        "Im2Wav-size AR sampler / this model (CFG, batch 1), same card",
        "reported (no target)",
        "im2wav",
        (im2wav, b1) if im2wav and b1 else None,
        _ratio_figure,
    )
    official = (results.get("encoders") or {}).get("official")
    for modality, unit, goal in (
        ("image", "img/s", IMAGES_PER_S_TF32),
        ("audio", "mels/s", MELS_PER_S_TF32),
    ):
        row = _find(official, modality=modality, precision="tf32")
        add(
            f"encoder_{modality}",
            f"official {modality} encoder, TF32",
            f">= {goal:g} {unit}",
            "encoders",
            row,
            lambda r, unit=unit: _encoder_figure(r, unit),
            lambda r, goal=goal: r["per_s"] >= goal,
        )
        add(
            f"encoder_{modality}_ids",
            f"official {modality} encoder, TF32 ids equal to fp32's",
            f">= {IDS_EQUAL_FP32:.1%}",
            "encoders",
            row,
            lambda r: f"{r['ids_equal_fp32']:.2%}",
            lambda r: r["ids_equal_fp32"] >= IDS_EQUAL_FP32,
        )
    add(
        "tokenize_overhead",
        "tokenize stage (Ray Data) against the bare encoder loop, same clips",
        f"<= {TOKENIZE_OVERHEAD:.0%} slower (Ray start-up excluded)",
        "tokenize",
        (results.get("tokenize") or {}).get("pipeline"),
        _tokenize_figure,
        lambda p: p["overhead"] <= TOKENIZE_OVERHEAD,
    )
    return rows


def _cell(text: Any) -> str:
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    env = report.get("env") or {}
    mode = "dry run (cpu, tiny sizes: code paths, not figures)" if report["dry"] else "GPU run"
    lines = [
        f"# GPU check: {mode}",
        "",
        f"- date: {env.get('date', report['written'])}",
        f"- machine: {env.get('machine', 'unknown')}",
        f"- GPU: {env.get('gpu') or 'none'}"
        + (f" ({env['gpu_memory_gib']} GiB)" if env.get("gpu_memory_gib") else ""),
        f"- torch {env.get('torch', '?')}, CUDA {env.get('cuda') or 'none'}, cuDNN "
        f"{env.get('cudnn') or 'none'}, Python {env.get('python', '?')}; ray "
        f"{env.get('ray') or 'missing'}, mlflow {env.get('mlflow') or 'missing'}",
        f"- commit: {env.get('commit', 'unknown')}",
        "",
        "| target | what | goal | measured | met |",
        "|---|---|---|---|---|",
    ]
    for row in report["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        measured = row["measured"] or f"not measured (step {row['step']})"
        lines.append(
            f"| {row['target']} | {_cell(row['what'])} | {_cell(row['goal'])} | "
            f"{_cell(measured)} | {met} |"
        )
    lines += ["", "| step | status | exit | seconds | limit (s) |", "|---|---|---|---|---|"]
    for step in report["steps"]:
        seconds = "" if step["seconds"] is None else f"{step['seconds']:.0f}"
        lines.append(
            f"| {step['name']} | {step['status']} | {_cell(step['rc'])} | {seconds} | "
            f"{_cell(step['limit_s'])} |"
        )
    dag = (report.get("results") or {}).get("dag")
    if dag:
        lines += ["", f"DAG stages on {dag['device']}:", ""]
        for run in dag["runs"]:
            how = "prepared on a CPU" if run.get("prepared") else f"{run['seconds']:.0f} s"
            lines.append(f"- {run['stage']}: exit {run['rc']}, {how}")
        for stage, said in dag.get("evidence", {}).items():
            lines.append(f"- {stage} recorded: {said}")
    return "\n".join(lines) + "\n"


def write_report(work: Path, out: Path, dry: bool) -> dict[str, Any]:
    results = {}
    for name in STEPS:
        data = read_json(work / f"{name}.json")
        if data is not None:
            results[name] = data
    env = results.pop("env", None)
    report = {
        "dry": dry,
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "env": env,
        "steps": read_steps(work),
        "targets": targets(results, dry),
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    return report


# ----------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="machine, GPU and versions")
    p.add_argument("--json", type=Path, required=True)
    p = sub.add_parser("dag", help="the tiny DAG with every stage on one device")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], required=True)
    p.add_argument("--stages", nargs="+", help="a subset, run in dvc.yaml's order")
    p.add_argument("--prepared", type=Path, help="`prepare`'s folder (the media stages' outputs)")
    p.add_argument(
        "--media",
        choices=["auto", "run", "prepared"],
        default="auto",
        help="run the media stages, or copy them from --prepared (auto: when no ffmpeg)",
    )
    p.add_argument("--json", type=Path)
    p = sub.add_parser("prepare", help="the media stages' outputs for a GPU without ffmpeg")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("report", help="gpu_check.json + gpu_check.md from a work folder")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=["gpu", "dry"], required=True)
    args = ap.parse_args()

    if args.command == "env":
        info = env_info()
        args.json.write_text(json.dumps(info, indent=2) + "\n")
        print(json.dumps(info))
    elif args.command == "dag":
        result = run_dag(args.work, args.device, args.stages, args.prepared, args.media)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"dag on {args.device}: {'ok' if result['ok'] else 'FAILED'}; {result['evidence']}")
        sys.exit(0 if result["ok"] else 1)
    elif args.command == "prepare":
        prepare(args.out)
    else:
        report = write_report(args.work, args.out, args.mode == "dry")
        missed = [t["target"] for t in report["targets"] if t["met"] is False]
        print(
            f"report: {len(report['steps'])} steps, targets missed: "
            f"{', '.join(missed) or 'none'} -> {args.out}/gpu_check.json, gpu_check.md"
        )


if __name__ == "__main__":
    main()
