"""Faults and odd inputs for the extract stage that tests/test_extract.py does not make: unusual
codecs and containers, stereo, tiny pictures, and the stage process killed with SIGKILL between
two chunks, then rerun: the output must be byte-identical to an uninterrupted run."""

from __future__ import annotations

import functools
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import ExtractConfig, load_params
from pipeline.data import decode, extract, extracted
from pipeline.data.manifest import ClipRecord, video_path, write_manifest
from pipeline.media import ffmpeg_exe

ROOT = Path(__file__).resolve().parents[1]
CFG = ExtractConfig(
    num_frames=10, image_size=32, jpeg_quality=90, sample_rate=22050, clip_seconds=10.0,
    n_fft=1024, hop_length=256, n_mels=80, fmin=125.0, fmax=7600.0, mel_frames=848,
    rows_per_shard=2, workers=1,
)  # fmt: skip


@functools.cache
def _encoders() -> str:
    return subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=30
    ).stdout


def _clip(
    out: Path,
    *,
    seconds: float = 10.0,
    size: str = "96x72",
    codecs: tuple[str, ...] = ("-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac"),
    layout: str = "mono",
    tone: int = 440,
) -> Path:
    """A lavfi clip (testsrc2 + a sine in `layout`) encoded with `codecs` into `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=10",
            "-f", "lavfi", "-i", f"sine=frequency={tone}:sample_rate=44100",
            "-t", f"{seconds}", "-af", f"aformat=channel_layouts={layout}", *codecs, str(out),
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out


CODECS = {  # clip id: (container, ffmpeg codec arguments, audio layout)
    "avi_mpeg4_mp3": ("avi", ("-c:v", "mpeg4", "-c:a", "libmp3lame"), "stereo"),
    "webm_vp9_opus": ("webm", ("-c:v", "libvpx-vp9", "-deadline", "realtime", "-c:a", "libopus"), "stereo"),
    "mov_mjpeg_pcm": ("mov", ("-c:v", "mjpeg", "-c:a", "pcm_s16le"), "stereo"),
    "mkv_ffv1_flac": ("mkv", ("-c:v", "ffv1", "-c:a", "flac"), "mono"),
    "mpg_mpeg2_mp2": ("mpg", ("-c:v", "mpeg2video", "-c:a", "mp2"), "stereo"),
    "mp4_hevc_ac3": ("mp4", ("-c:v", "libx265", "-preset", "ultrafast", "-c:a", "ac3"), "5.1"),
}  # fmt: skip


def _missing(codecs: tuple[str, ...]) -> list[str]:
    names = [codecs[i + 1] for i, a in enumerate(codecs) if a in ("-c:v", "-c:a")]
    return [n for n in names if f" {n} " not in _encoders()]


@pytest.fixture(scope="module")
def tone_band(tmp_path_factory) -> int:
    """The loudest mel band of a 1 kHz tone in a plain H.264/AAC clip."""
    data = decode.extract_clip(_clip(tmp_path_factory.mktemp("tone") / "ref.mp4", tone=1000), CFG)
    return int(np.argmax(data.mel.astype(np.float32).mean(axis=1)))


@pytest.mark.parametrize("clip_id", sorted(CODECS))
def test_unusual_codecs_and_containers_give_the_same_kind_of_row(tmp_path, clip_id, tone_band):
    container, codecs, layout = CODECS[clip_id]
    if missing := _missing(codecs):
        pytest.skip(f"this ffmpeg lacks {', '.join(missing)}")
    path = _clip(tmp_path / f"{clip_id}.{container}", codecs=codecs, layout=layout, tone=1000)
    data = decode.extract_clip(path, CFG)
    assert len(data.frames) == 10 and data.flags == []
    frames, mel = extracted.decode_row(data.frames, data.mel.astype("<f2").tobytes(), (80, 848))
    assert frames.shape == (10, 32, 32, 3) and frames.std() > 20  # a picture, not a blank
    # the 1 kHz tone survives every codec and the downmix: the same loudest mel band
    assert int(np.argmax(mel.mean(axis=1))) == tone_band


def test_tiny_pictures_and_stereo_are_scaled_and_downmixed(tmp_path):
    tiny = decode.extract_clip(_clip(tmp_path / "tiny.mp4", size="16x12"), CFG)
    assert len(tiny.frames) == 10 and tiny.flags == []
    frames, _ = extracted.decode_row(tiny.frames, tiny.mel.astype("<f2").tobytes(), (80, 848))
    assert frames.shape == (10, 32, 32, 3)  # scaled up on the short side, centre-cropped
    # odd sizes (h264 needs even ones: a lossless codec takes any) and a 2-pixel-high strip
    odd = ("-c:v", "ffv1", "-c:a", "flac")
    for size in ("7x5", "64x2"):
        data = decode.extract_clip(_clip(tmp_path / f"{size}.mkv", size=size, codecs=odd), CFG)
        assert len(data.frames) == 10, size
    mono = decode.extract_clip(_clip(tmp_path / "mono.mp4", layout="mono"), CFG)
    stereo = decode.extract_clip(_clip(tmp_path / "stereo.mp4", layout="stereo"), CFG)
    # the same tone in both channels downmixes to the mono clip's mel
    assert np.abs(stereo.mel.astype(np.float32) - mono.mel.astype(np.float32)).mean() < 0.01


# ------------------------------------------------------------------------ SIGKILL mid-stage


def _dataset(clips: Path, n: int) -> None:
    records = []
    for i in range(n):
        clip_id = f"clip{i:02d}"
        _clip(clips / video_path(clip_id), seconds=4.0, tone=300 + 100 * i)
        records.append(
            ClipRecord(clip_id, "local", f"label{i % 3}", "test" if i % 4 == 3 else "train",
                       status="ok", path=video_path(clip_id))
        )  # fmt: skip
    write_manifest(clips, records)


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_sigkill_mid_stage_then_rerun_is_byte_identical(tmp_path, stage_project):
    stage_project.params({"extract": {"image_size": 32, "rows_per_shard": 2, "workers": 1}})
    cfg = load_params(stage_project.root / "params.yaml").extract
    clips = stage_project.root / "data" / "clips"
    _dataset(clips, 6)
    reference = tmp_path / "reference"
    extract.run_extract(cfg, clips, reference, tmp_path / "cache")  # uninterrupted

    out = stage_project.root / "data" / "extract"
    cache = stage_project.root / "data" / ".cache" / "extract"
    chunks = lambda: list(cache.rglob("chunk-*.parquet"))  # noqa: E731
    scratch = tmp_path / "tmp"  # the stage's TMPDIR: ffmpeg's audio sink must leave nothing
    scratch.mkdir()
    proc = stage_project.start("extract", TMPDIR=str(scratch))
    stage_project.wait_for(proc, lambda: len(chunks()) >= 1)
    stage_project.stop(proc, signal.SIGKILL)
    done = len(chunks())
    assert 1 <= done < 3 and not out.exists()  # never half-written: no output at all yet
    assert not list(scratch.iterdir())
    for chunk in chunks():  # a finished chunk is whole (written under a temporary name)
        assert pq.read_table(chunk).num_rows == 2

    code, stdout, err = stage_project.run("extract")
    assert code == 0, err
    assert f"({done} reused from" in err
    assert stdout.strip().startswith("extract: 6 of 6 clips written")
    assert _tree(out) == _tree(reference)
    assert not cache.exists() and not list(out.parent.glob(".tmp-*"))
