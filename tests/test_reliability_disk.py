"""A full disk on an output path: the stage fails with one sentence, and nothing half-written is
left where a later stage would take it for a finished artefact.

Two ways to fill a disk: a real size-limited tmpfs in a private mount namespace (`unshare -Urm`,
no root needed where unprivileged user namespaces are allowed; skipped elsewhere), and fault
hooks that make one write raise ENOSPC part-way, which run everywhere.
"""

from __future__ import annotations

import errno
import functools
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipeline import checkpoint, io
from pipeline.config import ExtractConfig, load_params
from pipeline.data import extract, manifest
from pipeline.data.manifest import ClipRecord, video_path
from pipeline.errors import PipelineError
from pipeline.media import ffmpeg_exe
from pipeline.profiles import load_profile
from pipeline.stage import stage_main
from pipeline.tokenizers.batch_tokenize import _extract_meta

ROOT = Path(__file__).resolve().parents[1]


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _half_then_full(write):
    """`write(data, path)`-like hook: writes part of the output, then the disk is full."""

    @functools.wraps(write)
    def hook(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    return hook


def _clip(out: Path, seconds: float = 4.0, tone: int = 440) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
            "-f", "lavfi", "-i", "testsrc2=size=96x72:rate=10",
            "-f", "lavfi", "-i", f"sine=frequency={tone}:sample_rate=22050",
            "-t", f"{seconds}", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
            "-c:a", "aac", str(out),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def _dataset(clips: Path, n: int) -> None:
    records = []
    for i in range(n):
        clip_id = f"clip{i:02d}"
        _clip(clips / video_path(clip_id), tone=300 + 150 * i)
        records.append(ClipRecord(clip_id, "local", f"l{i % 2}", "train", status="ok",
                                  path=video_path(clip_id)))  # fmt: skip
    manifest.write_manifest(clips, records)


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- fault hooks


def test_an_atomic_write_that_hits_a_full_disk_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "table.parquet"
    io.write_table(path, pa.table({"x": [1, 2, 3]}))
    before = path.read_bytes()
    monkeypatch.setattr(io.pq, "write_table", _half_then_full(io.pq.write_table))
    with pytest.raises(OSError) as info:
        io.write_table(path, pa.table({"x": [4, 5, 6]}))
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before  # the finished file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]  # no temporary left


def test_a_table_reads_whole_while_another_thread_replaces_it(tmp_path):
    # The download manifest is rewritten after every few clips while the run goes on.
    path = tmp_path / "table.parquet"
    io.write_table(path, pa.table({"x": [0]}))
    stop = threading.Event()

    def rewrite() -> None:
        n = 0
        while not stop.is_set():
            n = n % 50 + 1
            io.write_table(path, pa.table({"x": list(range(n)), "s": ["y" * (n % 7)] * n}))

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        deadline, reads = time.monotonic() + 2.0, 0
        while time.monotonic() < deadline:
            table = io.read_table(path)  # by path, pyarrow opened it twice: torn reads
            assert table.column("x").to_pylist() == list(range(table.num_rows))
            reads += 1
    finally:
        stop.set()
        writer.join()
    assert reads > 100


def test_extract_on_a_full_disk_keeps_its_chunks_and_never_writes_a_half_output(
    tmp_path, monkeypatch
):
    clips, out, cache = tmp_path / "clips", tmp_path / "extract", tmp_path / "cache"
    _dataset(clips, 4)
    cfg = ExtractConfig(
        num_frames=4, image_size=32, jpeg_quality=90, sample_rate=22050, clip_seconds=4.0,
        n_fft=1024, hop_length=256, n_mels=80, fmin=125.0, fmax=7600.0, mel_frames=256,
        rows_per_shard=2, workers=1,
    )  # fmt: skip
    write_table = io.pq.write_table

    def full_at_the_first_shard(table, path, **options):
        if Path(path).name.startswith(".tmp-part-"):  # the first output shard, not a chunk
            _half_then_full(write_table)(table, path)
        write_table(table, path, **options)

    monkeypatch.setattr(io.pq, "write_table", full_at_the_first_shard)
    with pytest.raises(OSError):
        extract.run_extract(cfg, clips, out, cache)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))  # no output, half or whole
    with pytest.raises(PipelineError, match="run the extract stage first"):
        _extract_meta(out)  # what tokenize does with it: refuses
    assert len(list(cache.rglob("chunk-*.parquet"))) == 2  # the decoded work is kept

    monkeypatch.setattr(io.pq, "write_table", write_table)
    summary = extract.run_extract(cfg, clips, out, cache)  # space again: finishes from the cache
    assert summary.chunks_reused == 2 and summary.counts == {"train": 4}
    assert _extract_meta(out)["counts"] == {"train": 4}


def test_a_checkpoint_cut_by_a_full_disk_is_never_loaded(tmp_path, monkeypatch):
    import safetensors.torch

    model = torch.nn.Linear(3, 2)
    folder = checkpoint.save(tmp_path / "model", model, {"step": 1})
    good = (folder / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.weight.add_(1.0)
    # the weights file cannot be written: the old checkpoint stays, whole and loadable
    monkeypatch.setattr(safetensors.torch, "save_file", _half_then_full(torch.save))
    with pytest.raises(OSError):
        checkpoint.save(folder, model, {"step": 2})
    monkeypatch.undo()
    assert (folder / "model.safetensors").read_bytes() == good
    assert checkpoint.load(folder)[1]["step"] == 1
    # the weights are written but not their config.json: the pair no longer matches, and the
    # folder is refused instead of being loaded with the wrong config
    monkeypatch.setattr(io, "write_json", _full)
    with pytest.raises(OSError):
        checkpoint.save(folder, model, {"step": 2})
    monkeypatch.undo()
    with pytest.raises(checkpoint.CheckpointError, match="does not match the sha256"):
        checkpoint.load(folder)


@pytest.fixture
def one_thread():
    """A micro model gains nothing from 2 threads; on a busy machine they only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_training_checkpoint_cut_by_a_full_disk_leaves_the_previous_one(
    tmp_path, monkeypatch, make_token_dir, one_thread
):
    import dataclasses

    from pipeline.data.tokens import load_token_meta
    from pipeline.training import loop

    params = load_params(ROOT / "params.yaml")
    tokens = make_token_dir(tmp_path / "tokens")
    layout, _ = load_token_meta(tokens)
    model = load_profile(ROOT / "profiles/tiny.yaml", ROOT / "params.yaml").model
    train = dataclasses.replace(
        params.train,
        steps=8,
        batch_size=8,
        warmup_steps=1,
        log_every=4,
        eval_every=0,
        figure_every=0,
        checkpoint_every=4,
    )
    job = loop.TrainJob(model, train, layout.to_dict(), str(tokens), seed=0, fingerprint="f")
    env = loop.FolderEnvironment(tmp_path / "run")
    save = torch.save
    monkeypatch.setattr(
        torch, "save",
        lambda obj, path, *a, **k: _full() if obj.get("step") == 8 else save(obj, path, *a, **k),
    )  # fmt: skip
    with pytest.raises(OSError):
        loop.run_training(job, env)
    files = sorted(p.relative_to(tmp_path / "run").as_posix() for p in env.folder.rglob("*.pt"))
    assert files == ["checkpoint_00000004/state.pt"]  # step 8's folder holds nothing to load
    assert env.restore()["step"] == 4


def test_a_stage_on_a_full_disk_says_so_in_one_sentence(capsys):
    def body() -> str:
        raise OSError(errno.ENOSPC, "No space left on device", "data/extract/part-00000.parquet")

    assert stage_main("extract", body) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "extract: error: no space left on the device writing data/extract/part-00000.parquet; "
        "free some space and rerun (finished work is kept, nothing half-written is)"
    )


# -------------------------------------------------------------------- a real, small filesystem


@functools.cache
def _private_mounts() -> bool:
    """Whether this machine lets us mount a tmpfs in a private user + mount namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d && rmdir $d"
    run = subprocess.run(["unshare", "-Urm", "sh", "-c", probe], capture_output=True, timeout=30)
    return run.returncode == 0


SCRIPT = """
set -u
mount -t tmpfs -o size={size}k tmpfs data
cp -a ../clips data/clips
python -m stages.extract > run1.out 2> run1.err; echo $? > run1.code
(cd data && find . -type f | sort) > after1.txt
mount -o remount,size=65536k data
python -m stages.extract > run2.out 2> run2.err; echo $? > run2.code
cp -a data/extract ../extract-after
"""


@pytest.mark.skipif(not _private_mounts(), reason="no unprivileged user + mount namespaces here")
def test_the_extract_stage_on_a_small_tmpfs(tmp_path, stage_project):
    stage_project.params({"extract": {"image_size": 32, "rows_per_shard": 2, "workers": 1}})
    cfg = load_params(stage_project.root / "params.yaml").extract
    _dataset(tmp_path / "clips", 6)
    extract.run_extract(cfg, tmp_path / "clips", tmp_path / "reference", tmp_path / "cache")
    kib = lambda d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) // 1024  # noqa: E731
    # room for the clips and the cached chunks (about as large as the output), not the output
    size = kib(tmp_path / "clips") + kib(tmp_path / "reference") + 64
    root = stage_project.root
    (root / "data").mkdir()
    subprocess.run(
        ["unshare", "-Urm", "bash", "-c", SCRIPT.format(size=size)],
        cwd=root, env=stage_project.env(), check=True, timeout=600,
    )  # fmt: skip
    read = lambda name: (root / name).read_text()  # noqa: E731
    assert read("run1.code").strip() == "1"
    err = read("run1.err").strip().splitlines()
    assert re.fullmatch(
        r"extract: error: no space left on the device( writing \S+)?; free some space and "
        r"rerun \(finished work is kept, nothing half-written is\)",
        err[-1],
    ), err
    assert "Traceback" not in read("run1.err")
    after = read("after1.txt").split()
    assert not any(f.startswith("./extract/") for f in after)  # nothing a later stage would take
    assert not any("/.tmp-" in f for f in after)  # no temporaries left behind either
    assert read("run2.code").strip() == "0", read("run2.err")
    assert read("run2.out").startswith("extract: 6 of 6 clips written")
    assert "(3 reused from" in read("run2.err")  # the chunks written before the disk filled
    assert _tree(root.parent / "extract-after") == _tree(tmp_path / "reference")
