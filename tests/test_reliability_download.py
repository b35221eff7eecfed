"""Faults injected into the download stage: 5xx bursts, a wrong content type, a body that trickles
slower than the timeout, a server that vanishes mid-run, and the stage process itself stopped by
SIGTERM and SIGKILL. Everything runs against the loopback server of conftest.py.

The invariant every test checks: a clip is `ok` only when its final file is complete and decodes
to the 10-s section; nothing half-written is left or counted.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from conftest import DownloadServer

from pipeline.config import DownloadConfig, LocalConfig, SyntheticConfig, VGGSoundConfig
from pipeline.data import download as dl
from pipeline.data import manifest
from pipeline.data.download import DownloadError, download_vggsound, verify_clip
from pipeline.data.manifest import ClipRecord, video_path


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(dl, "RETRY_DELAY_S", 0.01)


class FaultServer(DownloadServer):
    """The conftest server plus the faults it lacks, queued with `script` like its own:
    ("status", code) an empty answer with that code; "html" a web page instead of a video;
    "html_as_video" that page labelled video/mp4; "wrong_type" the video's bytes labelled
    text/html; ("trickle", gap_s) the headers and 5% of the body, then one byte every `gap_s`
    until the client gives up (at most 4 s)."""

    FAULTS = ("status", "html", "html_as_video", "wrong_type", "trickle")
    PAGE = b"<html><body><p>Nothing to see here.</p></body></html>"

    def _handler(self):
        base = super()._handler()
        server = self

        class Handler(base):
            def _serve(self, body: bool) -> None:
                with server._lock:
                    queue = server._scripts.get(self.path) or ["ok"]
                    head = queue[0]
                name = head[0] if isinstance(head, tuple) else head
                if name not in server.FAULTS:
                    return super()._serve(body)
                server._next_action(self.command, self.path, self.headers.get("Range"), None)
                if name == "status":
                    return self._empty(head[1])
                data, kind = server.video, "video/mp4"
                if name == "html":
                    data, kind = server.PAGE, "text/html"
                elif name == "html_as_video":
                    data = server.PAGE
                elif name == "wrong_type":
                    kind = "text/html; charset=utf-8"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not body:
                    return None
                try:
                    if name != "trickle":
                        self.wfile.write(data)
                        return None
                    self.wfile.write(data[: len(data) // 20])
                    self.wfile.flush()
                    deadline = time.monotonic() + 4.0
                    for i in range(len(data) // 20, len(data)):
                        if time.monotonic() > deadline:
                            break
                        time.sleep(head[1])
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True
                return None

        return Handler


@pytest.fixture
def server(download_video, download_server) -> FaultServer:
    """A `FaultServer` (proxies already cleared by `download_server`)."""
    srv = FaultServer(download_video.read_bytes())
    yield srv
    srv.close()


def _config(tmp_path: Path, rows: str, url: str, **vggsound) -> DownloadConfig:
    csv = tmp_path / "vggsound.csv"
    csv.write_text(rows)
    options = dict(
        csv=str(csv), split="test", url_template=url, format="b", workers=1,
        sleep_requests=0.0, sleep_interval=0.0, max_sleep_interval=0.0, socket_timeout=2.0,
        retries=3, backoff_s=0.05, max_backoff_s=5.0, cookiefile="",
    )  # fmt: skip
    options.update(vggsound)
    return DownloadConfig(
        source="vggsound", limit=0, splits=("train", "test"), classes=(), retry_failed=False,
        synthetic=SyntheticConfig(2, 1, 1, 64, 48, 10, 16000, 10.0),
        vggsound=VGGSoundConfig(**options), local=LocalConfig("sources/videos", "sources/labels.csv"),
    )  # fmt: skip


def _leftovers(clips: Path) -> list[Path]:
    return [p for p in clips.rglob("*") if p.name.startswith(".tmp") or p.suffix == ".part"]


def _assert_honest(clips: Path, records: list[ClipRecord]) -> None:
    """ok ⇔ a complete, decodable 10-s clip at the record's path; no other file anywhere."""
    ok = {r.clip_id: r for r in records if r.status == "ok"}
    for r in ok.values():
        info = verify_clip(clips / r.path)  # video + audio, 10 s ± 1.5 s, or it raises
        assert abs(info.duration_s - 10) < 0.2 and r.size_bytes == (clips / r.path).stat().st_size
    for r in records:
        if r.status != "ok":
            assert r.path == "" and not (clips / video_path(r.clip_id)).exists(), r
    files = {p.relative_to(clips).as_posix() for p in clips.rglob("*") if p.is_file()}
    assert files == {manifest.MANIFEST_NAME, *(r.path for r in ok.values())}
    assert _leftovers(clips) == [] and not (clips / dl.WORK_DIR).exists()


# ------------------------------------------------------------------------------------ in process


def test_a_5xx_burst_is_ridden_out_and_a_longer_one_is_recorded_failed(tmp_path, server):
    # a: 502 and 503 on attempts 1 and 2, fine on 3; b: the burst outlasts the 3 attempts.
    server.script("/aaaaaaaaaaa.mp4", ("status", 502), ("status", 503))
    server.script("/bbbbbbbbbbb.mp4", *[("status", 503)] * 10)
    rows = "aaaaaaaaaaa,1,dog,train\nbbbbbbbbbbb,2,cat,train\n"
    clips = tmp_path / "clips"
    records = {
        r.clip_id: r
        for r in download_vggsound(_config(tmp_path, rows, server.url_template), clips, previous=[])
    }
    a, b = records["aaaaaaaaaaa_000001"], records["bbbbbbbbbbb_000002"]
    assert (a.status, a.attempts) == ("ok", 3)
    assert (b.status, b.attempts) == ("http_error", 3) and "503" in b.error
    _assert_honest(clips, list(records.values()))
    # the burst is over: a rerun with retry_failed fetches b, and only b
    with server._lock:
        server._scripts.clear()
    cfg = _config(tmp_path, rows, server.url_template)
    cfg = DownloadConfig(**{**cfg.__dict__, "retry_failed": True})
    before = server.count("/aaaaaaaaaaa.mp4")
    again = download_vggsound(cfg, clips, previous=manifest.read_manifest(clips))
    assert {r.status for r in again} == {"ok"} and server.count("/aaaaaaaaaaa.mp4") == before
    _assert_honest(clips, again)


@pytest.mark.parametrize(
    ("fault", "status", "attempts"),
    [
        ("html", "unavailable", 1),  # a web page: yt-dlp finds no video, permanent
        ("html_as_video", "other", 3),  # a page labelled video/mp4: it never decodes
        ("wrong_type", "ok", 1),  # a real video labelled text/html: sniffed, verified, kept
    ],
)
def test_a_wrong_content_type_is_ok_only_when_the_bytes_are_the_clip(
    tmp_path, server, fault, status, attempts
):
    server.script("/abcdefghijk.mp4", *[fault] * 6)
    clips = tmp_path / "clips"
    (record,) = download_vggsound(
        _config(tmp_path, "abcdefghijk,0,dog,train\n", server.url_template), clips, previous=[]
    )
    assert (record.status, record.attempts) == (status, attempts), record.error
    _assert_honest(clips, [record])


def test_a_body_trickling_slower_than_the_timeout_is_retried(tmp_path, server):
    # The first request (yt-dlp's look at the URL) is answered; ffmpeg's body request trickles.
    server.script("/abcdefghijk.mp4", "ok", ("trickle", 1.0))
    clips = tmp_path / "clips"
    cfg = _config(tmp_path, "abcdefghijk,4,dog,train\n", server.url_template, socket_timeout=0.5)
    started = time.monotonic()
    (record,) = download_vggsound(cfg, clips, previous=[])
    assert (record.status, record.attempts) == ("ok", 2), record.error
    assert time.monotonic() - started < 20
    _assert_honest(clips, [record])
    # ... and a server that only ever trickles gives a failure, never an ok clip
    server.script("/bbbbbbbbbbb.mp4", *[("ok"), ("trickle", 1.0)] * 3)
    cfg = _config(tmp_path, "bbbbbbbbbbb,4,dog,train\n", server.url_template, socket_timeout=0.5)
    (bad,) = download_vggsound(cfg, tmp_path / "clips2", previous=[])
    assert bad.status != "ok" and bad.attempts == 3
    _assert_honest(tmp_path / "clips2", [bad])


def test_a_server_vanishing_mid_run_stops_the_run_and_the_rerun_finishes(
    tmp_path, server, download_video
):
    rows = "".join(f"{c * 11},{i},dog,train\n" for i, c in enumerate("abcd"))
    clips = tmp_path / "clips"
    # b's first request takes the server down: b, c and d meet a refused connection
    server.script("/bbbbbbbbbbb.mp4", lambda: server.close())
    with pytest.raises(DownloadError, match=r"stopped answering \(connection refused\)"):
        download_vggsound(_config(tmp_path, rows, server.url_template), clips, previous=[])
    saved = manifest.read_manifest(clips)
    # a is ok; the rest is not marked failed (that would need retry_failed) but left for later
    assert [(r.clip_id, r.status) for r in saved] == [("aaaaaaaaaaa_000000", "ok")]
    _assert_honest(clips, saved)

    back = FaultServer(download_video.read_bytes())  # the server is back (on another port)
    try:
        done = download_vggsound(_config(tmp_path, rows, back.url_template), clips, previous=saved)
        assert [r.status for r in done] == ["ok"] * 4
        assert back.count("/aaaaaaaaaaa.mp4") == 0  # nothing fetched twice
        _assert_honest(clips, done)
    finally:
        back.close()


# --------------------------------------------------------------------------- the stage process

ROWS = "".join(f"{c * 11},{i},{'dog' if i % 2 else 'cat'},train\n" for i, c in enumerate("abcde"))
IDS = [f"{c * 11}_{i:06d}" for i, c in enumerate("abcde")]


def _params(project, url: str, csv: Path) -> None:
    project.params({
        "download": {
            "source": "vggsound",
            "vggsound": {
                "csv": str(csv), "url_template": url, "format": "b", "workers": 1,
                "sleep_requests": 0.0, "sleep_interval": 0.0, "max_sleep_interval": 0.0,
                "socket_timeout": 2.0, "retries": 3, "backoff_s": 0.1, "max_backoff_s": 5.0,
            },
        },
    })  # fmt: skip


def test_sigterm_then_sigkill_mid_run_then_a_rerun_loses_and_refetches_nothing(
    tmp_path, server, stage_project
):
    csv = tmp_path / "vggsound.csv"
    csv.write_text(ROWS)
    _params(stage_project, server.url_template, csv)
    clips = stage_project.root / "data" / "clips"
    finals = lambda: {p.stem for p in (clips / "videos").rglob("*.mp4")}  # noqa: E731

    # SIGTERM: the stage unwinds like Ctrl-C, saves its manifest, removes its temporaries
    proc = stage_project.start("download")
    stage_project.wait_for(proc, lambda: len(finals()) >= 1)
    assert stage_project.stop(proc, signal.SIGTERM) == 130
    out, err = stage_project.output(proc)
    assert "download: interrupted; rerun to resume" in err and "Traceback" not in err
    saved = manifest.read_manifest(clips)
    assert {r.clip_id for r in saved} <= set(IDS) and all(r.status == "ok" for r in saved)
    assert {r.clip_id for r in saved} <= finals() and len(saved) >= 1
    assert _leftovers(clips) == [] and not (clips / dl.WORK_DIR).exists()
    after_term = finals()
    count = lambda: [server.count(f"/{c * 11}.mp4") for c in "abcde"]  # noqa: E731
    before = count()

    # SIGKILL: no chance to clean up; what is on disk must still be trustworthy
    proc = stage_project.start("download")
    stage_project.wait_for(proc, lambda: len(finals()) >= len(after_term) + 1)
    stage_project.stop(proc, signal.SIGKILL)
    after_kill = finals()
    for clip_id in after_kill:  # a final file only ever appears complete
        verify_clip(next((clips / "videos").rglob(f"{clip_id}.mp4")))
    requests = count()

    code, out, err = stage_project.run("download")
    assert code == 0, err
    assert out.strip().startswith("download (vggsound): 5 of 5 clips ok")
    done = manifest.read_manifest(clips)
    assert [r.clip_id for r in done] == IDS and {r.status for r in done} == {"ok"}
    # nothing that was finished before a signal is fetched again
    for i, clip_id in enumerate(IDS):
        if clip_id in after_term:
            assert requests[i] == before[i], clip_id
        if clip_id in after_kill:
            assert count()[i] == requests[i], clip_id
    _assert_honest(clips, done)


def test_a_failed_download_run_under_dvc_keeps_the_previous_summary(tmp_path):
    """DVC deletes a stage's outputs before it runs; the summary of the last good run must stay
    (dvc.lock still describes that run)."""
    import json

    import yaml
    from conftest import new_tiny_repo, run_in

    repo = new_tiny_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["download"]["source"] = "local"
    # both exist (DVC checks its dependencies first), but the folder is a file: the stage fails
    params["download"]["local"] = {"videos_dir": "nowhere", "labels_csv": "nowhere.csv"}
    (repo / "nowhere").write_text("not a folder\n")
    (repo / "nowhere.csv").write_text("file,label\n")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    summary = repo / "reports" / "download" / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"clips": 3, "ok": 3}))
    out = run_in(repo, "dvc", "repro", "download", check=False)
    assert "download: error:" in out and "Traceback" not in out, out
    assert json.loads(summary.read_text()) == {"clips": 3, "ok": 3}
