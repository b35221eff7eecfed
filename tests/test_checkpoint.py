"""pipeline.checkpoint: the official weight files, as their authors released them, read without
their producers' packages and imported strictly into the official-size models; what a file may
hold and how it is read (placeholders, NumPy arrays, plain containers).

The released layouts come from conftest's `official_files` (tests/official_layouts.py): saved in a
child process that had stand-in `pytorch_lightning` and `omegaconf` packages, read here under
`no_producers`, which makes both packages unimportable (omegaconf is installed in this venv, as
a DVC dependency). Code-running files are refused in test_reliability_security.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from official_layouts import IMAGE_SHAPE, MEL_SHAPE, digest

from pipeline import checkpoint, io
from pipeline.checkpoint import CheckpointError, Placeholder
from pipeline.config import VocoderConfig
from pipeline.metrics.extractors.clip_image import ClipImageExtractor
from pipeline.metrics.extractors.panns import PannsExtractor
from pipeline.metrics.extractors.vggish import VggishExtractor
from pipeline.metrics.extractors.wav2clip import Wav2ClipExtractor
from pipeline.profiles import load_profile
from pipeline.tokenizers.tokenizer import InputSpec
from pipeline.tokenizers.train import import_pretrained
from pipeline.tokenizers.vocoder import build_vocoder

PRODUCERS = ("pytorch_lightning", "lightning", "omegaconf")
ROOT = Path(__file__).resolve().parents[1]


class _Blocked:
    """A meta-path finder for which the producers' packages do not exist."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in PRODUCERS:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


@pytest.fixture
def no_producers(monkeypatch):
    """This process without pytorch_lightning and omegaconf: imports of them fail, and any
    already imported are out of sys.modules for the test."""
    for name in [m for m in sys.modules if m.partition(".")[0] in PRODUCERS]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_Blocked(), *sys.meta_path])
    for name in PRODUCERS:
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(name)
    yield
    assert not [m for m in sys.modules if m.partition(".")[0] in PRODUCERS]


@pytest.fixture(scope="module")
def paper():
    """params.yaml with profiles/paper.yaml applied: the official sizes."""
    return load_profile(ROOT / "profiles" / "paper.yaml", ROOT / "params.yaml")


def _tokenizer(modality: str):
    def load(path, paper):
        cfg = dataclasses.replace(getattr(paper.tokenizers, modality), pretrained=str(path))
        spec = (
            InputSpec("image", IMAGE_SHAPE) if modality == "image" else InputSpec("mel", MEL_SHAPE)
        )
        return import_pretrained(modality, cfg, spec).model

    return load


IMPORTERS = {  # layout -> how the pipeline imports it, giving the model it filled
    "taming": _tokenizer("image"),
    "lightning-1.5": _tokenizer("image"),
    "specvqgan": _tokenizer("audio"),
    "melgan": lambda path, paper: build_vocoder(VocoderConfig(str(path), 32), paper.extract).generator,
    "panns": lambda path, paper: PannsExtractor.from_checkpoint(path).model,
    "vggish": lambda path, paper: VggishExtractor.from_checkpoint(path).model,
    "clip": lambda path, paper: ClipImageExtractor.from_checkpoint(path).model,
    "wav2clip": lambda path, paper: Wav2ClipExtractor.from_checkpoint(path).model,
}  # fmt: skip


@pytest.fixture(scope="module")
def files(official_files):
    """Every layout, saved by one child process."""
    return official_files.get(*IMPORTERS)


@pytest.mark.parametrize("layout", list(IMPORTERS))
def test_each_released_layout_imports_strictly_without_its_producer(
    layout, files, paper, no_producers
):
    file = files[layout]
    model = IMPORTERS[layout](file.path, paper)
    # every tensor of the official-size model came from the file (loss.* and heads dropped)
    assert digest(model.state_dict()) == file.digest


def test_lightning_metadata_is_read_as_inert_placeholders(files, no_producers):
    old = checkpoint.safe_load(files["taming"].path)  # Lightning 1.0.8
    (callback, state), = old["callbacks"].items()  # fmt: skip
    assert issubclass(callback, Placeholder)
    name = f"{callback.__module__}.{callback.__qualname__}"
    assert name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert set(state) == {"best_model_score", "best_model_path"}
    assert isinstance(state["best_model_score"], torch.Tensor)
    assert old["pytorch-lightning_version"] == "1.0.8" and old["lr_schedulers"] == []
    assert [len(o["param_groups"][0]["params"]) > 0 for o in old["optimizer_states"]] == [True] * 2
    # The OmegaConf container: a placeholder holding its pickled __dict__, its type a
    # placeholder class, the metadata's defaultdict resolver cache a plain dict.
    hparams = old["hyper_parameters"]
    assert type(hparams).__module__ == "omegaconf.dictconfig" and old["hparams_type"] is type(
        hparams
    )
    assert set(hparams.state) == {"_metadata", "_parent", "_content"}
    lossconfig = hparams.state["_content"]["lossconfig"]
    assert lossconfig.state["_parent"] is hparams  # the parent link survives, as a reference
    assert type(lossconfig.state["_metadata"]).__qualname__ == "ContainerMetadata"
    cache = hparams.state["_metadata"].state["resolver_cache"]
    assert cache == {"env": {("HOME",): "/home/researcher"}} and type(cache) is dict
    n_embed = hparams.state["_content"]["n_embed"]
    assert type(n_embed).__qualname__ == "AnyNode" and n_embed.state["_val"] == 1024

    mid = checkpoint.safe_load(files["specvqgan"].path)  # Lightning 1.2.10
    (callback, state), = mid["callbacks"].items()  # fmt: skip
    assert callback.__qualname__ == "ModelCheckpoint" and state["monitor"] == "val/rec_loss"
    assert mid["native_amp_scaling_state"]["scale"] == 65536.0
    assert mid["hparams_name"] == "kwargs" and mid["hyper_parameters"]["n_embed"] == 1024
    assert isinstance(mid["hyper_parameters"]["ddconfig"], Placeholder)

    new = checkpoint.safe_load(files["lightning-1.5"].path)  # string-keyed, nothing to stand in
    assert all(isinstance(k, str) for k in new["callbacks"]) and "loops" in new
    assert checkpoint.pickle_globals(files["lightning-1.5"].path) == {
        "collections.OrderedDict", "torch.FloatStorage", "torch.LongStorage",
        "torch._utils._rebuild_tensor_v2",
    }  # fmt: skip


def test_panns_sampler_arrays_are_read_from_the_legacy_format(files, no_producers):
    path = files["panns"].path
    assert path.read_bytes()[:2] != b"PK"  # torch's pre-1.6 format, not a zip
    assert "numpy.core.multiarray._reconstruct" in checkpoint.pickle_globals(path)  # NumPy 1.x
    data = checkpoint.safe_load(path)
    assert set(data) == {"iteration", "model", "sampler"}
    indexes = data["sampler"]["indexes_per_class"]
    assert len(indexes) == 527 and all(a.dtype == np.int64 and a.shape == (3,) for a in indexes)


# ----------------------------------------------------------------- what a file may hold


@pytest.fixture
def producer(monkeypatch):
    """A module `labkit.state` of a package this process does not have, importable only while
    the test saves (as the producer's was for its authors)."""
    module = types.ModuleType("labkit.state")

    def define(cls):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
        return cls

    monkeypatch.setitem(sys.modules, "labkit", types.ModuleType("labkit"))
    monkeypatch.setitem(sys.modules, "labkit.state", module)
    module.define = define
    return module


def _unimport(monkeypatch, *names: str) -> None:
    for name in names:
        monkeypatch.delitem(sys.modules, name)


def test_a_class_of_an_absent_package_becomes_an_inert_placeholder(tmp_path, producer, monkeypatch):
    ran = []

    @producer.define
    class Recipe:
        def __init__(self, steps):
            self.steps = steps

        def __reduce__(self):  # called with its argument when unpickled by Python
            return (Recipe, (self.steps,))

        def __setstate__(self, state):
            ran.append(state)

    @producer.define
    class Settings:
        def __init__(self):
            self.lr, self.steps = 1e-3, 7

        def __setstate__(self, state):
            ran.append(state)

    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(2), "recipe": Recipe(5), "settings": Settings(),
                "kind": Settings, "rng": np.random.RandomState(0)}, path)  # fmt: skip
    _unimport(monkeypatch, "labkit", "labkit.state")
    data = checkpoint.safe_load(path)
    recipe, settings, rng = data["recipe"], data["settings"], data["rng"]
    assert isinstance(recipe, Placeholder) and recipe.args == (5,) and recipe.state is None
    assert isinstance(settings, Placeholder) and settings.state == {"lr": 1e-3, "steps": 7}
    assert (
        data["kind"] is type(settings) and repr(settings) == "<placeholder labkit.state.Settings>"
    )
    assert not hasattr(settings, "lr") and not ran and "labkit" not in sys.modules
    # NumPy's random generator state: placeholders too, its state recorded, never rebuilt
    assert isinstance(rng, Placeholder) and rng.state["state"]["key"].shape == (624,)
    assert torch.equal(checkpoint.read_state_dict(path).tensors["w"], torch.ones(2))


def test_arrays_scalars_and_defaultdicts_are_plain_values(tmp_path):
    from collections import defaultdict

    counts = defaultdict(list, {"a": [1, 2]})
    arrays = [np.arange(4, dtype=np.float32), np.array([True, False]), np.zeros((2, 3), np.uint8)]
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(1)}, "arrays": arrays, "step": np.int64(9),
                "best": np.float32(0.5), "counts": counts}, path)  # fmt: skip
    data = checkpoint.safe_load(path)
    for got, want in zip(data["arrays"], arrays, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    assert data["step"] == 9 and type(data["step"]) is np.int64 and data["best"] == np.float32(0.5)
    assert data["counts"] == {"a": [1, 2]} and type(data["counts"]) is dict


def test_placeholder_classes_record_and_do_nothing_else():
    cls = checkpoint.placeholder("labkit.state.Recipe")
    assert (cls.__module__, cls.__qualname__) == ("labkit.state", "Recipe")
    obj = cls(1, two=2)
    obj.__setstate__({"x": 1})
    assert obj.args == (1,) and obj.state == {"x": 1}
    with pytest.raises(AttributeError):  # nothing else can be set on it, by a file either
        obj.steps = 3
    assert checkpoint.placeholder("labkit.state.Recipe") is not cls  # one class per load


def test_a_dict_subclass_of_an_absent_package_is_refused_by_name(tmp_path, producer, monkeypatch):
    @producer.define
    class AttributeDict(dict):
        pass

    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(1), "hparams": AttributeDict(lr=1.0)}, path)
    _unimport(monkeypatch, "labkit", "labkit.state")
    with pytest.raises(CheckpointError, match=r"refused.*labkit\.state\.AttributeDict") as info:
        checkpoint.safe_load(path)
    assert "\n" not in str(info.value)


def test_a_file_that_is_not_a_checkpoint_is_called_corrupt(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("just some notes\n")
    broken_zip = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(1000)}, broken_zip)
    broken_zip.write_bytes(broken_zip.read_bytes()[:300])
    for path in (text, broken_zip):
        with pytest.raises(CheckpointError, match="is corrupt or truncated"):
            checkpoint.safe_load(path)


# ------------------------------------------------------------- the project's own model folders


def _tiny_transformer():
    from pipeline.models.transformer import AudioVisualTransformer
    from pipeline.tokenizers.layout import ModalityLayout, TokenLayout

    layout = TokenLayout(ModalityLayout("audio", 16, (5, 10)), ModalityLayout("image", 16, (8, 8)))
    model_cfg = load_profile(ROOT / "profiles/tiny.yaml", ROOT / "params.yaml").model
    torch.manual_seed(0)
    config = {"model": dataclasses.asdict(model_cfg), "layout": layout.to_dict(), "step": 3}
    return AudioVisualTransformer(model_cfg, layout), config


class _Wrapper(torch.nn.Module):
    """Stands in for DDP: the model under `.module`, its keys prefixed `module.`."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_saved_model_is_safetensors_and_rebuilds_from_its_config_alone(tmp_path):
    import json

    from safetensors import safe_open

    from pipeline.models.transformer import AudioVisualTransformer

    model, config = _tiny_transformer()
    folder = checkpoint.save(tmp_path / "m", _Wrapper(model), config, card="# card\n")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "model.safetensors"
    ]  # fmt: skip
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(model.state_dict())  # saved unwrapped: no `module.`
        assert f.metadata() == {"format": "pt"}
    saved = json.loads((folder / "config.json").read_text())
    assert saved["weights_sha256"] == io.sha256_file(folder / "model.safetensors")
    assert saved["step"] == 3
    loaded = AudioVisualTransformer.from_pretrained(folder)
    assert not loaded.training and _same(loaded, model)


def test_a_legacy_folder_still_loads_and_copy_rewrites_it_as_safetensors(tmp_path):
    import json

    from pipeline.models.transformer import AudioVisualTransformer

    model, config = _tiny_transformer()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(model.state_dict(), legacy / "weights.pt")  # what the project wrote before
    config["weights_sha256"] = io.sha256_file(legacy / "weights.pt")
    (legacy / "meta.json").write_text(json.dumps(config))
    assert _same(AudioVisualTransformer.from_pretrained(legacy), model)
    copied = checkpoint.copy(legacy, tmp_path / "new")
    assert sorted(p.name for p in copied.iterdir()) == ["config.json", "model.safetensors"]
    assert _same(AudioVisualTransformer.from_pretrained(copied), model)
    assert checkpoint.read_config(copied)["step"] == 3
    # a legacy pickle that runs code is refused on the way, not converted
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(1), "x": _OpensWhenUnpickled(marker)}, legacy / "weights.pt")
    config.pop("weights_sha256")
    (legacy / "meta.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="was refused"):
        checkpoint.copy(legacy, tmp_path / "other")
    assert not marker.exists() and not (tmp_path / "other" / "model.safetensors").exists()


def test_weights_that_are_not_safetensors_are_corrupt_and_never_unpickled(tmp_path):
    model, config = _tiny_transformer()
    folder = checkpoint.save(tmp_path / "m", model, {**config})
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one weight changed
    with pytest.raises(CheckpointError, match="does not match the sha256 in config.json"):
        checkpoint.load(folder)
    weights.write_bytes(data[:500])
    with pytest.raises(CheckpointError, match="is corrupt or truncated"):
        checkpoint.load(folder)
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(1), "x": _OpensWhenUnpickled(marker)}, weights)
    checkpoint.write_config(folder, config)  # no sha: the fault is in the content
    for path in (weights, folder):
        with pytest.raises(CheckpointError, match="is corrupt or truncated") as info:
            checkpoint.read_state_dict(path) if path == weights else checkpoint.load(path)
        assert "\n" not in str(info.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="is not a transformer folder .no config.json."):
        checkpoint.load(tmp_path / "empty", "transformer")


class _OpensWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))
