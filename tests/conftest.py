"""Shared pytest fixtures.

Each block is named for the module whose tests use it; append new blocks, keep existing ones.
"""

from __future__ import annotations

import http.server
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest

# ------------------------------------------------------------------ download: loopback video server

DOWNLOAD_VIDEO_SECONDS = 30
DOWNLOAD_VIDEO_FPS = 25
_DOWNLOAD_PROXY_VARS = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)


@pytest.fixture(scope="session")
def download_video(tmp_path_factory) -> Path:
    """A 30-s 128x96 H.264/AAC MP4 (testsrc + 440 Hz sine, 2-s GOP, moov first), made once."""
    from pipeline.media import ffmpeg_exe

    path = tmp_path_factory.mktemp("download-video") / "source.mp4"
    seconds, fps = DOWNLOAD_VIDEO_SECONDS, DOWNLOAD_VIDEO_FPS
    subprocess.run(
        [
            ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostdin",
            "-y",
            "-f",
            "lavfi",
            "-i",
            f"testsrc=size=128x96:rate={fps}:duration={seconds}",
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency=440:sample_rate=22050:duration={seconds}",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            str(2 * fps),
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-b:a",
            "32k",
            "-movflags",
            "+faststart",
            "-shortest",
            str(path),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


class DownloadServer:
    """A threaded HTTP server on 127.0.0.1 that serves one MP4 under any `/<name>.mp4`.

    `script(path, *actions)` queues what the next requests for `path` get, in order; once the
    queue is empty requests are served normally. Actions: "ok", "404", "500", "drop" (headers
    and 40 % of the body, then the connection is cut), "stall" (no answer for `stall_s`),
    ("429", retry_after) and any callable (run, then served normally). Range requests are
    honoured. `requests` records (time, method, path, range, action) for every request,
    `cookies` every Cookie header received.
    """

    def __init__(self, video: bytes, stall_s: float = 3.0) -> None:
        self.video = video
        self.stall_s = stall_s
        self.requests: list[tuple[float, str, str, str | None, str]] = []
        self.cookies: list[str] = []
        self._scripts: dict[str, list] = {}
        self._lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda request, address: None  # cut connections are expected
        self.port = self._httpd.server_address[1]
        self.url_template = f"http://127.0.0.1:{self.port}/{{id}}.mp4"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def script(self, path: str, *actions) -> None:
        with self._lock:
            self._scripts.setdefault(path, []).extend(actions)

    def count(self, path: str) -> int:
        """How many requests `path` has received."""
        with self._lock:
            return sum(1 for r in self.requests if r[2] == path)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next_action(self, method: str, path: str, rng: str | None, cookie: str | None):
        with self._lock:
            if cookie:
                self.cookies.append(cookie)
            queue = self._scripts.get(path)
            action = queue.pop(0) if queue else "ok"
            name = (
                action
                if isinstance(action, str)
                else (action[0] if isinstance(action, tuple) else "hook")
            )
            self.requests.append((time.monotonic(), method, path, rng, name))
        return action

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _empty(self, code: int, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, body: bool) -> None:
                rng = self.headers.get("Range")
                action = server._next_action(
                    self.command, self.path, rng, self.headers.get("Cookie")
                )
                if callable(action):
                    action()
                    action = "ok"
                if not re.fullmatch(r"/[A-Za-z0-9_-]+\.mp4", self.path) or action == "404":
                    return self._empty(404)
                if action == "500":
                    return self._empty(500)
                if isinstance(action, tuple) and action[0] == "429":
                    return self._empty(429, {"Retry-After": str(action[1])})
                if action == "stall":
                    time.sleep(server.stall_s)
                    self.close_connection = True
                    return None
                data = server.video
                start, end = 0, len(data) - 1
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng or "")
                if m and m[1]:
                    start = int(m[1])
                    end = min(int(m[2]), end) if m[2] else end
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                if not body:
                    return None
                chunk = data[start : end + 1]
                try:
                    if action == "drop":
                        self.wfile.write(chunk[: len(chunk) * 2 // 5])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return None
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                return None

        return Handler


@pytest.fixture
def download_server(download_video, monkeypatch):
    """A `DownloadServer` on a free loopback port, with proxy variables cleared."""
    for name in _DOWNLOAD_PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = DownloadServer(download_video.read_bytes())
    yield server
    server.close()


# ---------------------------------------------------------------- training: a tokens folder


def write_token_dir(
    out_dir: Path,
    *,
    audio_grid: tuple[int, int] = (2, 6),
    image_grid: tuple[int, int] = (3, 3),
    codebook: int = 16,
    num_frames: int = 4,
    classes: int = 4,
    per_class: dict[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """A tokenize-stage output (Parquet + meta.json) with learnable structure: each class has a
    fixed audio and image pattern, and every clip is its class pattern with 10% of ids replaced
    at random; frames differ from each other only by that noise."""
    import numpy as np
    import pyarrow as pa

    from pipeline import io
    from pipeline.tokenizers.batch_tokenize import _compact, _scratch_table
    from pipeline.tokenizers.layout import ModalityLayout, TokenLayout

    per_class = per_class or {"train": 8, "test": 2}
    layout = TokenLayout(
        ModalityLayout("audio", codebook, audio_grid), ModalityLayout("image", codebook, image_grid)
    )
    rng = np.random.default_rng(seed)
    pattern_a = rng.integers(0, codebook, (classes, layout.audio.length))
    pattern_v = rng.integers(0, codebook, (classes, layout.image.length))

    def noisy(pattern: np.ndarray) -> np.ndarray:
        noise = rng.random(pattern.shape) < 0.1
        return np.where(noise, rng.integers(0, codebook, pattern.shape), pattern)

    rows = {
        "clip_id": [],
        "label": [],
        "split": [],
        "image_ids": [],
        "audio_ids": [],
        "encoder": [],
    }
    for split, n in per_class.items():
        for c in range(classes):
            for i in range(n):
                rows["clip_id"].append(f"{split}-c{c}-{i:03d}")
                rows["label"].append(f"class {c}")
                rows["split"].append(split)
                rows["image_ids"].append(np.stack([noisy(pattern_v[c]) for _ in range(num_frames)]))
                rows["audio_ids"].append(noisy(pattern_a[c]))
                rows["encoder"].append("test")
    batch = {
        k: (np.stack(v).astype(np.uint16) if k.endswith("_ids") else np.array(v, object))
        for k, v in rows.items()
    }
    table: pa.Table = _scratch_table(batch)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, counts = _compact(table, layout, num_frames, 16, out_dir)
    io.write_json(
        out_dir / io.META_NAME,
        {
            "layout": layout.to_dict(),
            "counts": counts,
            "num_frames": num_frames,
            "labels": [f"class {c}" for c in range(classes)],
            "files": files,
            "tokenizers": {},
        },
    )
    return out_dir


@pytest.fixture(scope="session")
def make_token_dir():
    """`write_token_dir` as a fixture (test modules cannot import conftest)."""
    return write_token_dir


# ------------------------------------------------------------ dvc / generate: a tiny project

ROOT = Path(__file__).resolve().parents[1]


def run_in(repo: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    """Run a command in `repo` with this venv's executables first on PATH (and `env` added);
    stdout + stderr."""
    import os
    import sys

    env = {**os.environ, **(env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    # The console script imports the code under test, not whatever checkout the venv was made in
    # (stages run `python -m` inside `repo`, whose own copy of the code comes first).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


class Upstream(NamedTuple):
    """A tiny project on which `dvc repro tokenizers` has run, and what that printed. `reads`:
    the folder where its stages noted the params they read (`pipeline.config`); pass `reads_env`
    to the repro that runs the rest of the DAG, so that it notes them there too."""

    repo: Path
    log: str
    reads: Path

    @property
    def reads_env(self) -> dict[str, str]:
        from pipeline.config import PARAM_READS_ENV

        return {PARAM_READS_ENV: str(self.reads)}


UPSTREAM_STAGES = ("download", "extract", "tokenizers")


@pytest.fixture(scope="session")
def tiny_upstream(tmp_path_factory) -> Upstream:
    """The project as a fresh git + DVC repository on the tiny profile, after `dvc repro
    tokenizers`: the clips, the extracted data and the tokenizers every later stage starts from.
    Built once for the session; tests never change it, they take a `copy_repo` of it."""
    repo = new_tiny_repo(tmp_path_factory.mktemp("upstream") / "repo")
    reads = tmp_path_factory.mktemp("param-reads")
    upstream = Upstream(repo, "", reads)
    log = run_in(repo, "dvc", "repro", UPSTREAM_STAGES[-1], env=upstream.reads_env)
    return upstream._replace(log=log)


def new_tiny_repo(repo: Path) -> Path:
    """The project's code, dvc.yaml and params.yaml on the tiny profile in a fresh git + DVC
    repository at `repo`, nothing run yet."""
    import shutil

    from pipeline.profiles import apply_profile

    repo.mkdir(parents=True)
    for name in ("pipeline", "stages", "profiles", "sources"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    apply_profile(repo / "profiles" / "tiny.yaml", repo / "params.yaml")
    run_in(repo, "git", "init", "-q")
    run_in(repo, "dvc", "init", "-q")
    run_in(repo, "dvc", "config", "core.analytics", "false")
    return repo


def copy_repo(src: Path, dst: Path) -> Path:
    """A copy of the repository `src` at `dst`, as a user would copy it (`cp -r`), the MLflow
    store and its artifacts included: the copy's stages log into the copy's store and folder
    (pipeline/tracking.py), never into `src`'s. DVC's scratch folder (locks, temp) stays."""
    import shutil

    skip = {src / ".dvc" / "tmp"}
    shutil.copytree(src, dst, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if Path(folder, n) in skip])  # fmt: skip
    return dst


@pytest.fixture(scope="session")
def tiny_project(tiny_upstream, tmp_path_factory) -> Path:
    """A copy of `tiny_upstream` that the session takes further: test_dvc runs the rest of the
    DAG in it, test_generate uses the checkpoint that leaves."""
    return copy_repo(tiny_upstream.repo, tmp_path_factory.mktemp("tiny") / "repo")


# ------------------------------------------------ reliability: stage processes to interrupt


class StageProject:
    """A scratch folder where `python -m stages.<name>` runs as a child process.

    `params(overrides)` writes params.yaml: the repository's, with `overrides` merged in (paths
    stay relative, so every output lands in the folder). Each child runs in its own process group
    with this venv first on PATH, the repository on PYTHONPATH and a SQLite MLflow store in the
    folder; stdout and stderr go to files (a pipe could fill up and stall a child being killed).
    """

    def __init__(self, root: Path, mlflow_db: Path | None = None) -> None:
        import shutil

        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.runs = 0
        if mlflow_db is not None:  # an empty store made once: creating one takes seconds
            shutil.copy(mlflow_db, root / "mlflow.db")

    def params(self, overrides: dict) -> None:
        import yaml

        from pipeline.config import merge, parse_params

        data = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
        parse_params(data)
        (self.root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def env(self, **extra: str) -> dict[str, str]:
        import os
        import sys

        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        env["PYTHONPATH"] = str(ROOT)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{self.root / 'mlflow.db'}"
        env.update(extra)
        return env

    def start(self, stage: str, **env: str) -> subprocess.Popen:
        import sys

        self.runs += 1
        log = self.root / f"run-{self.runs}-{stage}"
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"stages.{stage}"],
                cwd=self.root,
                env=self.env(**env),
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        proc.log = log  # type: ignore[attr-defined]
        return proc

    @staticmethod
    def output(proc: subprocess.Popen) -> tuple[str, str]:
        """(stdout, stderr) of a finished child."""
        log = proc.log  # type: ignore[attr-defined]
        return Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()

    def run(self, stage: str, timeout: float = 300, **env: str) -> tuple[int, str, str]:
        proc = self.start(stage, **env)
        try:
            proc.wait(timeout)
        finally:
            self.stop(proc)
        return proc.returncode, *self.output(proc)

    @staticmethod
    def wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
        """Poll `ready()` every 20 ms until it is true; fails if the child ended first."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, f"the stage ended (status {proc.returncode}) too early"
            assert time.monotonic() < deadline, "the stage never reached the point to interrupt"
            time.sleep(0.02)

    @staticmethod
    def stop(proc: subprocess.Popen, sig: int | None = None, timeout: float = 60) -> int:
        """Send `sig` to the stage process (only it, as the OOM killer would), wait for it, then
        kill whatever of its process group is left (ffmpeg children, Ray helpers)."""
        import contextlib
        import os
        import signal

        if sig is not None and proc.poll() is None:
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """A SQLite MLflow store with its tables created and no runs."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def stage_project(tmp_path, empty_mlflow_db) -> StageProject:
    """A `StageProject` in a fresh temporary folder."""
    return StageProject(tmp_path / "project", empty_mlflow_db)


# ------------------------------------------- checkpoint / official: the released weight files


@pytest.fixture(scope="session")
def official_files(tmp_path_factory):
    """Stand-ins of the official weight files in their released layouts, random weights at the
    official sizes (tests/official_layouts.py): `official_files.get("panns", ...)` builds each
    once per session, in a child process with stand-in producer packages."""
    from official_layouts import OfficialFiles

    return OfficialFiles(tmp_path_factory.mktemp("official-files"))


# ------------------------------------------ official / evaluate_paper: Fréchet distances fast


def low_rank_frechet(a, b) -> float:
    """pipeline.metrics.math.frechet_distance of two GaussianStats, in seconds where scipy's
    sqrtm at d = 2048 takes minutes on a busy 2-core box; exact when rank Σa < a.n + 4:
    ‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½.

    Σa of n rows has rank ≤ n − 1, so k = n + 4 random directions of Σa span its range; with
    Σa = H Hᵀ (H: d × k), the eigenvalues of Hᵀ Σb H are the nonzero ones of Σa Σb. O(d² n).
    """
    import numpy as np

    k = min(a.dim, a.n + 4)
    q, _ = np.linalg.qr(a.sigma @ np.random.RandomState(0).randn(a.dim, k))
    w, v = np.linalg.eigh(q.T @ a.sigma @ q)
    half = q @ (v * np.sqrt(np.clip(w, 0, None)))
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(half.T @ b.sigma @ half), 0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


# ------------------------------------------------- synthetic, rhythm: rendered mels of every class


class ClassMels(NamedTuple):
    """Real log-mels (80, 848) of rendered demo clips, 5 per class and split, clip-major per
    class; labels alike; frame_rate in mel frames per second."""

    mels: dict[str, list]
    labels: dict[str, list[str]]
    frame_rate: float


@pytest.fixture(scope="session")
def class_mels() -> ClassMels:
    """Audio only is rendered (frames at a token size), then the extract stage's mel."""
    from dataclasses import replace

    from pipeline.config import load_params
    from pipeline.data import audio, synthetic

    params = load_params(ROOT / "params.yaml")
    cfg = replace(params.download.synthetic, num_classes=8, width=48, height=32, fps=2)
    mels: dict[str, list] = {}
    labels: dict[str, list[str]] = {}
    for split in ("train", "test"):
        specs = [synthetic.ClipSpec(c, split, i) for c in range(8) for i in range(5)]
        clips = [synthetic.render_clip(cfg, s, seed=0).audio for s in specs]
        mels[split] = [audio.log_mel(a, params.extract) for a in clips]
        labels[split] = [s.label for s in specs]
    rate = params.extract.sample_rate / params.extract.hop_length
    return ClassMels(mels, labels, rate)


# ------------------------------------------------------------------ the session's own exit

_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    """Shut down any Ray instance a test left connected in this process, and remember the
    status for `pytest_unconfigure`."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """Leave with the session's status once everything is reported, skipping the interpreter's
    teardown: on 2026-12-07 a clean-clone `.ci/run` segfaulted there after all 740 tests had
    passed (C-extension threads, e.g. the gRPC clients of Ray's state API, outliving Python's
    finalisation), and make turned that into a failed CI run. Nothing of the suite runs then."""
    import os
    import sys

    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
