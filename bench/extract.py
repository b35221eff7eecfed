"""Benchmark: the extract stage's per-clip work against a bare ffmpeg decode of the same clips.

    .venv/bin/python bench/extract.py [--clips 8] [--image-size 64] [--repeat 2]

Makes synthetic 10-s H.264/AAC clips (testsrc2 + sine) at two sizes, then times, in this one
process (so per core), `extract_clip` (probe + one ffmpeg pass + checks + JPEG + mel) and the
floor: one `ffmpeg -i clip` that decodes every frame to raw RGB and the audio to mono f32 PCM at
22,050 Hz, nothing else. Both ffmpeg calls use one decoder thread. Target: extract <= 1.5x bare.
CPU seconds count this process and its ffmpeg children.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pipeline.config import ExtractConfig, load_params
from pipeline.data import decode
from pipeline.media import ffmpeg_exe

FORMATS = {"192x144@15": ("192x144", 15), "320x240@25": ("320x240", 25)}


def make_clips(folder: Path, count: int) -> dict[str, list[Path]]:
    """`count` 10-s clips per format (each with its own tone so no two are identical)."""
    clips: dict[str, list[Path]] = {}
    for name, (size, rate) in FORMATS.items():
        clips[name] = []
        for i in range(count):
            path = folder / f"{name.replace('@', '_')}_{i}.mp4"
            subprocess.run(
                [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
                 "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}",
                 "-f", "lavfi", "-i", f"sine=frequency={220 + 40 * i}:sample_rate=44100",
                 "-t", "10", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
                 "-shortest", str(path)],
                check=True,
            )  # fmt: skip
            clips[name].append(path)
    return clips


def bare_decode(path: Path, sample_rate: int) -> int:
    """Decode every frame to rgb24 and the audio to mono f32le, both to a pipe; bytes read."""
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-threads", "1",
        "-i", str(path.resolve()),
        "-map", "0:v:0", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
        "-map", "0:a:0", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "pipe:1",
    ]  # fmt: skip
    return len(subprocess.run(cmd, capture_output=True, check=True).stdout)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn: Callable[[Path], object], paths: list[Path], repeat: int) -> tuple[float, float]:
    """(wall, cpu) seconds per clip, best of `repeat` passes over `paths`."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        wall0, cpu0 = time.perf_counter(), cpu_seconds()
        for p in paths:
            fn(p)
        wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
        best = min(best, (wall / len(paths), cpu / len(paths)))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8, help="clips per format")
    parser.add_argument("--image-size", type=int, default=0, help="0: params.yaml's")
    parser.add_argument("--repeat", type=int, default=2, help="passes; the best one counts")
    args = parser.parse_args()
    cfg: ExtractConfig = load_params().extract
    if args.image_size:
        cfg = replace(cfg, image_size=args.image_size)

    with tempfile.TemporaryDirectory() as tmp:
        clips = make_clips(Path(tmp), args.clips)
        warm = clips[next(iter(clips))][0]
        decode.extract_clip(warm, cfg)  # imports, mel basis
        bare_decode(warm, cfg.sample_rate)
        print(
            f"ffmpeg: {decode.ffmpeg_version()}; {os.cpu_count()} cores; "
            f"image_size {cfg.image_size}, {cfg.num_frames} frames, mel "
            f"{cfg.n_mels}x{cfg.mel_frames}; {args.clips} clips per format, best of "
            f"{args.repeat}"
        )
        header = (
            f"{'format':<12}{'extract ms':>12}{'(cpu)':>8}{'bare ms':>10}{'(cpu)':>8}"
            f"{'ratio':>7}{'ratio cpu':>10}{'extract clips/s/core':>22}"
        )
        print(header)
        for name, paths in clips.items():
            ext_wall, ext_cpu = timed(lambda p: decode.extract_clip(p, cfg), paths, args.repeat)
            bare_wall, bare_cpu = timed(
                lambda p: bare_decode(p, cfg.sample_rate), paths, args.repeat
            )
            print(
                f"{name:<12}{1000 * ext_wall:>12.1f}{1000 * ext_cpu:>8.1f}"
                f"{1000 * bare_wall:>10.1f}{1000 * bare_cpu:>8.1f}"
                f"{ext_wall / bare_wall:>7.2f}{ext_cpu / bare_cpu:>10.2f}"
                f"{1 / ext_cpu:>22.1f}"
            )


if __name__ == "__main__":
    main()
