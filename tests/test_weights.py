"""pipeline.weights: `visual-echoes weights list|fetch|check` and the weight report of
`visual-echoes check`, against an HTTP server this test starts on 127.0.0.1.

The stand-ins are random bytes (loading the real layouts is tested elsewhere), but every
verification the built-in registry uses is exercised with their own hashes: a full sha256
(CLIP), a torch.hub sha256 prefix (VGGish), md5 (PANNs, the SpecVQGAN tarball), a git blob id
(the MelGAN file) and none (taming, Wav2CLIP: recorded in the lock file on first download).
The SpecVQGAN tarball has the released run folder's layout (docs/references.md).
"""

from __future__ import annotations

import hashlib
import http.server
import io as _io
import os
import random
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.profiles import load_profile
from pipeline.weights.download import _content_range
from pipeline.weights.registry import (
    LOCK_FILE,
    REGISTRY_FILE,
    WEIGHTS_DIR,
    Lock,
    WeightsError,
    load_registry,
)

ROOT = Path(__file__).resolve().parents[1]
RUN = "2021-05-19T22-16-54_vggsound_codebook"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


# ------------------------------------------------------------------------------ loopback server


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving `files` (URL path -> bytes), Range honoured.

    `script(path, *actions)` queues what the next requests for `path` get: "ok", "404",
    "drop" (headers, 40 % of the body, then the connection is cut), "stall" (headers, 30 % of
    the body, then silence for `stall_s`), "ignore_range" (200 and the whole body even when a
    range was asked); `redirects` maps a path to another (302). Each body has a strong ETag
    and an `If-Range` naming another one gets the whole body. `requests` records (path, Range
    header, action) for every request, `if_range` the If-Range headers.
    """

    def __init__(self, stall_s: float = 4.0) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.stall_s = stall_s
        self.requests: list[tuple[str, str | None, str]] = []
        self.if_range: list[str | None] = []
        self._scripts: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda request, address: None  # cut connections are expected
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()

    def script(self, path: str, *actions: str) -> None:
        with self._lock:
            self._scripts.setdefault(path, []).extend(actions)

    def made(self, path: str) -> list[tuple[str | None, str]]:
        """(Range header, action) of every request for `path`."""
        with self._lock:
            return [(rng, action) for p, rng, action in self.requests if p == path]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                with server._lock:
                    queue = server._scripts.get(self.path)
                    action = queue.pop(0) if queue else "ok"
                    server.requests.append((self.path, rng, action))
                    server.if_range.append(self.headers.get("If-Range"))
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                data = server.files.get(self.path)
                if data is None or action == "404":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                start = 0
                etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
                if_range = self.headers.get("If-Range")
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and action != "ignore_range" and if_range in (None, etag):
                    start = int(m[1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        return self.end_headers()
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", etag)
                self.end_headers()
                body = data[start:]
                try:
                    if action in ("drop", "stall"):
                        tenths = 4 if action == "drop" else 3
                        self.wfile.write(body[: len(body) * tenths // 10])
                        self.wfile.flush()
                        if action == "stall":
                            time.sleep(server.stall_s)
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return None
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                return None

        return Handler


@pytest.fixture
def server(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    s = FileServer()
    yield s
    s.close()


# ------------------------------------------------------------------------------------ stand-ins


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, _io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def codebook_tarball(ckpt: bytes, extra: list | None = None) -> bytes:
    """The SpecVQGAN codebook release: the run folder with checkpoints/ and the two configs
    its train.py writes (<time>-project.yaml, <time>-lightning.yaml)."""
    stamp = RUN.split("_")[0]
    return _tar(
        [
            _dir(RUN),
            _dir(f"{RUN}/checkpoints"),
            _file(f"{RUN}/checkpoints/epoch_39.ckpt", ckpt),
            _dir(f"{RUN}/configs"),
            _file(f"{RUN}/configs/{stamp}-project.yaml", b"model:\n  base_learning_rate: 4.5e-6\n"),
            _file(f"{RUN}/configs/{stamp}-lightning.yaml", b"lightning:\n  trainer: {}\n"),
            *(extra or []),
        ]
    )


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Official:
    """Stand-ins for the seven files, served by `server` at /official/<name> (the codebook
    behind a redirect), and a registry that publishes their hashes as the real one does."""

    def __init__(self, server: FileServer, tmp: Path, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.server = server
        self.bodies = {
            name: rng.randbytes(200_000 + 1000 * i)
            for i, name in enumerate(load_registry())
            if name != "specvqgan_vggsound_codebook"
        }
        self.ckpt = rng.randbytes(150_000)
        self.bodies["specvqgan_vggsound_codebook"] = codebook_tarball(self.ckpt)
        self.entries = yaml.safe_load(REGISTRY_FILE.read_text())
        for name, entry in self.entries.items():
            body = self.bodies[name]
            entry["url"] = f"{server.url}/official/{name}"
            server.files[f"/official/{name}"] = body
            sha256, md5 = hashlib.sha256(body).hexdigest(), hashlib.md5(body).hexdigest()
            entry["sha256"] = {64: sha256, 0: ""}.get(len(entry["sha256"]), sha256[:8])
            entry["md5"] = md5 if entry["md5"] else ""
            entry["git_blob_sha1"] = _blob_id(body) if entry["git_blob_sha1"] else ""
        self.entries["specvqgan_vggsound_codebook"]["url"] = f"{server.url}/moved/codebook"
        server.redirects["/moved/codebook"] = "/official/specvqgan_vggsound_codebook"
        self.registry = tmp / "registry.yaml"
        self.write()

    def write(self) -> None:
        self.registry.write_text(yaml.safe_dump(self.entries, sort_keys=False))

    def path(self, name: str) -> str:
        return f"/official/{name}"

    def serve(self, name: str, body: bytes) -> None:
        self.server.files[self.path(name)] = body


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A folder laid out as the repository's root (params.yaml, profiles/), the working one."""
    repo = tmp_path / "repo"
    (repo / "profiles").mkdir(parents=True)
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (repo / "profiles" / "paper.yaml").write_text((ROOT / "profiles" / "paper.yaml").read_text())
    monkeypatch.chdir(repo)
    return repo


@pytest.fixture
def official(server, tmp_path) -> Official:
    return Official(server, tmp_path)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def fetch(capsys, official: Official, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, "weights", "fetch", "--registry", str(official.registry), *args)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------- the acceptance path


def test_fetch_all_fills_the_folder_that_check_accepts_under_the_paper_profile(checkout, official):
    """As a user would: the paper profile, `check` refusing the missing files, `weights fetch
    --all`, then `check` accepting every file as verified; in child processes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def ve(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "pipeline.cli", *args]
        return subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip

    assert ve("profile", "profiles/paper.yaml").returncode == 0
    reg = ("--registry", str(official.registry))
    before = ve("check", *reg)
    assert before.returncode == 1, before.stdout + before.stderr
    assert "7 weight file(s) the params point at are missing" in before.stderr
    assert "weights fetch --all" in before.stderr
    assert "Traceback" not in before.stderr

    got = ve("weights", "fetch", "--all", *reg)
    assert got.returncode == 0, got.stdout + got.stderr
    weights = checkout / WEIGHTS_DIR
    assert (weights / RUN / "checkpoints" / "epoch_39.ckpt").read_bytes() == official.ckpt
    assert (weights / RUN / "configs" / "2021-05-19T22-16-54-project.yaml").is_file()
    assert not any(p.name.endswith(".part") or ".tmp-" in p.name for p in weights.rglob("*"))

    after = ve("check", *reg)
    assert after.returncode == 0, after.stdout + after.stderr
    lines = [line for line in after.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == 7 and all(": verified (" in line for line in lines), after.stdout
    # The lock holds the entries with no full published sha256 (all but CLIP), and for the
    # tarball the file the params read as well.
    lock = Lock(checkout / LOCK_FILE)
    assert sorted(lock.entries) == sorted(n for n in official.entries if n != "clip_vit_b32")
    inner = lock.recorded("specvqgan_vggsound_codebook", "file")
    assert inner["sha256"] == hashlib.sha256(official.ckpt).hexdigest()

    listed = ve("weights", "list", *reg)
    rows = [r for r in listed.stdout.splitlines() if r.startswith("| ")][1:]  # no header
    assert len(rows) == 7 and all(r.endswith("| verified |") for r in rows), listed.stdout


def test_paper_profile_points_at_the_registry_files_under_weights():
    params = load_profile(ROOT / "profiles" / "paper.yaml", ROOT / "params.yaml")
    for w in load_registry().values():
        value = params
        for part in w.params_key.split("."):
            value = getattr(value, part)
        assert value == f"{WEIGHTS_DIR}/{w.file}", w.name
    ignored = (ROOT / ".gitignore").read_text().split() + (ROOT / ".dvcignore").read_text().split()
    assert ignored.count(f"/{WEIGHTS_DIR}/") == 2
    lock = Lock(ROOT / LOCK_FILE)  # committed; entries only ever come from verified downloads
    assert set(lock.entries) <= set(load_registry())
    for name in lock.entries:
        assert lock.recorded(name, "download") and lock.recorded(name, "file")


def test_every_official_checkpoint_key_has_a_registry_entry():
    """Adding a checkpoint path to the official extractors without a registry entry fails here."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    keys = {f"evaluator.official.{k}" for k in data["evaluator"]["official"]}
    keys |= {"tokenizers.image.pretrained", "tokenizers.audio.pretrained", "tokenizers.vocoder.melgan"}  # fmt: skip
    assert {w.params_key for w in load_registry().values()} == keys


# ------------------------------------------------------------------------------ download faults


def test_a_cut_connection_resumes_with_a_range_request(checkout, official, capsys):
    name = "wav2clip"
    official.server.script(official.path(name), "drop")
    code, out, err = fetch(capsys, official, name, "--attempts", "2")
    assert code == 0, err
    (first, a), (second, b) = official.server.made(official.path(name))
    assert (first, a) == (None, "drop")
    cut = int(re.fullmatch(r"bytes=(\d+)-", second)[1])
    assert 0 < cut < len(official.bodies[name])
    assert (checkout / WEIGHTS_DIR / "evaluator" / "Wav2CLIP.pt").read_bytes() == official.bodies[name]  # fmt: skip


def test_a_download_cut_in_one_run_resumes_in_the_next(checkout, official, capsys):
    name = "vggish"
    official.server.script(official.path(name), "drop")
    code, _, err = fetch(capsys, official, name, "--attempts", "1")
    assert code == 1 and "rerun to resume" in err and "Traceback" not in err
    final = checkout / WEIGHTS_DIR / "evaluator" / "vggish-10086976.pth"
    part = final.with_name(final.name + ".part")
    assert not final.exists() and 0 < part.stat().st_size < len(official.bodies[name])
    kept = part.stat().st_size
    code, _, err = fetch(capsys, official, name)
    assert code == 0, err
    assert official.server.made(official.path(name))[-1] == (f"bytes={kept}-", "ok")
    assert final.read_bytes() == official.bodies[name] and not part.exists()


def test_a_file_changed_on_the_server_between_runs_is_not_spliced(checkout, official, capsys):
    """Nothing is published for Wav2CLIP: only If-Range keeps a resume from joining two
    versions into a file that the lock would then record."""
    name = "wav2clip"
    official.server.script(official.path(name), "drop")
    assert fetch(capsys, official, name, "--attempts", "1")[0] == 1
    newer = official.bodies[name][::-1]
    official.serve(name, newer)
    code, _, err = fetch(capsys, official, name)
    assert code == 0, err
    first, second = official.server.if_range
    assert first is None and second and second != f'"{hashlib.sha256(newer).hexdigest()[:16]}"'
    final = checkout / WEIGHTS_DIR / "evaluator" / "Wav2CLIP.pt"
    assert final.read_bytes() == newer
    assert Lock(checkout / LOCK_FILE).recorded(name, "file")["sha256"] == hashlib.sha256(newer).hexdigest()  # fmt: skip
    assert leftovers(checkout / WEIGHTS_DIR) == ["evaluator/Wav2CLIP.pt"]


def test_a_server_that_ignores_the_range_starts_over(checkout, official, capsys):
    name = "clip_vit_b32"
    official.server.script(official.path(name), "drop", "ignore_range")
    code, _, err = fetch(capsys, official, name, "--attempts", "2")
    assert code == 0, err
    assert (checkout / WEIGHTS_DIR / "evaluator" / "ViT-B-32.pt").read_bytes() == official.bodies[name]  # fmt: skip


def test_404_fails_at_once_and_installs_nothing(checkout, official, capsys):
    name = "panns_cnn14_16k"
    official.server.script(official.path(name), "404")
    code, _, err = fetch(capsys, official, name)
    assert code == 1 and "HTTP 404" in err and "Traceback" not in err
    assert len(official.server.made(official.path(name))) == 1  # a 404 is not retried
    assert leftovers(checkout / WEIGHTS_DIR) == []


def test_a_body_silent_past_the_timeout_is_cut_and_resumed(checkout, official, capsys):
    name = "vggish"
    official.server.script(official.path(name), "stall", "stall")
    started = time.monotonic()
    code, _, err = fetch(capsys, official, name, "--timeout", "0.5", "--attempts", "1")
    assert time.monotonic() - started < official.server.stall_s  # cut by us, not by the server
    assert code == 1 and "no byte for 0.5 s" in err, err
    final = checkout / WEIGHTS_DIR / "evaluator" / "vggish-10086976.pth"
    assert not final.exists()
    code, _, err = fetch(capsys, official, name, "--timeout", "0.5", "--attempts", "2")
    assert code == 0, err
    ranges = [rng for rng, _ in official.server.made(official.path(name))]
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:])
    assert final.read_bytes() == official.bodies[name]


# ---------------------------------------------------------------------------------- verification


@pytest.mark.parametrize(
    "name", ["clip_vit_b32", "vggish", "panns_cnn14_16k", "specvqgan_melgan_vggsound"]
)
def test_a_download_that_is_not_the_published_file_installs_nothing(
    checkout, official, capsys, name
):
    """Each kind of published hash (sha256, its prefix, md5, git blob id) refuses other bytes."""
    official.serve(name, b"\0" * 1000 + official.bodies[name][1000:])
    code, _, err = fetch(capsys, official, name)
    assert code == 1 and "is not the official file" in err and "nothing was installed" in err
    kind = {"clip_vit_b32": "sha256", "vggish": "sha256", "panns_cnn14_16k": "md5"}.get(name, "git blob id")  # fmt: skip
    assert f"{kind} " in err
    assert leftovers(checkout / WEIGHTS_DIR) == []
    assert Lock(checkout / LOCK_FILE).entries == {}


def test_a_later_download_must_match_the_hash_recorded_by_the_first(checkout, official, capsys):
    name = "vqgan_imagenet_f16_1024"  # nothing published: the first download is recorded
    assert fetch(capsys, official, name)[0] == 0
    final = checkout / WEIGHTS_DIR / "vqgan_imagenet_f16_1024" / "last.ckpt"
    recorded = Lock(checkout / LOCK_FILE).recorded(name, "download")
    assert recorded == {"size": final.stat().st_size, "sha256": hashlib.sha256(final.read_bytes()).hexdigest()}  # fmt: skip
    official.serve(name, official.bodies[name][::-1])  # the host now serves other bytes
    code, _, err = fetch(capsys, official, name, "--force")
    assert code == 1 and f"{LOCK_FILE} recorded" in err
    assert final.read_bytes() == official.bodies[name]  # the verified file stays
    assert not final.with_name("last.ckpt.part").exists()


def test_a_partial_file_from_another_version_is_fetched_again_from_the_start(
    checkout, official, capsys
):
    name = "clip_vit_b32"
    final = checkout / WEIGHTS_DIR / "evaluator" / "ViT-B-32.pt"
    final.parent.mkdir(parents=True)
    final.with_name("ViT-B-32.pt.part").write_bytes(b"an older upload" * 100)
    code, out, err = fetch(capsys, official, name)
    assert code == 0, err
    assert "did not verify; downloading again from the start" in out
    assert final.read_bytes() == official.bodies[name]


def test_weights_check_finds_a_damaged_file_and_fetch_force_repairs_it(checkout, official, capsys):
    assert fetch(capsys, official, "--all")[0] == 0
    reg = ("--registry", str(official.registry))
    assert run_cli(capsys, "weights", "check", *reg)[0] == 0
    ckpt = checkout / WEIGHTS_DIR / RUN / "checkpoints" / "epoch_39.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:-1] + b"x")
    code, out, err = run_cli(capsys, "weights", "check", *reg)
    assert code == 1 and "specvqgan_vggsound_codebook: not the official" in err
    assert f"{RUN}/checkpoints/epoch_39.ckpt: wrong (" in out
    assert fetch(capsys, official, "--force", "specvqgan_vggsound_codebook")[0] == 0
    assert ckpt.read_bytes() == official.ckpt
    assert run_cli(capsys, "weights", "check", *reg)[0] == 0


def test_a_mirror_serves_name_slash_file_name(checkout, official, server, capsys):
    server.files["/mirror/panns_cnn14_16k/Cnn14_16k_mAP%3D0.438.pth"] = official.bodies[
        "panns_cnn14_16k"
    ]
    code, _, err = fetch(capsys, official, "panns_cnn14_16k", "--mirror", f"{server.url}/mirror/")
    assert code == 0, err
    assert official.server.made(official.path("panns_cnn14_16k")) == []


# ------------------------------------------------------------------------------------- tarballs


def _evil(kind: str) -> list:
    if kind == "parent":
        return [_file(f"{RUN}/../../escaped.txt", b"x")]
    if kind == "absolute":
        return [_file("/tmp/escaped-visual-echoes.txt", b"x")]
    if kind == "symlink":
        info = tarfile.TarInfo(f"{RUN}/configs/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        return [(info, None)]
    if kind == "hardlink":
        info = tarfile.TarInfo(f"{RUN}/configs/hard")
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
        return [(info, None)]
    return [_file("elsewhere/file.txt", b"x")]  # outside the run folder


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "hardlink", "outside"])
def test_a_tarball_with_a_member_leaving_its_folder_is_refused(
    checkout, official, capsys, tmp_path, kind
):
    name = "specvqgan_vggsound_codebook"
    official.serve(name, codebook_tarball(official.ckpt, _evil(kind)))
    official.entries[name]["md5"] = ""  # publish nothing: only the member check can refuse it
    official.write()
    code, _, err = fetch(capsys, official, name)
    assert code == 1 and "refused" in err and "Traceback" not in err, err
    weights = checkout / WEIGHTS_DIR
    assert leftovers(weights) == [] and not (weights / RUN).exists()
    assert not list(tmp_path.rglob("escaped*")) and not Path("/tmp/escaped-visual-echoes.txt").exists()  # fmt: skip
    assert Lock(checkout / LOCK_FILE).entries == {}


def test_a_tarball_without_the_checkpoint_is_refused(checkout, official, capsys):
    name = "specvqgan_vggsound_codebook"
    official.serve(name, _tar([_dir(RUN), _file(f"{RUN}/configs/x-project.yaml", b"")]))
    official.entries[name]["md5"] = ""
    official.write()
    code, _, err = fetch(capsys, official, name)
    assert code == 1 and f"holds no {RUN}/checkpoints/epoch_39.ckpt" in err
    assert leftovers(checkout / WEIGHTS_DIR) == []


# ------------------------------------------------------------------------ registry, lock, parts


def test_the_built_in_registry_names_the_published_facts():
    registry = load_registry()
    assert len(registry) == 7
    clip = registry["clip_vit_b32"]
    assert clip.full_sha256 and clip.sha256 in clip.url  # clip.py's URL embeds the sha256
    assert registry["vggish"].sha256 in registry["vggish"].url  # torch.hub's name-<prefix>.pth
    assert registry["specvqgan_vggsound_codebook"].archive.endswith(".tar.gz")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"params_key": "evaluator.official.nope"}, "is not a path key of params.yaml"),
        ({"file": "../outside.pt"}, "file: must be a relative path"),
        ({"sha256": "XYZ"}, "sha256: must be empty or"),
        ({"url": "ftp://host/x"}, "url: must be an http"),
        ({"extra": 1}, "extra: is not a known key"),
    ],
)
def test_a_bad_registry_entry_is_one_sentence_naming_the_key(tmp_path, change, words):
    entries = yaml.safe_load(REGISTRY_FILE.read_text())
    entries["wav2clip"].update(change)
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(entries))
    with pytest.raises(WeightsError, match=re.escape(words)) as err:
        load_registry(path)
    assert "wav2clip" in str(err.value)


def test_a_corrupt_lock_file_is_one_sentence(checkout, capsys):
    (checkout / LOCK_FILE).write_text("{not json")
    code, _, err = run_cli(capsys, "weights", "list")
    assert code == 1 and f"{LOCK_FILE}: not valid JSON" in err


def test_fetch_needs_names_or_all(checkout, capsys):
    assert run_cli(capsys, "weights", "fetch")[0] == 1
    code, _, err = run_cli(capsys, "weights", "fetch", "nope")
    assert code == 1 and "nope: not a known weight file" in err


def test_check_with_no_weight_keys_set_passes(checkout, capsys):
    code, out, _ = run_cli(capsys, "check")
    assert code == 0 and "weight files: none set in the params" in out


def test_content_range_parsing():
    assert _content_range("bytes 100-199/200") == (100, 200)
    assert _content_range("bytes */200") == (None, 200)
    assert _content_range("bytes 0-9/*") == (0, None)
    assert _content_range(None) == (None, None)
