"""Malformed input to the generation command, on micro models built here (no DAG needed):
decompression bombs and absurd image shapes, files whose extension lies, devices and pipes,
and transformer checkpoints made for another TokenLayout, corrupt or unsafe.

Each must end as `visual-echoes: error: <one sentence>` with exit status 1 and no output file;
a well-formed call on the same models works (so the refusals are not an artefact of the set-up).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import checkpoint
from pipeline.cli import main
from pipeline.config import ModelConfig, VQGANArch, load_params
from pipeline.data import audio
from pipeline.media import ffmpeg_exe
from pipeline.models.transformer import AudioVisualTransformer
from pipeline.tokenizers.layout import ModalityLayout, TokenLayout
from pipeline.tokenizers.tokenizer import InputSpec, Tokenizer, vqgan_config
from pipeline.tokenizers.vocoder import Vocoder
from pipeline.tokenizers.vqgan import VQModel

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")
MEL = dataclasses.replace(PARAMS.extract, clip_seconds=2.0, mel_frames=160, image_size=16)
MODEL = ModelConfig(**{**dataclasses.asdict(PARAMS.model), "embed_dim": 16, "depth": 1,
                       "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
                       "decoder_num_heads": 2})  # fmt: skip
LAYOUT = TokenLayout(ModalityLayout("audio", 16, (5, 10)), ModalityLayout("image", 16, (8, 8)))


def _arch(ch_mult: tuple[int, ...]) -> VQGANArch:
    return VQGANArch(ch=8, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=(), z_channels=8,
                     embed_dim=8, n_embed=16, dropout=0.0, norm_groups=4)  # fmt: skip


def _transformer(folder: Path, layout: TokenLayout) -> Path:
    torch.manual_seed(0)
    model = AudioVisualTransformer(MODEL, layout)
    meta = {"model": dataclasses.asdict(MODEL), "layout": layout.to_dict(), "step": 1}
    return checkpoint.save(folder, model, meta)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """models/{tokenizers/{image,audio,vocoder}, transformer} for 16x16 frames and 2-s mels."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for modality, spec, mult in (
        ("image", InputSpec("image", (3, 16, 16)), (1, 2)),  # -> 8x8 ids
        ("audio", InputSpec("mel", (1, 80, 160)), (1, 2, 4, 8, 16)),  # -> 5x10 ids
    ):
        model = VQModel(vqgan_config(_arch(mult), spec))
        Tokenizer(modality, model, spec, {"source": "test"}).save(root / "tokenizers" / modality)
    Vocoder(MEL, None, 2).save(root / "tokenizers" / "vocoder")
    _transformer(root / "transformer", LAYOUT)
    return root


@pytest.fixture
def cli(models, tmp_path, capsys):
    """`visual-echoes <task> ... --out tmp/out.*` on the micro models: (status, stdout, stderr)."""

    def call(*args: str, checkpoint_dir: Path | None = None) -> tuple[int, str, str]:
        code = main([
            *args, "--checkpoint", str(checkpoint_dir or models / "transformer"),
            "--tokenizers", str(models / "tokenizers"), "--steps", "2",
            "--params", str(tmp_path / "none.yaml"), "--device", "cpu",
        ])  # fmt: skip
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def _refused(result: tuple[int, str, str], *words: str) -> str:
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("visual-echoes: error: "), err
    assert "Traceback" not in err and not out
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header) with no real data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
        )

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _wav(path: Path, seconds: float = 2.0) -> Path:
    t = np.arange(int(seconds * MEL.sample_rate)) / MEL.sample_rate
    audio.save_wav(path, 0.3 * np.sin(2 * np.pi * 440 * t), MEL.sample_rate)
    return path


# --------------------------------------------------------------------------------------- works


def test_the_micro_models_generate(cli, tmp_path):
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "cat.png")
    code, out, err = cli("image2audio", "--image", str(tmp_path / "cat.png"),
                         "--out", str(tmp_path / "cat.wav"))  # fmt: skip
    assert code == 0, err
    assert out.startswith("image2audio: 1 file(s)") and (tmp_path / "cat.wav").stat().st_size > 0
    code, _, err = cli("audio2image", "--audio", str(_wav(tmp_path / "a.wav")),
                       "--out", str(tmp_path / "a.png"))  # fmt: skip
    assert code == 0, err
    assert Image.open(tmp_path / "a.png").size == (16, 16)


# -------------------------------------------------------------------------------- bad images


def test_huge_and_absurd_images_are_refused_before_they_are_decoded(cli, tmp_path):
    cases = {
        "bomb.png": _png_header(100_000, 100_000),  # 10^10 pixels: Pillow's hard limit
        "big.png": _png_header(10_000, 10_000),  # 10^8 pixels: past the limit, a warning only
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        _refused(cli("image2audio", "--image", str(tmp_path / name), "--out",
                     str(tmp_path / "o.wav")), str(tmp_path / name), "too large an image")  # fmt: skip
    # a 1 x 200,000 strip: few source pixels, but scaled to a 16-pixel short side it would be
    # a 16 x 3,200,000 picture (150 MB) before the crop
    Image.new("RGB", (1, 200_000), (1, 2, 3)).save(tmp_path / "strip.png")
    _refused(cli("image2audio", "--image", str(tmp_path / "strip.png"), "--out",
                 str(tmp_path / "o.wav")), "strip.png", "too elongated")  # fmt: skip
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "dot.png")  # tiny is fine: scaled up
    code, _, err = cli("image2audio", "--image", str(tmp_path / "dot.png"),
                       "--out", str(tmp_path / "dot.wav"))  # fmt: skip
    assert code == 0, err
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize(
    ("task", "flag", "name", "make", "words"),
    [
        # extensions that lie: the content decides
        ("audio2image", "--audio", "photo.wav", "png", "has no audio stream"),
        ("audio2image", "--audio", "notes.mp3", "text", "is not a readable audio or video file"),
        ("image2audio", "--image", "sound.jpg", "wav", "is not a readable image"),
        ("image2audio", "--image", "song.mp4", "wav", "has no video stream"),
        # not regular files
        ("image2audio", "--image", "fifo.png", "fifo", "does not exist"),
        ("audio2image", "--audio", "/dev/zero", None, "does not exist"),
        ("image2audio", "--image", "loop.png", "symlink-loop", "does not exist"),
        # names that look like options or protocols reach ffmpeg as plain file names
        ("image2audio", "--image", "-y.mp4", "text", "is not a readable image or video file"),
        ("audio2image", "--audio", "concat:a.wav|b.wav", "text", "is not a readable audio"),
    ],
)
def test_inputs_whose_name_or_kind_lies_are_one_sentence(
    cli, tmp_path, monkeypatch, task, flag, name, make, words
):
    monkeypatch.chdir(tmp_path)  # relative names, as a user would type them
    path = Path(name)
    if make == "png":
        Image.new("RGB", (32, 32), (1, 2, 3)).save(path, format="PNG")
    elif make == "text":
        path.write_text("hello, I am not media\n")
    elif make == "wav":
        _wav(tmp_path / "x.wav").rename(path)
    elif make == "fifo":
        os.mkfifo(path)  # opening it would block forever
    elif make == "symlink-loop":
        path.symlink_to(name)
    _refused(cli(task, f"{flag}={name}", "--out", "out.wav"), words)  # "=": argparse sees "-y"
    assert not Path("out.wav").exists() and not Path("generated").exists()


def test_a_video_with_a_hostile_name_and_a_wrong_extension_is_used(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "-i $(touch PWNED);x.wav"  # an option, a command substitution, an audio extension
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         "testsrc2=size=64x48:rate=10", "-f", "lavfi", "-i", "sine=sample_rate=22050", "-t", "2",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-f", "mp4",
         str(tmp_path / name)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    for task, flag in (("audio2image", "--audio"), ("image2audio", "--image")):
        code, _, err = cli(task, f"{flag}={name}", "--out", f"{task}.out")
        assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [name, "audio2image.png", "image2audio.wav", "image2audio.mel.png"]
    )  # nothing else was created: no PWNED


# ------------------------------------------------------------------------------- checkpoints


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("other layout", ("do not match", "image 4x4 of 32")),
        ("meta says another layout", ("cannot load the transformer", "shape mismatch")),
        ("truncated weights", ("cannot load the transformer", "corrupt or truncated")),
        ("unsafe pickle", ("cannot load the transformer", "was refused")),
        ("no meta", ("is not a transformer checkpoint",)),
        ("meta without layout", ("cannot load the transformer",)),
    ],
)
def test_a_transformer_checkpoint_that_does_not_fit_is_refused(cli, models, tmp_path, case, words):
    folder = tmp_path / "transformer"
    other = TokenLayout(LAYOUT.audio, ModalityLayout("image", 32, (4, 4)))
    marker = tmp_path / "code-ran"
    if case == "other layout":  # a sound checkpoint trained on another image tokenizer
        _transformer(folder, other)
    else:
        _transformer(folder, LAYOUT)
    meta = json.loads((folder / "meta.json").read_text())
    weights = folder / "weights.pt"
    if case == "meta says another layout":
        meta["layout"] = other.to_dict()
    elif case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "unsafe pickle":
        torch.save({"pos_embed": torch.zeros(1), "x": Payload(marker)}, weights)
    elif case == "no meta":
        (folder / "meta.json").unlink()
    elif case == "meta without layout":
        del meta["layout"]
    if (folder / "meta.json").exists():
        meta.pop("weights_sha256", None)  # the faults are in the content, not the hash
        (folder / "meta.json").write_text(json.dumps(meta))
    Image.new("RGB", (16, 16)).save(tmp_path / "p.png")
    message = _refused(cli("image2audio", "--image", str(tmp_path / "p.png"), "--out",
                           str(tmp_path / "o.wav"), checkpoint_dir=folder), *words)  # fmt: skip
    assert not marker.exists() and not (tmp_path / "o.wav").exists(), message
