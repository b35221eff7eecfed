"""The generation subcommands of `visual-echoes`: image2audio, audio2image, cogenerate,
inpaint-audio and inpaint-image.

Inputs go through the same preparation and rules as the `extract` stage
(`pipeline.inference.inputs`); a folder of inputs is one call. Outputs: sound as WAV plus a mel
plot (`x.wav`, `x.mel.png`), images as PNG. `--out` is a file for one input and one sample
(`.wav` for a sound, `.png` for an image; co-generation writes both side by side), else a folder
(default `generated/`; an existing folder always is one), where each output is named after its
input (`cat.wav`, or `cat-2.wav` for the third sample); inputs that share a name keep their
extension (`x.png.wav`, `x.jpg.wav`), so no output of a run replaces another.

Every output is checked before any model is loaded: its folder can be written (it is created
when missing), it is not a folder, and it is none of the inputs unless `--overwrite` says so.
The settings (N, T, s) come from `pipeline.inference.settings`. Inpainting keeps its input
(`pipeline.inference.inpaint`): the sound outside the span and the pixels outside the box are
the user's own, at the file's own sample rate, channels and size.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import ConfigError, GenerateConfig
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.bundle import Located

AUDIO_OUT, IMAGE_OUT, MEL_OUT = ".wav", ".png", ".mel.png"
MAX_SAMPLES = 1000
MAX_SEED = 2**32 - 1  # Griffin-Lim's random phases come from numpy's RandomState(seed)
# What each task writes per row: a sound (+ its mel plot) and/or an image.
WRITES = {
    "image2audio": ("sound",),
    "audio2image": ("image",),
    "cogenerate": ("sound", "image"),
    "inpaint_audio": ("sound",),
    "inpaint_image": ("image",),
}
OVERRIDES = ("steps", "temperature", "guidance", "batch_size", "device")


class OutputError(PipelineError):
    """An output that cannot, or must not, be written; the message is one sentence."""


@dataclass(frozen=True)
class Target:
    """The files of one generated row: `sound` and its `mel` plot, and/or `image`."""

    sound: Path | None = None
    mel: Path | None = None
    image: Path | None = None

    def files(self) -> list[Path]:
        return [p for p in (self.sound, self.mel, self.image) if p is not None]


# ------------------------------------------------------------------------------------ checks


def _check_numbers(args: argparse.Namespace) -> None:
    """The flags that no config section checks. Raises PipelineError."""
    if not 1 <= args.samples <= MAX_SAMPLES:
        raise PipelineError(f"--samples {args.samples}: must be between 1 and {MAX_SAMPLES}")
    if not 0 <= args.seed <= MAX_SEED:
        raise PipelineError(f"--seed {args.seed}: must be between 0 and {MAX_SEED}")


def _config(args: argparse.Namespace, base: GenerateConfig) -> GenerateConfig:
    """`base` with the flags given; a bad value is named by its flag."""
    changes = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    try:
        return dataclasses.replace(base, **changes)
    except ConfigError as err:  # "steps: must be ...": base was valid, so a flag is wrong
        key, _, reason = str(err).partition(": ")
        raise PipelineError(f"--{key.replace('_', '-')} {changes.get(key)}: {reason}") from None


def _names(files: Sequence[Path]) -> list[str]:
    """One output name per input: its stem, or its whole name where inputs share a stem
    (x.png, x.jpg -> "x.png", "x.jpg")."""
    stems = [f.stem.casefold() for f in files]
    return [f.name if stems.count(f.stem.casefold()) > 1 else f.stem for f in files]


def _unique(names: list[str]) -> list[str]:
    """`names` with any repeat (case-insensitively, as on macOS) numbered "~2", "~3", ..."""
    seen: set[str] = set()
    out = []
    for name in names:
        candidate, k = name, 1
        while candidate.casefold() in seen:
            k += 1
            candidate = f"{name}~{k}"
        seen.add(candidate.casefold())
        out.append(candidate)
    return out


def _with(path: Path, suffix: str) -> Path:
    """`path` + `suffix` (not `with_suffix`: a name may hold dots, "x.png" -> "x.png.wav")."""
    return path.with_name(path.name + suffix)


def plan_targets(task: str, out: str | None, names: list[str], samples: int) -> list[Target]:
    """One Target per (input, sample), input-major. Raises OutputError for an `--out` file name
    with another extension than the task writes, or one file name for several outputs."""
    writes = WRITES[task]
    rows = len(names) * samples
    suffixes = {"sound": AUDIO_OUT, "image": IMAGE_OUT}
    wanted = " or ".join(suffixes[w] for w in writes)
    given = Path(out) if out else None
    if given is not None and not given.is_dir() and given.suffix:
        suffix = given.suffix.lower()
        if rows == 1:
            if suffix not in (suffixes[w] for w in writes):
                raise OutputError(
                    f"--out {given}: {task.replace('_', '-')} writes a {wanted} file; name it "
                    f"{given.with_suffix(suffixes[writes[0]])}"
                )
            return [_target(given.with_suffix(""), writes, given)]
        if suffix in suffixes.values():
            raise OutputError(
                f"--out {given} names one file, but {task.replace('_', '-')} writes {rows} here "
                f"({len(names)} input(s) x {samples} sample(s)); give a folder"
            )
    folder = given or Path("generated")
    stems = [n + (f"-{k}" if samples > 1 else "") for n in names for k in range(samples)]
    return [_target(folder / stem, writes) for stem in _unique(stems)]


def _target(stem: Path, writes: Sequence[str], given: Path | None = None) -> Target:
    """The files of one row named `stem`; `given` is the user's own file name for its kind."""
    sound = image = mel = None
    if "sound" in writes:
        sound = given if given is not None and given.suffix.lower() == AUDIO_OUT else None
        sound = sound or _with(stem, AUDIO_OUT)
        mel = _with(stem, MEL_OUT)
    if "image" in writes:
        image = given if given is not None and given.suffix.lower() == IMAGE_OUT else None
        image = image or _with(stem, IMAGE_OUT)
    return Target(sound, mel, image)


def check_targets(targets: Sequence[Target], inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse, before anything is generated, outputs that would fail or lose a file: a folder in
    the way, a file where a folder is needed, a folder that cannot be written, an input (unless
    `overwrite`). Creates nothing. Raises OutputError."""
    given = {p.resolve(): p for p in inputs}
    files = [p for t in targets for p in t.files()]
    if len({p.resolve() for p in files}) != len(files):  # _unique makes this impossible
        raise OutputError("two outputs of this run would have the same name")
    for path in files:
        if path.is_dir():
            raise OutputError(f"{path} is a folder; choose another --out or move the folder")
        source = given.get(path.resolve())
        if source is not None and not overwrite:
            raise OutputError(
                f"the output {path} would replace the input {source}; choose another --out, "
                "or add --overwrite to replace it"
            )
    for folder in dict.fromkeys(p.parent for p in files):
        _check_folder(folder)


def _check_folder(folder: Path) -> None:
    """Whether files can be made in `folder`, or in the nearest existing folder above it (where
    `folder` will be created): a real file is made there and deleted. Raises OutputError."""
    from pipeline import io

    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "it" if existing == folder else str(existing)
        raise OutputError(f"cannot write in {folder}: {what} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{io.TMP_PREFIX}probe-", dir=existing)
    except OSError as err:
        raise OutputError(f"cannot write in {existing} ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)


# ------------------------------------------------------------------------------------ run

IMAGE_IN = ("image2audio", "inpaint_audio", "inpaint_image")
AUDIO_IN = ("audio2image", "inpaint_audio", "inpaint_image")


def run_command(args: argparse.Namespace) -> str:
    """Find the model (`pipeline.bundle.locate`: a folder, or an MLflow URI downloaded for the
    run), then `generate_with` it; returns the closing line."""
    from pipeline import bundle

    _check_numbers(args)
    with bundle.locate(args.checkpoint, args.tokenizers) as model:
        return generate_with(args, model)


def generate_with(args: argparse.Namespace, model: Located) -> str:
    """Check the flags and every output, load the model and the inputs, generate, write;
    returns the closing line. `model`: a `bundle.Located`."""
    from pipeline.inference import inpaint, inputs, settings

    task = args.task
    found = settings.resolve(model.transformer, args.params)
    cfg = _config(args, found.config)
    image_files = inputs.list_inputs(args.image, ["image", "video"]) if task in IMAGE_IN else []
    audio_files = inputs.list_inputs(args.audio, ["audio", "video"]) if task in AUDIO_IN else []
    if image_files and audio_files and len(image_files) != len(audio_files):
        raise PipelineError(
            f"{args.image} gives {len(image_files)} image(s) but {args.audio} gives "
            f"{len(audio_files)} audio input(s); inpainting pairs them one to one"
        )
    named = audio_files if task in ("audio2image", "inpaint_audio") else image_files
    targets = plan_targets(task, args.out, _names(named) if named else ["sample"], args.samples)
    check_targets(targets, [*image_files, *audio_files], args.overwrite)

    from pipeline.inference.generate import Generator  # torch: seconds to import

    generator = Generator(model.transformer, model.tokenizers, cfg, cfg.device)
    extract = generator.extract_config
    notes = [found.note] if found.note else []
    images = mels = None
    if image_files:
        images = np.stack([inputs.load_image(f, extract) for f in image_files])
    if audio_files:
        sounds = [inputs.load_sound(f, extract) for f in audio_files]
        mels = np.stack([s.mel for s in sounds])
        notes += [
            f"{f} holds {s.seconds:.2f} s of sound: it is looped to fill the "
            f"{extract.clip_seconds:g}-s clip, as extract does"
            for f, s in zip(audio_files, sounds, strict=True)
            if s.looped
        ]
    span = box = None
    if task == "inpaint_audio":
        first, last = inpaint.audio_window(extract)
        if not first <= args.start < args.end <= last:
            raise PipelineError(
                f"--start {args.start:g} and --end {args.end:g} must satisfy {first:.2f} <= "
                f"start < end <= {last:.2f} (the seconds of the clip the model's mel covers)"
            )
        sound_originals = [inputs.load_original_sound(f) for f in audio_files]
        for f, (pcm, rate) in zip(audio_files, sound_originals, strict=True):
            if args.end > len(pcm) / rate:
                raise PipelineError(f"--end {args.end:g} is past the end of {f} "
                                    f"({len(pcm) / rate:.2f} s)")  # fmt: skip
        span = inpaint.span_fractions(extract, args.start, args.end)
    if task == "inpaint_image":
        r0, r1, c0, c1 = args.box
        rows, cols = generator.layout.image.grid
        if not (0 <= r0 < r1 <= rows and 0 <= c0 < c1 <= cols):
            raise PipelineError(f"--box must lie within the {rows}x{cols} image token grid")
        box = ((r0, r1), (c0, c1))
        size = extract.image_size
        crop_box = (c0 * size // cols, r0 * size // rows, c1 * size // cols, r1 * size // rows)
        picture_originals = [inputs.load_original_picture(f, extract) for f in image_files]
    for note in notes:
        print(f"visual-echoes: note: {note}", file=sys.stderr)

    result = generator.run(
        task, images, mels, samples=args.samples, seed=args.seed, audio_span=span,
        image_box=box, progress=True,
    )  # fmt: skip
    written: list[Path] = []
    for row, target in enumerate(targets):
        i = row // args.samples  # the input of this row
        sound, rate, mel = result.waves[row], result.sample_rate, result.mels[row]
        image = result.images[row]
        if task == "inpaint_audio":
            original, rate = sound_originals[i]
            sound = inpaint.splice_sound(original, rate, sound, extract, args.start, args.end)
            mel = inpaint.splice_mel(mels[i], mel, extract, args.start, args.end)
        if task == "inpaint_image":
            picture = picture_originals[i]
            where = inputs.original_box(picture.shape[1], picture.shape[0], size, crop_box)
            image = inpaint.splice_picture(picture, image, crop_box, where)
        written += _write(target, sound, rate, mel, image)
    where = written[0] if len(written) == 1 else written[0].parent
    return (
        f"{task}: {len(written)} file(s) -> {where} "
        f"(N={cfg.steps}, T={cfg.temperature:g}, s={cfg.guidance:g}, seed {args.seed}, "
        f"{generator.device.type}; settings: {found.source})"
    )


def _write(
    target: Target, sound: np.ndarray, rate: int, mel: np.ndarray, image: np.ndarray
) -> list[Path]:
    """Write what `target` names; returns the sound and image files (not the mel plot).
    A file system that fails now (full, gone read-only) is an OutputError."""
    from PIL import Image

    from pipeline import io
    from pipeline.data.audio import save_mel_png, save_wav

    try:
        if target.sound is not None and target.mel is not None:
            save_wav(target.sound, sound, rate)
            save_mel_png(target.mel, mel, title=target.sound.name)
        if target.image is not None:
            with io.atomic_path(target.image) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
    except OSError as err:
        where = err.filename or target.files()[0]
        raise OutputError(f"could not write {where} ({err.strerror or err})") from None
    return [p for p in (target.sound, target.image) if p is not None]


def run_export(args: argparse.Namespace) -> str:
    """`visual-echoes export DIR`: the model, its tokenizers, vocoder, generation settings and
    card in one folder (`pipeline.bundle`); returns the closing line."""
    from pipeline import bundle, checkpoint, io
    from pipeline.config import load_params
    from pipeline.inference import settings

    out = Path(args.folder)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not args.overwrite:
        raise OutputError(f"{out} exists; choose another folder, or add --overwrite to replace it")
    with bundle.locate(args.checkpoint, args.tokenizers) as model:
        found = settings.resolve(model.transformer, args.params)
        generate = {k: getattr(found.config, k) for k in settings.MODEL_KEYS}
        evaluation, source = None, None
        params_file = settings.checkout_params(model.transformer)
        if params_file is not None:
            params = load_params(params_file)
            source = params.download.source
            metrics = params_file.parent / params.paths.reports / "evaluate" / "metrics.json"
            config = checkpoint.config_path(model.transformer)
            # metrics of an evaluate run older than the model are another model's
            if metrics.is_file() and metrics.stat().st_mtime >= config.stat().st_mtime:
                evaluation = io.read_json(metrics)
        tmp = io.make_temp_dir(out)
        try:
            bundle.write_bundle(tmp, model.transformer, model.tokenizers,
                                generate if found.note is None else None, evaluation, source)  # fmt: skip
            if found.note is None:  # the paper's defaults are no setting of this model's
                settings.write_generation(tmp / bundle.TRANSFORMER, found.config)
            io.replace_dir(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if found.note:
        print(f"visual-echoes: note: {found.note}", file=sys.stderr)
    return (
        f"export: {model.source} -> {out} (settings: {found.source}; evaluate metrics "
        f"{'included' if evaluation else 'not known'}); generate with `visual-echoes "
        f"image2audio --checkpoint {out} --image IMAGE`"
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--checkpoint and --tokenizers: which model a command loads (`pipeline.bundle.locate`)."""
    p.add_argument(
        "--checkpoint",
        default="models/transformer",
        help="the train stage output, an exported folder (visual-echoes export), or a model "
        "the train stage logged to MLflow: runs:/RUN_ID/model, models:/NAME/VERSION",
    )
    p.add_argument(
        "--tokenizers",
        help="the tokenizers stage output (default: the exported folder's own, else "
        "models/tokenizers)",
    )


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register the generation subcommands and `export` on the `visual-echoes` parser."""
    e = sub.add_parser(
        "export",
        help="the model, tokenizers, vocoder and card in one folder to copy elsewhere",
        description="Write the transformer, both tokenizers, the vocoder, the generation "
        "settings (from the checkout's params.yaml) and a model card into FOLDER; "
        "`visual-echoes image2audio --checkpoint FOLDER` then runs on any machine.",
    )
    e.add_argument("folder", help="the folder to write (new or empty)")
    add_model_arguments(e)
    e.add_argument("--params", help="take the generation settings from this file's generate:")
    e.add_argument("--overwrite", action="store_true", help="replace FOLDER if it exists")
    e.set_defaults(func=run_export)

    def common(p: argparse.ArgumentParser) -> None:
        add_model_arguments(p)
        p.add_argument("--out", help="output file (one input, one sample) or folder")
        p.add_argument("--overwrite", action="store_true",
                       help="let an output replace one of the inputs")  # fmt: skip
        p.add_argument("--steps", type=int, help="unmasking iterations N (paper: 30)")
        p.add_argument("--temperature", type=float, help="T (paper: 9)")
        p.add_argument("--guidance", type=float, help="CFG scale s (paper: 3; 1: none)")
        p.add_argument("--samples", type=int, default=1,
                       help=f"samples per input (1 to {MAX_SAMPLES})")  # fmt: skip
        p.add_argument("--seed", type=int, default=0, help=f"0 to {MAX_SEED}")
        p.add_argument("--batch-size", type=int, dest="batch_size")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"])
        p.add_argument(
            "--params",
            help="take N, T, s from this file's generate: (default: the model's own settings, "
            "then ./params.yaml, then the paper's)",
        )
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
