"""The DVC pipeline end to end on the tiny profile: repro, no-op repro, and a single-stage rerun.

A real DVC repository in a temporary folder, real MP4s through real ffmpeg, a real MLflow store.
The DAG runs from scratch in two `dvc repro`s: conftest's `tiny_upstream` runs the stages up to
`tokenizers` once for the session (tests/test_cluster.py starts from there too), the first test
here runs the rest in a copy, whose MLflow store came along: two pipeline runs in one store.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import UPSTREAM_STAGES, copy_repo, run_in

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(repo: Path, *args: str) -> str:
    return run_in(repo, *args)


def _client(repo: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def _stage_runs(repo: Path, stage: str) -> list:
    """The runs of `stage` in the project's store, oldest first."""
    client = _client(repo)
    exp = client.get_experiment_by_name("visual-echoes")
    return client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'",
                              order_by=["attributes.start_time ASC"])  # fmt: skip


def _csv_rows(out: str) -> list[dict[str, str]]:
    """The rows of `visual-echoes compare --csv` (anything logged before the header dropped)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run_id,"))
    return list(csv.DictReader(lines[start:]))


@pytest.fixture(scope="module")
def tiny_repo(tiny_project) -> Path:
    return tiny_project


STAGES = (
    "download", "extract", "tokenizers", "tokenize", "train", "evaluator", "evaluate", "sweep",
)  # fmt: skip


def _ran(out: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in out]


def _restore(repo: Path, text: str, stage: str) -> None:
    """Put params.yaml back: DVC's run cache then restores the outputs of the `stage` the change
    had rerun, without running anything, and the whole DAG is up to date."""
    (repo / "params.yaml").write_text(text)
    out = _run(repo, "dvc", "repro")
    assert _ran(out) == [] and f"Stage '{stage}' is cached" in out
    assert "changed" not in _run(repo, "dvc", "status")


def test_repro_runs_the_whole_dag(tiny_upstream, tiny_repo):
    assert _ran(tiny_upstream.log) == list(UPSTREAM_STAGES) == list(STAGES[:3])
    out = run_in(tiny_repo, "dvc", "repro", env=tiny_upstream.reads_env)
    assert _ran(out) == list(STAGES[3:])
    manifest = pq.read_table(tiny_repo / "data/clips/manifest.parquet").to_pylist()
    assert len(manifest) == 12 and {r["status"] for r in manifest} == {"ok"}
    meta = json.loads((tiny_repo / "data/extract/meta.json").read_text())
    assert meta["counts"] == {"test": 4, "train": 8}
    shards = sorted((tiny_repo / "data/extract/train").glob("part-*.parquet"))
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet"]
    assert (tiny_repo / "mlflow.db").exists()
    assert (tiny_repo / "reports/extract/preview.png").stat().st_size > 1000
    assert (tiny_repo / "dvc.lock").exists()
    for modality in ("image", "audio"):
        tok = json.loads((tiny_repo / f"models/tokenizers/{modality}/config.json").read_text())
        assert tok["modality"] == modality and tok["source"] == "trained"
        card = (tiny_repo / f"models/tokenizers/{modality}/README.md").read_text()
        assert f"# Visual Echoes {modality} tokenizer" in card and "trained by" in card
        assert (tiny_repo / f"reports/tokenizers/{modality}/reconstructions.png").exists()
    vocoder = json.loads((tiny_repo / "models/tokenizers/vocoder/config.json").read_text())
    assert vocoder["kind"] == "griffin_lim"
    tokens = json.loads((tiny_repo / "data/tokens/meta.json").read_text())
    assert tokens["layout"]["audio"]["grid"] == [5, 53]
    assert tokens["layout"]["image"]["grid"] == [8, 8]
    rows = pq.read_table(tiny_repo / "data/tokens/train/part-00000.parquet").to_pylist()
    assert len(rows) == 5 and len(rows[0]["audio_ids"]) == 265
    model = json.loads((tiny_repo / "models/transformer/config.json").read_text())
    assert model["step"] == 4 and model["layout"] == tokens["layout"]
    assert model["tokenizers"] == tokens["tokenizers"]  # the hashes of the tokenizers it needs
    assert (tiny_repo / "models/transformer/model.safetensors").stat().st_size > 1000
    card = (tiny_repo / "models/transformer/README.md").read_text()
    assert "## Metrics at the end of training" in card and "`loss_audio`" in card
    losses = (tiny_repo / "reports/train/loss.csv").read_text().splitlines()
    assert losses[0].startswith("step,loss,loss_audio,loss_image") and len(losses) == 3
    assert (tiny_repo / "reports/train/reconstruction.png").stat().st_size > 1000
    assert "train: 4 steps" in out
    _check_evaluation_outputs(tiny_repo, out)


def _check_evaluation_outputs(repo: Path, out: str) -> None:
    evaluator = json.loads((repo / "reports/evaluator/metrics.json").read_text())
    assert evaluator["comparable_to_paper"] is False and evaluator["test_clips"] == 4
    assert (repo / "models/evaluator/model.safetensors").is_file()
    assert (repo / "reports/evaluator/evaluator.png").stat().st_size > 1000
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert metrics["comparable_to_paper"] is False and metrics["clips"] == 4
    assert set(metrics["image2audio"]) == {"s3", "s1"}
    for key in ("s3", "s1"):  # with the time structure of generated mels at each CFG scale
        for name in ("acc_local", "fd_local", "is_local", "cs_local"):
            assert name in metrics["image2audio"][key]
        for name in ("acc_rhythm_local", "period_err_local"):
            assert 0 <= metrics["image2audio"][key][name] <= 1, (key, name)
    # ... of the real test mels and of the codec's reconstructions, beside it
    assert 0 <= metrics["reference"]["audio_acc_rhythm_local"] <= 1
    assert 0 <= metrics["reference"]["audio_period_err_local"] <= 1
    for name in ("audio_acc_rhythm", "audio_period_err"):
        assert 0 <= evaluator[name] <= 1 and 0 <= evaluator[f"{name}_codec"] <= 1
        assert metrics["codec"][f"{name}_codec_local"] == evaluator[f"{name}_codec"]
    assert "fid_local" in metrics["audio2image"]["s1"]
    assert "agreement_local" in metrics["cogenerate"]["free"]
    for name in ("image2audio.png", "audio2image.png", "cogenerate.png", "confusion.png"):
        assert (repo / "reports/evaluate" / name).stat().st_size > 1000
    # per_class.csv: every label of each conditional task and scale, adding up to acc_local
    with open(repo / "reports/evaluate/per_class.csv", newline="") as f:
        per_class = list(csv.DictReader(f))
    labels = json.loads((repo / "models/evaluator/config.json").read_text())["labels"]
    for task in ("image2audio", "audio2image"):
        for key in ("s3", "s1"):
            rows = [r for r in per_class if (r["task"], r["setting"]) == (task, key)]
            assert [r["label"] for r in rows] == labels
            assert sum(int(r["clips"]) for r in rows) == 4
            correct = sum(int(r["correct"]) for r in rows)
            assert correct / 4 == pytest.approx(metrics[task][key]["acc_local"])
    wavs = sorted((repo / "reports/evaluate/samples/image2audio").glob("*.wav"))
    assert len(wavs) == 2 and all(w.stat().st_size > 10_000 for w in wavs)
    assert "evaluate: image2audio s3: accuracy" in out
    results = (repo / "reports/sweep/results.csv").read_text().splitlines()
    assert results[0].startswith("temperature,steps,guidance") and len(results) == 5
    best = json.loads((repo / "reports/sweep/best.json").read_text())
    assert best["metric"] == "fd_local" and best["steps"] in (2, 4)
    for name in ("guidance.png", "grid.png"):
        assert (repo / "reports/sweep" / name).stat().st_size > 1000


def test_sweep_trials_are_child_runs_of_the_sweep_run(tiny_repo):
    from mlflow.tracking import MlflowClient

    parent = json.loads((tiny_repo / "reports/sweep/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tiny_repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("visual-echoes")
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert len(children) == 4
    assert {(r.data.params["steps"], r.data.params["guidance"]) for r in children} == {
        ("2", "1.0"), ("2", "3.0"), ("4", "1.0"), ("4", "3.0"),
    }  # fmt: skip
    assert all("fd_local" in r.data.metrics for r in children)
    evaluate = json.loads((tiny_repo / "reports/evaluate/mlflow_run.json").read_text())["run_id"]
    tags = client.get_run(evaluate).data.tags
    assert tags["stage"] == "evaluate" and tags["git_commit"] and tags["train_run"]
    out = _run(tiny_repo, "visual-echoes", "compare", "--sort", "fd")
    assert out.count("sweep-trial") == 4 and "evaluate" in out
    # Every run carries the commit; no param holds a path of either checkout.
    sweep = client.get_run(parent).data.tags
    for r in children:
        assert r.data.tags["git_commit"] == sweep["git_commit"]
        assert r.data.tags["pipeline_run"] == sweep["pipeline_run"]
    roots = (str(tiny_repo), str(tiny_repo.resolve()), str(ROOT))
    for r in client.search_runs([exp.experiment_id]):
        assert "git_commit" in r.data.tags, r.info.run_name
        assert not [v for v in r.data.params.values() if any(root in v for root in roots)]


def test_each_repro_is_one_pipeline_run_and_evaluate_reaches_download(tiny_upstream, tiny_repo):
    """The two `dvc repro`s that built the DAG (tiny_upstream's three stages, then the other
    five here) are two pipeline runs: parent runs whose children are their stage runs. The
    evaluate run's lineage leads run by run back to download, each link agreeing with the
    content digest the producing run recorded; its data inputs are MLflow datasets; compare
    shows the training and data that produced it."""
    from pipeline.config import load_params

    client = _client(tiny_repo)
    exp = client.get_experiment_by_name("visual-echoes")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {s: _stage_runs(tiny_repo, s) for s in STAGES}
    assert [len(r) for r in runs.values()] == [1] * len(STAGES)
    runs = {s: r[0] for s, r in runs.items()}
    first, second = (
        runs["download"].data.tags["pipeline_run"],
        runs["sweep"].data.tags["pipeline_run"],
    )
    assert first != second
    for group, members in ((first, UPSTREAM_STAGES), (second, STAGES[3:])):
        parent = client.get_run(group)
        assert parent.info.run_name.startswith("dvc repro ") and parent.info.status == "FINISHED"
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{group}'")
        assert sorted(c.data.tags["stage"] for c in children) == sorted(members)
        assert {c.data.tags["pipeline_run"] for c in children} == {group}
    reused = client.get_run(second).data.tags  # the second repro read the first one's outputs
    assert reused["reused.extract"] == runs["extract"].info.run_id
    assert reused["reused.tokenizers"] == runs["tokenizers"].info.run_id

    run = runs["evaluate"]
    named = {k.split(".")[1] for k in run.data.tags if re.fullmatch(r"lineage\.\w+\.run_id", k)}
    assert named == {"download", "extract", "tokenizers", "train", "evaluator"}
    for stage in ("train", "tokenize", "tokenizers", "extract", "download"):
        made = client.get_run(run.data.tags[f"lineage.{stage}.run_id"])
        assert made.info.run_id == runs[stage].info.run_id
        assert run.data.tags[f"lineage.{stage}.sha256"] == made.data.tags["output_sha256"]
        run = made

    datasets = {d.dataset.name: d.dataset for d in runs["evaluate"].inputs.dataset_inputs}
    assert sorted(datasets) == ["clips", "extract"]
    assert json.loads(datasets["extract"].profile) == {"splits": {"test": 4, "train": 8},
                                                       "source": "synthetic"}  # fmt: skip
    assert json.loads(datasets["clips"].source) == {"uri": "data/clips"}
    (tokens,) = runs["train"].inputs.dataset_inputs
    assert tokens.dataset.name == "tokens" and [t.value for t in tokens.tags] == ["training"]

    params = load_params(tiny_repo / "params.yaml")
    (row,) = _csv_rows(_run(tiny_repo, "visual-echoes", "compare", "--stage", "evaluate", "--csv"))
    assert row["run_id"] == runs["evaluate"].info.run_id and row["status"] == "FINISHED"
    assert float(row["mask_mean"]) == params.train.masking.mean
    assert int(row["steps"]) == params.train.steps
    assert row["model"] == f"{params.model.embed_dim}x{params.model.depth}"
    assert (row["source"], row["clips"], row["tokenizers"]) == ("synthetic", "12.0", "trained")


def test_bench_dag_time_lists_each_stage_run(tiny_repo, capsys, monkeypatch):
    """bench/dag_time.py on the copy: the stages the last `dvc repro` ran have a run with its
    seconds; the upstream ones ran in tiny_upstream's repro, another pipeline run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = importlib.util.spec_from_file_location("dag_time", ROOT / "bench" / "dag_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--repo", str(tiny_repo)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[0] in STAGES}
    assert sorted(rows) == sorted(STAGES)
    assert re.search(r"pipeline run 'dvc repro [\d-]+ [\d:]+'", out)
    for stage in UPSTREAM_STAGES:
        assert re.search(r"no run in pipeline run 'dvc repro [\d-]+ [\d:]+'$", rows[stage])
    for stage in STAGES[3:]:
        assert re.fullmatch(rf"{stage} +\d{{4}}-\d\d-\d\d [\d:]{{8}} +\d+ +\d*", rows[stage])
    assert "not one `dvc repro` from scratch: download has no run" in out


def test_bench_accuracy_spread_reproduces_evaluate_at_seed_0(tiny_repo):
    """bench/accuracy_spread.py batches and seeds as evaluate does: its seed 0 gives the
    acc_local of metrics.json, and it adds the other seeds' spread and a line per label."""
    script = ROOT / "bench" / "accuracy_spread.py"
    out = _run(tiny_repo, "python", str(script), "--seeds", "2", "--guidance", "3")
    metrics = json.loads((tiny_repo / "reports/evaluate/metrics.json").read_text())
    assert f"s=3 seed 0: acc_local {metrics['image2audio']['s3']['acc_local']:.1%}" in out
    assert re.search(r"s=3 seed 1: acc_local [\d.]+%", out)
    assert re.search(r"s=3: acc_local mean [\d.]+%, sd [\d.]+% over 2 seeds", out)
    labels = json.loads((tiny_repo / "models/evaluator/config.json").read_text())["labels"]
    assert all(re.search(rf"^ +{re.escape(label[:40])} +\d+%$", out, re.M) for label in labels)


def test_bench_rhythm_resolution_scores_real_mels_as_the_tokenizers_report_does(tiny_repo):
    """bench/rhythm_resolution.py: its real row is the tokenizers' report's rhythm of the real
    test mels (same scorer, same mels); block averages keep each block's mean."""
    script = ROOT / "bench" / "rhythm_resolution.py"
    out = _run(tiny_repo, "python", str(script), "--factors", "2", "16")
    report = json.loads((tiny_repo / "reports/tokenizers/metrics.json").read_text())
    assert re.search(
        rf"^ +real: acc_rhythm {report['audio_acc_rhythm']:.1%}, period_err "
        rf"{report['audio_period_err']:.3f}", out, re.M,
    ), out  # fmt: skip
    for name in ("frames / 2", "frames / 16", "bands / 2", "bands / 16"):
        assert re.search(rf"^ *{name}: acc_rhythm [\d.]+%, period_err [\d.]+; per label", out, re.M)
    spec = importlib.util.spec_from_file_location("rhythm_resolution", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mels = np.random.default_rng(0).random((2, 6, 10))
    frames = module.block_average(mels, 4, axis=2)  # blocks 0-3, 4-7 and the short 8-9
    assert frames.shape == mels.shape
    assert np.allclose(frames[..., 5], mels[..., 4:8].mean(-1))
    assert np.allclose(frames[..., 9], mels[..., 8:].mean(-1))
    assert np.allclose(module.block_average(mels, 3, axis=1)[:, 4], mels[:, 3:].mean(1))
    assert np.array_equal(module.block_average(mels, 1, axis=2), mels)


def test_bench_memory_evaluate_does_not_grow_with_the_test_split(tiny_repo):
    """bench/memory.py on the tiny model: evaluate's driver on 10x the test clips (the tiny test
    clips repeated) peaks within 1.2x of the small run, the issue's goal for "flat". Before it
    streamed the split, 400 such clips took 1.47x the memory of 40 (754 -> 1105 MB); now 240
    take 1.13-1.15x of 24 (docs/benchmarks.md, "Evaluate's memory")."""
    spec = importlib.util.spec_from_file_location("memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    small, large = (module.measure(tiny_repo, n, steps=1, guidance=3.0, batch_size=128)
                    for n in (24, 240))  # fmt: skip
    assert (small["clips"], large["clips"]) == (24, 240)
    assert large["peak_rss_mb"] <= 1.2 * small["peak_rss_mb"], (small, large)
    assert not (tiny_repo / "data/.cache/bench-memory/extract-240").exists()


# Read by every stage but no input of any: where the runs are logged, resumable scratch, and how
# long a stage waits for an autoscaling cluster.
UNDECLARED = {"base.experiment", "paths.cache", "base.cluster_wait_s"}


def _covers(declared: str, key: str) -> bool:
    return key == declared or key.startswith(declared + ".")


def test_every_stage_reads_exactly_the_params_it_declares(tiny_upstream, tiny_repo):
    """What each stage process read of params.yaml in the whole repro (`pipeline.config` notes
    it) against dvc.yaml: a read param left undeclared leaves the stage stale when it changes;
    a declared one never read reruns the stage for nothing. Paths count as declared where the
    stage names them in its deps, outs, metrics or plots."""
    import yaml

    spec = yaml.safe_load((tiny_repo / "dvc.yaml").read_text())["stages"]
    text = (tiny_repo / "dvc.yaml").read_text()
    assert sorted(p.name.rsplit("-", 1)[0] for p in tiny_upstream.reads.glob("*.txt")) == sorted(
        STAGES
    )
    for path in sorted(tiny_upstream.reads.glob("*.txt")):
        stage = path.name.rsplit("-", 1)[0]
        reads = set(path.read_text().split()) - UNDECLARED
        block = text[text.index(f"\n  {stage}:\n") :].split("\n\n", 1)[0]
        for key in sorted(k for k in reads if k.startswith("paths.")):
            assert f"${{{key}}}" in block, f"{stage} reads {key} but does not name ${{{key}}}"
        declared = spec[stage].get("params", [])
        reads = {k for k in reads if not k.startswith("paths.")}
        undeclared = sorted(k for k in reads if not any(_covers(d, k) for d in declared))
        assert not undeclared, (
            f"stage {stage} reads {undeclared} but dvc.yaml does not declare them"
        )
        unread = sorted(d for d in declared if not any(_covers(d, k) for k in reads))
        assert not unread, f"stage {stage} declares {unread} but never reads them"


def test_second_repro_runs_nothing(tiny_repo):
    before = {p: p.stat().st_mtime_ns for p in (tiny_repo / "data").rglob("*.parquet")}
    out = _run(tiny_repo, "dvc", "repro")
    assert "Running stage" not in out
    assert "up to date" in out
    assert before == {p: p.stat().st_mtime_ns for p in (tiny_repo / "data").rglob("*.parquet")}


def test_train_logged_curves_and_figures_to_mlflow(tiny_repo):
    from mlflow.tracking import MlflowClient

    run_id = json.loads((tiny_repo / "reports/train/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tiny_repo / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "loss_audio")
    assert [m.step for m in history] == [2, 4]
    assert client.get_metric_history(run_id, "val/loss_image_r70")
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"loss.png", "reconstruction.png"} <= names
    assert client.list_artifacts(run_id, "reconstructions")  # rank 0's figure at the end
    # ... and sounds generated from 2 test frames (train.figure_examples), to listen to
    samples = sorted(a.path for a in client.list_artifacts(run_id, "samples/step_0000004"))
    assert [Path(a).suffix for a in samples] == [".png", ".wav"] * 2, samples
    # the model, logged with its tokenizers and linked to the run's final metrics
    experiment = client.get_run(run_id).info.experiment_id
    (model,) = [m for m in client.search_logged_models([experiment])
                if m.source_run_id == run_id]  # fmt: skip
    assert model.name == "model" and str(model.status) == "READY"
    assert {"loss_audio", "loss_image", "val/loss_audio_r70"} <= {m.key for m in model.metrics}


def test_changing_a_logging_param_reruns_only_train_and_resumes(tiny_repo):
    params = tiny_repo / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("log_every: 2", "log_every: 1"))
    out = _run(tiny_repo, "dvc", "repro", "train")
    assert _ran(out) == ["train"]
    # Same optimisation, same auto run name: the finished run's last checkpoint is reused.
    assert "train: 4 steps, resumed at step 4" in out
    _restore(tiny_repo, text, "train")


def test_changing_a_tokenize_param_reruns_tokenize_and_stales_train(tiny_repo):
    params = tiny_repo / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("rows_per_file: 5", "rows_per_file: 4"))
    out = _run(tiny_repo, "dvc", "repro", "tokenize")
    assert _ran(out) == ["tokenize"]
    rows = pq.read_table(tiny_repo / "data/tokens/train/part-00000.parquet").num_rows
    assert rows == 4
    # The ids are the same, in other files: train (their only reader) is stale.
    stale = re.findall(r"^(\w+):$", _run(tiny_repo, "dvc", "status"), flags=re.M)
    assert stale == ["train"]
    _restore(tiny_repo, text, "tokenize")
    assert pq.read_table(tiny_repo / "data/tokens/train/part-00000.parquet").num_rows == 5


def _stale(repo: Path) -> list[str]:
    return re.findall(r"^(\w+):$", _run(repo, "dvc", "status"), flags=re.M)


@pytest.mark.parametrize(
    ("edited", "stale"),
    [
        ("pipeline/tokenizers/batch_tokenize.py", ["tokenize"]),
        ("pipeline/data/tokens.py", ["tokenize", "train", "evaluator", "sweep", "evaluate"]),
        ("pipeline/data/decode.py", ["extract"]),
        ("sources/labels.csv", ["download"]),
    ],
)
def test_editing_a_file_stales_only_the_stages_that_read_it(tiny_repo, edited, stale):
    """The tokenize job and extract's ffmpeg driver are modules of their own: editing one stales
    its stage alone (what follows reruns only if the output changes), while the token readers
    every later stage imports stale them all. The source inputs outside DVC's outputs (a labels
    CSV here) are download's dependencies."""
    path = tiny_repo / edited
    text = path.read_text()
    path.write_text(text + "\n# an edit\n")
    try:
        assert sorted(_stale(tiny_repo)) == sorted(stale)
    finally:
        path.write_text(text)
    assert _stale(tiny_repo) == []


def test_changing_an_extract_param_reruns_extract_and_stales_what_follows(tiny_repo):
    params = tiny_repo / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("jpeg_quality: 90", "jpeg_quality: 75"))
    manifest = tiny_repo / "data/clips/manifest.parquet"
    before = manifest.stat().st_mtime_ns
    out = _run(tiny_repo, "dvc", "repro", "extract")
    assert _ran(out) == ["extract"]
    assert manifest.stat().st_mtime_ns == before
    # Every stage that reads the extracted data is now stale. Train is not listed: `dvc status`
    # names the stages whose own inputs changed, and train reads the ids and the tokenizers,
    # which `dvc repro` would remake first (a stale train is the tokenize param test's case).
    stale = re.findall(r"^(\w+):$", _run(tiny_repo, "dvc", "status"), flags=re.M)
    assert sorted(stale) == sorted(["tokenizers", "tokenize", "evaluator", "sweep", "evaluate"])
    _restore(tiny_repo, text, "extract")


def test_changing_an_evaluate_param_reruns_only_evaluate(tiny_repo):
    params = tiny_repo / "params.yaml"
    text, n = re.subn(r"^(  samples:) 2\b", r"\1 1", params.read_text(), flags=re.M)
    assert n == 1
    params.write_text(text)
    out = _run(tiny_repo, "dvc", "repro")
    assert _ran(out) == ["evaluate"]
    wavs = list((tiny_repo / "reports/evaluate/samples/image2audio").glob("*.wav"))
    assert len(wavs) == 1  # the samples folder is replaced, not added to
    # train and extract were rerun by the tests above, then restored from DVC's run cache: the
    # restores made no run, and the new evaluate run links to the runs that made what it read.
    trains, extracts = _stage_runs(tiny_repo, "train"), _stage_runs(tiny_repo, "extract")
    assert [r.data.params["train.log_every"] for r in trains] == ["2", "1"]
    assert [r.data.params["jpeg_quality"] for r in extracts] == ["90", "75"]
    latest = _stage_runs(tiny_repo, "evaluate")[-1].data.tags
    assert latest["lineage.train.run_id"] == trains[0].info.run_id
    assert latest["lineage.extract.run_id"] == extracts[0].info.run_id


def test_a_temporary_experiment_keeps_its_runs_in_the_workspace_store(tiny_repo):
    """`dvc exp run --temp` runs the stages in a copy under .dvc/tmp that DVC deletes afterwards;
    their MLflow runs must land in the workspace's store, which `visual-echoes compare` reads."""
    from mlflow.tracking import MlflowClient

    git = ("git", "-c", "user.name=test", "-c", "user.email=test@localhost")
    _run(tiny_repo, *git, "add", "-A")
    _run(tiny_repo, *git, "commit", "-q", "-m", "baseline")  # an experiment needs a baseline
    out = _run(tiny_repo, "dvc", "exp", "run", "--temp", "-S", "train.steps=6", "train")
    assert _ran(out) == ["train"]
    client = MlflowClient(f"sqlite:///{tiny_repo / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.stage = 'train'"
    )
    (exp_run,) = [r for r in runs if r.data.params.get("train.steps") == "6"]
    assert exp_run.data.tags.get("dvc_exp") and exp_run.info.status == "FINISHED"
    table = _run(tiny_repo, "visual-echoes", "compare", "--stage", "train")
    assert exp_run.info.run_id[:8] in table
    # MLflow and DVC name the experiment alike: its pipeline run is named after it.
    parent = client.get_run(exp_run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == exp_run.data.tags["dvc_exp"] == parent.data.tags["dvc_exp"]
    assert parent.data.tags["dvc_exp_baseline"]
    assert exp_run.data.tags["dvc_exp"] in _run(tiny_repo, "dvc", "exp", "show", "--csv")


def _store_state(repo: Path) -> tuple[str, dict[str, tuple[int, int]]]:
    """The sha256 of a project's mlflow.db and the size and mtime of every artifact file."""
    from pipeline.io import sha256_file

    files = sorted(p for p in (repo / "mlruns").rglob("*") if p.is_file())
    tree = {p.relative_to(repo).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}
    return sha256_file(repo / "mlflow.db"), tree


def test_a_copied_checkout_logs_into_its_own_store(tiny_upstream, tmp_path):
    """`cp -r` of a checkout, store included (conftest's copy_repo), and a stage rerun in the
    copy: the new run, its artifact and the copied runs' locations are the copy's; the
    original's store and artifacts are untouched; the run links to the copied download run."""
    original = tiny_upstream.repo
    before = _store_state(original)
    assert before[1], "the original has artifacts to leave alone"
    repo = copy_repo(original, tmp_path / "copy")
    assert _ran(_run(repo, "dvc", "repro", "-f", "-s", "extract")) == ["extract"]
    client = _client(repo)
    exp = client.get_experiment_by_name("visual-echoes")
    assert exp.artifact_location == (repo / "mlruns" / exp.experiment_id).as_posix()
    for run in client.search_runs([exp.experiment_id]):
        assert run.info.artifact_uri.startswith(f"{repo}/mlruns/"), run.info.run_name
    old, new = _stage_runs(repo, "extract")
    assert [a.path for a in client.list_artifacts(new.info.run_id)] == ["preview.png"]
    assert (
        repo / "mlruns" / exp.experiment_id / new.info.run_id / "artifacts/preview.png"
    ).is_file()
    (download,) = _stage_runs(repo, "download")
    assert new.data.tags["lineage.download.run_id"] == download.info.run_id
    assert new.data.tags["pipeline_run"] != old.data.tags["pipeline_run"]
    assert _store_state(original) == before
