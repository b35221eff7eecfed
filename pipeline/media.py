"""The ffmpeg binary and a header-only probe of a media file.

The system ffmpeg is used when there is one; otherwise the binary that ships inside the
`imageio-ffmpeg` wheel, so that no set-up step needs root. ffprobe is not required: the probe
reads the stream header that `ffmpeg -i` prints.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError


class MediaError(PipelineError):
    """A media file that cannot be used; the message says why in one sentence."""


@functools.cache
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: $PATH first, then the imageio-ffmpeg wheel's."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:  # pragma: no cover - a dependency of the package
        raise MediaError("no ffmpeg on PATH and imageio-ffmpeg is not installed") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


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
    """`python -m pipeline.media --check`: say which ffmpeg is used, fail if none runs."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--check"]:
        print("usage: python -m pipeline.media --check", file=sys.stderr)
        return 2
    try:
        exe = ffmpeg_exe()
        out = subprocess.run([exe, "-version"], capture_output=True, check=True, timeout=30).stdout
    except (MediaError, OSError, subprocess.SubprocessError) as err:
        print(f"error: ffmpeg does not run: {err}", file=sys.stderr)
        return 1
    print(f"ffmpeg: {exe} ({out.decode().splitlines()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
