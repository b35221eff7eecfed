"""pipeline.compare and `visual-echoes compare`: a table of the MLflow runs of chosen stages.

One SQLite tracking store in a temporary folder holds three experiments, written with
MlflowClient the way the stages write them (tags `stage=...`, flattened params, metrics named
as `run_evaluate` and the sweep trials name them):
- "trials": three sweep trials and one train run;
- "mixed": one evaluate run at a single setting and two sweep trials;
- "headline": one evaluate run at s = 3 (the headline, first in evaluate.guidance) and s = 1;
- "lineage": a failed and a finished download, then extract, tokenizers, tokenize, two trainings
  (mask mean 0.55 and 0.75), an evaluate run of each and a sweep trial of the second, each run
  tagged with the runs it read (`lineage.<stage>.run_id`) as `pipeline.tracking` tags them.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline import cli, tracking
from pipeline.compare import CompareError, compare

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_000  # ms; each run starts one minute after the previous one

# name: (stage, params, metrics), in start order (the last is the newest).
TRIALS = {
    "trial-a": ("sweep-trial", {"temperature": 4.5, "steps": 8, "guidance": 1.0},
                {"fd_local": 6.0, "acc_local": 0.500, "is_local": 1.5, "cs_local": 10.0}),
    "trial-b": ("sweep-trial", {"temperature": 9.0, "steps": 8, "guidance": 3.0},
                {"fd_local": 2.0, "acc_local": 0.250, "is_local": 1.2, "cs_local": 30.0}),
    "trial-c": ("sweep-trial", {"temperature": 9.0, "steps": 30, "guidance": 3.0},
                {"fd_local": 4.0, "acc_local": 0.875, "is_local": 2.5, "cs_local": 20.0}),
    "train-1": ("train", {"train.masking.mean": 0.55}, {"loss": 3.2}),
}  # fmt: skip
EVALUATE_PARAMS = {"generate.temperature": 9.0, "generate.steps": 30}
MIXED = {
    "evaluate-1": ("evaluate", EVALUATE_PARAMS | {"evaluate.guidance": "[3.0]"},
                   {"image2audio/s3/fd_local": 3.0, "image2audio/s3/acc_local": 0.75,
                    "image2audio/s3/is_local": 2.0, "image2audio/s3/cs_local": 40.0}),
    "trial-d": ("sweep-trial", {"temperature": 4.5, "steps": 8, "guidance": 3.0},
                {"fd_local": 1.0, "acc_local": 0.5, "is_local": 1.1, "cs_local": 5.0}),
    "trial-e": ("sweep-trial", {"temperature": 9.0, "steps": 8, "guidance": 3.0},
                {"fd_local": 5.0, "acc_local": 0.25, "is_local": 1.3, "cs_local": 15.0}),
}  # fmt: skip
HEADLINE = {
    "evaluate-2": ("evaluate", EVALUATE_PARAMS | {"evaluate.guidance": "[3.0, 1.0]"},
                   {"image2audio/s3/fd_local": 3.5, "image2audio/s3/acc_local": 0.625,
                    "image2audio/s1/fd_local": 8.5, "image2audio/s1/acc_local": 0.125}),
}  # fmt: skip


def _from(*runs: str) -> dict[str, str]:
    """Lineage tags naming the runs (by fixture name; the store fixture puts in their ids)."""
    return {f"lineage.{r.rsplit('-', 1)[0]}.run_id": f"@{r}" for r in runs}


TRAIN_PARAMS = {"model.embed_dim": 64, "model.depth": 2, "train.masking.drop_ratio": 0.5}
EVALUATE_METRICS = {"image2audio/s3/fd_local": 3.0, "image2audio/s3/acc_local": 0.75}
# name: (stage, params, metrics, tags[, status]); "@name" in a tag value: that run's id.
LINEAGE = {
    "download-failed": ("download", {"source": "vggsound"}, {}, {}, "FAILED"),
    "download-1": ("download", {"source": "synthetic"}, {"ok": 12}, {"source": "synthetic"}),
    "extract-1": ("extract", {}, {}, _from("download-1") | {"source": "synthetic"}),
    "tokenizers-1": ("tokenizers", {}, {},
                     _from("extract-1") | {"image_tokenizer": "trained", "audio_tokenizer": "trained"}),
    "tokenize-1": ("tokenize", {}, {}, _from("extract-1", "tokenizers-1")),
    "train-a": ("train", TRAIN_PARAMS | {"train.masking.mean": 0.55, "train.steps": 100}, {},
                _from("tokenize-1", "tokenizers-1")),
    "train-b": ("train", TRAIN_PARAMS | {"train.masking.mean": 0.75, "train.steps": 200}, {},
                _from("tokenize-1", "tokenizers-1")),
    "evaluate-a": ("evaluate", EVALUATE_PARAMS | {"evaluate.guidance": "[3.0]"}, EVALUATE_METRICS,
                   _from("download-1", "extract-1", "tokenizers-1", "train-a")),
    "evaluate-b": ("evaluate", EVALUATE_PARAMS | {"evaluate.guidance": "[3.0]"}, EVALUATE_METRICS,
                   _from("download-1", "extract-1", "tokenizers-1", "train-b")),
    "sweep-1": ("sweep", {}, {}, _from("extract-1", "tokenizers-1", "train-b")),
    "trial-f": ("sweep-trial", {"temperature": 1.0, "steps": 8, "guidance": 3.0},
                {"fd_local": 2.5}, {"mlflow.parentRunId": "@sweep-1"}),
}  # fmt: skip
EXPERIMENTS = {"trials": TRIALS, "mixed": MIXED, "headline": HEADLINE, "lineage": LINEAGE}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """(tracking URI, run name -> the 8-character id the table shows)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    ids: dict[str, str] = {}
    full: dict[str, str] = {}
    start = T0
    for experiment, runs in EXPERIMENTS.items():
        exp_id = client.create_experiment(
            experiment, artifact_location=(folder / experiment).as_uri()
        )
        for name, (stage, params, metrics, *rest) in runs.items():
            start += 60_000
            tags = {
                k: full[v[1:]] if v.startswith("@") else v for k, v in (rest or [{}])[0].items()
            }
            run = client.create_run(
                exp_id, start_time=start, tags={"stage": stage} | tags, run_name=name
            ).info.run_id
            for key, value in params.items():
                client.log_param(run, key, value)
            for key, value in metrics.items():
                client.log_metric(run, key, value, timestamp=start)
            status = rest[1] if len(rest) > 1 else "FINISHED"
            client.set_terminated(run, status=status, end_time=start + 1000)
            full[name] = run
            ids[name] = run[:8]
    return uri, ids


@pytest.fixture(autouse=True)
def restore_tracking_uri(monkeypatch):
    """compare() calls mlflow.set_tracking_uri, which also exports MLFLOW_TRACKING_URI; put both
    back so later tests see the environment they started with."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


def _rows(table: str) -> list[dict[str, str]]:
    """The table as one dict per run, cut at the header's column starts."""
    lines = table.splitlines()
    assert lines[-1].startswith("(*_local"), "the closing note is missing"
    spans = [(m.group(), m.start()) for m in re.finditer(r"\S+", lines[0])]
    starts = [s for _, s in spans] + [None]
    return [
        {
            name: line[start:end].strip()
            for (name, start), end in zip(spans, starts[1:], strict=True)
        }
        for line in lines[1:-1]
    ]


def _names(rows: list[dict[str, str]], ids: dict[str, str]) -> list[str]:
    by_id = {v: k for k, v in ids.items()}
    return [by_id[r["run"]] for r in rows]


def test_lists_evaluate_and_sweep_runs_newest_first_without_train_runs(store):
    uri, ids = store
    rows = _rows(compare("trials", ("evaluate", "sweep-trial"), None, 30, uri))
    assert _names(rows, ids) == ["trial-c", "trial-b", "trial-a"]
    assert [r["stage"] for r in rows] == ["sweep-trial"] * 3
    assert rows[0]["started"] == "2023-11-14 22:16"  # T0 + 3 minutes, UTC
    assert rows[0]["T"] == "9.0" and rows[0]["N"] == "30" and rows[0]["s"] == "3.0"
    assert rows[0]["fd_local"] == "4.000" and rows[0]["acc_local"] == "0.875"
    asked = _rows(compare("trials", ("train",), None, 30, uri))
    assert _names(asked, ids) == ["train-1"]
    assert asked[0]["mask_mean"] == "0.55"


@pytest.mark.parametrize(
    ("sort", "order"),
    [
        ("fd", ["trial-b", "trial-c", "trial-a"]),  # ascending: lower FD is better
        ("fd_local", ["trial-b", "trial-c", "trial-a"]),
        ("acc", ["trial-c", "trial-a", "trial-b"]),  # descending
        ("is", ["trial-c", "trial-a", "trial-b"]),
        ("cs", ["trial-b", "trial-c", "trial-a"]),
    ],
)
def test_sort_orders_fd_ascending_and_the_others_descending(store, sort, order):
    uri, ids = store
    rows = _rows(compare("trials", ("evaluate", "sweep-trial"), sort, 30, uri))
    assert _names(rows, ids) == order


def test_limit_keeps_the_first_rows_of_the_order(store):
    uri, ids = store
    rows = _rows(compare("trials", ("sweep-trial",), "fd", 2, uri))
    assert _names(rows, ids) == ["trial-b", "trial-c"]


def test_metrics_of_evaluate_and_sweep_runs_share_one_column(store):
    """An evaluate run logs `image2audio/s3/fd_local`, a sweep trial `fd_local`: each row must
    show (and sort by) its own run's FD."""
    uri, ids = store
    rows = _rows(compare("mixed", ("evaluate", "sweep-trial"), "fd", 30, uri))
    shown = {name: row for name, row in zip(_names(rows, ids), rows, strict=True)}
    assert {n: r["fd_local"] for n, r in shown.items()} == {
        "trial-d": "1.000", "evaluate-1": "3.000", "trial-e": "5.000",
    }  # fmt: skip
    assert _names(rows, ids) == ["trial-d", "evaluate-1", "trial-e"]
    assert shown["trial-e"]["acc_local"] == "0.250"
    assert shown["evaluate-1"]["T"] == "9.0" and shown["evaluate-1"]["N"] == "30"


def test_evaluate_runs_show_the_headline_setting(store):
    """evaluate.guidance [3.0, 1.0]: s = 3 is the headline, s = 1 (no guidance) the control."""
    uri, _ = store
    (row,) = _rows(compare("headline", ("evaluate",), None, 30, uri))
    assert row["fd_local"] == "3.500"
    assert row["acc_local"] == "0.625"


@pytest.mark.parametrize(
    ("experiment", "stages", "sort", "message"),
    [
        ("no-such-experiment", ("evaluate",), None, r"no MLflow experiment 'no-such-experiment'"),
        ("trials", ("evaluate",), None, r"has no runs of stage evaluate"),
        ("trials", ("sweep-trial",), "speed", r"--sort 'speed': no metric of that name"),
        ("trials", ("sweep-trial",), "fid", r"--sort 'fid'.*try fd, acc, is, cs"),
    ],
)
def test_bad_requests_raise_compare_error(store, experiment, stages, sort, message):
    uri, _ = store
    with pytest.raises(CompareError, match=message):
        compare(experiment, stages, sort, 30, uri)


def test_cli_prints_the_table_from_the_tracking_uri(store, monkeypatch, capsys):
    uri, ids = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.tracking_uri() == uri
    code = cli.main(["compare", "--experiment", "trials", "--sort", "acc", "--limit", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0].split() == [
        "run", "stage", "status", "started", "T", "N", "s",
        "mask_mean", "drop", "steps", "model", "tokenizers", "source", "clips",
        "acc_local", "fd_local", "is_local", "cs_local",
    ]  # fmt: skip
    assert _names(_rows(out.rstrip("\n")), ids) == ["trial-c", "trial-a"]


def test_cli_takes_the_experiment_from_params_and_repeats_stage(
    store, monkeypatch, capsys, tmp_path
):
    uri, ids = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["base"]["experiment"] = "trials"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    args = ["compare", "--params", str(params), "--stage", "train", "--stage", "sweep-trial"]
    assert cli.main(args) == 0
    names = _names(_rows(capsys.readouterr().out.rstrip("\n")), ids)
    assert names == ["train-1", "trial-c", "trial-b", "trial-a"]


def test_cli_reports_an_unknown_experiment_in_one_line(store, monkeypatch, capsys):
    uri, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli.main(["compare", "--experiment", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("visual-echoes: error: no MLflow experiment 'nope'")
    assert len(captured.err.strip().splitlines()) == 1


def test_evaluate_and_sweep_rows_show_the_training_and_data_that_produced_them(store):
    """The lineage is followed from each row back to download: the train run's mask mean, drop,
    steps and model size, the tokenizers' origin, the data source and its clips."""
    uri, ids = store
    rows = _rows(compare("lineage", ("evaluate", "sweep-trial"), None, 30, uri))
    shown = dict(zip(_names(rows, ids), rows, strict=True))
    assert list(shown) == ["trial-f", "evaluate-b", "evaluate-a"]
    assert [shown[n]["mask_mean"] for n in shown] == ["0.75", "0.75", "0.55"]
    assert [shown[n]["steps"] for n in shown] == ["200", "200", "100"]
    for row in shown.values():
        assert row["status"] == "finished" and row["drop"] == "0.5" and row["model"] == "64x2"
        assert (row["tokenizers"], row["source"], row["clips"]) == ("trained", "synthetic", "12")
    assert shown["trial-f"]["fd_local"] == "2.500" and shown["evaluate-a"]["fd_local"] == "3.000"


def test_status_column_and_filter_tell_a_failed_run_apart(store):
    uri, ids = store
    rows = _rows(compare("lineage", ("download",), None, 30, uri))
    assert [(n, r["status"], r["source"]) for n, r in zip(_names(rows, ids), rows, strict=True)] == [
        ("download-1", "finished", "synthetic"), ("download-failed", "failed", "vggsound"),
    ]  # fmt: skip
    failed = _rows(compare("lineage", ("download",), None, 30, uri, statuses=["failed"]))
    assert _names(failed, ids) == ["download-failed"]
    with pytest.raises(CompareError, match=r"--status DONE: not a run status"):
        compare("lineage", ("download",), None, 30, uri, statuses=["done"])


@pytest.mark.parametrize(
    ("where", "names"),
    [
        (["train.mask_mean>0.6"], ["evaluate-b"]),
        (["mask_mean<=0.6"], ["evaluate-a"]),
        (["train.masking.mean>0.6"], ["evaluate-b"]),  # the train run's param by its own name
        (["train.steps=100"], ["evaluate-a"]),
        (["download.source=synthetic", "status=FINISHED"], ["evaluate-b", "evaluate-a"]),
        (["params.generate.steps==30", "model!=64x2"], []),
        (["tags.lineage.train.run_id=@train-a"], ["evaluate-a"]),
    ],
)
def test_where_filters_on_columns_and_on_lineage_params(store, where, names):
    uri, ids = store
    exprs = [w.replace("@train-a", _full_id(uri, ids["train-a"])) for w in where]
    rows = _rows(compare("lineage", ("evaluate",), None, 30, uri, where=exprs))
    assert _names(rows, ids) == names


def _full_id(uri: str, prefix: str) -> str:
    (run,) = [r for r in tracking.search_runs("lineage", uri) if r["run_id"].startswith(prefix)]
    return run["run_id"]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("mask_mean", r"write NAME OP VALUE"),
        ("no_such_thing>1", r"no listed run has 'no_such_thing'"),
        ("source>1", r"'synthetic' is not a number"),
    ],
)
def test_a_bad_where_is_one_sentence(store, where, message):
    uri, _ = store
    with pytest.raises(CompareError, match=message):
        compare("lineage", ("evaluate",), None, 30, uri, where=[where])


def test_cli_csv_has_full_ids_and_raw_values(store, monkeypatch, capsys):
    uri, ids = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = ["compare", "--experiment", "lineage", "--stage", "evaluate", "--csv",
            "--where", "train.mask_mean>0.6"]  # fmt: skip
    assert cli.main(args) == 0
    (row,) = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert row["run_id"][:8] == ids["evaluate-b"] and len(row["run_id"]) == 32
    assert (row["status"], row["mask_mean"], row["fd_local"]) == ("FINISHED", "0.75", "3.0")
    assert row["clips"] == "12.0" and row["source"] == "synthetic"
