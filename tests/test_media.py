"""pipeline.media: which ffmpeg the stages run. The default is the imageio-ffmpeg wheel's binary
whatever else is on PATH; another one only through VISUAL_ECHOES_FFMPEG. Each case runs in a
fresh process, since the choice is made once per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.media import FFMPEG_ENV, _wheel_ffmpeg

ROOT = Path(__file__).resolve().parents[1]

# Decodes a clip the way extract does and probes it, then says which ffmpeg did it.
CHILD = """
import sys
from pathlib import Path
from pipeline import media
from pipeline.config import load_params
from pipeline.data.extract import extract_clip
clip = Path(sys.argv[1])
assert media.probe(clip).has_audio
data = extract_clip(clip, load_params("params.yaml").extract)
print(media.describe_ffmpeg(), len(data.frames))
"""


def _fake(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def _clip(path: Path) -> Path:
    subprocess.run(
        [_wheel_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", "testsrc2=size=96x72:rate=10:duration=2",
         "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=2",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
         "-shortest", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    return path


def test_an_ffmpeg_on_path_is_never_used_by_default(tmp_path):
    marker = tmp_path / "fake-ffmpeg-ran"
    bin_dir = tmp_path / "bin"
    fake = _fake(bin_dir, "ffmpeg", f'touch "{marker}"; echo "fake ffmpeg on PATH" >&2; exit 3')
    env = {k: v for k, v in os.environ.items() if k != FFMPEG_ENV}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["IMAGEIO_FFMPEG_EXE"] = str(fake)  # imageio-ffmpeg's own override: ignored too
    proc = _run(["-c", CHILD, str(_clip(tmp_path / "clip.mp4"))], env)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), "the ffmpeg on PATH ran"
    assert proc.stdout.startswith(f"{_wheel_ffmpeg()} (ffmpeg version ")
    assert "pinned, from the imageio-ffmpeg wheel) 10" in proc.stdout


def test_visual_echoes_ffmpeg_chooses_another_and_is_checked(tmp_path):
    marker = tmp_path / "wrapper-ran"
    bin_dir = tmp_path / "bin"
    wrapper = _fake(bin_dir, "my-ffmpeg", f'touch "{marker}"; exec "{_wheel_ffmpeg()}" "$@"')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # A command name on PATH (decoding a clip), then a path (the check): used, said to be chosen.
    proc = _run(["-c", CHILD, str(_clip(tmp_path / "clip.mp4"))], {**env, FFMPEG_ENV: "my-ffmpeg"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{wrapper} (ffmpeg version ")
    assert f"chosen by {FFMPEG_ENV}) 10" in proc.stdout
    assert marker.exists()
    marker.unlink()
    proc = _run(["-m", "pipeline.media", "--check"], {**env, FFMPEG_ENV: str(wrapper)})
    assert proc.stdout.startswith(f"ffmpeg: {wrapper} (ffmpeg version ") and marker.exists()
    # What cannot be used is one sentence and exit 1, from the check and from a stage alike.
    broken = _fake(bin_dir, "broken", "exit 3")
    for asked, says in (
        (str(tmp_path / "nowhere"), f"{FFMPEG_ENV}={tmp_path / 'nowhere'} is not an executable"),
        (str(broken), f"ffmpeg {broken} does not run (CalledProcessError)"),
        ("true", "is not ffmpeg (`-version` printed '')"),
    ):
        proc = _run(["-m", "pipeline.media", "--check"], {**env, FFMPEG_ENV: asked})
        assert proc.returncode == 1 and says in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
