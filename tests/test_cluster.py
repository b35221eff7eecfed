"""`visual-echoes submit` and Ray Train on a real two-node Ray cluster on this machine.

The `ray_cluster` fixture starts `ray start --head --block` (1 CPU, resource node_a, dashboard
and job server on 127.0.0.1) and a second `ray start --address=... --block` (1 CPU, node_b),
each in its own session with its own --temp-dir and free ports, and tears them down by killing
exactly the processes it started (the two `ray start`s, everything under them, and any process
whose command line names its temp dir). `ray stop` is never run: it would stop every Ray
instance on the machine. The unit tests at the top need no cluster; the others are marked
`cluster` and `slow`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import copy_repo, new_tiny_repo, run_in

from pipeline import submit
from pipeline.cli import build_parser, main
from pipeline.profiles import apply_profile

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120


# ----------------------------------------------------------------- unit tests, no cluster


def _repo(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_in_place_job_cds_into_the_workspace_and_runs_repro(tmp_path):
    repo = _repo(tmp_path / "my repo")
    sub = submit.build_submission(
        repo, ["train"], in_place=True, single_item=True, env={"MLFLOW_TRACKING_URI": "http://m"}
    )
    assert sub.entrypoint == f"cd '{repo.resolve()}' && dvc repro --single-item train"
    assert sub.runtime_env == {"env_vars": {"MLFLOW_TRACKING_URI": "http://m"}}
    assert sub.metadata["command"] == "dvc repro --single-item train" and not sub.upload
    assert sub.submission_id.startswith("visual-echoes-train-")
    shared = submit.build_submission(repo / "absent", ["train"], in_place=False,
                                     workspace="/mnt/shared/visual-echoes")  # fmt: skip
    assert shared.entrypoint == "cd /mnt/shared/visual-echoes && dvc repro train"
    with pytest.raises(submit.SubmitError, match="absolute path on the cluster"):
        submit.build_submission(repo, [], in_place=True, workspace="shared/ve")
    bare = submit.build_submission(repo, [], in_place=True, force=True, submission_id="x")
    assert bare.entrypoint.endswith("&& dvc repro --force") and bare.runtime_env == {}
    assert bare.submission_id == "x"


def test_upload_job_ships_code_not_data_and_round_trips_dvc(tmp_path):
    repo = _repo(tmp_path / "repo")
    sub = submit.build_submission(repo, ["tokenize", "train"], in_place=False,
                                  check_remote=lambda r: "store")  # fmt: skip
    steps = sub.entrypoint.split(" && ")
    assert steps[0] == "dvc config --local core.no_scm true"
    assert steps[1] == "dvc repro --pull tokenize train"
    assert steps[2] == "dvc push --with-deps tokenize train"
    assert "emit_results" in steps[3] and sub.upload
    assert sub.runtime_env["working_dir"] == str(repo.resolve())
    excludes = sub.runtime_env["excludes"]
    for pattern in ("/.git/", "/.venv/", "/.dvc/cache/", "/mlruns/", "/mlflow.db"):
        assert pattern in excludes
    # Every data path of params.yaml, but not the reports (they come back with the results).
    for path in ("/data/clips/", "/data/extract/", "/data/tokens/", "/models/transformer/",
                 "/models/tokenizers/", "/data/.cache/"):  # fmt: skip
        assert path in excludes
    assert not any(p.startswith("/reports") for p in excludes)
    single = submit.build_submission(repo, ["train"], in_place=False, single_item=True,
                                     check_remote=lambda r: "store")  # fmt: skip
    assert " && dvc push train && " in single.entrypoint


def test_upload_without_a_dvc_remote_is_a_clear_error(tmp_path):
    repo = _repo(tmp_path)
    with pytest.raises(submit.SubmitError, match="default DVC remote"):
        submit.build_submission(repo, ["train"], in_place=False, check_remote=lambda r: "")
    with pytest.raises(submit.SubmitError, match="has no dvc.yaml"):
        submit.build_submission(tmp_path / "nothing", [], in_place=True)
    with pytest.raises(submit.SubmitError, match="not a stage name"):
        submit.build_submission(repo, ["--force"], in_place=True)


def test_env_forwards_mlflow_and_never_echoes_secrets():
    environ = {
        "MLFLOW_TRACKING_URI": "postgresql://me:hunter2@db/mlflow",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "AWS_SECRET_ACCESS_KEY": "aws",
        "HOME": "/root",
    }
    env = submit.forwarded_env(environ, ["AWS_SECRET_ACCESS_KEY", "STAGE_NOTE=hi"])
    assert env == {
        "MLFLOW_TRACKING_URI": "postgresql://me:hunter2@db/mlflow",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "AWS_SECRET_ACCESS_KEY": "aws",
        "STAGE_NOTE": "hi",
    }
    shown = submit.describe_env(env)
    assert "hunter2" not in shown and "pw," not in shown and "aws" not in shown
    assert "MLFLOW_TRACKING_PASSWORD=<hidden>" in shown and "STAGE_NOTE=hi" in shown
    assert "MLFLOW_TRACKING_URI=postgresql://me@db/mlflow" in shown
    # A port-forward to the cluster's MLflow is not what the job should use; --env still wins.
    tunnel = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    assert submit.forwarded_env(tunnel) == {}
    assert submit.forwarded_env(tunnel, ["MLFLOW_TRACKING_URI=http://mlflow:5000"]) == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000"
    }
    assert submit.forwarded_env({"MLFLOW_TRACKING_URI": "http://localhost:5000"}) == {}
    with pytest.raises(submit.SubmitError, match="not set in this shell"):
        submit.forwarded_env(environ, ["MISSING"])
    with pytest.raises(submit.SubmitError, match="RAY_ADDRESS"):
        submit.forwarded_env(environ, ["RAY_ADDRESS=http://x:8265"])


def test_address_comes_from_the_flag_then_the_environment():
    env = {"RAY_ADDRESS": "http://a:8265", "RAY_API_SERVER_ADDRESS": "http://b:8265"}
    assert submit.resolve_address("http://c:8265", env) == "http://c:8265"
    assert submit.resolve_address(None, env) == "http://b:8265"
    assert submit.resolve_address(None, {"RAY_ADDRESS": "http://a:8265"}) == "http://a:8265"
    with pytest.raises(submit.SubmitError, match="no cluster address"):
        submit.resolve_address(None, {})
    # A GCS address (what stage code wants in RAY_ADDRESS) is refused at once, not joined.
    with pytest.raises(submit.SubmitError, match=r"\$RAY_ADDRESS=10.0.0.5:6379 is not a job"):
        submit.resolve_address(None, {"RAY_ADDRESS": "10.0.0.5:6379"})


def test_unreachable_cluster_is_one_sentence_and_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(_repo(tmp_path))
    code = main(["submit", "--in-place", "--address", f"http://127.0.0.1:{_free_port()}", "x"])
    err = capsys.readouterr().err
    assert code == 1
    assert "visual-echoes: error: cannot reach a Ray job server at http://127.0.0.1:" in err
    assert "Traceback" not in err


def test_log_printer_keeps_the_results_line_back():
    out: list[str] = []
    printer = submit.LogPrinter(out.append)
    for chunk in ("a\nb", "\n" + submit.RESULTS_MARKER + "QUJD", "\nc\nd"):
        printer.feed(chunk)
    printer.close()
    assert out == ["a\n", "b\n", "c\n", "d"]
    assert printer.results == submit.RESULTS_MARKER + "QUJD"
    assert printer.seen == len("a\nb\n" + submit.RESULTS_MARKER + "QUJD\nc\nd")


@pytest.mark.parametrize("data_filter", [True, False], ids=["filter", "python-3.11.2"])
def test_results_round_trip_replaces_lock_and_reports(tmp_path, capsys, monkeypatch, data_filter):
    """Also on a Python without tarfile's data filter (Debian 12's 3.11.2): the same refusals."""
    if not data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    job, local = tmp_path / "job", tmp_path / "local"
    _repo(job)
    _repo(local)
    (local / "keep.txt").write_text("not a result")
    (job / "dvc.lock").write_text("schema: '2.0'\n")
    (job / "reports/train").mkdir(parents=True)
    (job / "reports/train/metrics.json").write_text("{}")
    (local / "reports/old").mkdir(parents=True)
    submit.emit_results(job)
    line = capsys.readouterr().out.strip()
    assert line.startswith(submit.RESULTS_MARKER)
    assert submit.apply_results(line, local) == ["dvc.lock", "reports"]
    assert (local / "dvc.lock").read_text() == "schema: '2.0'\n"
    assert (local / "reports/train/metrics.json").is_file()
    assert not (local / "reports/old").exists() and (local / "keep.txt").is_file()
    for name, kind in (("../escape", tarfile.REGTYPE), ("reports/link", tarfile.SYMTYPE)):
        evil = io.BytesIO()
        with tarfile.open(fileobj=evil, mode="w:gz") as tar:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info, io.BytesIO(b""))
        with pytest.raises(tarfile.TarError):
            submit.apply_results(
                submit.RESULTS_MARKER + base64.b64encode(evil.getvalue()).decode(), local
            )
    assert not (tmp_path / "escape").exists() and not (local / "reports/link").exists()


def test_submit_is_a_subcommand_with_repro_options():
    args = build_parser().parse_args(["submit", "-s", "--in-place", "train", "evaluate"])
    assert args.stages == ["train", "evaluate"] and args.single_item and args.in_place
    assert args.address is None and not args.no_wait


class RayVersionStub:
    """A loopback stand-in for a Ray dashboard's job server on another Ray: answers
    `GET /api/version` with the fields Ray's job head sends (ray.dashboard.modules.version's
    VersionResponse) and the given `ray_version`, 404 to anything else, and records every
    request (a submitted job would be a POST /api/jobs/)."""

    def __init__(self, ray_version: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from ray.dashboard.modules.version import CURRENT_VERSION

        self.requests: list[str] = []
        body = json.dumps({"version": CURRENT_VERSION, "ray_version": ray_version,
                           "ray_commit": "0" * 40, "session_name": "stub"}).encode()  # fmt: skip
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                stub.requests.append(f"{self.command} {self.path}")
                ok = self.command == "GET" and self.path == "/api/version"
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if ok else 0))
                self.end_headers()
                if ok:
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def version_stub():
    stubs: list[RayVersionStub] = []
    yield lambda version: stubs.append(RayVersionStub(version)) or stubs[-1]
    for stub in stubs:
        stub.close()


def test_submit_refuses_a_cluster_on_another_ray_before_submitting(
    tmp_path, capsys, monkeypatch, version_stub
):
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.chdir(_repo(tmp_path))
    for other in ("2.59.0", "2.61.0"):
        stub = version_stub(other)
        assert main(["submit", "--in-place", "--address", stub.address, "train"]) == 1
        err = capsys.readouterr().err
        assert (
            f"visual-echoes: error: the cluster at {stub.address} runs Ray {other} and this "
            f"client Ray {ray.__version__};" in err
        )
        assert "Traceback" not in err
        assert all(r == "GET /api/version" for r in stub.requests), stub.requests
    # The same stub on the client's own version is accepted: the check reads what Ray's client
    # learnt while connecting, so a Ray that stops keeping it fails here, not silently.
    same = version_stub(ray.__version__)
    assert submit.cluster_ray_version(submit.connect(same.address)) == ray.__version__


# -------------------------------------------------------------------------- the cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    return [
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]


def _cluster_env() -> dict[str, str]:
    """The nodes' environment, which every job inherits: this venv first on PATH (dvc and
    python for the stages), no token auth, no usage stats, no outside cluster or MLflow."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_")) and k != "PYTHONPATH"}  # fmt: skip
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


class Cluster:
    """Two `ray start --block` processes and everything they start."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.logs = root / "logs"
        self.logs.mkdir()

    def _start(self, name: str, args: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("w")
        self.procs.append(
            subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", *args],
                env=_cluster_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.root,
            )
        )

    def start(self) -> None:
        common = ["--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1",
                  f"--object-store-memory={100 * 2**20}", "--disable-usage-stats"]  # fmt: skip
        self._start("head", [
            "--head", f"--port={self.gcs_port}", *common, '--resources={"node_a": 1}',
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={_free_port()}",
            f"--temp-dir={self.root / 'head'}", *_node_ports(),
        ])  # fmt: skip
        self._wait(lambda nodes: len(nodes) >= 1, "the head node")
        self._start("worker", [
            f"--address=127.0.0.1:{self.gcs_port}", *common, '--resources={"node_b": 1}',
            f"--temp-dir={self.root / 'worker'}", *_node_ports(),
        ])  # fmt: skip
        self._wait(lambda nodes: len(nodes) == 2, "both nodes")

    def nodes(self) -> dict[str, str]:
        """node id -> 'node_a' / 'node_b', for the alive nodes."""
        from ray.util.state import list_nodes

        out = {}
        for n in list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], detail=True):
            res = n.resources_total or {}
            out[n.node_id] = "node_a" if "node_a" in res else "node_b" if "node_b" in res else "?"
        return out

    def train_workers(self) -> dict[str, str]:
        """actor id -> node id of every Ray Train worker this cluster has run."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.address, detail=True, limit=1000,
                             filters=[("class_name", "=", "RayTrainWorker")])  # fmt: skip
        return {a.actor_id: a.node_id for a in actors}

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited ({p.returncode}):\n{self._log_tail()}")
            try:
                if ready(self.nodes()):
                    return
            except Exception:  # the dashboard is not up yet
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{what} not up in {START_TIMEOUT_S}s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return "\n".join(f.read_text()[-3000:] for f in sorted(self.logs.glob("*.log")))

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: the `ray start`s, all their descendants, and
        anything whose command line names this cluster's temp dir (reparented workers)."""
        found: dict[int, psutil.Process] = {}
        for p in self.procs:
            try:
                top = psutil.Process(p.pid)
                for q in [top, *top.children(recursive=True)]:
                    found[q.pid] = q
            except psutil.NoSuchProcess:
                pass
        marker = str(self.root)
        for q in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in q.info["cmdline"] or ()):
                    found[q.pid] = q
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        """Kill this cluster's processes, by id: SIGTERM, then SIGKILL after 5 s."""
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            procs = self.processes()
            if not procs:
                break
            for p in self.procs:  # whole process groups first: each `ray start` leads one
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
            for q in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    q.send_signal(sig)
            psutil.wait_procs(procs, timeout=wait_s)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)


@pytest.fixture(scope="module")
def ray_cluster():
    # A short root: Ray's unix sockets live under --temp-dir (108-byte path limit).
    root = Path(tempfile.mkdtemp(prefix="ve-ray-", dir="/tmp"))
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        left = cluster.processes()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"cluster processes left running: {[p.pid for p in left]}"


def _job_env(monkeypatch) -> dict[str, str]:
    """This test process as a client of the cluster (not of any other Ray on the machine)."""
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def _submit(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "visual-echoes"), "submit", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


# ------------------------------------------------------------ `visual-echoes submit` end to end


def _two_workers(repo: Path, scratch: Path) -> None:
    """Train with two Ray Train workers of one CPU each: a `train:` overlay applied to the
    repository's params.yaml the way profiles are (comments kept, validated first)."""
    overlay = scratch / "two-workers.yaml"
    overlay.write_text("train:\n  num_workers: 2\n  cpus_per_worker: 1\n")
    apply_profile(overlay, repo / "params.yaml")


def _ran(out: str) -> list[str]:
    return re.findall(r"Running stage '([a-z]+)'", out)


@pytest.mark.cluster
@pytest.mark.slow
def test_submit_runs_tokenize_and_train_on_the_cluster(
    ray_cluster, tiny_upstream, tmp_path, monkeypatch
):
    """`visual-echoes submit --in-place train` on a copy of conftest's `tiny_upstream` (clips,
    extracted data and tokenizers made locally): tokenize (Ray Data) and train (2 Ray Train
    workers, one per node) as one job; then a params change and `submit train` reruns only
    train. Download and extract on the cluster are the tests below; evaluator, sweep and
    evaluate add minutes and nothing cluster-specific (tests/test_dvc.py runs the whole DAG
    locally)."""
    from pipeline.training.loop import STATE_NAME

    env = _job_env(monkeypatch)
    repo = copy_repo(tiny_upstream.repo, tmp_path / "repo")
    _two_workers(repo, tmp_path)
    addr = ["--address", ray_cluster.address]
    before = set(ray_cluster.train_workers())
    proc = _submit(repo, env, *addr, "--in-place", "train")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert _ran(out) == ["tokenize", "train"]
    assert "2 worker(s)" in out and "train: 4 steps" in out
    assert re.search(r"submit: job visual-echoes-train-\S+ SUCCEEDED in \d+s", out)
    model = json.loads((repo / "models/transformer/config.json").read_text())
    assert model["step"] == 4 and (repo / "models/transformer/model.safetensors").is_file()
    assert (repo / "reports/train/metrics.json").is_file() and (repo / "mlflow.db").is_file()
    # Checkpoints went to the storage path both nodes see, under the run's name.
    checkpoints = list((repo / "data/.cache/ray_train").glob("train-*/checkpoint_*/"))
    assert checkpoints and all((c / STATE_NAME).is_file() for c in checkpoints)
    # The train stage, a process under `dvc repro` under the job, joined this cluster, and its
    # two Ray Train workers ran one on each node.
    nodes = ray_cluster.nodes()
    new = {a: n for a, n in ray_cluster.train_workers().items() if a not in before}
    assert sorted(nodes.get(n, "?") for n in new.values()) == ["node_a", "node_b"]
    assert "train:" in (repo / "dvc.lock").read_text()

    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("log_every: 2", "log_every: 1"))
    proc = _submit(repo, env, *addr, "--in-place", "train")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert _ran(out) == ["train"] and "resumed at step 4" in out
    assert "up to date" in run_in(repo, "dvc", "status", "train")


MINI_DVC_YAML = """\
stages:
  nap:
    cmd: python -c "print('napping', flush=True); import time; time.sleep(300)"
  broken:
    cmd: python -c "raise SystemExit('broken on purpose')"
"""


@pytest.fixture
def mini_repo(tmp_path) -> Path:
    repo = tmp_path / "mini"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(MINI_DVC_YAML)
    run_in(repo, "git", "init", "-q")
    run_in(repo, "dvc", "init", "-q")
    return repo


@pytest.mark.cluster
@pytest.mark.slow
def test_a_failing_job_makes_submit_exit_non_zero(ray_cluster, mini_repo, monkeypatch):
    env = _job_env(monkeypatch)
    for stage, says in (("broken", "broken on purpose"), ("no-such-stage", "no-such-stage")):
        proc = _submit(mini_repo, env, "--address", ray_cluster.address, "--in-place", stage)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert says in proc.stdout
        assert re.search(r"visual-echoes: error: job \S+ FAILED: .*exit code", proc.stderr)


@pytest.mark.cluster
@pytest.mark.slow
def test_ctrl_c_stops_the_job(ray_cluster, mini_repo, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient

    env = _job_env(monkeypatch)
    cmd = [str(BIN / "visual-echoes"), "submit", "--address", ray_cluster.address, "--in-place",
           "--submission-id", "ve-ctrl-c", "nap"]  # fmt: skip
    # As from a terminal: SIGINT at its default. A suite started in the background by a
    # non-interactive shell (`make test &`) inherits SIGINT ignored, and so would submit.
    reset = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, cwd=mini_repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=reset)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if "napping" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "stopping job ve-ctrl-c" in err
    assert JobSubmissionClient(ray_cluster.address).get_job_status("ve-ctrl-c") == JobStatus.STOPPED


@pytest.mark.cluster
@pytest.mark.slow
def test_submit_uploads_the_code_and_brings_the_results_back(ray_cluster, tmp_path, monkeypatch):
    """Upload mode: the job runs `download` in Ray's copy of the code, pushes the clips to the
    DVC remote and hands back dvc.lock and the reports; MLflow goes to the forwarded URI."""
    env = _job_env(monkeypatch)
    repo = new_tiny_repo(tmp_path / "repo")
    remote = tmp_path / "remote"
    run_in(repo, "dvc", "remote", "add", "-d", "store", str(remote))
    store = tmp_path / "tracking" / "mlflow.db"
    store.parent.mkdir()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    env["MLFLOW_TRACKING_PASSWORD"] = "hunter2"
    proc = _submit(repo, env, "--address", ray_cluster.address, "download")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert _ran(out) == ["download"]
    assert "wrote dvc.lock, reports; `dvc pull` fetches the outputs" in proc.stdout
    assert submit.RESULTS_MARKER not in out and "hunter2" not in out
    assert "MLFLOW_TRACKING_PASSWORD=<hidden>" in proc.stderr
    assert "download:" in (repo / "dvc.lock").read_text()
    assert json.loads((repo / "reports/download/summary.json").read_text())
    assert not (repo / "data/clips").exists() and store.is_file()
    run_in(repo, "dvc", "pull", "download")
    assert len(list((repo / "data/clips").rglob("*.mp4"))) == 12
    assert "up to date" in run_in(repo, "dvc", "status", "download")


# ----------------------------------------------- the data plane: download and extract over nodes

DOWNLOAD_CLIPS = 40


def _join(cluster: Cluster, monkeypatch) -> None:
    """Make this test process a driver of `cluster` (the stages' `ray_session` joins it)."""
    _job_env(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{cluster.gcs_port}")


def _download_cfg(tmp_path: Path, url: str, nodes: int):
    """The vggsound source over the cluster: 40 loopback clips, one worker per node, no pacing."""
    import dataclasses

    from pipeline.config import DownloadRayConfig, load_params

    csv = tmp_path / "vggsound.csv"
    csv.write_text("".join(f"vid{i:08d},{i % 20},label {i % 4},{'test' if i % 5 else 'train'}\n"
                           for i in range(DOWNLOAD_CLIPS)))  # fmt: skip
    base = load_params(ROOT / "params.yaml").download
    vggsound = dataclasses.replace(
        base.vggsound, csv=str(csv), url_template=url, format="b", workers=1,
        sleep_requests=0.0, sleep_interval=0.0, max_sleep_interval=0.0, socket_timeout=5.0,
        backoff_s=0.05, max_backoff_s=5.0,
    )  # fmt: skip
    return dataclasses.replace(base, source="vggsound", executor="ray", vggsound=vggsound,
                               ray=DownloadRayConfig(nodes=nodes, shard_clips=4))  # fmt: skip


class _NodeKiller:
    """SIGKILLs node_b's downloader actor once `after` clips were asked of the server and node_b
    has finished a shard (so it has clips to its name) and begun another; notes the finished clip
    files (and their inodes) at that moment."""

    def __init__(self, cluster: Cluster, server, clips: Path, after: int) -> None:
        import threading

        self.cluster, self.server, self.clips, self.after = cluster, server, clips, after
        self.killed: tuple[str, int] | None = None
        self.done_before: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        from ray.util.state import list_actors, list_tasks

        node_b = next(n for n, name in self.cluster.nodes().items() if name == "node_b")
        work = self.clips / ".tmp-download"
        while not self.stop.wait(0.2):
            asked = {r[2] for r in self.server.requests}
            if len(asked) < self.after or not list(work.glob(f"node-{node_b[:12]}-*")):
                continue
            # On a loaded machine node_a can take the first `after` clips alone: wait for a shard
            # of node_b's to come back, or the manifest may rightly name node_a only.
            shards = list_tasks(address=self.cluster.address, detail=True, filters=[
                ("name", "=", "Downloader.fetch"), ("state", "=", "FINISHED")])  # fmt: skip
            if not any(task.node_id == node_b for task in shards):
                continue
            actors = list_actors(address=self.cluster.address, detail=True, filters=[
                ("class_name", "=", "Downloader"), ("state", "=", "ALIVE")])  # fmt: skip
            for actor in actors:
                if actor.node_id == node_b:
                    self.done_before = {p.name: p.stat().st_ino
                                        for p in (self.clips / "videos").rglob("*.mp4")}  # fmt: skip
                    os.kill(actor.pid, signal.SIGKILL)
                    self.killed = (actor.node_id, len(asked))
                    return


@pytest.mark.cluster
@pytest.mark.slow
def test_download_fans_out_over_the_nodes_and_survives_a_lost_node(
    ray_cluster, download_server, tmp_path, monkeypatch, caplog
):
    """40 loopback clips, `executor: ray` on 2 nodes (a placement group, one downloader each);
    node_b's actor is SIGKILLed mid-run. Every clip ends `ok` exactly once, both nodes appear in
    the manifest, no clip finished before the kill is fetched again, and a rerun asks the server
    for nothing."""
    from pipeline.data import manifest
    from pipeline.data.download import run_download, verify_clip

    _join(ray_cluster, monkeypatch)
    clips = tmp_path / "clips"
    cfg = _download_cfg(tmp_path, download_server.url_template, nodes=2)
    # 0.25 s before each clip: node_b still holds shards when Ray's state API (which reports
    # with a lag) first shows one of its shards back, so the kill lands mid-shard.
    paced = dataclasses.replace(cfg.vggsound, sleep_interval=0.25, max_sleep_interval=0.25)
    cfg = dataclasses.replace(cfg, vggsound=paced)
    killer = _NodeKiller(ray_cluster, download_server, clips, after=12)
    killer.thread.start()
    try:
        with caplog.at_level("WARNING", logger="pipeline.data.download_ray"):
            summary = run_download(cfg, clips, seed=0)
    finally:
        killer.stop.set()
        killer.thread.join(timeout=10)
    assert killer.killed is not None, "node_b's downloader was never seen working"
    lost, asked_at_kill = killer.killed
    assert asked_at_kill < DOWNLOAD_CLIPS, "the kill came after the last clip"
    assert f"node {lost[:12]}: its downloader was lost" in caplog.text

    records = manifest.read_manifest(clips)
    assert summary.ok == DOWNLOAD_CLIPS == len(records) == len({r.clip_id for r in records})
    assert {r.status for r in records} == {"ok"}
    nodes = ray_cluster.nodes()
    assert {nodes.get(r.node) for r in records} == {"node_a", "node_b"}
    for r in records:
        assert abs(verify_clip(clips / r.path).duration_s - 10) < 0.5
    # Nothing finished before the kill was fetched again (a refetch renames a new file in).
    after = {p.name: p.stat().st_ino for p in (clips / "videos").rglob("*.mp4")}
    assert killer.done_before and all(after[n] == i for n, i in killer.done_before.items())
    assert not (clips / ".tmp-download").exists()

    asked = len(download_server.requests)
    again = run_download(cfg, clips, seed=0)
    assert again.ok == DOWNLOAD_CLIPS and len(download_server.requests) == asked
    assert [(r.clip_id, r.node) for r in manifest.read_manifest(clips)] == [
        (r.clip_id, r.node) for r in records
    ]


@pytest.mark.cluster
@pytest.mark.slow
def test_downloaders_go_one_per_node_and_a_node_count_the_cluster_lacks_fails(
    ray_cluster, tmp_path, monkeypatch
):
    import ray

    from pipeline.data import download_ray
    from pipeline.data.download import DownloadError
    from pipeline.ray_runtime import ray_session

    _join(ray_cluster, monkeypatch)
    monkeypatch.setattr(download_ray, "PLACE_TIMEOUT_S", 2.0)
    with ray_session():
        actors, group = download_ray.start_downloaders(
            _download_cfg(tmp_path, "http://127.0.0.1:9/{id}.mp4", nodes=0), tmp_path, 0.0
        )
        try:
            assert group is None
            assert sorted(ray_cluster.nodes()[n] for n in actors) == ["node_a", "node_b"]
        finally:
            for actor in actors.values():
                ray.kill(actor)
        with pytest.raises(DownloadError, match=r"asks for 3 nodes .* within 2 s \(it has 2\)"):
            download_ray.start_downloaders(
                _download_cfg(tmp_path, "http://127.0.0.1:9/{id}.mp4", nodes=3), tmp_path, 0.0
            )


@pytest.mark.cluster
@pytest.mark.slow
def test_extract_on_the_cluster_writes_the_local_pools_shards(
    ray_cluster, tiny_upstream, tmp_path, monkeypatch
):
    """The tiny project's 12 clips extracted with `executor: ray` (one task per clip, on both
    nodes) and with the local process pool, in the same environment (the same ffmpeg): every
    output file is byte-identical."""
    import dataclasses

    from ray.util.state import list_tasks

    from pipeline.config import load_params
    from pipeline.data.extract import run_extract

    _join(ray_cluster, monkeypatch)
    clips = tiny_upstream.repo / "data/clips"
    cfg = load_params(tiny_upstream.repo / "params.yaml").extract
    local, out = tmp_path / "local", tmp_path / "ray"
    run_extract(dataclasses.replace(cfg, workers=2), clips, local, tmp_path / "cache")
    summary = run_extract(dataclasses.replace(cfg, executor="ray"), clips, out, tmp_path / "cache")
    files = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".parquet"]) >= 4
    for name in files:
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
    assert summary.inputs == 12
    tasks = list_tasks(address=ray_cluster.address, detail=True, limit=1000,
                       filters=[("func_or_class_name", "=", "_cluster_work")])  # fmt: skip
    assert {ray_cluster.nodes().get(t.node_id) for t in tasks} == {"node_a", "node_b"}
