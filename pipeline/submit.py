"""`visual-echoes submit`: run `dvc repro [STAGE ...]` as a Ray job on a cluster and follow it.

Two ways to give the job the workspace:

* in place, `--in-place` or `--workspace PATH` (the cluster set-up of infra/README.md): the
  repository lives on a file system every node mounts at the same path; the job `cd`s into
  this checkout's absolute path (or PATH, the checkout as the cluster sees it) and runs
  `dvc repro` there, so outputs, dvc.lock, reports and the default MLflow store land in the
  workspace exactly as with a local run.
* upload (the default): Ray's `runtime_env.working_dir` ships the code (the checkout without
  `.git`, `.venv`, what .gitignore/.rayignore list and the data paths of params.yaml) to a
  throwaway folder on the cluster; the job pulls the inputs from the project's default DVC
  remote (`dvc repro --pull`), pushes the outputs back (`dvc push`), and prints dvc.lock and the
  reports folder (the `cache: false` outputs) as one marker line, which this command writes back
  into the checkout when the job succeeds. Then `dvc pull` fetches the outputs. Ray caps the
  upload at its gRPC message size (512 MiB) and warns on files over 10 MiB.

The cluster is the job server at `--address`, else `RAY_API_SERVER_ADDRESS`, else
`RAY_ADDRESS` (`http://HEAD:8265`). Ray gives the job's driver `RAY_ADDRESS` = the cluster's own
address, which the stages' `ray_session` joins, so it is not forwarded (the dashboard URL would
be the wrong kind of address there). `MLFLOW_*` variables and `--env` ones are forwarded through
`runtime_env.env_vars` (not a tracking URI on localhost: a port-forward here is the head node
there); names containing KEY, TOKEN, SECRET or PASSWORD are never echoed.

A cluster whose Ray is not exactly the client's (the job server reports its version) is refused
before anything is submitted. The job's logs stream to stdout; the command exits 0 only when the
job SUCCEEDED, so it can be a DVC stage's `cmd` itself. Ctrl-C stops the job (Ray sends SIGTERM,
then SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io as _io
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline import io
from pipeline.errors import PipelineError

SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
FORWARDED_PREFIXES = ("MLFLOW_",)
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# Never uploaded, on top of Ray's defaults (.git, .venv, venv, __pycache__), .gitignore,
# .rayignore and the data paths of params.yaml. Patterns are gitwildmatch, from the repo root.
UPLOAD_EXCLUDES = (
    "/.git/",
    "/.venv/",
    "/.dvc/cache/",
    "/.dvc/tmp/",
    "/mlruns/",
    "/mlartifacts/",
    "/mlflow.db",
    "/dvc_plots/",
    "/.pytest_cache/",
    "/.ruff_cache/",
    "*.egg-info/",
)
RESULTS_MARKER = "visual-echoes-submit-results: "
RESULTS_MAX_BYTES = 64 * 1024**2  # base64 of dvc.lock + reports, as one log line
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STOP_WAIT_S = 30.0


class SubmitError(PipelineError):
    """No or unreachable cluster, a workspace that cannot be submitted, or a failed job."""


@dataclass(frozen=True)
class Submission:
    """What goes to `JobSubmissionClient.submit_job`."""

    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    upload: bool = False


# --------------------------------------------------------------------------- building the job


def repro_command(
    targets: Sequence[str], single_item: bool = False, force: bool = False, pull: bool = False
) -> list[str]:
    """`dvc repro` with the chosen options; targets are stage names or `dvc.yaml:stage`."""
    for t in targets:
        if t.startswith("-"):
            raise SubmitError(f"{t!r} is not a stage name (options go before the stages)")
    flags = ["--pull"] * pull + ["--single-item"] * single_item + ["--force"] * force
    return ["dvc", "repro", *flags, *targets]


def is_secret(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in SECRET_WORDS)


def names_this_machine(uri: str) -> bool:
    """True for an http(s) URI on localhost / 127.x / ::1 (a port-forward to the cluster's
    MLflow, say), which would mean the head node itself inside the job."""
    parts = urlsplit(uri)
    host = (parts.hostname or "").lower()
    return parts.scheme in ("http", "https") and (
        host in ("localhost", "::1") or host.startswith("127.")
    )


def forwarded_env(environ: Mapping[str, str], extra: Sequence[str] = ()) -> dict[str, str]:
    """The job's env_vars: every `MLFLOW_*` variable set here (but not a tracking URI that
    names this machine), plus `--env NAME[=VALUE]` (a bare NAME takes this shell's value)."""
    env = {k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES) and v}
    if names_this_machine(env.get("MLFLOW_TRACKING_URI", "")):
        del env["MLFLOW_TRACKING_URI"]
    for item in extra:
        name, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SubmitError(f"--env {item!r}: expected NAME=VALUE or NAME")
        if not sep:
            if name not in environ:
                raise SubmitError(f"--env {name}: not set in this shell (use {name}=VALUE)")
            value = environ[name]
        env[name] = value
    if "RAY_ADDRESS" in env:
        raise SubmitError(
            "--env RAY_ADDRESS: Ray sets the job's RAY_ADDRESS to its own cluster; don't forward it"
        )
    return env


def describe_env(env: Mapping[str, str]) -> str:
    """`NAME=value, ...` for a log line: secrets as <hidden>, URIs without passwords."""
    from pipeline.tracking import redact

    shown = [
        f"{k}=<hidden>" if is_secret(k) else f"{k}={redact(v)}" for k, v in sorted(env.items())
    ]
    return ", ".join(shown) if shown else "none"


def default_submission_id(targets: Sequence[str], now: float | None = None) -> str:
    stages = "-".join(re.sub(r"[^A-Za-z0-9_-]+", "_", t) for t in targets) or "all"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"visual-echoes-{stages[:60]}-{stamp}"


def upload_excludes(repo: Path) -> list[str]:
    """UPLOAD_EXCLUDES plus the data and model folders of params.yaml that lie in the repo
    (not `paths.reports`: the reports come back with the results)."""
    from pipeline.config import load_params

    paths = load_params(repo / "params.yaml").paths
    out = list(UPLOAD_EXCLUDES)
    for name, value in sorted(asdict(paths).items()):
        p = Path(value)
        if name == "reports" or p.is_absolute() or ".." in p.parts:
            continue
        out.append(f"/{p.as_posix().strip('/')}/")
    return out


def _dvc_default_remote(repo: Path) -> str:
    """The project's default DVC remote (in .dvc/config, which the upload carries), or ''."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "default", "--project"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""


def build_submission(
    repo: str | Path,
    targets: Sequence[str],
    *,
    in_place: bool,
    workspace: str | None = None,
    single_item: bool = False,
    force: bool = False,
    env: Mapping[str, str] | None = None,
    submission_id: str | None = None,
    check_remote: Callable[[Path], str] = _dvc_default_remote,
) -> Submission:
    """The entrypoint and runtime_env of `dvc repro targets` for the workspace at `repo`
    (uploaded, or used in place), or at the cluster path `workspace` (in place)."""
    repo = Path(repo).resolve()
    if workspace is not None:
        if not workspace.startswith("/"):
            raise SubmitError(f"--workspace {workspace!r}: give the absolute path on the cluster")
        in_place = True
    elif not (repo / "dvc.yaml").is_file():
        raise SubmitError(f"{repo} has no dvc.yaml: run from the repository or pass --repo")
    env = dict(env or {})
    runtime_env: dict[str, Any] = {"env_vars": env} if env else {}
    if in_place:
        repro = shlex.join(repro_command(targets, single_item, force))
        entrypoint = f"cd {shlex.quote(workspace or str(repo))} && {repro}"
    else:
        if not check_remote(repo):
            raise SubmitError(
                "uploading the workspace needs a default DVC remote in .dvc/config that the "
                "cluster can reach (dvc remote add -d NAME URL), or use --in-place on storage "
                "every node mounts"
            )
        push = ["dvc", "push"] + (["--with-deps"] if targets and not single_item else [])
        steps = [
            "dvc config --local core.no_scm true",  # the upload carries no .git
            shlex.join(repro_command(targets, single_item, force, pull=True)),
            shlex.join(push + list(targets)),
            shlex.join([
                "python", "-c", "from pipeline.submit import emit_results; emit_results()"
            ]),
        ]  # fmt: skip
        entrypoint = " && ".join(steps)
        runtime_env["working_dir"] = str(repo)
        runtime_env["excludes"] = upload_excludes(repo)
    from pipeline.tracking import git_commit

    return Submission(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        submission_id=submission_id or default_submission_id(targets),
        metadata={
            "command": shlex.join(repro_command(targets, single_item, force)),
            "git_commit": git_commit(repo),
            "workspace": workspace or str(repo),
        },
        upload=not in_place,
    )


# ------------------------------------------------------------------- results of an upload job


def result_paths(repo: str | Path) -> list[str]:
    """What an upload job hands back: dvc.lock and `paths.reports` (the `cache: false`
    outputs), when it lies inside the repo."""
    from pipeline.config import load_params

    reports = Path(load_params(Path(repo) / "params.yaml").paths.reports)
    inside = not reports.is_absolute() and ".." not in reports.parts
    return ["dvc.lock"] + ([reports.as_posix().strip("/")] if inside else [])


def emit_results(repo: str | Path = ".") -> None:
    """Job side: print `result_paths` as one base64 tar.gz marker line."""
    repo = Path(repo)
    names = result_paths(repo)
    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in names:
            if (repo / name).exists():
                tar.add(repo / name, arcname=name)
    payload = base64.b64encode(buf.getvalue()).decode()
    if len(payload) > RESULTS_MAX_BYTES:
        raise SystemExit(
            f"visual-echoes submit: {' + '.join(names)} are {len(payload) // 2**20} MiB "
            f"encoded, over the {RESULTS_MAX_BYTES // 2**20} MiB a job log line may carry; "
            "the outputs are pushed, but only an --in-place run keeps dvc.lock"
        )
    print(RESULTS_MARKER + payload, flush=True)


def apply_results(line: str, repo: str | Path) -> list[str]:
    """Client side: replace `result_paths` in `repo` by the marker line's copies (a path the
    job did not send stays as it is). Returns the paths written."""
    repo = Path(repo)
    data = base64.b64decode(line[len(RESULTS_MARKER) :].strip())
    written = []
    with tempfile.TemporaryDirectory(prefix="ve-results-", dir=repo) as tmp:
        with tarfile.open(fileobj=_io.BytesIO(data), mode="r:gz") as tar:
            io.extract_tar(tar, Path(tmp))  # refuses absolute paths, '..', links and devices
        for name in result_paths(repo):
            src, dst = Path(tmp) / name, repo / name
            if not src.exists():
                continue
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            written.append(name)
    return written


# -------------------------------------------------------------------------------- the cluster


def resolve_address(explicit: str | None, environ: Mapping[str, str]) -> str:
    """The job server's http(s) URL: `explicit`, else the first of ADDRESS_VARIABLES set."""
    named = [("--address", explicit), *((f"${v}", environ.get(v)) for v in ADDRESS_VARIABLES)]
    for source, value in named:
        if value and value.strip():
            value = value.strip()
            # A bare HOST:PORT (or ray://) is a GCS / Ray Client address, which Ray would
            # resolve by joining the cluster, waiting minutes on a wrong one.
            if urlsplit(value).scheme not in ("http", "https"):
                raise SubmitError(
                    f"{source}={value} is not a job server address: give the dashboard's "
                    "http://HEAD:8265"
                )
            return value
    raise SubmitError(
        "no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS to the "
        "cluster's job server (the dashboard address)"
    )


def connect(address: str):
    """A JobSubmissionClient for `address` (Ray would let RAY_ADDRESS override it: not here)."""
    from ray.job_submission import JobSubmissionClient

    # Ray's SDK logs every closed log stream at INFO; the job's own log is what we print.
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    saved = {v: os.environ.pop(v) for v in ADDRESS_VARIABLES if v in os.environ}
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, OSError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SubmitError(
            f"cannot reach a Ray job server at {address} ({first}); is the cluster up, with "
            "its dashboard (ray start --head --include-dashboard=true), and is this its "
            "http://HOST:8265 address?"
        ) from None
    finally:
        os.environ.update(saved)
    check_ray_version(address, cluster_ray_version(client))
    return client


def cluster_ray_version(client: Any) -> str | None:
    """The Ray version the cluster's job server reported (`GET /api/version`, which the client
    asks while connecting and keeps); None when it did not say."""
    return getattr(client, "_server_ray_version", None)


def check_ray_version(address: str, cluster: str | None) -> None:
    """SubmitError unless the cluster runs exactly this client's Ray. The job API and the
    runtime_env upload change between releases, and a cluster on another release runs the
    pipeline on a Ray that the tests did not (the locks, the image and infra/ pin one)."""
    import ray

    if cluster != ray.__version__:
        raise SubmitError(
            f"the cluster at {address} runs Ray {cluster or 'of an unknown version'} and this "
            f"client Ray {ray.__version__}; use the cluster image of infra/ (the lock's Ray) or "
            "install the cluster's Ray here"
        )


class LogPrinter:
    """Writes the job's log to `out` line by line, keeping back (and remembering) the results
    marker line of an upload job."""

    def __init__(self, out: Callable[[str], Any]) -> None:
        self.out = out
        self.seen = 0  # characters of the job's log consumed
        self.results: str | None = None
        self._partial = ""

    def feed(self, text: str) -> None:
        self.seen += len(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line + "\n")

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def _line(self, line: str) -> None:
        if line.startswith(RESULTS_MARKER):
            self.results = line.rstrip("\n")
        else:
            self.out(line)


def _tail(client: Any, job_id: str, printer: LogPrinter) -> None:
    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            printer.feed(chunk)

    # Not asyncio.run: its SIGINT handler only cancels the task, and a websocket read that does
    # not give way to the cancellation would swallow Ctrl-C. A bare loop lets KeyboardInterrupt
    # out of the selector at once; the pending task is dropped with the loop.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(follow())
    finally:
        loop.close()


def follow(client: Any, job_id: str, printer: LogPrinter, poll_s: float = 2.0) -> str:
    """Stream the job's log into `printer` until the job ends; its final status name."""
    # A broken log stream (a proxy, a restarted head) leaves the rest to the polling below.
    with contextlib.suppress(RuntimeError, OSError):
        _tail(client, job_id, printer)
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if len(logs) > printer.seen:
            printer.feed(logs[printer.seen :])
        if status in TERMINAL:
            printer.close()
            return status
        time.sleep(poll_s)


def _stop(client: Any, job_id: str) -> None:
    print(f"submit: Ctrl-C: stopping job {job_id}", file=sys.stderr, flush=True)
    client.stop_job(job_id)
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        if str(client.get_job_status(job_id).value) in TERMINAL:
            print(f"submit: job {job_id} stopped", file=sys.stderr, flush=True)
            return
        time.sleep(1.0)
    print(f"submit: job {job_id} is still stopping; `ray job status {job_id}`", file=sys.stderr)


def _failure(client: Any, job_id: str, status: str) -> str:
    message = (client.get_job_info(job_id).message or "").strip()
    first = message.splitlines()[0].split(", last available logs")[0] if message else ""
    return f"job {job_id} {status}" + (f": {first}" if first else "")


def submit(
    submission: Submission,
    address: str,
    *,
    repo: str | Path,
    wait: bool = True,
    out: Callable[[str], Any] | None = None,
) -> str:
    """Submit, then (with `wait`) stream the log until the job ends. Returns the closing line;
    raises SubmitError unless the job SUCCEEDED."""
    out = out or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    client = connect(address)
    start = time.monotonic()
    try:
        job_id = client.submit_job(
            entrypoint=submission.entrypoint,
            runtime_env=submission.runtime_env or None,
            submission_id=submission.submission_id,
            metadata=submission.metadata,
        )
    except (RuntimeError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SubmitError(f"the job server at {address} refused the job: {first}") from None
    print(
        f"submit: job {job_id} on {address}: {submission.entrypoint}", file=sys.stderr, flush=True
    )
    if not wait:
        return f"submit: job {job_id} submitted; follow it with `ray job logs -f {job_id}`"
    printer = LogPrinter(out)
    try:
        status = follow(client, job_id, printer)
    except KeyboardInterrupt:
        _stop(client, job_id)
        raise
    seconds = time.monotonic() - start
    if status != "SUCCEEDED":
        raise SubmitError(_failure(client, job_id, status) + f" after {seconds:.0f}s")
    closing = f"submit: job {job_id} SUCCEEDED in {seconds:.0f}s"
    if submission.upload:
        if printer.results is None:
            raise SubmitError(f"job {job_id} succeeded but printed no results line")
        written = apply_results(printer.results, repo)
        closing += f"; wrote {', '.join(written)}; `dvc pull` fetches the outputs"
    return closing


# ---------------------------------------------------------------------------------- command


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser(
        "submit",
        help="run `dvc repro [STAGE ...]` as a Ray job on a cluster and follow its log",
        description="Submit `dvc repro [STAGE ...]` as a Ray job, stream its log and exit "
        "non-zero unless it succeeds. Ctrl-C stops the job.",
    )
    p.add_argument("stages", nargs="*", metavar="STAGE", help="stages to reproduce (default all)")
    p.add_argument("--address", default=None,
                   help="the cluster's job server, http://HEAD:8265 "
                        "(default $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)")  # fmt: skip
    p.add_argument("--repo", default=".", help="the workspace (default: the current folder)")
    p.add_argument("--in-place", action="store_true",
                   help="run in --repo's own path on the cluster (a file system every node "
                        "mounts there) instead of uploading the code")  # fmt: skip
    p.add_argument("--workspace", default=None, metavar="PATH",
                   help="run in place in this checkout on the cluster, e.g. "
                        "/mnt/shared/visual-echoes (implies --in-place)")  # fmt: skip
    p.add_argument("-s", "--single-item", action="store_true",
                   help="dvc repro -s: exactly these stages, not what they depend on")  # fmt: skip
    p.add_argument("-f", "--force", action="store_true", help="dvc repro -f")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="an environment variable for the job (repeatable; MLFLOW_* are "
                        "forwarded already)")  # fmt: skip
    p.add_argument("--submission-id", default=None, help="the job's id (default: stages + time)")
    p.add_argument("--no-wait", action="store_true", help="submit and return")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> str:
    from pipeline.tracking import redact

    address = resolve_address(args.address, os.environ)
    env = forwarded_env(os.environ, args.env)
    submission = build_submission(
        args.repo,
        args.stages,
        in_place=args.in_place,
        workspace=args.workspace,
        single_item=args.single_item,
        force=args.force,
        env=env,
        submission_id=args.submission_id,
    )
    print(f"submit: env for the job: {describe_env(env)}", file=sys.stderr, flush=True)
    local_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if local_uri and "MLFLOW_TRACKING_URI" not in env:
        print(
            f"submit: not forwarding MLFLOW_TRACKING_URI={redact(local_uri)}: it names this "
            "machine; the job keeps the cluster's own (or pass --env MLFLOW_TRACKING_URI=URI "
            "as the cluster sees it)",
            file=sys.stderr,
        )
    if submission.upload and "MLFLOW_TRACKING_URI" not in env:
        print(
            "submit: warning: MLFLOW_TRACKING_URI is not set; the job's MLflow runs go to a "
            "SQLite file in its uploaded copy and are lost",
            file=sys.stderr,
        )
    return submit(submission, address, repo=args.repo, wait=not args.no_wait)
