"""Contract tests: params.yaml <-> config dataclasses <-> dvc.yaml <-> the code stages import."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params, merge, parse_params
from pipeline.profiles import apply_profile, load_profile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_yaml_loads_with_the_paper_mel_defaults():
    params = load_params(ROOT / "params.yaml")
    assert params.download.source == "synthetic"
    ex = params.extract
    assert (ex.sample_rate, ex.n_fft, ex.hop_length, ex.n_mels) == (22050, 1024, 256, 80)
    assert (ex.fmin, ex.fmax, ex.mel_frames, ex.num_frames) == (125.0, 7600.0, 848, 10)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["extract"].update(colour=1), r"^extract\.colour: is not a known key"),
        (
            lambda d: d["download"]["vggsound"].pop("workers"),
            r"^download\.vggsound\.workers: is missing",
        ),
        (lambda d: d["extract"].update(jpeg_quality=0), r"^extract\.jpeg_quality: must be between"),
        (lambda d: d["download"].update(source="youtube"), r"^download\.source: must be one of"),
        (lambda d: d["download"].update(splits=["val"]), r"^download\.splits: must be"),
        (
            lambda d: d["extract"].update(image_size="big"),
            r"^extract\.image_size: must be an integer",
        ),
        (
            lambda d: d["download"]["vggsound"].update(url_template="http://x/"),
            r"url_template: must contain",
        ),
        (lambda d: d["paths"].update(clips="/abs"), r"^paths\.clips: must be a relative path"),
        (lambda d: d["paths"].update(clips="../out"), r"^paths\.clips: must not leave"),
        (lambda d: d.update(sweeps={}), r"^sweeps: is not a known key"),
        (
            lambda d: d["train"].update(batch_size=3, num_workers=2),
            r"^train\.batch_size: must be a positive multiple",
        ),
        (
            lambda d: d["train"]["masking"].update(low=0.9, high=0.5),
            r"^train\.masking\.low: must satisfy",
        ),
        (lambda d: d["model"].update(num_heads=5), r"^model\.num_heads: must divide"),
        (lambda d: d.pop("base"), r"^base: is missing"),
        (
            lambda d: d["extract"].update(mel_frames=900),
            r"^extract\.mel_frames: must be between 1 and the 862",
        ),
        (
            lambda d: d["download"].update(executor="ray"),
            r"^download\.executor: 'ray' fans out the vggsound source only; use 'local'",
        ),
        (lambda d: d["download"]["ray"].update(nodes=-1), r"^download\.ray\.nodes: must be 0"),
        (lambda d: d["extract"].update(executor="dask"), r"^extract\.executor: must be one of"),
        (lambda d: d["base"].update(cluster_wait_s=-5), r"^base\.cluster_wait_s: must be between"),
    ],
)
def test_bad_params_fail_with_one_sentence_naming_the_key(raw, edit, message):
    data = copy.deepcopy(raw)
    edit(data)
    with pytest.raises(ConfigError, match=message) as info:
        parse_params(data)
    assert "\n" not in str(info.value)


def test_config_is_frozen(raw):
    params = parse_params(raw)
    with pytest.raises(AttributeError):
        params.extract.image_size = 1  # type: ignore[misc]


def test_profiles_apply_and_keep_comments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    apply_profile(ROOT / "profiles" / "tiny.yaml", params)
    text = params.read_text()
    assert "# The only configuration source" in text
    tiny = load_params(params)
    assert tiny.download.synthetic.train_per_class == 2
    assert tiny.extract.image_size == 32
    assert load_profile(ROOT / "profiles" / "tiny.yaml", ROOT / "params.yaml") == tiny
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract:\n  no_such_key: 1\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        apply_profile(bad, params)
    assert params.read_text() == text


def test_merge_is_recursive():
    assert merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"c": 9}}) == {
        "a": {"b": 1, "c": 9},
        "d": 3,
    }


# ------------------------------------------------------------------------------------ dvc.yaml


def _dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _pipeline_imports(path: Path, seen: set[Path]) -> set[Path]:
    """Every pipeline/*.py file that `path` imports, directly or through other pipeline modules."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith("pipeline"):
                continue
            parts = name.split(".")
            for candidate in (
                ROOT.joinpath(*parts).with_suffix(".py"),
                ROOT.joinpath(*parts, "__init__.py"),
            ):
                if candidate.is_file() and candidate not in seen:
                    seen.add(candidate)
                    _pipeline_imports(candidate, seen)
    return seen


@pytest.mark.parametrize("stage", sorted(_dvc()["stages"]))
def test_every_stage_depends_on_exactly_the_code_it_imports(stage):
    spec = _dvc()["stages"][stage]
    module = re.fullmatch(r"python -m stages\.(\w+)", spec["cmd"])
    assert module, f"stage {stage} must run `python -m stages.<name>`"
    entry = ROOT / "stages" / f"{module[1]}.py"
    assert module[1] == stage, "stage file and DVC stage share one name"
    deps = set(spec["deps"])
    imported = {p.relative_to(ROOT).as_posix() for p in _pipeline_imports(entry, set())}
    imported = {p for p in imported if not p.endswith("__init__.py")}
    missing = imported - deps
    assert not missing, f"stage {stage} imports {sorted(missing)} but does not list them in deps"
    # A listed module the stage never imports reruns it for nothing when that module changes.
    unused = {d for d in deps if d.startswith("pipeline/")} - imported
    assert not unused, f"stage {stage} lists {sorted(unused)} in deps but never imports them"
    assert f"stages/{stage}.py" in deps


def _lookup(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        node = node[part]
    return node


def test_dvc_yaml_paths_and_params_come_from_params_yaml(raw):
    text = (ROOT / "dvc.yaml").read_text()
    # Outputs live under `paths`; the source inputs of download are the only other templates.
    inputs = {"download.local.videos_dir", "download.local.labels_csv", "download.vggsound.csv"}
    for ref in re.findall(r"\$\{([\w.]+)\}", text):
        section, key = ref.split(".", 1)
        if ref in inputs:
            assert (ROOT / _lookup(raw, ref)).exists(), f"${{{ref}}}'s default must exist"
            continue
        assert section == "paths" and key in raw["paths"], f"${{{ref}}} is not declared in paths"
    for name, spec in _dvc()["stages"].items():
        for param in spec.get("params", []):
            node = raw
            for part in param.split("."):
                assert part in node, f"stage {name} tracks unknown param {param}"
                node = node[part]
        assert name in raw, f"stage {name} has no params section of its own name"
