"""Stand-ins of the seven official weight files in the layouts their authors released them in
(docs/references.md, "Official weight files"): random weights, official sizes, warts included.

`OfficialFiles` (conftest's session fixture `official_files`) builds the ones a test asks for, once
per session, by running this file as a child process whose PYTHONPATH has stand-in
`pytorch_lightning` and `omegaconf` packages (`PRODUCERS`, written to a temporary folder): the
classes the files name really exist while they are saved, as they did for their authors, and
exist nowhere in the test process that reads them. Each layout records the `digest` of the
tensors the official-size model must end up with, so a reader can check it loaded those.

Layouts (name: the file it stands for, and how it is saved):
- `taming`: taming-transformers' VQGAN f16/1024 `last.ckpt`, a Lightning 1.0.8 checkpoint:
  `callbacks` keyed by the ModelCheckpoint class, two optimizers' states, `lr_schedulers`, the
  model with its `loss.*` (LPIPS, discriminator), plus OmegaConf `hyper_parameters` and
  `hparams_type` as Lightning writes them for a model whose hparams are a DictConfig;
- `specvqgan`: SpecVQGAN's VGGSound codebook `epoch_39.ckpt`, Lightning 1.2.10: the same with
  `monitor`/`current_score`/`dirpath` in the callback state, the AMP scaler state and
  `hyper_parameters` a dict of DictConfigs (OmegaConf 2.0: typed metadata, a `defaultdict`
  resolver cache, parent links);
- `lightning-1.5`: the image VQGAN saved by Lightning >= 1.5: callbacks keyed by a string, `loops`;
- `panns`: PANNs `Cnn14_16k_mAP=0.438.pth`, `{"iteration", "model", "sampler"}` with a balanced
  sampler's numpy index arrays, in torch's legacy (pre-1.6) format with NumPy 1.x's global names;
- `vggish`: torchvggish `vggish-10086976.pth`, a bare state dict, legacy format;
- `clip`: OpenAI `ViT-B-32.pt`, a TorchScript archive (float16) of the image tower and part of
  the text side;
- `wav2clip`: `Wav2CLIP.pt`, one flat state dict of the audio encoder and both heads;
- `melgan`: SpecVQGAN's `best_netG.pt`, a bare generator state dict.
Optimizer states hold the moments of the first two parameters only (real shapes), so that a
file is not three times its model's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("taming", "specvqgan", "lightning-1.5", "panns", "vggish", "clip", "wav2clip", "melgan")
FILE_NAMES = {
    "taming": "vqgan_imagenet_f16_1024/last.ckpt",
    "specvqgan": "2021-05-19T22-16-54_vggsound_codebook/checkpoints/epoch_39.ckpt",
    "lightning-1.5": "lightning-1.5/last.ckpt",
    "panns": "Cnn14_16k_mAP=0.438.pth",
    "vggish": "vggish-10086976.pth",
    "clip": "ViT-B-32.pt",
    "wav2clip": "Wav2CLIP.pt",
    "melgan": "vocoder/logs/vggsound/best_netG.pt",
}
IMAGE_SHAPE = (3, 256, 256)  # profiles/paper.yaml: extract.image_size 256
MEL_SHAPE = (1, 80, 848)  # params.yaml: extract.n_mels, extract.mel_frames

# The producers' packages, reduced to what their checkpoints name. OmegaConf 2.0's containers
# pickle their __dict__: `_metadata` (a dataclass holding typing.Any, flags and a
# defaultdict(dict) resolver cache), `_parent` and `_content` (value nodes, or nested containers).
PRODUCERS = {
    "pytorch_lightning/__init__.py": '__version__ = "1.0.8"\n',
    "pytorch_lightning/callbacks/__init__.py": (
        "from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint\n"
    ),
    "pytorch_lightning/callbacks/model_checkpoint.py": (
        "class ModelCheckpoint:\n"
        '    """Lightning < 1.5 keys its state in checkpoint["callbacks"] by this class."""\n'
    ),
    "omegaconf/__init__.py": (
        "from omegaconf.dictconfig import DictConfig\nfrom omegaconf.listconfig import ListConfig\n"
    ),
    "omegaconf/base.py": """\
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Type


@dataclass
class Metadata:
    ref_type: Optional[Type[Any]]
    object_type: Optional[Type[Any]]
    optional: bool
    key: Any
    flags: Dict[str, bool] = field(default_factory=dict)
    resolver_cache: Dict[str, Any] = field(default_factory=lambda: defaultdict(dict))


@dataclass
class ContainerMetadata(Metadata):
    key_type: Any = None
    element_type: Any = None


class Node:
    def __init__(self, parent, metadata):
        self.__dict__["_metadata"] = metadata
        self.__dict__["_parent"] = parent


class Container(Node):
    pass
""",
    "omegaconf/nodes.py": """\
from typing import Any

from omegaconf.base import Metadata, Node


class ValueNode(Node):
    def __init__(self, parent, value, metadata):
        super().__init__(parent, metadata)
        self.__dict__["_val"] = value


class AnyNode(ValueNode):
    def __init__(self, value=None, key=None, parent=None, is_optional=True):
        metadata = Metadata(ref_type=Any, object_type=None, key=key, optional=is_optional)
        super().__init__(parent, value, metadata)
""",
    "omegaconf/basecontainer.py": """\
from typing import Any

from omegaconf.base import Container, ContainerMetadata


class BaseContainer(Container):
    object_type = None

    def __init__(self, content, key=None, parent=None, ref_type=Any, is_optional=True):
        metadata = ContainerMetadata(
            ref_type=ref_type, object_type=self.object_type, optional=is_optional, key=key
        )
        super().__init__(parent, metadata)
        self.__dict__["_content"] = self.wrap_content(content)

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, d):
        self.__dict__.update(d)


def wrap(value, key, parent):
    from omegaconf.dictconfig import DictConfig
    from omegaconf.listconfig import ListConfig
    from omegaconf.nodes import AnyNode

    if isinstance(value, dict):
        return DictConfig(value, key=key, parent=parent)
    if isinstance(value, list):
        return ListConfig(value, key=key, parent=parent)
    return AnyNode(value, key=key, parent=parent)
""",
    "omegaconf/dictconfig.py": """\
from omegaconf.basecontainer import BaseContainer, wrap


class DictConfig(BaseContainer):
    def wrap_content(self, content):
        return {k: wrap(v, k, self) for k, v in content.items()}
""",
    "omegaconf/listconfig.py": """\
from omegaconf.basecontainer import BaseContainer, wrap


class ListConfig(BaseContainer):
    object_type = list

    def wrap_content(self, content):
        return [wrap(v, i, self) for i, v in enumerate(content)]
""",
}


class Layout(NamedTuple):
    """A stand-in file and the digest of the tensors the official-size model must receive."""

    path: Path
    digest: str


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys and their values as float32 (float16 files load as float32)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class OfficialFiles:
    """Builds requested layouts under `folder`, each once (see the module doc)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.producers = folder / "producers"
        self.built: dict[str, Layout] = {}

    def get(self, *names: str) -> dict[str, Layout]:
        missing = [n for n in names if n not in self.built]
        if missing:
            self._build(missing)
        return {n: self.built[n] for n in names}

    def _build(self, names: list[str]) -> None:
        for rel, text in PRODUCERS.items():
            (self.producers / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.producers / rel).write_text(text)
        env = dict(os.environ, PYTHONPATH=f"{self.producers}{os.pathsep}{ROOT}")
        subprocess.run(
            [sys.executable, __file__, str(self.folder), *names],
            env=env, check=True, timeout=900, capture_output=True,
        )  # fmt: skip
        manifest = json.loads((self.folder / "manifest.json").read_text())
        for name in names:
            self.built[name] = Layout(self.folder / FILE_NAMES[name], manifest[name])


# ------------------------------------------------------------------------- in the child process


def _random_state(factory: Any, seed: int) -> OrderedDict[str, torch.Tensor]:
    """The state dict of `factory()` as torch initialises it (random weights, BatchNorm
    statistics at 0 and 1, frozen front ends as built), from `seed`."""
    torch.manual_seed(seed)
    return OrderedDict(factory().state_dict())


def _adam(state: Mapping[str, torch.Tensor], lr: float) -> dict[str, Any]:
    """An Adam `state_dict()` for the parameters of `state` (moments of the first two only)."""
    params = list(range(len(state)))
    moments = {
        i: {"step": 4242, "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.ones_like(t)}
        for i, t in zip(params[:2], state.values(), strict=False)
    }
    group = {"lr": lr, "betas": (0.5, 0.9), "eps": 1e-08, "weight_decay": 0, "amsgrad": False}
    return {"state": moments, "param_groups": [{**group, "params": params}]}


def _vqgan_state(modality: str, seed: int) -> tuple[OrderedDict[str, torch.Tensor], str]:
    """(the Lightning `state_dict`: model + `loss.*`, digest of the model part)."""
    from pipeline.profiles import load_profile
    from pipeline.tokenizers.discriminator import NLayerDiscriminator
    from pipeline.tokenizers.lpips import LPIPS
    from pipeline.tokenizers.tokenizer import InputSpec
    from pipeline.tokenizers.train import build_model

    params = load_profile(ROOT / "profiles" / "paper.yaml", ROOT / "params.yaml")
    cfg = getattr(params.tokenizers, modality)
    spec = InputSpec("image", IMAGE_SHAPE) if modality == "image" else InputSpec("mel", MEL_SHAPE)
    model = _random_state(lambda: build_model(cfg, spec), seed)
    channels = spec.shape[0]
    loss = {
        **{f"perceptual_loss.{k}": v for k, v in _random_state(LPIPS, seed + 1).items()},
        **{f"discriminator.{k}": v
           for k, v in _random_state(lambda: NLayerDiscriminator(channels), seed + 2).items()},
    }  # fmt: skip
    state = OrderedDict([*model.items(), *((f"loss.{k}", v) for k, v in loss.items())])
    return state, digest(model)


def _hparams(modality: str) -> dict[str, Any]:
    """The VQModel's constructor arguments, as the model's config file gives them."""
    channels = 3 if modality == "image" else 1
    ddconfig = {
        "double_z": False, "z_channels": 256, "resolution": 256 if channels == 3 else 848,
        "in_channels": channels, "out_ch": channels, "ch": 128, "ch_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 2, "attn_resolutions": [16 if channels == 3 else 53], "dropout": 0.0,
    }  # fmt: skip
    lossconfig = {
        "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
        "params": {"disc_conditional": False, "disc_in_channels": channels, "disc_start": 250001,
                   "disc_weight": 0.8, "codebook_weight": 1.0},
    }  # fmt: skip
    return {"ddconfig": ddconfig, "lossconfig": lossconfig, "n_embed": 1024, "embed_dim": 256,
            "ckpt_path": None, "ignore_keys": [], "image_key": "image"}  # fmt: skip


def _resolved(config: Any) -> Any:
    """`config` (a DictConfig) after an interpolation resolver ran: OmegaConf 2.0 caches its
    result in the metadata's defaultdict."""
    config._metadata.resolver_cache["env"][("HOME",)] = "/home/researcher"
    return config


def _lightning(state: OrderedDict, version: str, modality: str) -> dict[str, Any]:
    from omegaconf import DictConfig
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    disc = [k for k in state if k.startswith("loss.discriminator.")]
    ae = OrderedDict((k, v) for k, v in state.items() if not k.startswith("loss."))
    common = {
        "epoch": 40,
        "global_step": 2130001,
        "pytorch-lightning_version": version,
        "state_dict": state,
        "optimizer_states": [_adam(ae, 4.5e-06), _adam({k: state[k] for k in disc}, 4.5e-06)],
        "lr_schedulers": [],
    }
    run = "logs/2020-11-09T13-31-51_vqgan"
    if version == "1.0.8":  # Lightning's CallbackHook.on_save_checkpoint of 1.0.8
        hparams = _resolved(DictConfig(_hparams(modality)))
        callbacks = {ModelCheckpoint: {"best_model_score": torch.tensor(0.5247),
                                       "best_model_path": f"{run}/checkpoints/last.ckpt"}}  # fmt: skip
        extra = {"hyper_parameters": hparams, "hparams_type": DictConfig}
    elif version == "1.2.10":
        callbacks = {ModelCheckpoint: {
            "monitor": "val/rec_loss", "best_model_score": torch.tensor(0.3127),
            "best_model_path": f"{run}/checkpoints/epoch_39.ckpt",
            "current_score": torch.tensor(0.3127), "dirpath": f"{run}/checkpoints",
        }}  # fmt: skip
        extra = {
            "native_amp_scaling_state": {"scale": 65536.0, "growth_factor": 2.0,
                                         "backoff_factor": 0.5, "growth_interval": 2000,
                                         "_growth_tracker": 117},
            "hparams_name": "kwargs",
            "hyper_parameters": {
                **_hparams(modality),
                "ddconfig": DictConfig(_hparams(modality)["ddconfig"]),
                "lossconfig": _resolved(DictConfig(_hparams(modality)["lossconfig"])),
            },
        }  # fmt: skip
    else:  # >= 1.5: state keys are strings (Callback.state_key)
        key = ("ModelCheckpoint{'monitor': 'val/rec_loss', 'mode': 'min', 'every_n_train_steps': "
               "0, 'every_n_epochs': 1, 'train_time_interval': None, 'save_on_train_epoch_end': "
               "True}")  # fmt: skip
        callbacks = {key: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.29),
                           "best_model_path": f"{run}/checkpoints/last.ckpt",
                           "current_score": torch.tensor(0.3), "dirpath": f"{run}/checkpoints"}}  # fmt: skip
        progress = {"ready": 40, "started": 40, "processed": 40, "completed": 40}
        extra = {
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {
                "total": progress, "current": progress}}},
            "hparams_name": "kwargs",
            "hyper_parameters": {"n_embed": 1024, "embed_dim": 256, "image_key": "image"},
        }  # fmt: skip
    return {**common, "callbacks": callbacks, **extra}


def _legacy_with_numpy_1_names(obj: Any, path: Path) -> None:
    """torch.save in the pre-1.6 format, with the array globals spelt as NumPy 1.x wrote them
    (`numpy.core.multiarray`; NumPy >= 2 writes `numpy._core.multiarray`). The legacy format has
    no offsets, so the pickle text may change length."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(data)


class _ClipArchive(torch.nn.Module):
    """OpenAI's TorchScript layout: `visual.*` beside the text side (here part of it)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.visual = torch.nn.Module()
        for key, value in tensors.items():
            owner = self
            *parents, leaf = key.split(".")
            for part in parents:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _build_one(name: str, folder: Path, cache: dict[str, Any]) -> str:
    import numpy as np

    path = folder / FILE_NAMES[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    if name in ("taming", "lightning-1.5", "specvqgan"):
        modality = "audio" if name == "specvqgan" else "image"
        if modality not in cache:
            cache[modality] = _vqgan_state(modality, seed=1 if modality == "image" else 2)
        state, model_digest = cache[modality]
        version = {"taming": "1.0.8", "specvqgan": "1.2.10", "lightning-1.5": "1.5.10"}[name]
        torch.save(_lightning(state, version, modality), path)
        return model_digest
    if name == "panns":
        from pipeline.metrics.extractors.panns import CLASSES_NUM, Cnn14

        model = _random_state(Cnn14, 3)
        rng = np.random.RandomState(0)
        sampler = {  # BalancedTrainSampler.state_dict(): per-class index arrays, a class queue
            "indexes_per_class": [np.sort(rng.choice(5000, 3, replace=False)) for _ in
                                  range(CLASSES_NUM)],
            "queue": rng.permutation(CLASSES_NUM).tolist()[:100],
            "pointers_of_classes": [int(p) for p in rng.randint(0, 3, CLASSES_NUM)],
        }  # fmt: skip
        _legacy_with_numpy_1_names({"iteration": 560000, "model": model, "sampler": sampler}, path)
        return digest(model)
    if name == "vggish":
        from pipeline.metrics.extractors.vggish import VGGish

        model = _random_state(VGGish, 4)
        torch.save(model, path, _use_new_zipfile_serialization=False)
        return digest(model)
    if name == "clip":
        from pipeline.metrics.extractors.clip_image import ClipImageEncoder

        visual = {k: v.half() for k, v in _random_state(ClipImageEncoder, 5).items()}
        text = {"positional_embedding": torch.zeros(77, 512), "ln_final.weight": torch.ones(512),
                "text_projection": torch.zeros(512, 512), "logit_scale": torch.tensor(4.6052)}  # fmt: skip
        archive = _ClipArchive({**visual, **{k: v.half() for k, v in text.items()}}).eval()
        torch.jit.save(torch.jit.trace(archive, torch.zeros(1), check_trace=False), str(path))
        return digest(visual)
    if name == "wav2clip":
        from pipeline.metrics.extractors.wav2clip import Wav2Clip

        audio = _random_state(Wav2Clip, 6)
        image_head = {f"image_transform.sequential.{i}.{p}": torch.zeros(512, 512)
                      if p == "weight" else torch.zeros(512) for i in (0, 3)
                      for p in ("weight", "bias")}  # fmt: skip
        torch.save({**audio, **image_head}, path)
        return digest(audio)
    if name == "melgan":
        from pipeline.tokenizers.vocoder import MelGANGenerator

        model = _random_state(MelGANGenerator, 7)
        torch.save(model, path)
        return digest(model)
    raise ValueError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")


def main(folder: Path, names: list[str]) -> None:
    import omegaconf
    import pytorch_lightning

    for module in (omegaconf, pytorch_lightning):  # the stand-ins, not an installed package
        assert Path(module.__file__).is_relative_to(folder / "producers"), module.__file__
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    cache: dict[str, Any] = {}
    for name in names:
        manifest[name] = _build_one(name, folder, cache)
    manifest_path.write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
