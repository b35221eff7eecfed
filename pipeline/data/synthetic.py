"""The procedural audio-visual dataset: eight classes of moving shapes paired with sounds.

Each class pairs a visual signature (shape, colour, texture, motion, and a scene: the background's
hue) with a sound signature (pitch band, rhythm, timbre, noise band), and the two are tied inside a
clip as well: the sound's events happen when the picture's events do (a ball's thump when it
touches the floor, a chirp when the ring pulses), and what one frame shows sets part of the sound
(a bigger object sounds lower, denser rain hisses louder). Every clip varies within its class
(position, size, background shade and texture, motion phase, pitch, onset times, loudness,
background noise), so image-to-audio is learnable but not a lookup.

The scene matters for the demo: as in VGGSound, where a frame's surroundings (water, a road, a
stage) say as much about the sound as its subject, the background covers most of a frame and so
most of its 16x16 image ids. With backgrounds of any hue, one frame's ids told the class apart
only 39% of the time (nearest centroid of id histograms); the object alone is a handful of ids.

Each class is one `SynthClass` object in `pipeline.data.synthetic_classes`: its signature as data
and its drawing and sound together. This module names the clips (`ClipSpec`, `clip_specs`),
renders one from its class (`render_clip`), encodes it and writes the dataset.

Clips are rendered with numpy (frames and waveform, deterministic from the seed and the clip id)
and encoded by one ffmpeg process per clip into a real 10-second MP4 (H.264 + AAC), so that every
later stage decodes real files. `render_clip` gives the arrays without encoding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from pipeline import io
from pipeline.config import SyntheticConfig
from pipeline.data import synthetic_classes
from pipeline.data.download import select_clips
from pipeline.data.manifest import ClipRecord, video_path
from pipeline.data.synthetic_classes import CLASSES, Canvas, SynthClass, background, band_noise
from pipeline.media import MediaError, ffmpeg_exe, probe

log = logging.getLogger(__name__)

SOURCE = "synthetic"
SPLITS = ("train", "test")
# Beside the manifest: the settings the clips in the folder were made with. The clips folder
# persists across DVC runs, so a clip is reused only while seed, settings and code are the same.
SETTINGS_NAME = "synthetic.json"
# The code a clip's content follows from: this module and its classes (`made_with` hashes both).
CODE = (__file__, synthetic_classes.__file__)

# x264 with one thread is deterministic; bitexact flags and no metadata keep the encoder's
# version string and timestamps out of the file, so one machine always writes the same bytes.
VIDEO_CODEC = [
    "-c:v",
    "libx264",
    "-preset",
    "veryfast",
    "-crf",
    "23",
    "-pix_fmt",
    "yuv420p",
    "-threads",
    "1",
    "-g",
    "60",
]
AUDIO_CODEC = ["-c:a", "aac", "-b:a", "64k", "-ac", "1"]
BITEXACT = [
    "-fflags",
    "+bitexact",
    "-flags:v",
    "+bitexact",
    "-flags:a",
    "+bitexact",
    "-map_metadata",
    "-1",
    "-movflags",
    "+faststart",
]

# Frames are drawn this many at a time: vectorised, yet a moving object's box over the chunk
# stays small and a 30-s HD clip stays within memory.
FRAME_CHUNK = 8


_CLIP_ID = re.compile(r"synth-c(\d{2})-(train|test)-(\d{4,})_000000")


class ClipSpec(NamedTuple):
    """Which clip: the class, the split and the index within class and split."""

    class_index: int
    split: str
    index: int

    @property
    def clip_id(self) -> str:
        return f"synth-c{self.class_index:02d}-{self.split}-{self.index:04d}_000000"

    @property
    def label(self) -> str:
        return CLASSES[self.class_index].label


class ClipArrays(NamedTuple):
    """A rendered clip: frames (T, H, W, 3) uint8 and mono audio (N,) float32 in [-1, 1]."""

    frames: np.ndarray
    audio: np.ndarray


def parse_clip_id(clip_id: str) -> ClipSpec:
    """The `ClipSpec` of a synthetic clip id such as `synth-c03-train-0007_000000`."""
    m = _CLIP_ID.fullmatch(clip_id)
    if not m or int(m[1]) >= len(CLASSES):
        raise ValueError(f"{clip_id!r} is not a synthetic clip id")
    return ClipSpec(int(m[1]), m[2], int(m[3]))


def clip_specs(cfg: SyntheticConfig) -> list[ClipSpec]:
    """Every clip of the dataset, interleaved so that any prefix is balanced over classes.

    Order: index 0 of every class in train, then in test, then index 1, and so on; taking the
    first `limit` clips therefore keeps the classes (and splits) as even as possible.
    """
    specs = []
    for index in range(max(cfg.train_per_class, cfg.test_per_class)):
        for split, per_class in (("train", cfg.train_per_class), ("test", cfg.test_per_class)):
            if index < per_class:
                specs.extend(ClipSpec(c, split, index) for c in range(cfg.num_classes))
    return specs


# -------------------------------------------------------------------------------------- rendering


def _clip_rng(spec: ClipSpec, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, spec.class_index, SPLITS.index(spec.split), spec.index])


def _to_uint8(rgb: np.ndarray, out: np.ndarray) -> None:
    """Write float RGB in [0, 1] into the uint8 array `out` (rounded, clipped)."""
    scaled = rgb * np.float32(255)
    np.clip(scaled + np.float32(0.5), 0, 255, out=scaled)
    np.copyto(out, scaled, casting="unsafe")


def _render_frames(synth: SynthClass, p: dict, cv: Canvas, times: np.ndarray) -> np.ndarray:
    """All frames (T, H, W, 3) uint8: the background, with the object drawn chunk by chunk.

    Each chunk (a few frames) is drawn only inside the box that its object can touch during
    the chunk (`SynthClass.extent`): the same pixels as drawing the whole frame, at a fraction of
    the cost.
    """
    bg = background(cv, p)
    frames = np.empty((len(times), cv.height, cv.width, 3), np.uint8)
    _to_uint8(bg, frames[0])
    frames[1:] = frames[0]
    for start in range(0, len(times), FRAME_CHUNK):
        t = times[start : start + FRAME_CHUNK]
        top, bottom, left, right = synth.extent(p, t, cv.aspect)
        # the box in pixels, one pixel wider on each side for the anti-aliased edge
        rows = slice(max(0, int(top * cv.height) - 1), max(0, int(np.ceil(bottom * cv.height)) + 1))
        cols = slice(max(0, int(left * cv.height) - 1), max(0, int(np.ceil(right * cv.height)) + 1))
        crop = cv.crop(rows, cols)
        if crop.y.size and crop.x.size:
            _to_uint8(
                synth.draw(p, crop, t, bg[rows, cols]), frames[start : start + len(t), rows, cols]
            )
    return frames


def render_clip(cfg: SyntheticConfig, clip: ClipSpec | str, *, seed: int) -> ClipArrays:
    """Render one clip's frames and audio without encoding; the same seed gives the same arrays.

    `clip` is a `ClipSpec` or a synthetic clip id. Returns frames (T, H, W, 3) uint8 with
    T = round(duration_s * fps), and audio (N,) float32 at cfg.sample_rate with
    N = round(duration_s * sample_rate).
    """
    spec = parse_clip_id(clip) if isinstance(clip, str) else clip
    if not 0 <= spec.class_index < cfg.num_classes:
        raise ValueError(f"class {spec.class_index} is outside the {cfg.num_classes} classes")
    rng = _clip_rng(spec, seed)
    synth = CLASSES[spec.class_index]
    p = synth.params(rng, cfg)

    times = np.arange(int(round(cfg.duration_s * cfg.fps)), dtype=np.float32) / cfg.fps
    frames = _render_frames(synth, p, Canvas(cfg.width, cfg.height), times)

    sr, n = cfg.sample_rate, int(round(cfg.duration_s * cfg.sample_rate))
    audio = synth.audio(p, rng, n, sr) * 10 ** (p["gain_db"] / 20)
    noise = band_noise(rng, n, sr, 30, sr / 2, tilt=p["noise_tilt"])
    audio = audio + noise * 10 ** (p["noise_db"] / 20)
    return ClipArrays(frames, np.clip(audio, -1.0, 1.0).astype(np.float32))


# --------------------------------------------------------------------------------------- encoding


def encode_clip(arrays: ClipArrays, out: Path, cfg: SyntheticConfig) -> None:
    """Encode frames + audio into an MP4 at `out` with one ffmpeg process. Raises `MediaError`.

    Frames go through stdin as raw rgb24; the audio through a temporary raw float32 file beside
    `out` (named like every temporary, so an interrupted run's leftovers are cleaned up).
    """
    raw_audio = out.with_name(out.name + ".f32")
    try:
        arrays.audio.astype("<f4").tofile(raw_audio)
        cmd = [
            ffmpeg_exe(),
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{cfg.width}x{cfg.height}",
            "-r",
            str(cfg.fps),
            "-i",
            "pipe:0",
            "-f",
            "f32le",
            "-ar",
            str(cfg.sample_rate),
            "-ac",
            "1",
            "-i",
            str(raw_audio),
            "-map",
            "0:v:0",
            "-map",
            "1:a:0",
            *VIDEO_CODEC,
            *AUDIO_CODEC,
            *BITEXACT,
            "-f",
            "mp4",
            str(out),
        ]
        proc = subprocess.run(cmd, input=arrays.frames.tobytes(), capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise MediaError(f"ffmpeg took over 600 s to encode {out.name}") from None
    finally:
        raw_audio.unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"]
        raise MediaError(f"ffmpeg failed with exit code {proc.returncode}: {lines[-1]}")


def _make_clip(
    cfg: SyntheticConfig, clips_dir: Path, spec: ClipSpec, seed: int, attempts: int
) -> ClipRecord:
    """Render, encode, verify and move one clip into place; failures become a record."""
    rel = video_path(spec.clip_id)
    record = ClipRecord(
        clip_id=spec.clip_id,
        source=SOURCE,
        label=spec.label,
        split=spec.split,
        attempts=attempts + 1,
    )
    try:
        arrays = render_clip(cfg, spec, seed=seed)
        with io.atomic_path(clips_dir / rel) as tmp:
            encode_clip(arrays, tmp, cfg)
            info = probe(tmp)
            if not (info.has_video and info.has_audio and info.duration_s):
                raise MediaError(f"{spec.clip_id}: the encoded file lacks a video or audio stream")
    except (MediaError, OSError) as err:
        record.status, record.error = "other", str(err)
        return record
    record.status, record.path = "ok", rel
    record.size_bytes = (clips_dir / rel).stat().st_size
    record.duration_s = float(info.duration_s)
    return record


def _reusable(record: ClipRecord | None, clips_dir: Path) -> bool:
    return (
        record is not None
        and record.status == "ok"
        and record.source == SOURCE
        and bool(record.path)
        and (clips_dir / record.path).is_file()
    )


def made_with(cfg: SyntheticConfig, seed: int) -> dict:
    """What decides a clip's content: the seed, the settings and the code that renders it."""
    digest = hashlib.sha256()
    for path in CODE:
        digest.update(Path(path).read_bytes())
    code = digest.hexdigest()[:16]
    return {"seed": seed, "settings": dataclasses.asdict(cfg), "code_sha256": code}


def _settings_changed(clips_dir: Path, settings: dict) -> bool:
    try:
        return io.read_json(clips_dir / SETTINGS_NAME) != settings
    except (OSError, ValueError):
        return True


def _forget(clips_dir: Path, previous: list[ClipRecord]) -> int:
    """Delete the videos of the previous synthetic records; returns how many there were."""
    count = 0
    for record in previous:
        if record.source == SOURCE and record.path:
            path = io.inside(clips_dir, record.path)
            if path.is_file():
                path.unlink()
                count += 1
    return count


def generate_dataset(
    cfg: SyntheticConfig,
    clips_dir: Path,
    *,
    seed: int,
    splits: tuple[str, ...],
    classes: tuple[str, ...],
    limit: int,
    previous: list[ClipRecord],
    workers: int = 0,
) -> list[ClipRecord]:
    """Write the selected synthetic clips as MP4s under `clips_dir` and return their records.

    `splits` and `classes` (labels; empty: all) filter the clips, then `limit` (0: all) keeps a
    class-balanced prefix (see `clip_specs`). A clip whose file exists and whose record in
    `previous` is ok is kept as it is, as long as `SETTINGS_NAME` in the folder says that the
    same seed, settings and code made it (otherwise the previous videos are deleted first);
    every other selected clip is rendered and encoded, in `workers` threads (0: one per core),
    each running one ffmpeg. Returns one record per selected clip, in selection order; a clip
    that failed has status "other" and the error.
    """
    clips_dir = Path(clips_dir)
    specs = select_clips(
        clip_specs(cfg), splits=splits, classes=classes, limit=limit, source="the synthetic set"
    )
    clips_dir.mkdir(parents=True, exist_ok=True)
    stale = io.remove_stale_temporaries(clips_dir)
    if stale:
        log.info("removed %d temporaries of an interrupted run", stale)
    settings = made_with(cfg, seed)
    if _settings_changed(clips_dir, settings):
        # before the new settings are recorded, so that no old clip can pass for a new one
        removed = _forget(clips_dir, previous)
        if removed:
            log.info("synthetic: seed, settings or code changed; deleted %d old clips", removed)
        io.write_json(clips_dir / SETTINGS_NAME, settings)
        previous = []
    before = {r.clip_id: r for r in previous}
    done: dict[str, ClipRecord] = {}
    todo = []
    for spec in specs:
        old = before.get(spec.clip_id)
        if _reusable(old, clips_dir):
            done[spec.clip_id] = old
        else:
            todo.append((spec, old.attempts if old else 0))
    if todo:
        threads = min(workers or os.cpu_count() or 1, len(todo))
        with (
            ThreadPoolExecutor(threads) as pool,
            tqdm(total=len(todo), desc="synthetic clips", unit="clip") as bar,
        ):
            futures = [
                pool.submit(_make_clip, cfg, clips_dir, spec, seed, attempts)
                for spec, attempts in todo
            ]
            for future in as_completed(futures):
                record = future.result()
                done[record.clip_id] = record
                if record.status != "ok":
                    log.warning("%s: %s", record.clip_id, record.error)
                bar.update()
    log.info(
        "synthetic: %d clips selected, %d reused, %d written, %d failed",
        len(specs),
        len(specs) - len(todo),
        sum(done[s.clip_id].status == "ok" for s, _ in todo),
        sum(done[s.clip_id].status != "ok" for s, _ in todo),
    )
    return [done[spec.clip_id] for spec in specs]
