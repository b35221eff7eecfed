"""The evaluate stage with the paper's protocol, end to end on the tiny pipeline.

A copy of conftest's `tiny_project` (after `dvc repro`) gets `evaluator.official` pointed at
stand-ins of the four released extractor files (random weights, official architectures and
layouts: conftest's `official_files`) and `evaluate.repeats: 2`, and `stages.evaluate` runs in
this process, Ray Data and MLflow included. The only change is conftest's `low_rank_frechet` for
the 2048-d PANNs FD (exact at this N, minutes faster than scipy's sqrtm on a busy box).

FD, FAD, IS and CS must land in metrics.json and MLflow beside the local metrics, labelled as the
paper's protocol, each the mean of two runs with both runs' values, and `comparable_to_paper` must
be false for exactly the reasons that hold here: 4 clips (not the full test list, so IS has 4
splits) and a CLIP file that is not OpenAI's. Slow: needs the DAG.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import copy_repo, low_rank_frechet, run_in

from pipeline import io
from pipeline.evaluation import official

pytestmark = pytest.mark.slow
LAYOUTS = {"panns_cnn14_16k": "panns", "vggish": "vggish", "clip_vit_b32": "clip",
           "wav2clip": "wav2clip"}  # fmt: skip
PAPER_METRICS = ("fd_panns", "fad_vggish", "is_panns", "cs_clip_wav2clip")
SETTINGS = ("s3", "s1")  # params.yaml's evaluate.guidance


@pytest.fixture(scope="module")
def project(tiny_project, official_files, tmp_path_factory) -> Path:
    run_in(tiny_project, "dvc", "repro")  # a no-op when test_dvc already ran it
    repo = copy_repo(tiny_project, tmp_path_factory.mktemp("paper-evaluate") / "repo")
    files = official_files.get(*LAYOUTS.values())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluator"]["official"] = {f: str(files[n].path) for f, n in LAYOUTS.items()}
    params["evaluate"]["repeats"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


@pytest.fixture(scope="module")
def evaluated(project) -> dict:
    """metrics.json of `stages.evaluate` run in `project`, and the MLflow run it logged."""
    from mlflow.tracking import MlflowClient

    from pipeline.stage import stage_main
    from stages import evaluate

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        mp.setattr(official, "frechet_distance", low_rank_frechet)
        assert stage_main("evaluate", evaluate.main) == 0
    report = project / "reports" / "evaluate"
    run_id = json.loads((report / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id)
    return {"metrics": json.loads((report / "metrics.json").read_text()), "run": run}


def test_paper_metrics_sit_beside_the_local_ones_labelled(evaluated, official_files):
    metrics = evaluated["metrics"]
    assert metrics["comparable_to_paper"] is False and metrics["clips"] == 4
    hashes = {f: io.sha256_file(official_files.get(n)[n].path)[:8] for f, n in LAYOUTS.items()}
    assert set(metrics["paper_protocol"]) == set(SETTINGS)
    for key in SETTINGS:
        local, paper = metrics["image2audio"][key], metrics["paper_protocol"][key]
        assert {"acc_local", "fd_local", "is_local", "cs_local"} <= set(local)
        assert paper["protocol"] == official.PROTOCOL and paper["sample_rate"] == 16000
        assert paper["resampler"] == official.RESAMPLER
        assert {f: paper[f"sha256_{f}"] for f in LAYOUTS} == hashes
        assert (paper["n_generated"], paper["n_reference"], paper["is_splits"]) == (4, 4, 4)
        assert all(math.isfinite(paper[m]) for m in PAPER_METRICS)
        assert paper["fd_panns"] > 0 and paper["fad_vggish"] > 0 and paper["is_panns"] >= 1


def test_each_number_is_the_mean_of_two_generation_runs(evaluated):
    metrics = evaluated["metrics"]
    for key in SETTINGS:
        paper, local = metrics["paper_protocol"][key], metrics["image2audio"][key]
        assert paper["repeats"] == 2 and len(paper["runs"]) == len(local["runs"]) == 2
        for m in PAPER_METRICS:
            assert paper[m] == pytest.approx((paper["runs"][0][m] + paper["runs"][1][m]) / 2)
        acc = [run["acc_local"] for run in local["runs"]]
        assert local["acc_local"] == pytest.approx(sum(acc) / 2)
        # two runs with their own seeds: different samples, so different features
        assert paper["runs"][0]["fd_panns"] != paper["runs"][1]["fd_panns"]


def test_not_comparable_only_for_the_sample_count_and_the_clip_hash(evaluated, official_files):
    clip = io.sha256_file(official_files.get("clip")["clip"].path)[:8]
    for key in SETTINGS:
        paper = evaluated["metrics"]["paper_protocol"][key]
        assert paper["comparable_to_paper"] is False
        assert paper["not_comparable_because"] == [
            f"clip_vit_b32 (sha256 {clip}) is not OpenAI's ViT-B-32.pt (sha256 40d36571)",
            "the clips are not the paper's full VGGSound test list",
            "IS used 4 splits, not 10",
        ]
    assert evaluated["run"].data.tags["comparable_to_paper"] == "false"


def test_mlflow_has_the_paper_metrics_and_each_run(evaluated):
    logged, metrics = evaluated["run"].data.metrics, evaluated["metrics"]
    for key in SETTINGS:
        paper, local = metrics["paper_protocol"][key], metrics["image2audio"][key]
        for m in PAPER_METRICS:
            assert logged[f"paper/{key}/{m}"] == pytest.approx(paper[m], rel=1e-12)
            for i, run in enumerate(paper["runs"], start=1):
                assert logged[f"paper/{key}/run{i}/{m}"] == pytest.approx(run[m], rel=1e-12)
        assert logged[f"image2audio/{key}/acc_local"] == pytest.approx(local["acc_local"])
        assert logged[f"image2audio/{key}/run2/acc_local"] == local["runs"][1]["acc_local"]
