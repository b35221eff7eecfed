"""The ffmpeg binary and a header-only probe of a media file.

Every stage runs one ffmpeg: the binary inside the `imageio-ffmpeg` wheel, whose version the
locks pin, so that a laptop, CI and the cluster image decode a clip to the same samples (builds
of different versions and libraries do not: Debian's ffmpeg 5.1 gives a 3-s AAC clip 66,560
samples where this one gives 66,150). An ffmpeg on PATH is never picked up by itself; set
VISUAL_ECHOES_FFMPEG to a path (or a command name on PATH) to use another. Either way its
version line is what extract's meta.json and every stage's MLflow run record. No set-up step
needs root, and ffprobe is not required: the probe reads the stream header `ffmpeg -i` prints.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError


class MediaError(PipelineError):
    """A media file that cannot be used; the message says why in one sentence."""


FFMPEG_ENV = "VISUAL_ECHOES_FFMPEG"  # another ffmpeg than the pinned one, on request


@functools.cache
def ffmpeg_exe() -> str:
    """Path of the ffmpeg every stage runs: $VISUAL_ECHOES_FFMPEG when set (a path, or a name
    looked up on PATH), else the binary inside the imageio-ffmpeg wheel. Raises `MediaError`
    when the one asked for is not there."""
    asked = os.environ.get(FFMPEG_ENV, "").strip()
    if asked:
        found = shutil.which(asked)
        if found is None:
            raise MediaError(f"{FFMPEG_ENV}={asked} is not an executable file")
        return str(Path(found).resolve())
    return _wheel_ffmpeg()


def _wheel_ffmpeg() -> str:
    """The imageio-ffmpeg wheel's own binary. Not `imageio_ffmpeg.get_ffmpeg_exe()`: that
    prefers $IMAGEIO_FFMPEG_EXE and falls back to an ffmpeg on PATH, the very thing avoided."""
    import imageio_ffmpeg

    folder = Path(imageio_ffmpeg.__file__).parent / "binaries"
    found = sorted(p for p in folder.glob("ffmpeg*") if p.is_file() and os.access(p, os.X_OK))
    if not found:
        raise MediaError(
            f"the imageio-ffmpeg {imageio_ffmpeg.__version__} install has no ffmpeg binary for "
            f"this platform; set {FFMPEG_ENV} to an ffmpeg to use"
        )
    return str(found[0])


def ffmpeg_source() -> str:
    """Where `ffmpeg_exe` comes from, in words: the wheel, or the variable that chose it."""
    if os.environ.get(FFMPEG_ENV, "").strip():
        return f"chosen by {FFMPEG_ENV}"
    return "pinned, from the imageio-ffmpeg wheel"


@functools.cache
def ffmpeg_version() -> str:
    """First line of `ffmpeg -version` of `ffmpeg_exe()`, e.g. 'ffmpeg version n9.0.2-...'.
    Raises `MediaError` when it does not run."""
    exe = ffmpeg_exe()
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise MediaError(f"ffmpeg {exe} does not run ({type(err).__name__})") from None
    first = (out.stdout.decode("utf-8", "replace").splitlines() or [""])[0]
    if not first.startswith("ffmpeg version"):
        raise MediaError(f"{exe} is not ffmpeg (`-version` printed {first[:60]!r})")
    return first.split(" Copyright")[0].strip()


@dataclass(frozen=True)
class Probe:
    """What the container header says about a file."""

    duration_s: float | None
    has_video: bool
    has_audio: bool
    width: int | None
    height: int | None
    fps: float | None
    audio_channels: str | None


_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_VIDEO = re.compile(r"Stream #\S+.*?: Video: .*?(\d{2,5})x(\d{2,5})")
_FPS = re.compile(r"([\d.]+) (?:fps|tbr)")
_AUDIO = re.compile(r"Stream #\S+.*?: Audio: [^,]+, \d+ Hz, ([^,]+)")


def probe(path: str | Path, timeout_s: float = 30.0) -> Probe:
    """Read the header of `path` with `ffmpeg -i` (no decoding). Raises `MediaError`."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise MediaError(f"{path} is empty")
    # "-i" then an absolute path: a file name starting with "-" can never read as an option.
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path.resolve())]
    try:
        err = subprocess.run(cmd, capture_output=True, timeout=timeout_s).stderr.decode(
            "utf-8", "replace"
        )
    except subprocess.TimeoutExpired:
        raise MediaError(f"{path} took over {timeout_s:.0f} s to open") from None
    info = parse_probe(err)
    if info is None:
        last = err.strip().splitlines()[-1] if err.strip() else "no streams"
        raise MediaError(f"{path.name} is not a readable media file ({last})")
    return info


def parse_probe(text: str) -> Probe | None:
    """The input header that ffmpeg prints (at log level info) as a `Probe`; None if no streams.

    Only the text before the output section counts, since outputs list streams too.
    """
    head = re.split(r"^(?:Stream mapping:|Output #)", text, maxsplit=1, flags=re.M)[0]
    streams = [line for line in head.splitlines() if "Stream #" in line]
    if not streams:
        return None
    duration = None
    if m := _DURATION.search(head):
        duration = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    video = next((s for s in streams if ": Video: " in s and "attached pic" not in s), None)
    audio = next((s for s in streams if ": Audio: " in s), None)
    width = height = fps = None
    if video and (m := _VIDEO.search(video)):
        width, height = int(m[1]), int(m[2])
    if video and (m := _FPS.search(video)):
        fps = float(m[1])
    channels = m[1].strip() if audio and (m := _AUDIO.search(audio)) else None
    return Probe(duration, video is not None, audio is not None, width, height, fps, channels)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.media --check`: say which ffmpeg is used, fail if it does not run."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--check"]:
        print("usage: python -m pipeline.media --check", file=sys.stderr)
        return 2
    try:
        print(f"ffmpeg: {describe_ffmpeg()}")
    except MediaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def describe_ffmpeg() -> str:
    """'<path> (<version line>; <source>)', for `check` commands. Raises `MediaError`."""
    return f"{ffmpeg_exe()} ({ffmpeg_version()}; {ffmpeg_source()})"


if __name__ == "__main__":
    sys.exit(main())
