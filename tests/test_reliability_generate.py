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
def cli(models, tmp_path, capsys, monkeypatch):
    """`visual-echoes <task> ... --out tmp/out.*` on the micro models, run in `tmp_path` (no
    params.yaml there or beside the models): (status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)

    def call(task: str, *args: str, checkpoint_dir: Path | None = None) -> tuple[int, str, str]:
        code = main([
            task, "--checkpoint", str(checkpoint_dir or models / "transformer"),
            "--tokenizers", str(models / "tokenizers"), "--steps", "2", "--device", "cpu",
            *args,  # last, so that a test's own --steps wins
        ])  # fmt: skip
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


@pytest.fixture
def no_generation(monkeypatch):
    """Fails the test if a model is loaded: these refusals must come before any generation."""
    from pipeline.inference import generate

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(generate, "Generator", refuse)


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
    out = "out.png" if task == "audio2image" else "out.wav"
    _refused(cli(task, f"{flag}={name}", "--out", out), words)  # "=": argparse sees "-y"
    assert not Path(out).exists() and not Path("generated").exists()


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
        suffix = ".png" if task == "audio2image" else ".wav"
        code, _, err = cli(task, f"{flag}={name}", "--out", f"{task}{suffix}")
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
    config = folder / "config.json"
    meta = json.loads(config.read_text())
    weights = folder / "model.safetensors"
    if case == "meta says another layout":
        meta["layout"] = other.to_dict()
    elif case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "unsafe pickle":  # a folder of the legacy layout, whose weights are a pickle
        weights.unlink()
        config = config.rename(folder / "meta.json")
        torch.save({"pos_embed": torch.zeros(1), "x": Payload(marker)}, folder / "weights.pt")
    elif case == "no meta":
        config.unlink()
    elif case == "meta without layout":
        del meta["layout"]
    if config.exists():
        meta.pop("weights_sha256", None)  # the faults are in the content, not the hash
        config.write_text(json.dumps(meta))
    Image.new("RGB", (16, 16)).save(tmp_path / "p.png")
    message = _refused(cli("image2audio", "--image", str(tmp_path / "p.png"), "--out",
                           str(tmp_path / "o.wav"), checkpoint_dir=folder), *words)  # fmt: skip
    assert not marker.exists() and not (tmp_path / "o.wav").exists(), message


# ------------------------------------------------------------------------------------ outputs

REAL_CLIP = ROOT / "tests" / "data" / "vggsound" / "FwVYUHKoLtQ_000034.wav"  # 10 s, 16 kHz mono


def _picture(path: Path, size: tuple[int, int] = (50, 40), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _pcm(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit WAV's samples (frames, channels) and rate."""
    import wave

    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        return data.reshape(-1, w.getnchannels()), w.getframerate()


@pytest.mark.parametrize("task", ["inpaint-audio", "inpaint-image"])
def test_an_output_that_is_an_input_is_refused_before_any_generation(
    cli, tmp_path, no_generation, task
):
    picture, sound = _picture(tmp_path / "orig.png"), _wav(tmp_path / "orig.wav")
    before = {p: p.read_bytes() for p in (picture, sound)}
    span = ["--start", "0.5", "--end", "1"] if task == "inpaint-audio" else ["--box", *"0404"]
    target = sound if task == "inpaint-audio" else picture
    (tmp_path / "sub").mkdir()
    for spelling in (str(target), target.name, f"{tmp_path}/sub/../{target.name}"):
        _refused(cli(task, "--image", str(picture), "--audio", str(sound), *span,
                     "--out", spelling), str(target), "--overwrite")  # fmt: skip
    assert {p: p.read_bytes() for p in (picture, sound)} == before


def test_an_output_beside_the_output_that_is_an_input_is_refused(cli, tmp_path, no_generation):
    # image2audio writes x.wav and its mel plot x.mel.png: here the plot is the input
    picture = _picture(tmp_path / "x.mel.png")
    before = picture.read_bytes()
    _refused(cli("image2audio", "--image", str(picture), "--out", str(tmp_path / "x.wav")),
             str(picture))  # fmt: skip
    assert picture.read_bytes() == before and not (tmp_path / "x.wav").exists()


def test_a_folder_run_gives_every_input_its_own_output(cli, tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    for seed, name in enumerate(("x.png", "x.jpg", "y.png")):
        _picture(pics / name, seed=seed)
    code, out, err = cli("image2audio", "--image", str(pics), "--out", str(tmp_path / "o"))
    assert code == 0, err
    wavs = sorted(p.name for p in (tmp_path / "o").glob("*.wav"))
    assert wavs == ["x.jpg.wav", "x.png.wav", "y.wav"]
    assert out.startswith("image2audio: 3 file(s)")
    assert len({(tmp_path / "o" / w).read_bytes() for w in wavs}) == 3  # three different sounds


@pytest.mark.parametrize(
    ("task", "flag", "name", "expected"),
    [("image2audio", "--image", "c.png", ".wav"), ("audio2image", "--audio", "c.wav", ".png")],
)
def test_out_with_the_wrong_extension_names_the_right_one(
    cli, tmp_path, no_generation, task, flag, name, expected
):
    given = _picture(tmp_path / "in.png") if flag == "--image" else _wav(tmp_path / "in.wav")
    _refused(cli(task, flag, str(given), "--out", str(tmp_path / name)), name, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [given.name]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("under a file", ("is a file",)),
        ("name is a folder", ("is a folder",)),
        ("pseudo file system", ("cannot write", "/proc")),
        ("no permission", ("cannot write", "/sys")),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_generation(
    cli, tmp_path, no_generation, case, words
):
    picture = _picture(tmp_path / "cat.png")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    (tmp_path / "o" / "cat.wav").mkdir(parents=True)
    out = {
        "under a file": tmp_path / "notes.txt" / "cat.wav",
        "name is a folder": tmp_path / "o",  # a folder run: o/cat.wav is a folder
        "pseudo file system": Path("/proc/visual-echoes/cat.wav"),
        "no permission": Path("/sys/cat.wav"),  # refused to root as well
    }[case]
    _refused(cli("image2audio", "--image", str(picture), "--out", str(out)), *words)
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--samples", "0", "--samples"),
        ("--samples", "-2", "--samples"),
        ("--samples", "100000", "--samples"),
        ("--seed", "-1", "--seed"),
        ("--seed", str(2**64), "--seed"),
        ("--steps", "0", "--steps"),
        ("--temperature", "nan", "--temperature"),
        ("--guidance", "inf", "--guidance"),
        ("--batch-size", "0", "--batch-size"),
    ],
)
def test_a_bad_number_is_refused_before_any_generation(cli, tmp_path, no_generation, flag, value,
                                                       words):  # fmt: skip
    picture = _picture(tmp_path / "cat.png")
    _refused(cli("image2audio", "--image", str(picture), flag, value, "--out", "cat.wav"), words)


def test_a_refusal_comes_before_torch_is_even_imported(models, tmp_path):
    """The command as a user runs it, on a bad output path: one sentence, and nothing that
    could generate (torch) was loaded before it."""
    import sys

    _picture(tmp_path / "cat.png")
    script = (
        "import sys\nfrom pipeline.cli import main\ncode = main(sys.argv[1:])\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\nsys.exit(code)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "image2audio", "--image", "cat.png",
         "--checkpoint", str(models / "transformer"), "--tokenizers", str(models / "tokenizers"),
         "--out", "/proc/x/cat.wav"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("visual-echoes: error: cannot write in /proc"), proc.stderr
    assert proc.stdout.strip() == "no torch"


def test_outputs_get_the_mode_the_umask_gives(cli, tmp_path):
    import stat

    picture = _picture(tmp_path / "cat.png")
    old = os.umask(0o022)
    try:
        code, _, err = cli("image2audio", "--image", str(picture), "--out", "cat.wav")
        code2, _, err2 = cli("audio2image", "--audio", str(_wav(tmp_path / "a.wav")), "--out",
                             "a.png")  # fmt: skip
    finally:
        os.umask(old)
    assert code == 0 and code2 == 0, err + err2
    for name in ("cat.wav", "cat.mel.png", "a.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


# ---------------------------------------------------------------------------- inpainting


def test_inpaint_audio_keeps_a_real_recording_outside_the_span(cli, tmp_path):
    picture = _picture(tmp_path / "p.png")
    code, out, err = cli("inpaint-audio", "--image", str(picture), "--audio", str(REAL_CLIP),
                         "--start", "0.5", "--end", "1.5", "--out", "fixed.wav")  # fmt: skip
    assert code == 0, err
    original, rate = _pcm(REAL_CLIP)
    fixed, fixed_rate = _pcm(tmp_path / "fixed.wav")
    assert fixed_rate == rate == 16000 and fixed.shape == original.shape  # all 10 s, 1 channel
    a, b = 8000, 24000  # 0.5 s and 1.5 s at 16 kHz
    assert np.array_equal(fixed[:a], original[:a]) and np.array_equal(fixed[b:], original[b:])
    inside = fixed[a:b].astype(float), original[a:b].astype(float)
    assert np.mean(inside[0] != inside[1]) > 0.9 and np.abs(inside[0]).max() > 100  # generated
    # the crossfade: no step at the borders bigger than the recording's own
    steps = np.abs(np.diff(fixed[:, 0].astype(float)))
    assert steps[a - 2 : a + 2].max() <= np.abs(np.diff(original[:, 0].astype(float))).max()


def test_inpaint_audio_may_replace_its_input_with_overwrite(cli, tmp_path):
    import shutil

    sound = tmp_path / "orig.wav"
    shutil.copy(REAL_CLIP, sound)
    code, _, err = cli("inpaint-audio", "--image", str(_picture(tmp_path / "p.png")), "--audio",
                       str(sound), "--start", "1", "--end", "1.2", "--out", str(sound),
                       "--overwrite")  # fmt: skip
    assert code == 0, err
    original, fixed = _pcm(REAL_CLIP)[0], _pcm(sound)[0]
    assert np.array_equal(fixed[:16000], original[:16000]) and not np.array_equal(fixed, original)


def test_inpaint_image_keeps_the_pixels_outside_the_box(cli, tmp_path):
    picture = _picture(tmp_path / "p.png", size=(50, 40))
    code, _, err = cli("inpaint-image", "--image", str(picture), "--audio",
                       str(_wav(tmp_path / "a.wav")), "--box", "2", "5", "1", "6",
                       "--out", "fixed.png")  # fmt: skip
    assert code == 0, err
    before = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    after = np.asarray(Image.open(tmp_path / "fixed.png").convert("RGB")).astype(int)
    assert after.shape == before.shape  # the picture's own size, not the model's 16 x 16
    # The 50 x 40 picture is scaled to 20 x 16 and cropped from x = 2 to the model's 16 x 16;
    # 8 x 8 cells of 2 pixels: rows 2-5, cols 1-6 are y 4-10, x 2-12 of the crop, i.e.
    # y 10-25, x 10-35 of the picture (x 2.5 per pixel).
    inside = np.zeros(before.shape[:2], bool)
    inside[10:25, 10:35] = True
    assert np.array_equal(after[~inside], before[~inside])
    assert np.mean(np.any(after[inside] != before[inside], axis=-1)) > 0.9


# ------------------------------------------------------------------------------ input rules


def test_a_short_sound_is_refused_and_a_looped_one_is_said(cli, tmp_path):
    short = _wav(tmp_path / "short.wav", seconds=0.14)
    _refused(cli("audio2image", "--audio", str(short), "--out", "s.png"), "short.wav",
             "too short")  # fmt: skip
    code, _, err = cli("audio2image", "--audio", str(_wav(tmp_path / "l.wav", 1.5)), "--out",
                       "l.png")  # fmt: skip
    assert code == 0
    notes = [line for line in err.splitlines() if "l.wav" in line]
    assert len(notes) == 1 and "looped" in notes[0], err


# ------------------------------------------------------------------------- generation settings


def _closing_line(models: Path, cwd: Path, capsys, *extra: str) -> tuple[str, str]:
    """Run image2audio from `cwd` with no --params and no --steps; (stdout, stderr)."""
    _picture(cwd / "cat.png")
    os.chdir(cwd)
    code = main(["image2audio", "--image", "cat.png", "--out", "cat.wav", "--device", "cpu",
                 "--tokenizers", str(models / "tokenizers"), *extra])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out, out.err


def test_outside_a_checkout_the_checkouts_settings_follow_its_model(
    models, tmp_path, capsys, monkeypatch
):
    import shutil

    monkeypatch.chdir(tmp_path)
    checkout = tmp_path / "checkout"
    shutil.copytree(models / "transformer", checkout / "models" / "transformer")
    shutil.copy(ROOT / "params.yaml", checkout / "params.yaml")
    (tmp_path / "elsewhere").mkdir()
    out, err = _closing_line(models, tmp_path / "elsewhere", capsys, "--checkpoint",
                             str(checkout / "models" / "transformer"))  # fmt: skip
    g = PARAMS.generate
    assert f"N={g.steps}, T={g.temperature:g}, s={g.guidance:g}" in out, out
    assert str(checkout / "params.yaml") in out and "visual-echoes:" not in err


def test_settings_written_beside_a_model_are_used_and_flags_override_them(
    models, tmp_path, capsys, monkeypatch
):
    import shutil

    from pipeline.inference.settings import write_generation

    monkeypatch.chdir(tmp_path)
    exported = tmp_path / "exported"
    shutil.copytree(models / "transformer", exported)
    write_generation(exported, dataclasses.replace(PARAMS.generate, steps=3, temperature=2.5))
    out, _ = _closing_line(models, tmp_path, capsys, "--checkpoint", str(exported))
    assert "N=3, T=2.5, s=3" in out and "generation.json" in out, out
    out, _ = _closing_line(models, tmp_path, capsys, "--checkpoint", str(exported), "--steps",
                           "2", "--temperature", "0")  # fmt: skip
    assert "N=2, T=0, s=3" in out, out


def test_without_any_settings_the_paper_defaults_are_said_in_one_line(
    models, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    out, err = _closing_line(models, tmp_path, capsys, "--checkpoint",
                             str(models / "transformer"), "--steps", "2")  # fmt: skip
    assert "T=9, s=3" in out
    lines = [line for line in err.splitlines() if line.startswith("visual-echoes:")]
    assert len(lines) == 1 and lines[0].startswith("visual-echoes: note: ") and "paper" in lines[0]


def test_a_params_file_that_is_named_but_missing_is_an_error(cli, tmp_path, no_generation):
    picture = _picture(tmp_path / "cat.png")
    _refused(cli("image2audio", "--image", str(picture), "--params", "nope.yaml", "--out",
                 "cat.wav"), "nope.yaml")  # fmt: skip


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not readable JSON"),
        ('{"steps": 3}', 'must hold {"generate"'),
        ('{"generate": {"stepz": 3}}', "stepz: is not a known key"),
        ('{"generate": {"steps": 0}}', "steps: must be between 1 and 1000"),
    ],
)
def test_a_broken_generation_json_is_one_sentence(cli, models, tmp_path, no_generation, text,
                                                  words):  # fmt: skip
    import shutil

    exported = tmp_path / "exported"
    shutil.copytree(models / "transformer", exported)
    (exported / "generation.json").write_text(text)
    _refused(cli("image2audio", "--image", str(_picture(tmp_path / "cat.png")), "--out",
                 "cat.wav", checkpoint_dir=exported), "generation.json", words)  # fmt: skip
