"""One clip through ffmpeg: N frames and the mono audio, and the rules a decoded clip must pass.

One ffmpeg process per clip decodes once: `fps=N/D` (D = min(duration, clip_seconds)) keeps the
last frame before the centre of each of N equal segments, then scale on the short side + centre
crop, raw RGB to stdout; the same process writes mono f32le audio at `sample_rate` to an unnamed
temporary file. The header (duration, streams, size) is read from that same run's log instead of a
separate `ffmpeg -i` probe, which would cost a second process start (~20-30 ms, a third of a small
clip's decode): the run assumes D = clip_seconds, and a clip whose header says it is shorter is
decoded once more with its own D.

Failure reasons (`REASONS`); a failed clip never stops the extract stage:
    unreadable   empty, not media, truncated (both streams stop well before the header's duration),
                 undecodable, or the path is missing / leaves clips_dir
    no_video     no video stream (cover art does not count)
    no_audio     no audio stream
    too_short    shorter than MIN_SECONDS (1 s) by header or by decoded audio
    silent       audio peak below SILENCE_PEAK (-60 dBFS) over the first clip_seconds
    error        anything unexpected (a split or clip id that is not a safe name, a bug); detail
                 holds the exception
Flags (`FLAGS`) on successful rows:
    black_frames every sampled frame is near-black (no pixel above BLACK_LEVEL)
    portrait     the video is taller than wide (the centre crop loses the top and bottom)
    looped_audio the audio was shorter than the part the kept mel frames see, so it was looped
    padded_frames fewer than num_frames frames decoded; the last one was repeated
The truncation, minimum-length and looping rules (`check_truncation`, `check_min_length`,
`loops_audio`) judge the clips of the extract stage and the inputs of the `visual-echoes`
commands (`pipeline.inference.inputs`) alike.
"""

from __future__ import annotations

import io as _stdio
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline import media
from pipeline.config import ExtractConfig
from pipeline.data import audio
from pipeline.media import Probe, ffmpeg_exe

REASONS = ("unreadable", "no_video", "no_audio", "too_short", "silent", "error")

FLAGS = ("black_frames", "portrait", "looped_audio", "padded_frames")

MIN_SECONDS = 1.0  # shorter clips cannot give N distinct frames or a meaningful mel

SILENCE_PEAK = 10 ** (-60 / 20)  # -60 dBFS: below this the clip has no usable sound

BLACK_LEVEL = 24  # a frame whose brightest pixel is at most this is near-black

TRUNCATED_FRACTION = 0.9  # decoded audio under 90% of the header's duration, frames missing too

DECODE_TIMEOUT_S = 300.0

JPEG_SETTINGS = {"format": "JPEG", "optimize": False, "progressive": False, "subsampling": 0}


class ClipError(Exception):
    """A clip that cannot be used: `reason` is one of REASONS, `detail` one sentence."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Decoded:
    """What one ffmpeg pass returns.

    frames: (k, S, S, 3) uint8, k <= num_frames (fewer when the video ends early).
    audio: (T,) float32 mono at sample_rate, T <= clip_seconds * sample_rate.
    """

    frames: np.ndarray
    audio: np.ndarray


@dataclass(frozen=True)
class ClipData:
    """One successful clip: `frames` num_frames JPEGs, `mel` (n_mels, mel_frames) float16."""

    frames: list[bytes]
    mel: np.ndarray
    flags: list[str]


def fps_fraction(num_frames: int, span_s: float) -> Fraction:
    """The `fps` filter rate N/D as an exact fraction (D rounded to milliseconds)."""
    span = Fraction(max(1, round(span_s * 1000)), 1000)
    return Fraction(num_frames) / span


def input_args(path: Path, cfg: ExtractConfig, loglevel: str = "error") -> list[str]:
    """ffmpeg up to its input: the first `clip_seconds` of `path`, one decoder thread (the
    stage runs one clip per core). Paths go in as `file:` + absolute path, so no name can read
    as an option or a protocol."""
    return [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", loglevel,
        "-threads", "1", "-t", f"{cfg.clip_seconds:g}", "-i", f"file:{path.resolve()}",
    ]  # fmt: skip


def video_filter(cfg: ExtractConfig, rate: Fraction | None) -> str:
    """`fps=rate` (None: every frame), then the short side scaled to `image_size` (bicubic)
    and a centre crop."""
    s = cfg.image_size
    scale = f"scale={s}:{s}:force_original_aspect_ratio=increase:flags=bicubic,crop={s}:{s}"
    return scale if rate is None else f"fps={rate.numerator}/{rate.denominator},{scale}"


def audio_args(cfg: ExtractConfig, audio_path: Path) -> list[str]:
    """The first audio stream, mono float32 at `sample_rate`, to `audio_path`."""
    return [
        "-map", "0:a:0", "-ac", "1", "-ar", str(cfg.sample_rate), "-c:a", "pcm_f32le",
        "-f", "f32le", "-y", f"file:{audio_path}",
    ]  # fmt: skip


def ffmpeg_command(
    path: Path, cfg: ExtractConfig, span_s: float, audio_path: Path, loglevel: str = "error"
) -> list[str]:
    """One decode pass: N frames (scaled, cropped, rgb24) to stdout, mono f32le to `audio_path`.

    `span_s` is D of `fps=N/D`. `-map 0:V:0` skips cover art.
    """
    rate = fps_fraction(cfg.num_frames, span_s)
    return [
        *input_args(path, cfg, loglevel),
        "-map", "0:V:0", "-vf", video_filter(cfg, rate), "-frames:v", str(cfg.num_frames),
        "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
        *audio_args(cfg, audio_path),
    ]  # fmt: skip


@dataclass(frozen=True)
class FfmpegRun:
    """One ffmpeg process: frames (k, S, S, 3) uint8 (whole frames only), the wave (T,) float32
    when asked for, and stderr with the input's absolute path shortened to its file name."""

    returncode: int
    frames: np.ndarray
    wave: np.ndarray | None
    stderr: str

    def failure(self) -> str:
        """ffmpeg's last log line, the one that says why it stopped."""
        lines = self.stderr.strip().splitlines()
        return lines[-1].strip() if lines else f"exit status {self.returncode}"


def run_ffmpeg(
    command: Callable[[Path | None], list[str]],
    path: Path,
    image_size: int,
    *,
    sound: bool,
    on_timeout: Callable[[], Exception],
) -> FfmpegRun:
    """Run `command(audio_path)` on `path`: raw RGB frames come on stdout, the wave (with `sound`)
    through a temporary float32 file. A run over DECODE_TIMEOUT_S raises `on_timeout()`; any
    other failure is in the returned run.

    The file is unlinked from the start (`tempfile.TemporaryFile`) and ffmpeg writes it through
    `/dev/fd/N`, so nothing is left on disk even when this process is killed mid-decode."""
    with (
        tempfile.TemporaryFile(prefix="ffmpeg-", suffix=".f32") if sound else nullcontext() as sink
    ):
        fds = (sink.fileno(),) if sink is not None else ()
        audio_path = Path(f"/dev/fd/{fds[0]}") if fds else None
        try:
            proc = subprocess.run(
                command(audio_path), capture_output=True, timeout=DECODE_TIMEOUT_S, pass_fds=fds
            )
        except subprocess.TimeoutExpired:
            raise on_timeout() from None
        wave = None
        if sink is not None:
            # Where /dev/fd/N shares this descriptor's offset (macOS), ffmpeg left it at the end.
            sink.seek(0)
            wave = np.fromfile(sink, dtype="<f4")
    frame = image_size * image_size * 3
    usable = len(proc.stdout) // frame * frame
    frames = np.frombuffer(proc.stdout[:usable], np.uint8).reshape(-1, image_size, image_size, 3)
    stderr = proc.stderr.decode("utf-8", "replace").replace(str(path.resolve()), path.name)
    return FfmpegRun(proc.returncode, frames, wave, stderr)


def _run_ffmpeg(path: Path, cfg: ExtractConfig, span_s: float, loglevel: str) -> FfmpegRun:
    """Run `ffmpeg_command`; raises ClipError("unreadable") only on a timeout."""
    return run_ffmpeg(
        lambda audio_path: ffmpeg_command(path, cfg, span_s, audio_path, loglevel),
        path,
        cfg.image_size,
        sound=True,
        on_timeout=lambda: ClipError("unreadable", f"decoding took over {DECODE_TIMEOUT_S:.0f} s"),
    )


def _failed(run: FfmpegRun) -> ClipError:
    return ClipError("unreadable", f"ffmpeg failed: {run.failure()}")


def _decoded(run: FfmpegRun, cfg: ExtractConfig) -> Decoded:
    assert run.wave is not None
    return Decoded(run.frames[: cfg.num_frames], run.wave)


def decode_clip(path: Path, cfg: ExtractConfig, duration_s: float | None) -> Decoded:
    """Decode `path` once with D = min(duration_s, clip_seconds) (clip_seconds when None).

    Raises ClipError("unreadable") when ffmpeg fails or times out.
    """
    span = min(duration_s or cfg.clip_seconds, cfg.clip_seconds)
    run = _run_ffmpeg(path, cfg, span, "error")
    if run.returncode != 0:
        raise _failed(run)
    return _decoded(run, cfg)


def decode_with_header(path: Path, cfg: ExtractConfig) -> tuple[Probe, Decoded]:
    """Decode `path` and read its header from the same ffmpeg run (no separate probe).

    The first pass assumes a full clip (D = clip_seconds); a clip whose header says it is
    shorter is decoded again with D = its duration, so frames still sit at segment centres.
    Raises ClipError for unreadable files, missing streams and clips under MIN_SECONDS.
    """
    if not path.is_file():
        raise ClipError("unreadable", "the file does not exist")
    if path.stat().st_size == 0:
        raise ClipError("unreadable", "the file is empty")
    run = _run_ffmpeg(path, cfg, cfg.clip_seconds, "info")
    info = media.parse_probe(run.stderr)
    if info is None:
        raise _failed(run) if run.returncode else ClipError("unreadable", "no media streams")
    if not info.has_video:
        raise ClipError("no_video", "the file has no video stream")
    if not info.has_audio:
        raise ClipError("no_audio", "the file has no audio stream")
    if info.duration_s is not None and info.duration_s < MIN_SECONDS:
        raise ClipError("too_short", f"{info.duration_s:.2f} s long (minimum {MIN_SECONDS:g} s)")
    if run.returncode != 0:
        raise _failed(run)
    if info.duration_s is not None and round(info.duration_s, 3) < cfg.clip_seconds:
        return info, decode_clip(path, cfg, info.duration_s)
    return info, _decoded(run, cfg)


def jpeg_bytes(frame: np.ndarray, quality: int) -> bytes:
    """One (S, S, 3) uint8 frame as baseline JPEG, 4:4:4, fixed settings (stable bytes)."""
    from PIL import Image

    buf = _stdio.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, quality=quality, **JPEG_SETTINGS)
    return buf.getvalue()


def check_truncation(
    cfg: ExtractConfig,
    duration_s: float | None,
    audio_samples: int,
    frames: int | None,
    wanted_frames: int,
) -> None:
    """The truncation rule on one decode of the first `clip_seconds`: `audio_samples` at
    `sample_rate`, `frames` of the `wanted_frames` the fps filter should give (None: the file
    has no video). Raises ClipError("unreadable").

    Truncated: every stream stops well before the header says it should, i.e. under
    TRUNCATED_FRACTION of D = min(duration_s, clip_seconds) of audio and fewer frames than
    wanted; a file without video is judged on its audio alone, and only if its header gives a
    duration.
    """
    seconds = audio_samples / cfg.sample_rate
    span = min(duration_s or cfg.clip_seconds, cfg.clip_seconds)
    if seconds >= TRUNCATED_FRACTION * span or (frames is not None and frames >= wanted_frames):
        return
    if frames is not None:
        detail = f"{seconds:.2f} s of audio and {frames} frames decode"
    elif duration_s is not None:
        detail = f"{seconds:.2f} s of audio decode"
    else:
        return
    raise ClipError("unreadable", f"truncated: the header says {span:.2f} s, {detail}")


def check_min_length(cfg: ExtractConfig, audio_samples: int) -> None:
    """The minimum-length rule: under MIN_SECONDS of audio raises ClipError("too_short")."""
    seconds = audio_samples / cfg.sample_rate
    if seconds < MIN_SECONDS:
        raise ClipError("too_short", f"{seconds:.2f} s of audio (minimum {MIN_SECONDS:g} s)")


def loops_audio(cfg: ExtractConfig, audio_samples: int) -> bool:
    """Whether a sound of `audio_samples` is looped to fill what the kept mel frames see (the
    `looped_audio` flag)."""
    return audio_samples < audio.geometry(cfg).samples_used


def _check_decoded(dec: Decoded, cfg: ExtractConfig, duration_s: float | None) -> None:
    """Reject truncated, too short or silent decodes. Raises ClipError."""
    if len(dec.frames) == 0:
        raise ClipError("unreadable", "no video frame could be decoded")
    check_truncation(cfg, duration_s, dec.audio.size, len(dec.frames), cfg.num_frames)
    check_min_length(cfg, dec.audio.size)
    peak = float(np.max(np.abs(dec.audio)))
    if not peak >= SILENCE_PEAK:  # also catches NaN
        raise ClipError("silent", f"audio peak {peak:.2e} is below {SILENCE_PEAK:.0e}")


def extract_clip(path: Path, cfg: ExtractConfig, rel: str = "") -> ClipData:
    """The whole per-clip work: decode (header from the same pass), check, encode.

    Returns num_frames JPEGs, the (n_mels, mel_frames) float16 mel and flags. Raises ClipError;
    `rel` is how the file is named in failure details (its name by default).
    """
    try:
        info, dec = decode_with_header(path, cfg)
        _check_decoded(dec, cfg, info.duration_s)
    except ClipError as err:
        raise ClipError(err.reason, err.detail.replace(path.name, rel or path.name)) from None
    frames = dec.frames
    flags = []
    if int(frames.max()) <= BLACK_LEVEL:
        flags.append("black_frames")
    if info.width and info.height and info.height > info.width:
        flags.append("portrait")
    if loops_audio(cfg, dec.audio.size):
        flags.append("looped_audio")
    if len(frames) < cfg.num_frames:
        flags.append("padded_frames")
        pad = np.repeat(frames[-1:], cfg.num_frames - len(frames), axis=0)
        frames = np.concatenate([frames, pad])
    mel = audio.log_mel(dec.audio, cfg).astype(np.float16)
    return ClipData([jpeg_bytes(f, cfg.jpeg_quality) for f in frames], mel, flags)
