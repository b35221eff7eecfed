"""The download stage: yt-dlp against a loopback server, failure classes, resume, local videos."""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys
import threading
import time
import types
from io import BytesIO
from pathlib import Path

import pytest
from yt_dlp.networking.common import Response
from yt_dlp.networking.exceptions import HTTPError, TransportError
from yt_dlp.utils import DownloadError as YtdlpDownloadError
from yt_dlp.utils import ExtractorError

from pipeline.config import DownloadConfig, LocalConfig, SyntheticConfig, VGGSoundConfig
from pipeline.data import download as dl
from pipeline.data import manifest
from pipeline.data.download import (
    ClipVerifyError,
    DownloadError,
    RateGate,
    SectionOutOfRangeError,
    check_section,
    classify_error,
    download_vggsound,
    run_download,
    select_clips,
)
from pipeline.data.local import default_split, download_local, local_clip_id
from pipeline.data.manifest import ClipRecord, video_path
from pipeline.media import ffmpeg_exe, probe


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0.01)


def _config(
    tmp_path: Path,
    rows: str,
    *,
    url: str = "http://127.0.0.1:9/{id}.mp4",
    source: str = "vggsound",
    limit: int = 0,
    splits=("train", "test"),
    classes=(),
    retry_failed: bool = False,
    local: LocalConfig | None = None,
    **vggsound,
) -> DownloadConfig:
    csv = tmp_path / "vggsound.csv"
    csv.write_text(rows)
    options = dict(
        csv=str(csv),
        split="test",
        url_template=url,
        format="b",
        workers=2,
        sleep_requests=0.0,
        sleep_interval=0.0,
        max_sleep_interval=0.0,
        socket_timeout=2.0,
        retries=3,
        backoff_s=0.05,
        max_backoff_s=5.0,
        cookiefile="",
    )
    options.update(vggsound)
    return DownloadConfig(
        source=source,
        limit=limit,
        splits=tuple(splits),
        classes=tuple(classes),
        retry_failed=retry_failed,
        synthetic=SyntheticConfig(2, 1, 1, 64, 48, 10, 16000, 10.0),
        vggsound=VGGSoundConfig(**options),
        local=local or LocalConfig(str(tmp_path / "videos"), str(tmp_path / "labels.csv")),
    )


def _by_id(records: list[ClipRecord]) -> dict[str, ClipRecord]:
    return {r.clip_id: r for r in records}


def _frame(path: Path, at: float | None = None) -> bytes:
    """The first decoded frame of `path` (at `at` seconds, exact seek) as raw RGB."""
    seek = ["-ss", str(at)] if at is not None else []
    cmd = [
        ffmpeg_exe(),
        "-hide_banner",
        "-loglevel",
        "error",
        "-nostdin",
        *seek,
        "-i",
        str(path),
        "-frames:v",
        "1",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-",
    ]
    return subprocess.run(cmd, capture_output=True, check=True, timeout=30).stdout


def _decoded_frames(path: Path) -> int:
    cmd = [
        ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-i",
        str(path),
        "-map",
        "0:v",
        "-f",
        "null",
        "-",
    ]
    err = subprocess.run(cmd, capture_output=True, check=True, timeout=30).stderr.decode()
    return int(re.findall(r"frame=\s*(\d+)", err)[-1])


def _leftovers(clips: Path) -> list[Path]:
    return [p for p in clips.rglob("*") if p.name.startswith(".tmp") or p.suffix == ".part"]


# ------------------------------------------------------------------------------- loopback runs


def test_ok_clip_is_the_requested_section(tmp_path, download_server, download_video):
    cfg = _config(tmp_path, "abcdefghijk,7,dog barking,train\n", url=download_server.url_template)
    clips = tmp_path / "clips"
    (record,) = download_vggsound(cfg, clips, previous=[])
    assert (record.status, record.clip_id, record.path) == (
        "ok",
        "abcdefghijk_000007",
        video_path("abcdefghijk_000007"),
    )
    clip = clips / record.path
    assert record.size_bytes == clip.stat().st_size > 0
    info = probe(clip)
    assert info.has_video and info.has_audio and abs(info.duration_s - 10) < 0.2
    assert 245 <= _decoded_frames(clip) <= 256  # 10 s at 25 fps, not the 30-s source
    first = _frame(clip)
    # 7 s is mid-GOP (keyframes every 2 s): the MP4 edit list must trim to the exact frame
    assert first == _frame(download_video, at=7.0)
    assert first != _frame(download_video, at=6.0) and first != _frame(download_video, at=8.0)
    assert _leftovers(clips) == [] and not (clips / dl.WORK_DIR).exists()
    assert _by_id(manifest.read_manifest(clips))["abcdefghijk_000007"].status == "ok"


def test_404_is_unavailable_and_not_retried(tmp_path, download_server):
    download_server.script("/abcdefghijk.mp4", "404", "404", "404")
    cfg = _config(tmp_path, "abcdefghijk,0,dog,train\n", url=download_server.url_template)
    (record,) = download_vggsound(cfg, tmp_path / "clips", previous=[])
    assert record.status == "unavailable" and "404" in record.error
    assert record.attempts == 1 and download_server.count("/abcdefghijk.mp4") == 1
    assert not (tmp_path / "clips" / video_path(record.clip_id)).exists()


def test_500_is_retried_then_succeeds(tmp_path, download_server):
    download_server.script("/abcdefghijk.mp4", "500")
    cfg = _config(tmp_path, "abcdefghijk,0,dog,train\n", url=download_server.url_template)
    (record,) = download_vggsound(cfg, tmp_path / "clips", previous=[])
    assert (record.status, record.attempts) == ("ok", 2)


def test_429_with_retry_after_pauses_then_succeeds(tmp_path, download_server, caplog):
    download_server.script("/abcdefghijk.mp4", ("429", 1))
    cfg = _config(
        tmp_path,
        "abcdefghijk,2,dog,train\nbcdefghijkl,3,cat,train\n",
        url=download_server.url_template,
        backoff_s=0.05,
        max_backoff_s=5.0,
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.data.download"):
        records = _by_id(download_vggsound(cfg, tmp_path / "clips", previous=[]))
    assert records["abcdefghijk_000002"].status == "ok"
    assert records["bcdefghijkl_000003"].status == "ok"
    hits = [r for r in download_server.requests if r[2] == "/abcdefghijk.mp4"]
    assert hits[0][4] == "429"
    # Retry-After (1 s) wins over the 0.05-s back-off
    assert hits[1][0] - hits[0][0] >= 0.95
    assert any("pausing all workers for 1.0 s" in m for m in caplog.messages)


def test_endless_rate_limit_stops_the_run_instead_of_burning_the_list(tmp_path, download_server):
    download_server.script("/aaaaaaaaaaa.mp4", *[("429", 0)] * 20)
    cfg = _config(
        tmp_path,
        "aaaaaaaaaaa,0,dog,train\nbbbbbbbbbbb,0,dog,train\n",
        workers=1,
        url=download_server.url_template,
        backoff_s=0.05,
        max_backoff_s=0.2,
    )
    clips = tmp_path / "clips"
    with pytest.raises(DownloadError, match="rate_limited"):
        download_vggsound(cfg, clips, previous=[])
    # pauses of 0.05, 0.1 and 0.2 s, then one more 429: give up
    assert download_server.count("/aaaaaaaaaaa.mp4") == 4
    assert download_server.count("/bbbbbbbbbbb.mp4") == 0
    saved = _by_id(manifest.read_manifest(clips))
    assert saved["aaaaaaaaaaa_000000"].status == "rate_limited"
    assert "bbbbbbbbbbb_000000" not in saved  # not attempted: the next run will try it


def test_dropped_connection_is_retried(tmp_path, download_server):
    download_server.script("/abcdefghijk.mp4", "drop", "drop")  # both requests of attempt 1
    cfg = _config(tmp_path, "abcdefghijk,10,dog,train\n", url=download_server.url_template)
    (record,) = download_vggsound(cfg, tmp_path / "clips", previous=[])
    assert (record.status, record.attempts) == ("ok", 2)
    assert abs(record.duration_s - 10) < 0.2


def test_connection_always_dropped_leaves_no_final_file(tmp_path, download_server):
    download_server.script("/abcdefghijk.mp4", *["drop"] * 20)
    cfg = _config(
        tmp_path, "abcdefghijk,10,dog,train\n", url=download_server.url_template, retries=2
    )
    clips = tmp_path / "clips"
    (record,) = download_vggsound(cfg, clips, previous=[])
    assert record.status == "other" and "incomplete clip" in record.error
    assert record.attempts == 2 and record.path == "" and record.size_bytes == 0
    assert not (clips / video_path(record.clip_id)).exists()
    assert list(clips.rglob("*.mp4")) == [] and _leftovers(clips) == []


def test_stalled_server_times_out_and_is_retried(tmp_path, download_server):
    download_server.stall_s = 2.0
    download_server.script("/abcdefghijk.mp4", "stall")
    cfg = _config(
        tmp_path, "abcdefghijk,0,dog,train\n", url=download_server.url_template, socket_timeout=0.5
    )
    (record,) = download_vggsound(cfg, tmp_path / "clips", previous=[])
    assert (record.status, record.attempts) == ("ok", 2)


ROWS = "aaaaaaaaaaa,1,dog,train\nbbbbbbbbbbb,2,cat,train\nccccccccccc,3,dog,test\n"


def test_interrupted_run_resumes_without_refetching(tmp_path, download_server):
    cfg = _config(tmp_path, ROWS, url=download_server.url_template)
    clips = tmp_path / "clips"
    first = _by_id(download_vggsound(cfg, clips, previous=[]))
    assert {r.status for r in first.values()} == {"ok"}
    counts = {p: download_server.count(p) for p in ("/aaaaaaaaaaa.mp4", "/bbbbbbbbbbb.mp4")}
    # the state a kill leaves: a's record saved, b renamed into place but not yet recorded,
    # c never finished, temporaries lying around
    manifest.write_manifest(clips, [first["aaaaaaaaaaa_000001"]])
    (clips / video_path("ccccccccccc_000003")).unlink()
    (clips / dl.WORK_DIR / "worker-00").mkdir(parents=True)
    (clips / dl.WORK_DIR / "worker-00" / "clip.mp4.part").write_bytes(b"partial")
    stale = clips / "videos" / "00" / ".tmp-x.mp4.abc"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"partial")

    second = _by_id(download_vggsound(cfg, clips, previous=manifest.read_manifest(clips)))
    assert {r.status for r in second.values()} == {"ok"}
    assert {p: download_server.count(p) for p in counts} == counts  # a and b: no new request
    assert download_server.count("/ccccccccccc.mp4") >= 2  # fetched twice: once per run
    assert second["bbbbbbbbbbb_000002"].size_bytes == first["bbbbbbbbbbb_000002"].size_bytes
    assert not stale.exists() and not (clips / dl.WORK_DIR).exists()
    assert len(manifest.read_manifest(clips)) == 3


def test_manifest_is_saved_during_the_run(tmp_path, download_server, monkeypatch):
    monkeypatch.setattr(dl, "SAVE_EVERY_CLIPS", 1)
    clips = tmp_path / "clips"
    seen: list[set[str]] = []

    def saved_so_far() -> None:  # runs in the server when c's download starts
        deadline = time.monotonic() + 5
        ok: set[str] = set()
        while time.monotonic() < deadline and len(ok) < 2:
            ok = {r.clip_id for r in manifest.read_manifest(clips) if r.status == "ok"}
            time.sleep(0.02)
        seen.append(ok)

    download_server.script("/ccccccccccc.mp4", saved_so_far)
    cfg = _config(tmp_path, ROWS, url=download_server.url_template, workers=1)
    download_vggsound(cfg, clips, previous=[])
    assert seen == [{"aaaaaaaaaaa_000001", "bbbbbbbbbbb_000002"}]


def test_failed_clips_are_retried_only_when_asked(tmp_path, download_server):
    failed = ClipRecord(
        "aaaaaaaaaaa_000001",
        "vggsound",
        "dog",
        "train",
        status="unavailable",
        error="HTTP Error 404",
        attempts=1,
        youtube_id="aaaaaaaaaaa",
        start_s=1,
    )
    limited = dataclasses.replace(
        failed,
        clip_id="bbbbbbbbbbb_000002",
        youtube_id="bbbbbbbbbbb",
        start_s=2,
        label="cat",
        status="rate_limited",
    )
    rows = "aaaaaaaaaaa,1,dog,train\nbbbbbbbbbbb,2,cat,train\n"
    clips = tmp_path / "clips"

    kept = _by_id(
        download_vggsound(
            _config(tmp_path, rows, url=download_server.url_template),
            clips,
            previous=[failed, limited],
        )
    )
    assert kept["aaaaaaaaaaa_000001"].status == "unavailable"
    assert download_server.count("/aaaaaaaaaaa.mp4") == 0
    # a rate limit says nothing about the clip: always tried again
    assert kept["bbbbbbbbbbb_000002"].status == "ok"
    assert kept["bbbbbbbbbbb_000002"].attempts == 2

    cfg = _config(tmp_path, rows, url=download_server.url_template, retry_failed=True)
    retried = _by_id(download_vggsound(cfg, clips, previous=manifest.read_manifest(clips)))
    assert retried["aaaaaaaaaaa_000001"].status == "ok"
    assert download_server.count("/bbbbbbbbbbb.mp4") == 2  # ok clip not fetched again


def test_hostile_rows_never_reach_the_server(tmp_path, download_server):
    rows = (
        'abcdefghijk,0,dog,train\n"../../etc/pa",0,dog,train\n"--exec=rm -",0,dog,train\n'
        '";rm -rf /;a",0,dog,train\nabc%2F..%2Fxy,0,dog,train\n'
    )
    cfg = _config(tmp_path, rows, url=download_server.url_template)
    records = download_vggsound(cfg, tmp_path / "clips", previous=[])
    assert [r.clip_id for r in records] == ["abcdefghijk_000000"]
    assert {r[2] for r in download_server.requests} == {"/abcdefghijk.mp4"}


def test_cookiefile_is_used_but_never_logged_or_modified(tmp_path, download_server, caplog):
    cookies = tmp_path / "private" / "cookies.txt"
    cookies.parent.mkdir()
    cookies.write_text(
        "# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t4102444800\tSID\ts3cr3t-c00kie\n"
    )
    before = cookies.read_bytes()
    cfg = _config(
        tmp_path,
        "abcdefghijk,0,dog,train\n",
        url=download_server.url_template,
        cookiefile=str(cookies),
    )
    with caplog.at_level(logging.DEBUG):
        (record,) = download_vggsound(cfg, tmp_path / "clips", previous=[])
    assert record.status == "ok"
    assert any("s3cr3t-c00kie" in c for c in download_server.cookies)  # it was sent
    assert cookies.read_bytes() == before  # yt-dlp saved its jar into a private copy
    text = caplog.text + record.error
    assert "s3cr3t-c00kie" not in text and str(cookies) not in text
    assert not any("cookie" in p.name for p in (tmp_path / "clips").rglob("*"))


def test_section_past_the_end_is_a_permanent_failure():
    check_section({"duration": 30.0}, 20)  # 20-30 s fits
    check_section({}, 500)  # duration unknown (a direct link): the verification decides
    with pytest.raises(SectionOutOfRangeError, match="too short"):
        check_section({"duration": 30.0}, 25)
    got = classify_error(SectionOutOfRangeError("the video lasts 30.0 s, too short"))
    assert (got.status, got.transient) == ("other", False)


# --------------------------------------------------------------------------------- dispatcher


def test_run_download_writes_the_manifest_and_summary(tmp_path, download_server):
    download_server.script("/bbbbbbbbbbb.mp4", "404")
    import yt_dlp.version

    cfg = _config(tmp_path, ROWS, url=download_server.url_template, limit=2)
    summary = run_download(cfg, tmp_path / "clips", seed=0)
    # limit applies after sorting by clip id: a and b, not c
    assert (summary.clips, summary.ok, summary.failed) == (2, 1, 1)
    assert summary.by_status == {"ok": 1, "unavailable": 1}
    assert summary.by_split == {"train": {"ok": 1, "unavailable": 1}}
    assert summary.ytdlp_version == yt_dlp.version.__version__
    assert (
        summary.metrics()["status_unavailable"] == 1 and summary.as_dict()["source"] == "vggsound"
    )
    assert summary.describe(tmp_path / "clips").startswith(
        "download (vggsound): 1 of 2 clips ok (unavailable 1) in "
    )
    rows = manifest.read_manifest(tmp_path / "clips")
    assert [(r.clip_id, r.status) for r in rows] == [
        ("aaaaaaaaaaa_000001", "ok"),
        ("bbbbbbbbbbb_000002", "unavailable"),
    ]
    assert download_server.count("/ccccccccccc.mp4") == 0


def test_run_download_user_errors(tmp_path):
    cfg = _config(tmp_path, ROWS)
    missing = dataclasses.replace(
        cfg, vggsound=dataclasses.replace(cfg.vggsound, csv=str(tmp_path / "no.csv"))
    )
    with pytest.raises(DownloadError, match="does not exist"):
        run_download(missing, tmp_path / "clips", seed=0)
    with pytest.raises(DownloadError, match="'not a class' is not a label of"):
        run_download(dataclasses.replace(cfg, classes=("not a class",)), tmp_path / "clips", seed=0)
    with pytest.raises(DownloadError, match="no clip left"):
        run_download(
            dataclasses.replace(cfg, splits=("test",), limit=0, classes=("cat",)),
            tmp_path / "clips",
            seed=0,
        )


def test_run_download_fails_when_nothing_is_ok(tmp_path, download_server):
    download_server.script("/aaaaaaaaaaa.mp4", "404")
    cfg = _config(tmp_path, "aaaaaaaaaaa,1,dog,train\n", url=download_server.url_template)
    with pytest.raises(DownloadError, match="no clip"):
        run_download(cfg, tmp_path / "clips", seed=0)
    assert [r.status for r in manifest.read_manifest(tmp_path / "clips")] == ["unavailable"]


def test_run_download_dispatches_synthetic(tmp_path, monkeypatch):
    calls = []

    def generate_dataset(cfg, clips_dir, *, seed, splits, classes, limit, previous):
        calls.append((cfg, clips_dir, seed, splits, classes, limit, previous))
        return [ClipRecord("syn_000", "synthetic", "tone", "train", status="ok", path="x.mp4")]

    fake = types.ModuleType("pipeline.data.synthetic")
    fake.generate_dataset = generate_dataset
    monkeypatch.setitem(sys.modules, "pipeline.data.synthetic", fake)
    cfg = dataclasses.replace(
        _config(tmp_path, ROWS), source="synthetic", limit=3, classes=("tone",)
    )
    clips = tmp_path / "clips"
    manifest.write_manifest(clips, [ClipRecord("old", "synthetic", "tone", "test", status="ok")])
    summary = run_download(cfg, clips, seed=7)
    (call,) = calls
    assert (
        call[0] is cfg.synthetic and call[1] == clips and call[2:6] == (7, cfg.splits, ("tone",), 3)
    )
    assert [r.clip_id for r in call[6]] == ["old"]
    assert summary.source == "synthetic" and summary.ok == 1
    assert [r.clip_id for r in manifest.read_manifest(clips)] == ["syn_000"]


# ----------------------------------------------------------------------------- classification


def _http_error(status: int, retry_after: str | None = None) -> HTTPError:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return HTTPError(Response(BytesIO(b""), "http://x/y", headers, status=status))


def _wrapped(cause: BaseException, msg: str = "") -> YtdlpDownloadError:
    """How YoutubeDL surfaces an extractor failure."""
    err = ExtractorError(msg or f"Unable to download webpage: {cause}", cause=cause)
    return YtdlpDownloadError(f"ERROR: {err}", exc_info=(type(err), err, None))


@pytest.mark.parametrize(
    ("message", "status", "transient"),
    [
        ("Sign in to confirm you’re not a bot. Use --cookies-from-browser", "bot_check", False),
        (
            "This content isn't available, try again later. rate-limited by YouTube",
            "rate_limited",
            True,
        ),
        (
            "Sign in to confirm your age. This video may be inappropriate for some users.",
            "age_restricted",
            False,
        ),
        ("Private video. Sign in if you've been granted access", "private", False),
        ("Video unavailable. This video has been removed by the uploader", "removed", False),
        (
            "This video is no longer available because the YouTube account associated with this "
            "video has been terminated.",
            "removed",
            False,
        ),
        ("Video unavailable", "unavailable", False),
        ("The uploader has not made this video available in your country", "unavailable", False),
        ("ffmpeg exited with code 8", "other", True),
        ("something nobody expected", "other", False),
    ],
)
def test_classify_youtube_messages(message, status, transient):
    err = ExtractorError(message, expected=True)
    got = classify_error(
        YtdlpDownloadError(f"ERROR: [youtube] abcdefghijk: {err}", exc_info=(type(err), err, None))
    )
    assert (got.status, got.transient) == (status, transient)
    assert "ERROR:" not in got.message


def test_classify_http_errors():
    got = classify_error(_wrapped(_http_error(429, "17")))
    assert (got.status, got.transient, got.retry_after_s) == ("rate_limited", True, 17.0)
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= classify_error(_wrapped(_http_error(429, date))).retry_after_s <= 31
    assert classify_error(_wrapped(_http_error(404))).status == "unavailable"
    assert classify_error(_wrapped(_http_error(410))).status == "unavailable"
    assert (
        classify_error(_wrapped(_http_error(503))).status,
        classify_error(_wrapped(_http_error(503))).transient,
    ) == ("http_error", True)
    assert classify_error(_wrapped(_http_error(400))).transient is False


def test_classify_network_errors():
    timeout = TransportError(cause=TimeoutError("The read operation timed out"))
    assert (
        classify_error(_wrapped(timeout)).status,
        classify_error(_wrapped(timeout)).transient,
    ) == ("timeout", True)
    reset = TransportError(cause=ConnectionResetError(104, "Connection reset by peer"))
    assert (classify_error(_wrapped(reset)).status, classify_error(_wrapped(reset)).transient) == (
        "http_error",
        True,
    )
    got = classify_error(ClipVerifyError("incomplete clip: 4.2 s long"))
    assert (got.status, got.transient) == ("other", True)


# ----------------------------------------------------------------------------------- rate gate


def test_rate_gate_pauses_every_worker_and_counts_a_wave_once():
    gate = RateGate(backoff_s=0.3, max_backoff_s=10)
    epoch = gate.wait()
    assert gate.trip(epoch) is True
    assert gate.trip(epoch) is True  # a second worker of the same wave: no second pause
    assert gate.pauses == 1
    waited: list[float] = []

    def worker() -> None:
        t = time.monotonic()
        gate.wait()
        waited.append(time.monotonic() - t)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(waited) == 3 and min(waited) >= 0.2


def test_rate_gate_backs_off_exponentially_then_gives_up():
    gate = RateGate(backoff_s=0.01, max_backoff_s=0.04)
    pauses = []
    for _ in range(3):
        assert gate.trip(gate.wait()) is True
        pauses.append(gate.paused_s - sum(pauses))
    assert pauses == pytest.approx([0.01, 0.02, 0.04])
    assert gate.trip(gate.wait()) is False  # rate limited right after the longest pause
    gate2 = RateGate(backoff_s=0.01, max_backoff_s=0.04)
    for _ in range(3):
        gate2.trip(gate2.wait())
    gate2.clear()  # a success in between starts over
    assert gate2.trip(gate2.wait()) is True


def test_select_clips_filters_then_limits_in_the_given_order():
    E = types.SimpleNamespace
    items = [
        E(clip_id=c, label=lab, split=s)
        for c, lab, s in [
            ("d", "dog", "train"),
            ("a", "cat", "train"),
            ("c", "dog", "test"),
            ("b", "dog", "train"),
            ("e", "owl", "train"),
        ]
    ]
    items.sort(key=lambda x: x.clip_id)  # as the list sources pass them
    got = select_clips(items, splits=("train",), classes=("dog", "owl"), limit=2, source="t")
    assert [x.clip_id for x in got] == ["b", "d"]
    assert [
        x.clip_id
        for x in select_clips(items, splits=("train", "test"), classes=(), limit=0, source="t")
    ] == ["a", "b", "c", "d", "e"]
    with pytest.raises(DownloadError, match="no clip left"):
        select_clips(items, splits=("test",), classes=("cat",), limit=0, source="t")
    with pytest.raises(DownloadError, match="'dgo' is not a label of t; did you mean 'dog'"):
        select_clips(items, splits=("train",), classes=("dgo",), limit=0, source="t")


# --------------------------------------------------------------------------------------- local


def _video(path: Path, *, audio: bool = True, seconds: float = 2.0) -> Path:
    inputs = ["-f", "lavfi", "-i", f"testsrc=size=64x48:rate=10:duration={seconds}"]
    if audio:
        inputs += ["-f", "lavfi", "-i", f"sine=sample_rate=16000:duration={seconds}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostdin",
            "-y",
            *inputs,
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            *(["-c:a", "aac"] if audio else []),
            "-shortest",
            str(path),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


def test_local_source(tmp_path):
    videos = tmp_path / "videos"
    _video(videos / "my clip (1).mp4")
    _video(videos / "sub" / "two.mov")
    _video(videos / "silent.mp4", audio=False)
    (videos / "garbage.mp4").write_bytes(b"\x00not a video" * 100)
    outside = _video(tmp_path / "outside.mp4")  # a real video: only the path check stops it
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "file,label,split\n"
        "my clip (1).mp4,dog,train\n"
        "sub/two.mov,cat,\n"
        "garbage.mp4,dog,train\n"
        "../outside.mp4,dog,train\n"
        f"{outside},dog,train\n"
        "silent.mp4,dog,test\n"
        "missing.mp4,dog,test\n"
        "sub/two.mov,cat,train\n"  # duplicate row: rejected
        "bad.mp4,,train\n"  # empty label: rejected
    )
    cfg = _config(
        tmp_path,
        ROWS,
        source="local",
        local=LocalConfig(videos_dir=str(videos), labels_csv=str(labels)),
    )
    clips = tmp_path / "clips"
    records = {r.clip_id: r for r in download_local(cfg, clips, previous=[])}
    by_file = {
        f: records[local_clip_id(f)]
        for f in (
            "my clip (1).mp4",
            "sub/two.mov",
            "garbage.mp4",
            "../outside.mp4",
            str(outside),
            "silent.mp4",
            "missing.mp4",
        )
    }
    assert len(records) == 7
    assert {f for f, r in by_file.items() if r.status == "ok"} == {"my clip (1).mp4", "sub/two.mov"}
    assert "outside" in by_file["../outside.mp4"].error
    assert "outside" in by_file[str(outside)].error
    assert by_file["garbage.mp4"].status == "other"
    assert "no audio" in by_file["silent.mp4"].error
    assert by_file["missing.mp4"].status == "unavailable"
    assert by_file["sub/two.mov"].split == default_split("sub/two.mov")
    assert re.fullmatch(r"my_clip_1_[0-9a-f]{8}", local_clip_id("my clip (1).mp4"))
    copied = sorted(p.relative_to(clips).as_posix() for p in clips.rglob("*") if p.is_file())
    assert copied == sorted(by_file[f].path for f in ("my clip (1).mp4", "sub/two.mov"))
    good = clips / by_file["my clip (1).mp4"].path
    assert good.read_bytes() == (videos / "my clip (1).mp4").read_bytes()

    inode = good.stat().st_ino
    again = {r.clip_id: r for r in download_local(cfg, clips, previous=list(records.values()))}
    assert good.stat().st_ino == inode  # an ok clip is not copied again
    assert {k: r.status for k, r in again.items()} == {k: r.status for k, r in records.items()}


def test_a_switched_source_leaves_the_old_clips_out_of_what_later_stages_read(tmp_path, caplog):
    """Synthetic clips, then a local folder in the same clips folder: the manifest and extract see
    the local clip only; the synthetic files stay on disk (a switch back does not remake them)."""
    from pipeline.config import ExtractConfig
    from pipeline.data.extract import run_extract
    from pipeline.data.extracted import load_meta

    clips = tmp_path / "clips"
    synthetic = _config(tmp_path, ROWS, source="synthetic")
    dl.run_download(synthetic, clips, seed=0)
    old = {r.clip_id for r in manifest.read_manifest(clips)}
    assert len(old) == 4
    _video(tmp_path / "mine" / "a.mp4", seconds=3.0)
    (tmp_path / "labels.csv").write_text("file,label,split\na.mp4,dog,test\n")
    local = LocalConfig(str(tmp_path / "mine"), str(tmp_path / "labels.csv"))
    with caplog.at_level(logging.INFO, logger="pipeline"):
        dl.run_download(dataclasses.replace(synthetic, source="local", local=local), clips, seed=0)
    assert [r.clip_id for r in manifest.read_manifest(clips)] == [local_clip_id("a.mp4")]
    assert all((clips / video_path(c)).is_file() for c in old)
    assert "4 clip files in" in caplog.text and "not in this source's manifest" in caplog.text
    cfg = ExtractConfig(
        num_frames=2, image_size=16, jpeg_quality=90, sample_rate=16000, clip_seconds=10.0,
        n_fft=1024, hop_length=256, n_mels=80, fmin=125.0, fmax=7600.0, mel_frames=608,
        rows_per_shard=8, workers=1,
    )  # fmt: skip
    run_extract(cfg, clips, tmp_path / "extract", tmp_path / "cache")
    assert load_meta(tmp_path / "extract")["counts"] == {"test": 1}


def test_local_ids_and_default_split_are_stable():
    assert local_clip_id("a/b c.mp4") != local_clip_id("a/b_c.mp4")
    assert local_clip_id("../../etc/passwd").startswith("passwd_")
    assert re.fullmatch(r"[A-Za-z0-9_-]+", local_clip_id("ünï cödé;rm -rf.mp4"))
    splits = [default_split(f"clip{i}.mp4") for i in range(2000)]
    assert splits == [default_split(f"clip{i}.mp4") for i in range(2000)]
    assert 0.07 < splits.count("test") / len(splits) < 0.13


def test_local_missing_inputs_are_user_errors(tmp_path):
    cfg = _config(
        tmp_path,
        ROWS,
        source="local",
        local=LocalConfig(videos_dir=str(tmp_path / "nope"), labels_csv=str(tmp_path / "no.csv")),
    )
    with pytest.raises(DownloadError, match="videos_dir"):
        download_local(cfg, tmp_path / "clips", previous=[])
    (tmp_path / "v").mkdir()
    (tmp_path / "l.csv").write_text("name,label\nx.mp4,dog\n")
    cfg = dataclasses.replace(cfg, local=LocalConfig(str(tmp_path / "v"), str(tmp_path / "l.csv")))
    with pytest.raises(DownloadError, match="header"):
        download_local(cfg, tmp_path / "clips", previous=[])
