"""pipeline.io: atomic writes leave whole files with the mode the umask gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import io


def _write_everything(folder: Path) -> list[Path]:
    io.write_bytes(folder / "a.bin", b"x")
    io.write_json(folder / "b.json", {"ok": 1})
    io.write_csv(folder / "c.csv", [{"k": 1}], ["k"])
    io.write_table(folder / "d.parquet", pa.table({"k": [1]}))
    with io.atomic_path(folder / "e.png") as tmp:
        tmp.write_bytes(b"png")
    made = io.make_temp_dir(folder / "out")
    (made / "f.txt").write_text("inside")
    io.replace_dir(made, folder / "out")
    return [folder / n for n in ("a.bin", "b.json", "c.csv", "d.parquet", "e.png")]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_and_folders_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    (tmp_path / "e.png").write_bytes(b"old")
    os.chmod(tmp_path / "e.png", 0o600)  # a replaced file takes the new mode, not the old one
    old = os.umask(umask)
    try:
        files = _write_everything(tmp_path)
    finally:
        os.umask(old)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path.name
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    assert (tmp_path / "out" / "f.txt").read_text() == "inside"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(io.TMP_PREFIX)]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    io.write_bytes(tmp_path / "a.bin", b"old")
    with pytest.raises(RuntimeError), io.atomic_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("cut")
    assert (tmp_path / "a.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
