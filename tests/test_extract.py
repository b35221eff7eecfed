"""pipeline.data.extract: frame picking, edge-case media, shard layout, determinism, resume.

Every clip is made here with ffmpeg (lavfi sources or numpy frames piped in), so no fixture data
is needed; the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import io
from pipeline.config import ExtractConfig
from pipeline.data import audio, decode, extract, extracted
from pipeline.data.manifest import ClipRecord, video_path, write_manifest
from pipeline.media import ffmpeg_exe, probe

CFG = ExtractConfig(
    num_frames=10, image_size=32, jpeg_quality=90, sample_rate=22050, clip_seconds=10.0,
    n_fft=1024, hop_length=256, n_mels=80, fmin=125.0, fmax=7600.0, mel_frames=848,
    rows_per_shard=3, workers=1,
)  # fmt: skip

VCODEC = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
ACODEC = ["-c:a", "aac"]
AV = VCODEC + ACODEC


def ff(*args: str, stdin: bytes | None = None) -> None:
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args],
        input=stdin,
        check=True,
        timeout=60,
    )


def lavfi_clip(
    out: Path,
    seconds: float = 10.0,
    size: str = "96x72",
    rate: int = 10,
    video: str = "testsrc2",
    sound: str = "sine=frequency=440:sample_rate=22050",
    extra: tuple[str, ...] = (),
) -> None:
    """An H.264/AAC clip from lavfi sources (`video`/`sound` empty: leave that stream out)."""
    args: list[str] = []
    if video:
        sep = ":" if "=" in video else "="
        args += ["-f", "lavfi", "-i", f"{video}{sep}size={size}:rate={rate}"]
    if sound:
        args += ["-f", "lavfi", "-i", sound]
    args += ["-t", f"{seconds}", *extra]
    args += (VCODEC if video else []) + (ACODEC if sound else [])
    ff(*args, "-f", "mp4", str(out))


def frames_clip(out: Path, frames: np.ndarray, rate: float, seconds: float) -> None:
    """A near-lossless clip of exactly these RGB frames (n, h, w, 3) plus a sine track."""
    n, h, w, _ = frames.shape
    ff(
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{w}x{h}",
        "-r",
        f"{rate}",
        "-i",
        "pipe:0",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=44100",
        "-t",
        f"{seconds}",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-qp",
        "0",
        "-pix_fmt",
        "yuv444p",
        "-c:a",
        "aac",
        "-shortest",
        str(out),
        stdin=frames.tobytes(),
    )


def index_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Uniform frames whose colour encodes index i: R = 12 (i // 16) + 8, G = 16 (i % 16) + 8."""
    i = np.arange(n)
    frames = np.zeros((n, h, w, 3), np.uint8)
    frames[..., 0] = (12 * (i // 16) + 8)[:, None, None]
    frames[..., 1] = (16 * (i % 16) + 8)[:, None, None]
    frames[..., 2] = 128
    return frames


def read_index(frame: np.ndarray) -> int:
    r, g, _ = frame.reshape(-1, 3).mean(axis=0)
    return int(round((r - 8) / 12)) * 16 + int(round((g - 8) / 16))


# ------------------------------------------------------------------------------ frame picking


@pytest.mark.parametrize("seconds", [10.0, 7.3, 13.0, 3.0])
def test_fps_filter_picks_segment_centres(tmp_path: Path, seconds: float) -> None:
    rate = 25
    path = tmp_path / "index.mp4"
    frames_clip(path, index_frames(int(round(seconds * rate))), rate, seconds)
    duration = probe(path).duration_s
    dec = decode.decode_clip(path, CFG, duration)
    picked = [read_index(f) for f in dec.frames]
    span = min(duration, CFG.clip_seconds)
    # fps=N/D hands output slot k the last frame before the centre of segment k of [0, D)
    centres = [(k + 0.5) * span / CFG.num_frames * rate for k in range(CFG.num_frames)]
    assert len(picked) == CFG.num_frames
    for got, centre in zip(picked, centres, strict=True):
        assert centre - 1.5 <= got <= centre + 0.5, (picked, centres)
    if seconds == 10.0:
        assert picked == [12, 37, 62, 87, 112, 137, 162, 187, 212, 237]
    # the stage reads the header from its own decode and redoes short clips with their D
    info, again = decode.decode_with_header(path, CFG)
    assert info.duration_s == duration and (info.width, info.height) == (64, 48)
    np.testing.assert_array_equal(again.frames, dec.frames)


def test_decode_returns_mono_audio_at_the_mel_rate(tmp_path: Path) -> None:
    path = tmp_path / "a.mp4"
    lavfi_clip(path, seconds=12.0, sound="sine=frequency=1000:sample_rate=44100")
    dec = decode.decode_clip(path, CFG, 12.0)
    assert dec.audio.dtype == np.float32 and dec.audio.shape == (220_500,)  # cut at 10 s
    spectrum = np.abs(np.fft.rfft(dec.audio[:22050]))
    assert np.argmax(spectrum) == pytest.approx(1000, abs=2)  # 1 Hz bins at 22,050 Hz


def test_the_audio_sink_has_no_name_on_disk_while_ffmpeg_runs(tmp_path, monkeypatch) -> None:
    """A stage killed mid-decode (SIGKILL skips every `finally`) must leave no temporary file:
    the float32 sink is unlinked before ffmpeg starts and reached through its descriptor."""
    path = tmp_path / "clip" / "a.mp4"
    path.parent.mkdir()
    lavfi_clip(path, seconds=3.0, sound="sine=frequency=1000:sample_rate=44100")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen: list[list[str]] = []

    def command(audio_path: Path | None) -> list[str]:
        seen.append(sorted(p.name for p in scratch.iterdir()))
        return decode.ffmpeg_command(path, CFG, 3.0, audio_path)

    run = decode.run_ffmpeg(command, path, CFG.image_size, sound=True, on_timeout=RuntimeError)
    assert seen == [[]], f"named temporaries while ffmpeg ran: {seen}"
    assert run.returncode == 0 and run.wave.shape == (3 * CFG.sample_rate,)
    assert np.argmax(np.abs(np.fft.rfft(run.wave[: CFG.sample_rate]))) == pytest.approx(1000, abs=2)
    assert not list(scratch.iterdir())


def test_untrusted_names_never_read_as_options(tmp_path: Path) -> None:
    path = tmp_path / "-y.mp4"
    lavfi_clip(path, seconds=2.0)
    cmd = decode.ffmpeg_command(path, CFG, 2.0, tmp_path / "a.f32")
    assert cmd[cmd.index("-i") + 1] == f"file:{path.resolve()}"
    assert "-y.mp4" not in [a for a in cmd if not a.startswith("file:")]
    assert len(decode.extract_clip(path, CFG).frames) == CFG.num_frames


# ------------------------------------------------------------------------------ the dataset

# clip_id → (expected reason or "" for a written row, expected flags)
EXPECTED = {
    "a_ok": ("", []),
    "b_truncated": ("unreadable", None),
    "b_truncated_faststart": ("unreadable", None),
    "c_zero_bytes": ("unreadable", None),
    "d_not_media": ("unreadable", None),
    "e_audio_only": ("no_video", None),
    "f_video_only": ("no_audio", None),
    "g_three_seconds": ("", ["looped_audio"]),
    "g_half_second": ("too_short", None),
    "h_portrait": ("", ["portrait"]),
    "i_surround": ("", []),
    "j_variable_rate": ("", []),
    "k_wrong_extension": ("", []),
    "l_silent": ("silent", None),
    "m_black": ("", ["black_frames"]),
    "n_missing": ("unreadable", None),
    "o_escape": ("unreadable", None),
    "q_short_video": ("", ["padded_frames"]),
    "r_cover_art": ("no_video", None),
}


def _make_dataset(clips: Path) -> list[ClipRecord]:
    def at(clip_id: str, ext: str = "mp4") -> Path:
        path = clips / video_path(clip_id, ext)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    lavfi_clip(at("a_ok"))
    lavfi_clip(at("b_truncated"))  # moov atom at the end: half a file has no header
    data = at("b_truncated").read_bytes()
    at("b_truncated").write_bytes(data[: len(data) // 2])
    lavfi_clip(at("b_truncated_faststart"), extra=("-movflags", "+faststart"))
    data = at("b_truncated_faststart").read_bytes()
    at("b_truncated_faststart").write_bytes(data[: len(data) // 2])  # header says 10 s
    at("c_zero_bytes").write_bytes(b"")
    at("d_not_media").write_text("this is not a video\n")
    lavfi_clip(at("e_audio_only"), video="")
    lavfi_clip(at("f_video_only"), sound="")
    lavfi_clip(at("g_three_seconds"), seconds=3.0)
    lavfi_clip(at("g_half_second"), seconds=0.5)
    portrait = np.zeros((1, 96, 48, 3), np.uint8)
    portrait[:, :24, :, 0] = 255  # red top, green middle, blue bottom
    portrait[:, 24:72, :, 1] = 255
    portrait[:, 72:, :, 2] = 255
    frames_clip(at("h_portrait"), np.repeat(portrait, 100, axis=0), 10, 10.0)
    lavfi_clip(
        at("i_surround"),
        sound="sine=frequency=440:sample_rate=48000",
        extra=("-af", "pan=5.1|FL=c0|FR=c0|FC=c0|LFE=c0|BL=c0|BR=c0"),
    )
    lavfi_clip(
        at("j_variable_rate"),
        rate=30,
        extra=("-vf", "setpts='PTS+0.02*sin(N)/TB'", "-fps_mode", "vfr"),
    )
    shutil.copy(at("a_ok"), at("k_wrong_extension", "webm"))
    lavfi_clip(at("l_silent"), sound="anullsrc=r=22050:cl=mono")
    lavfi_clip(at("m_black"), video="color=c=black:d=10")
    ff(
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=96x72:rate=10",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=22050",
        "-t",
        "10",
        "-filter:v",
        "trim=duration=3",
        *AV,
        str(at("q_short_video")),
    )
    # music with cover art: the picture is a video stream to the demuxer, but not a video
    ff(
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=22050",
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=96x72:rate=1",
        "-t",
        "10",
        "-frames:v",
        "1",
        "-map",
        "0:a",
        "-map",
        "1:v",
        "-c:a",
        "aac",
        "-c:v",
        "mjpeg",
        "-disposition:v:0",
        "attached_pic",
        str(at("r_cover_art", "m4a")),
    )
    (clips.parent / "outside.mp4").write_bytes(at("a_ok").read_bytes())

    paths = {c: video_path(c) for c in EXPECTED}
    paths["k_wrong_extension"] = video_path("k_wrong_extension", "webm")
    paths["r_cover_art"] = video_path("r_cover_art", "m4a")
    paths["o_escape"] = "../outside.mp4"
    records = [
        ClipRecord(
            clip_id=c,
            source="local",
            label=f"label{i % 3}",
            split="test" if i % 4 == 3 else "train",
            status="ok",
            path=paths[c],
        )
        for i, c in enumerate(EXPECTED)
    ]
    records.append(
        ClipRecord(
            clip_id="p_removed",
            source="local",
            label="label9",
            split="train",
            status="removed",
            error="gone",
        )
    )
    return records


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clips = tmp_path_factory.mktemp("data") / "clips"
    write_manifest(clips, _make_dataset(clips))
    return clips


@pytest.fixture(scope="module")
def reference(clips: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One uninterrupted run with a process pool of 2: (out_dir, preview)."""
    root = tmp_path_factory.mktemp("ref")
    cfg = ExtractConfig(**{**CFG.__dict__, "workers": 2})
    summary = extract.run_extract(cfg, clips, root / "out", root / "cache", root / "preview.png")
    assert summary.inputs == len(EXPECTED) and summary.chunks_reused == 0
    assert not (root / "cache" / "extract").exists()  # cache deleted after success
    return root / "out", root / "preview.png"


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _rows(out: Path) -> dict[str, dict]:
    meta = extracted.load_meta(out)
    rows = {}
    for entries in meta["shards"].values():
        for e in entries:
            for row in pq.read_table(out / e["path"]).to_pylist():
                rows[row["clip_id"]] = row
    return rows


def test_every_case_is_written_or_failed_with_its_reason(reference: tuple[Path, Path]) -> None:
    out, _ = reference
    failures = {r["clip_id"]: r for r in pq.read_table(out / "failures.parquet").to_pylist()}
    rows = _rows(out)
    assert "p_removed" not in rows and "p_removed" not in failures  # only ok manifest rows
    for clip_id, (reason, flags) in EXPECTED.items():
        if reason:
            assert clip_id in failures and clip_id not in rows, clip_id
            assert failures[clip_id]["reason"] == reason, failures[clip_id]
            assert failures[clip_id]["detail"]
        else:
            assert clip_id in rows and clip_id not in failures, failures.get(clip_id)
            assert rows[clip_id]["flags"] == flags, clip_id
    assert "truncated" in failures["b_truncated_faststart"]["detail"]
    assert str(out.parent) not in "".join(f["detail"] for f in failures.values())


def test_rows_hold_the_right_content(clips: Path, reference: tuple[Path, Path]) -> None:
    out, _ = reference
    rows = _rows(out)
    shape = (80, 848)
    _, mel_ok = extracted.decode_row(rows["a_ok"]["frames"], rows["a_ok"]["mel"], shape)
    # the mel is the SpecVQGAN transform of the clip's audio, decoded independently here
    pcm = subprocess.run(
        [
            ffmpeg_exe(),
            "-v",
            "error",
            "-i",
            str(clips / video_path("a_ok")),
            "-ac",
            "1",
            "-ar",
            "22050",
            "-f",
            "f32le",
            "-",
        ],
        capture_output=True,
        check=True,
    ).stdout
    expected = audio.log_mel(np.frombuffer(pcm, "<f4"), CFG)
    assert np.abs(mel_ok - expected).max() < 2e-3  # float16 storage
    # the same bytes under another extension give the same row
    assert rows["k_wrong_extension"]["frames"] == rows["a_ok"]["frames"]
    assert rows["k_wrong_extension"]["mel"] == rows["a_ok"]["mel"]
    # 5.1 is downmixed to mono: a 440 Hz tone like the mono clip's
    _, mel_51 = extracted.decode_row(rows["i_surround"]["frames"], rows["i_surround"]["mel"], shape)
    assert np.argmax(mel_51.mean(axis=1)) == np.argmax(mel_ok.mean(axis=1))
    # portrait: scaled on the short side, centre-cropped: only the green middle survives
    frames, _ = extracted.decode_row(rows["h_portrait"]["frames"], rows["h_portrait"]["mel"], shape)
    assert frames.shape == (10, 32, 32, 3)
    assert frames[..., 1].min() > 200 and frames[..., [0, 2]].max() < 60
    # a 3-s video in a 10-s file: frames at 0.5, 1.5, 2.5 s, then the last one repeated
    short = rows["q_short_video"]["frames"]
    assert len(short) == 10 and short[1] != short[2] and set(short[2:]) == {short[2]}
    # a 3-s clip is looped, not zero-padded
    _, mel_3 = extracted.decode_row(
        rows["g_three_seconds"]["frames"], rows["g_three_seconds"]["mel"], shape
    )
    loud = mel_3.max(axis=0)  # per frame: silence after 3 s would be 0
    assert loud[300:].min() > 0.5 * loud[:250].mean()


def test_shard_layout_and_meta(clips: Path, reference: tuple[Path, Path]) -> None:
    out, preview = reference
    meta = extracted.load_meta(out)
    written = [c for c, (reason, _) in EXPECTED.items() if not reason]
    assert sum(meta["counts"].values()) == len(written)
    reasons = Counter(reason for reason, _ in EXPECTED.values() if reason)
    assert meta["failures"] == dict(sorted(reasons.items()))
    assert set(reasons) <= set(decode.REASONS)
    assert meta["mel"]["shape"] == [80, 848] and meta["num_frames"] == 10
    assert meta["image_size"] == 32 and meta["rows_per_shard"] == 3
    assert meta["ffmpeg"].startswith("ffmpeg version")
    assert meta["labels"] == sorted(meta["labels"]) and meta["labels"]
    for split, entries in meta["shards"].items():
        sizes = [e["rows"] for e in entries]
        assert sizes[:-1] == [3] * (len(sizes) - 1) and 1 <= sizes[-1] <= 3
        ids = []
        for i, e in enumerate(entries):
            assert e["path"] == f"{split}/part-{i:05d}.parquet"
            assert e["sha256"] == io.sha256_file(out / e["path"])
            table = pq.read_table(out / e["path"])
            assert table.schema.equals(extracted.SHARD_SCHEMA)
            assert table.num_rows == e["rows"]
            ids += table.column("clip_id").to_pylist()
            assert set(table.column("split").to_pylist()) == {split}
        assert ids == sorted(ids) and meta["counts"][split] == len(ids)
    examples = list(extracted.iter_examples(out, "train"))
    assert [e.clip_id for e in examples] == sorted(e.clip_id for e in examples)
    assert len(examples) == meta["counts"]["train"]
    ex = examples[0]
    assert ex.frames.shape == (10, 32, 32, 3) and ex.frames.dtype == np.uint8
    assert ex.mel.shape == (80, 848) and ex.mel.dtype == np.float32
    assert ex.mel.min() >= 0 and ex.mel.max() <= 1
    assert preview.read_bytes().startswith(b"\x89PNG")


def test_rerun_is_byte_identical_and_removes_stale_files(
    clips: Path, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    out_ref, preview_ref = reference
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "part-00099.parquet").write_bytes(b"stale")  # an earlier, larger run
    extract.run_extract(CFG, clips, out, tmp_path / "cache", tmp_path / "preview.png")  # inline
    assert _tree(out) == _tree(out_ref)  # process pool and inline agree byte for byte
    assert (tmp_path / "preview.png").read_bytes() == preview_ref.read_bytes()
    assert not list(tmp_path.glob(".tmp-*"))


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_from_its_chunks(
    clips: Path, reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_ref, _ = reference
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier complete output")
    write_chunk = extract._write_chunk
    written: list[Path] = []

    def write_two_then_die(path: Path, rows: list) -> None:
        if len(written) == 2:
            raise Interrupted
        write_chunk(path, rows)
        written.append(path)

    monkeypatch.setattr(extract, "_write_chunk", write_two_then_die)
    with pytest.raises(Interrupted):
        extract.run_extract(CFG, clips, out, cache)
    assert _tree(out) == {"previous.txt": b"an earlier complete output"}  # never half-written
    assert sorted(p.name for p in (cache / "extract").rglob("chunk-*.parquet")) == [
        "chunk-00000.parquet",
        "chunk-00001.parquet",
    ]

    monkeypatch.setattr(extract, "_write_chunk", write_chunk)
    calls: list[str] = []
    row = extract._row

    def counting(record: ClipRecord, clips_dir: Path, cfg: ExtractConfig) -> dict:
        calls.append(record.clip_id)
        return row(record, clips_dir, cfg)

    monkeypatch.setattr(extract, "_row", counting)
    summary = extract.run_extract(CFG, clips, out, cache)
    assert summary.chunks_reused == 2
    assert calls == sorted(EXPECTED)[2 * CFG.rows_per_shard :]  # chunks 0 and 1 reused
    assert _tree(out) == _tree(out_ref)
    assert not (cache / "extract").exists()


def test_an_unexpected_error_fails_one_clip_only(
    clips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "clips"
    records = [
        ClipRecord(
            clip_id=c, source="local", label="x", split="train", status="ok", path=video_path(c)
        )
        for c in ("a_ok", "g_three_seconds")
    ]
    for r in records:
        (sub / r.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clips / r.path, sub / r.path)
    write_manifest(sub, records)
    extract_clip = decode.extract_clip

    def broken(path: Path, cfg: ExtractConfig, rel: str = "") -> decode.ClipData:
        if "a_ok" in rel:
            raise ZeroDivisionError("boom")
        return extract_clip(path, cfg, rel)

    monkeypatch.setattr(extract, "extract_clip", broken)
    summary = extract.run_extract(CFG, sub, tmp_path / "out", tmp_path / "cache")
    assert summary.counts == {"train": 1} and summary.failures == {"error": 1}
    (failure,) = pq.read_table(tmp_path / "out" / "failures.parquet").to_pylist()
    assert failure["clip_id"] == "a_ok" and failure["detail"] == "ZeroDivisionError: boom"


def test_summary_and_a_missing_manifest(tmp_path: Path) -> None:
    summary = extract.ExtractSummary(
        "out", 5, {"train": 3, "test": 1}, {"silent": 1}, 2, 1, 1.5, {"portrait": 2}
    )
    m = summary.metrics()
    assert m["written"] == 4 and m["failed"] == 1 and m["failed_silent"] == 1
    assert m["train_written"] == 3 and m["flag_portrait"] == 2
    assert "4 of 5 clips" in summary.describe("out") and "silent 1" in summary.describe("out")
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="download"):
        extract.run_extract(CFG, tmp_path / "nowhere", tmp_path / "out", tmp_path / "cache")


def test_cache_key_follows_params_and_inputs(clips: Path) -> None:
    from dataclasses import replace

    from pipeline.data.manifest import read_manifest

    records = [r for r in read_manifest(clips) if r.status == "ok"]
    key = extract.cache_key(CFG, clips, records)
    assert key == extract.cache_key(replace(CFG, workers=4), clips, records)
    assert key != extract.cache_key(replace(CFG, jpeg_quality=80), clips, records)
    assert key != extract.cache_key(CFG, clips, records[1:])
