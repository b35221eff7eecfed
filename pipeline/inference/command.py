"""The generation subcommands of `visual-echoes`: image2audio, audio2image, cogenerate,
inpaint-audio and inpaint-image.

Inputs go through the same preparation as the `extract` stage (`pipeline.inference.inputs`);
a folder of inputs is one call. Outputs: audio as WAV plus a mel plot (`x.wav`, `x.mel.png`),
images as PNG. `--out` is a file for one input and one sample, else a folder (default
`generated/`), where each output is named after its input (`cat.wav`, or `cat-2.wav` for the
third sample).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from pipeline.config import GenerateConfig
from pipeline.errors import PipelineError

PAPER_DEFAULTS = GenerateConfig(
    steps=30, temperature=9.0, guidance=3.0, batch_size=16, device="auto"
)
AUDIO_OUT, IMAGE_OUT = ".wav", ".png"


def _defaults(params: str) -> GenerateConfig:
    """`generate:` of params.yaml when there is one, else the paper's N=30, T=9, s=3."""
    from pipeline.config import load_params

    if not Path(params).is_file():
        return PAPER_DEFAULTS
    return load_params(params).generate


def _config(args: argparse.Namespace) -> GenerateConfig:
    cfg = _defaults(args.params)
    changes = {
        k: getattr(args, k)
        for k in ("steps", "temperature", "guidance", "batch_size", "device")
        if getattr(args, k) is not None
    }
    return dataclasses.replace(cfg, **changes)


def _targets(out: Path | None, stems: list[str], samples: int, suffix: str) -> list[Path]:
    """One output path per (input, sample), input-major."""
    single = len(stems) == 1 and samples == 1
    if out is not None and single and out.suffix:
        return [out]
    folder = out or Path("generated")
    return [
        folder / (stem + (f"-{k}" if samples > 1 else "") + suffix)
        for stem in stems
        for k in range(samples)
    ]


def _write_audio(paths: list[Path], mels: np.ndarray, waves: np.ndarray, rate: int) -> None:
    from pipeline.data.audio import save_mel_png, save_wav

    for path, mel, wave in zip(paths, mels, waves, strict=True):
        path = path.with_suffix(AUDIO_OUT)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_wav(path, wave, rate)
        save_mel_png(path.with_suffix(".mel.png"), mel, title=path.name)


def _write_images(paths: list[Path], images: np.ndarray) -> None:
    from PIL import Image

    from pipeline import io

    for path, image in zip(paths, images, strict=True):
        path = path.with_suffix(IMAGE_OUT)
        path.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(path) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")


def run_command(args: argparse.Namespace) -> str:
    """Load inputs, generate, write outputs; returns the closing line."""
    from pipeline.inference import inputs
    from pipeline.inference.generate import Generator

    cfg = _config(args)
    generator = Generator(args.checkpoint, args.tokenizers, cfg, cfg.device)
    extract = generator.extract_config
    images = mels = None
    stems: list[str] = ["sample"]
    if args.task in ("image2audio", "inpaint_audio", "inpaint_image"):
        files = inputs.list_inputs(args.image, ["image", "video"])
        images = np.stack([inputs.load_image(f, extract) for f in files])
        stems = [f.stem for f in files]
    if args.task in ("audio2image", "inpaint_audio", "inpaint_image"):
        files = inputs.list_inputs(args.audio, ["audio", "video"])
        mels = np.stack([inputs.load_mel(f, extract) for f in files])
        if images is not None and len(files) != len(images):
            raise PipelineError(
                f"{args.image} gives {len(images)} image(s) but {args.audio} gives {len(files)} "
                "audio input(s); inpainting pairs them one to one"
            )
        stems = [f.stem for f in files] if images is None else stems
    span = None
    if args.task == "inpaint_audio":
        if not 0 <= args.start < args.end <= extract.clip_seconds:
            raise PipelineError(
                f"--start {args.start} and --end {args.end} must satisfy 0 <= start < end <= "
                f"{extract.clip_seconds:g} (seconds of the clip)"
            )
        span = (args.start / extract.clip_seconds, args.end / extract.clip_seconds)
    box = None
    if args.task == "inpaint_image":
        r0, r1, c0, c1 = args.box
        rows, cols = generator.layout.image.grid
        if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols):
            raise PipelineError(f"--box must lie within the {rows}x{cols} image token grid")
        box = ((r0, r1), (c0, c1))
    samples = args.samples if args.task != "cogenerate" else max(args.samples, 1)
    result = generator.run(
        args.task, images, mels, samples=samples, seed=args.seed, audio_span=span,
        image_box=box, progress=True,
    )  # fmt: skip
    written = []
    out = Path(args.out) if args.out else None
    if args.task in ("image2audio", "inpaint_audio", "cogenerate"):
        paths = _targets(out, stems, samples, AUDIO_OUT)
        _write_audio(paths, result.mels, result.waves, result.sample_rate)
        written += [p.with_suffix(AUDIO_OUT) for p in paths]
    if args.task in ("audio2image", "inpaint_image", "cogenerate"):
        paths = _targets(out, stems, samples, IMAGE_OUT)
        _write_images(paths, result.images)
        written += [p.with_suffix(IMAGE_OUT) for p in paths]
    where = written[0] if len(written) == 1 else written[0].parent
    return (
        f"{args.task}: {len(written)} file(s) -> {where} "
        f"(N={cfg.steps}, T={cfg.temperature:g}, s={cfg.guidance:g}, seed {args.seed}, "
        f"{generator.device.type})"
    )


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register the generation subcommands on the `visual-echoes` parser."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", default="models/transformer", help="train stage output")
        p.add_argument("--tokenizers", default="models/tokenizers", help="tokenizers output")
        p.add_argument("--out", help="output file (one input, one sample) or folder")
        p.add_argument("--steps", type=int, help="unmasking iterations N (paper: 30)")
        p.add_argument("--temperature", type=float, help="T (paper: 9)")
        p.add_argument("--guidance", type=float, help="CFG scale s (paper: 3; 1: none)")
        p.add_argument("--samples", type=int, default=1, help="samples per input")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, dest="batch_size")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"])
        p.add_argument("--params", default="params.yaml", help="defaults from its generate:")
        p.set_defaults(func=run_command)

    specs = {
        "image2audio": ("sound for images (JPEG/PNG/WebP, or a video's middle frame)", ["image"]),
        "audio2image": ("an image for sounds (WAV/FLAC/MP3, or a video's audio)", ["audio"]),
        "cogenerate": ("an image and a sound together, from nothing", []),
        "inpaint-audio": (
            "regenerate a time span of a sound, guided by an image",
            ["image", "audio"],
        ),
        "inpaint-image": ("regenerate a box of an image, guided by a sound", ["image", "audio"]),
    }
    for name, (text, needs) in specs.items():
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(task=name.replace("-", "_"))
        for kind in needs:
            p.add_argument(f"--{kind}", required=True, help=f"{kind} file or folder")
        if name == "inpaint-audio":
            p.add_argument("--start", type=float, required=True, help="span start, seconds")
            p.add_argument("--end", type=float, required=True, help="span end, seconds")
        if name == "inpaint-image":
            p.add_argument("--box", type=int, nargs=4, required=True,
                           metavar=("ROW0", "ROW1", "COL0", "COL1"),
                           help="token-grid cells to regenerate, end-exclusive")  # fmt: skip
        common(p)
