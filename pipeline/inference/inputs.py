"""A user's own files as the extract stage's per-clip arrays: one frame, one mel, or both.

`load_image` gives a frame as extract stores it and `iter_examples` reads it back: (S, S, 3)
uint8 RGB, the short side scaled to `image_size`, the centre cropped, then one JPEG round trip at
`jpeg_quality` with extract's settings. Still images are read with Pillow (EXIF rotation applied;
palette, grey, 16-bit and CMYK converted to RGB; transparency laid over white) and scaled onto
the same pixel grid as ffmpeg's `scale=S:S:force_original_aspect_ratio=increase,crop=S:S`. A
video gives its middle frame, decoded by ffmpeg with extract's filters: `fps=1/D` keeps the last
frame before the centre of D = min(duration, clip_seconds), the part of the file extract uses.

`load_mel` gives what extract stores as a mel: the first `clip_seconds` of any audio or video
file, decoded by ffmpeg to mono float32 at `sample_rate` with extract's arguments, through
`audio.log_mel` (shorter audio is looped), rounded through float16 as the shard column is. For a
clip extract accepts, both equal what `extracted.iter_examples` reads back (with num_frames = 1 for
the frame). `load_sound` also says how long the sound is and whether it was looped.

Extract's own rules judge what decodes (`decode.check_truncation`, `check_min_length`): a file
whose streams all stop well before its header says is truncated, a sound under 1 s too short
(a lone frame has no minimum). The truncation rule needs both streams of a video, so the one not
asked for is decoded as well when the asked one stops early.

`load_original_sound` and `load_original_picture` give a file as it is (native rate and
channels, full size) for inpainting to paste its result into; `original_box` maps a box of
`load_image`'s square back onto the picture.

Every problem with the file is an `InputError` whose message is one sentence naming it.
"""

from __future__ import annotations

import io as _stdio
import math
import subprocess
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import media
from pipeline.config import ExtractConfig
from pipeline.data import audio, decode
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
AUDIO_SUFFIXES = frozenset(
    {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".wma"}
)
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"}
)
KINDS = {"image": IMAGE_SUFFIXES, "audio": AUDIO_SUFFIXES, "video": VIDEO_SUFFIXES}

# Lower than extract's SILENCE_PEAK (-60 dBFS), which only keeps quiet clips out of training:
# a quiet recording at -70 dBFS still shows above the mel floor, while -80 dBFS and below is
# (near) digital silence that would give a blank mel.
SILENCE_PEAK = 1e-4
# The short side is scaled to image_size before the centre crop; beyond this many pixels the
# scaled picture (a very elongated strip) would cost more memory than any real photo.
MAX_SCALED_PIXELS = 1 << 24  # 16.8 M: a 256 x 65,536 strip at the paper's image size


class InputError(PipelineError):
    """A user's input file that cannot be used; the message is one sentence naming the file."""


# ------------------------------------------------------------------------------------ listing


def list_inputs(path: str | Path, kinds: Iterable[str]) -> list[Path]:
    """The input files at `path`: [path] for a file; for a folder, its files (not subfolders,
    not hidden ones) whose suffix belongs to one of `kinds` ("image", "audio", "video"),
    case-insensitively, sorted by name.

    Raises InputError when `path` does not exist or the folder holds no such file.
    """
    wanted = sorted(set(kinds))
    if not wanted or any(k not in KINDS for k in wanted):
        raise ValueError(f"kinds must be a non-empty subset of {sorted(KINDS)}, got {wanted}")
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path} does not exist")
    suffixes = frozenset().union(*(KINDS[k] for k in wanted))
    # Hidden names skip macOS "._photo.jpg" resource forks, which carry an image suffix.
    found = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )
    if not found:
        raise InputError(
            f"{path} holds no {' or '.join(wanted)} files ({', '.join(sorted(suffixes))})"
        )
    return found


# ------------------------------------------------------------------------------------ public


def load_image(path: str | Path, cfg: ExtractConfig) -> np.ndarray:
    """The frame extract would store for this image or video: (S, S, 3) uint8, S = image_size.

    Images (`IMAGE_SUFFIXES`, or any file Pillow reads) are scaled and cropped with Pillow;
    anything else is opened with ffmpeg as a video and gives its middle frame (module doc).
    Raises InputError.
    """
    path = _checked(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _image(path, cfg)
    if suffix not in VIDEO_SUFFIXES | AUDIO_SUFFIXES:
        from PIL import UnidentifiedImageError

        try:
            return _image(path, cfg, strict=False)
        except UnidentifiedImageError:
            pass  # not an image: maybe a video with an unusual suffix
    frame = _decode(path, cfg, video=True, sound=False).frame
    assert frame is not None
    return _stored_frame(frame, cfg)


@dataclass(frozen=True)
class Sound:
    """A file's sound as the model hears it: mel (n_mels, mel_frames) float32 in [0, 1], the
    seconds of audio decoded (at most clip_seconds) and whether they were looped to fill it."""

    mel: np.ndarray
    seconds: float
    looped: bool


def load_sound(path: str | Path, cfg: ExtractConfig) -> Sound:
    """The mel extract would store for this file's audio, with its length (see `Sound`).

    Any audio or video file with an audio stream; only its first `clip_seconds` are decoded.
    Raises InputError for files without audio samples, truncated or shorter than extract's
    minimum, and for silence (peak < SILENCE_PEAK).
    """
    wave = _decode(_checked(path), cfg, video=False, sound=True).wave
    assert wave is not None
    return Sound(_mel(wave, cfg), wave.size / cfg.sample_rate, decode.loops_audio(cfg, wave.size))


def load_mel(path: str | Path, cfg: ExtractConfig) -> np.ndarray:
    """`load_sound(path, cfg).mel`: (n_mels, mel_frames) float32 in [0, 1]. Raises InputError."""
    return load_sound(path, cfg).mel


def load_pair(path: str | Path, cfg: ExtractConfig) -> tuple[np.ndarray, np.ndarray]:
    """(middle frame (S, S, 3) uint8, mel (n_mels, mel_frames) float32) of a video with sound,
    from one ffmpeg pass; equal to (`load_image(path)`, `load_mel(path)`). Raises InputError."""
    decoded = _decode(_checked(path), cfg, video=True, sound=True)
    assert decoded.frame is not None and decoded.wave is not None
    return _stored_frame(decoded.frame, cfg), _mel(decoded.wave, cfg)


# --------------------------------------------------------------------------------- originals


def load_original_sound(path: str | Path) -> tuple[np.ndarray, int]:
    """The whole first audio stream of `path` as it is: ((T, C) int16 samples, rate in Hz),
    decoded by ffmpeg to 16-bit PCM at the file's own rate and channels (a 16-bit WAV gives its
    samples unchanged). Raises InputError."""
    import soundfile

    path = _checked(path)
    with tempfile.TemporaryDirectory(prefix="ve-sound-") as folder:
        out = Path(folder) / "sound.wav"
        cmd = [
            media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error",
            "-i", f"file:{path.resolve()}", "-map", "0:a:0", "-c:a", "pcm_s16le", "-f", "wav",
            f"file:{out}",
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=decode.DECODE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise InputError(
                f"{path} took over {decode.DECODE_TIMEOUT_S:.0f} s to decode"
            ) from None
        if proc.returncode != 0 or not out.is_file():
            lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            reason = lines[-1].strip() if lines else f"exit status {proc.returncode}"
            raise InputError(f"{path} could not be decoded (ffmpeg: {reason})")
        pcm, rate = soundfile.read(out, dtype="int16", always_2d=True)
    return pcm, int(rate)


def load_original_picture(path: str | Path, cfg: ExtractConfig) -> np.ndarray:
    """The picture `load_image` scales and crops, at its own size: (H, W, 3) uint8 RGB, EXIF
    rotation applied and other modes converted as there. A video's frame is not decoded again
    at full size: it gives `load_image`'s (S, S, 3) frame. Raises InputError."""
    from PIL import UnidentifiedImageError

    path = _checked(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES | AUDIO_SUFFIXES:
        return load_image(path, cfg)
    try:
        img = _open_image(path, strict=suffix in IMAGE_SUFFIXES)
    except UnidentifiedImageError:
        return load_image(path, cfg)
    return np.asarray(_rgb(img), dtype=np.uint8)


def original_box(
    width: int, height: int, size: int, box: tuple[int, int, int, int]
) -> tuple[int, int, int, int]:
    """Where the pixels `box` = (x0, y0, x1, y1), end-exclusive, of `load_image`'s size x size
    crop of a width x height picture lie in the picture: the smallest whole-pixel box holding
    them, (x0, y0, x1, y1)."""
    (w, h), (x, y) = _cover_box(width, height, size)
    sx, sy = width / w, height / h
    x0, y0, x1, y1 = box
    eps = 1e-9  # (x0 + x) * sx is often a whole number computed in floating point
    return (
        max(0, math.floor((x0 + x) * sx + eps)),
        max(0, math.floor((y0 + y) * sy + eps)),
        min(width, math.ceil((x1 + x) * sx - eps)),
        min(height, math.ceil((y1 + y) * sy - eps)),
    )


# ------------------------------------------------------------------------------------ images


def _checked(path: str | Path) -> Path:
    """`path` as a Path after the checks every loader shares. Raises InputError."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a file")
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty")
    return path


def _cover_box(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Extract's resize as integers: ((w, h) scaled size, (x, y) of the size² crop).

    ffmpeg's `force_original_aspect_ratio=increase` makes the short side `size` and rounds the
    long one half up (`av_rescale`); `crop` centres with `lrint`, which takes a half offset to
    the even neighbour, as Python's `round` does.
    """
    w = max(size, (size * width + height // 2) // height)
    h = max(size, (size * height + width // 2) // width)
    return (w, h), (round((w - size) / 2), round((h - size) / 2))


def _image(path: Path, cfg: ExtractConfig, strict: bool = True) -> np.ndarray:
    """A still image via Pillow as (S, S, 3) uint8. With strict=False an unidentified file
    raises Pillow's UnidentifiedImageError so that the caller can try ffmpeg."""
    from PIL import Image

    img = _open_image(path, strict)
    s = cfg.image_size
    (w, h), (x, y) = _cover_box(img.width, img.height, s)
    if w * h > MAX_SCALED_PIXELS:  # a 1 x 200,000 strip is small, but not once scaled up
        raise InputError(
            f"{path} is {img.width}x{img.height} pixels, too elongated to scale to a {s}x{s} frame"
        )
    img = _rgb(img)
    img = img.resize((w, h), Image.Resampling.BICUBIC).crop((x, y, x + s, y + s))
    return _stored_frame(np.asarray(img, dtype=np.uint8), cfg)


def _open_image(path: Path, strict: bool = True) -> Image.Image:
    """A still image decoded by Pillow, EXIF rotation applied. Raises InputError, or Pillow's
    UnidentifiedImageError with strict=False."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that, then decodes anyway.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                img = ImageOps.exif_transpose(opened)  # phone photos store rotation in EXIF
                img.load()
    except UnidentifiedImageError:
        if not strict:
            raise
        # Pillow also refuses zero-size images here, whatever the format.
        raise InputError(f"{path} is not a readable image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{path} is too large an image to read safely (over {Image.MAX_IMAGE_PIXELS:,} pixels)"
        ) from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        reason = str(err).replace(str(path), path.name).replace("\n", " ")
        raise InputError(f"{path} is not a readable image ({reason})") from None
    return img


def _rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparent parts over white, 16-bit grey scaled down."""
    from PIL import Image

    if img.mode.startswith("I"):  # I;16 (16-bit PNG) or I: Pillow's convert clips at 255
        grey = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


# ------------------------------------------------------------------------------------ ffmpeg


@dataclass(frozen=True)
class _Media:
    """One ffmpeg decode: frame (S, S, 3) uint8 and wave (T,) float32 mono, each when asked."""

    frame: np.ndarray | None
    wave: np.ndarray | None


def _command(
    path: Path,
    cfg: ExtractConfig,
    video: bool,
    span_s: float | None,
    audio_path: Path | None,
    frames: int = 1,
) -> list[str]:
    """`decode.ffmpeg_command` with either stream optional: with `video`, the middle frame of
    D = `span_s` (`fps=1/D`; None keeps every frame; `frames` = N: extract's N frames of
    `fps=N/D`) to stdout; with `audio_path`, mono f32le.

    The input options, filters and audio arguments are extract's, so both decode the same
    pixels and samples (tests/test_inputs.py holds them equal).
    """
    cmd = decode.input_args(path, cfg, loglevel="info")
    if video:
        if span_s is None:
            cmd += ["-map", "0:V:0", "-vf", decode.video_filter(cfg, None)]
        else:
            rate = decode.fps_fraction(frames, span_s)
            cmd += ["-map", "0:V:0", "-vf", decode.video_filter(cfg, rate)]
            cmd += ["-frames:v", str(frames)]
        cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    if audio_path is not None:
        cmd += decode.audio_args(cfg, audio_path)
    return cmd


def _run(
    path: Path,
    cfg: ExtractConfig,
    video: bool,
    span_s: float | None,
    sound: bool,
    frames: int = 1,
) -> decode.FfmpegRun:
    """Run `_command` (audio through a temporary file, as extract does). Raises InputError on
    a timeout."""
    return decode.run_ffmpeg(
        lambda audio_path: _command(path, cfg, video, span_s, audio_path, frames),
        path,
        cfg.image_size,
        sound=sound,
        on_timeout=lambda: InputError(
            f"{path} took over {decode.DECODE_TIMEOUT_S:.0f} s to decode"
        ),
    )


def _decode(path: Path, cfg: ExtractConfig, video: bool, sound: bool) -> _Media:
    """Decode the middle frame and/or the audio of `path` the way extract does.

    As in `decode.decode_with_header`, the header comes from the same run's log, the first pass
    assumes D = clip_seconds and a file whose header says it is shorter is decoded again with its
    own D. When the fps pass yields no frame (the header has no duration, or overstates it), one
    more pass keeps every frame of the first clip_seconds and takes the middle one.
    Raises InputError.
    """
    run = _run(path, cfg, video, cfg.clip_seconds, sound)
    info = media.parse_probe(run.stderr)
    if info is None:
        what = "video" if video and sound else "image or video" if video else "audio or video"
        raise InputError(f"{path} is not a readable {what} file (ffmpeg: {run.failure()})")
    if video and not info.has_video:
        raise InputError(f"{path} has no video stream")
    if sound and not info.has_audio:
        raise InputError(f"{path} has no audio stream")
    short = info.duration_s is not None and round(info.duration_s, 3) < cfg.clip_seconds
    if video and short and run.returncode == 0:
        run = _run(path, cfg, video, info.duration_s, sound)
    if run.returncode != 0:
        raise InputError(f"{path} could not be decoded (ffmpeg: {run.failure()})")
    if sound:
        assert run.wave is not None
        if run.wave.size == 0:
            raise InputError(f"{path} contains no audio samples")
    _check_length(path, cfg, info, run, sound)
    wave, frame = run.wave, None
    if video:
        frames = run.frames
        if len(frames) == 0:
            every = _run(path, cfg, True, None, False)
            if every.returncode != 0:
                raise InputError(f"{path} could not be decoded (ffmpeg: {every.failure()})")
            # fps=1/D keeps the last frame before D/2, which is index (k - 1) // 2 of k frames.
            frames = every.frames[max(0, (len(every.frames) - 1) // 2) :]
        if len(frames) == 0:
            raise InputError(f"{path} has no video frame that can be decoded")
        frame = frames[0].copy()
    if sound:
        assert wave is not None
        peak = float(np.max(np.abs(wave)))
        if not peak >= SILENCE_PEAK:  # also catches NaN
            raise InputError(f"{path} is silent (audio peak {peak:.1e}, below {SILENCE_PEAK:.0e})")
    return _Media(frame, wave)


def _check_length(
    path: Path,
    cfg: ExtractConfig,
    info: media.Probe,
    run: decode.FfmpegRun,
    sound: bool,
) -> None:
    """Extract's truncation rule on the file of `run` (and its minimum length on a sound).

    The rule weighs the audio against extract's `num_frames` frames of `fps=N/D`: the audio is
    decoded here when `run` has none, those frames only when the audio alone would fail it.
    A file without audio is never called truncated (extract takes no such file). Raises
    InputError.
    """
    span = min(info.duration_s or cfg.clip_seconds, cfg.clip_seconds)
    n = cfg.num_frames
    try:
        if info.has_audio:
            samples = (
                run.wave.size
                if run.wave is not None
                else _run(path, cfg, False, span, True).wave.size
            )
            frames = None
            if info.has_video:
                try:
                    decode.check_truncation(cfg, info.duration_s, samples, 0, n)
                    frames = n  # the audio alone clears it
                except decode.ClipError:
                    frames = len(_run(path, cfg, True, span, False, frames=n).frames)
            decode.check_truncation(cfg, info.duration_s, samples, frames, n)
        if sound:
            decode.check_min_length(cfg, run.wave.size)
    except decode.ClipError as err:
        what = "too short: " if err.reason == "too_short" else ""
        raise InputError(f"{path} is {what}{err.detail}") from None


def _stored_frame(frame: np.ndarray, cfg: ExtractConfig) -> np.ndarray:
    """(S, S, 3) uint8 after the JPEG round trip of extract's shards, decoded as `decode_row`
    does, so the tokenizers see the same compression artefacts as in training."""
    from PIL import Image

    jpeg = decode.jpeg_bytes(np.ascontiguousarray(frame), cfg.jpeg_quality)
    return np.asarray(Image.open(_stdio.BytesIO(jpeg)).convert("RGB"))


def _mel(wave: np.ndarray, cfg: ExtractConfig) -> np.ndarray:
    """`audio.log_mel` rounded through float16 as extract stores it: (n_mels, mel_frames) f32."""
    return audio.log_mel(wave, cfg).astype(np.float16).astype(np.float32)
