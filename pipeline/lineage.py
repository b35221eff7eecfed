"""What a stage run read and made, as dvc.yaml declares it, and which `dvc repro` started it.

No MLflow here: `pipeline.tracking` turns these facts into tags, datasets and a parent run.

* **Inputs and output.** A stage's inputs are the `${paths.x}` dependencies that another stage of
  dvc.yaml outputs (evaluate reads clips, extract, tokenizers, transformer, evaluator); its output
  is its own `${paths.x}` out. dvc.yaml is read, not repeated here, so the lineage follows the DAG
  DVC runs.
* **Content digest.** An output folder is identified by the sha256 of its sidecars: `meta.json`
  of a data folder and `config.json` of a model folder (which records its weights' sha256), at its
  top and in each sub-folder (the tokenizers' image/, audio/, vocoder/), and the clip manifest.
  Each sidecar lists the hashes or counts of the files beside it, so the digest changes when the
  data does, and costs a few small reads whatever the data's size.
* **One `dvc repro`.** DVC starts each stage as its own shell command and gives a plain `repro`
  no id (`dvc exp run` adds `DVC_EXP_NAME`); it sets `DVC_STAGE` for every stage command
  (docs/references.md, "DVC and MLflow behaviour"). The process that launched the stage is that
  `dvc` process (skipping the shell DVC runs the command in), one per `dvc repro` / `dvc exp
  run` / queued experiment, so its host, pid and start time identify the invocation
  (`invocation_id`).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import io
from pipeline.data.manifest import MANIFEST_NAME

# `pipeline.checkpoint.CONFIG_NAME`, named here so that reading lineage never imports torch
MODEL_CONFIG_NAME = "config.json"

DVC_FILE = "dvc.yaml"
# Outputs read as data (logged as MLflow datasets); the others are models.
DATASETS = ("clips", "extract", "tokens")
# What a shell DVC runs a stage command in is called; the process above it is DVC's.
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "fish", "ksh"})
_PATH_REF = re.compile(r"\$\{paths\.(\w+)\}")


@dataclass(frozen=True)
class StageFiles:
    """A stage's place in the DAG: `inputs` maps each `paths` key it reads to the stage that
    outputs it (in dvc.yaml order); `output` is the `paths` key of its own output, if any."""

    inputs: dict[str, str]
    output: str | None


def stage_files(stage: str, dvc_file: str | Path = DVC_FILE) -> StageFiles:
    """`stage`'s inputs and output as `dvc_file` declares them; none without the file or stage."""
    path = Path(dvc_file)
    stages = yaml.safe_load(path.read_text()).get("stages", {}) if path.is_file() else {}
    if stage not in stages:
        return StageFiles({}, None)
    producer = {key: name for name, spec in stages.items() for key in _path_keys(spec, "outs")}
    own = _path_keys(stages[stage], "outs")
    deps = _path_keys(stages[stage], "deps")
    inputs = {k: producer[k] for k in deps if k in producer and producer[k] != stage}
    return StageFiles(inputs, own[0] if own else None)


def _path_keys(spec: dict[str, Any], section: str) -> list[str]:
    """The `x` of every entry of `section` that is exactly `${paths.x}` (not a file below it)."""
    keys = []
    for entry in spec.get(section) or []:
        name = next(iter(entry)) if isinstance(entry, dict) else entry
        if isinstance(name, str) and (m := _PATH_REF.fullmatch(name.strip())):
            keys.append(m[1])
    return keys


def content_digest(folder: str | Path) -> str | None:
    """sha256 over the sidecars of a stage output folder (see the module doc), None when it has
    none (not made yet)."""
    folder = Path(folder)
    sidecars = [folder / io.META_NAME, folder / MODEL_CONFIG_NAME, folder / MANIFEST_NAME]
    if folder.is_dir():
        for name in (io.META_NAME, MODEL_CONFIG_NAME):
            sidecars += sorted(folder.glob(f"*/{name}"))
    digest, found = hashlib.sha256(), False
    for path in sidecars:
        if path.is_file():
            found = True
            digest.update(
                f"{path.relative_to(folder).as_posix()}\0{io.sha256_file(path)}\n".encode()
            )
    return digest.hexdigest() if found else None


def split_sizes(folder: str | Path) -> dict[str, int]:
    """Rows per split of a data folder: its meta.json `counts`, else the `ok` clips of its
    manifest; {} when it has neither."""
    folder = Path(folder)
    if (folder / io.META_NAME).is_file():
        counts = io.read_json(folder / io.META_NAME).get("counts")
        if isinstance(counts, dict):
            return {str(k): int(v) for k, v in sorted(counts.items())}
    if (folder / MANIFEST_NAME).is_file():
        table = io.read_table(folder / MANIFEST_NAME, columns=["split", "status"]).to_pydict()
        ok = Counter(s for s, st in zip(table["split"], table["status"], strict=True) if st == "ok")
        return dict(sorted(ok.items()))
    return {}


def invocation_id() -> str | None:
    """An id of the DVC command that started this stage process (see the module doc), the same
    for every stage it runs; None outside DVC or when the process tree cannot be read."""
    if not os.environ.get("DVC_STAGE"):
        return None
    import psutil

    try:
        proc = psutil.Process().parent()
        while proc is not None and proc.name() in SHELLS:
            proc = proc.parent()
        if proc is None:
            return None
        ident = f"{socket.gethostname()} {proc.pid} {proc.create_time()!r}"
    except psutil.Error:
        return None
    ident += f" {os.environ.get('DVC_EXP_NAME', '')}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]
