"""The declared dependencies are exactly what the code uses: every third-party module that
`pipeline/` or `stages/` imports comes from a package pyproject.toml declares, and every declared
package is imported, or is a command the project runs (listed below with why). The locks
(requirements/*.txt, `make lock`) hold every declared package at a version pyproject.toml
allows, with hashes, one version per package across both, and torch's own requirements."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# Declared for their command, never imported by the code.
COMMANDS = {"dvc": "`make demo` runs `dvc repro`; the stages are its commands"}
LOCKS = {"cpu": ("test",), "cu126": ("cluster", "test")}  # lock -> the extras it holds
# Runtime libraries a CUDA build of torch pins exactly itself, from its own index.
CUDA_RUNTIME = re.compile(r"^(nvidia-|triton|cuda-)")


def _name(requirement: str) -> str:
    """The distribution name of a requirement string, normalised (PEP 503)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_name(r) for r in project["dependencies"]}


def _imported_modules() -> set[str]:
    found: set[str] = set()
    for folder in ("pipeline", "stages"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names} - {"pipeline", "stages"}


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    """Import name -> the installed distributions that provide it."""
    provided = importlib.metadata.packages_distributions()
    return {m: {_name(d) for d in provided.get(m, [])} for m in modules}


def test_every_imported_package_is_declared():
    declared = _declared()
    missing = {m: d for m, d in _distributions(_imported_modules()).items() if not d & declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_declared_package_is_imported_or_run():
    used = set().union(*_distributions(_imported_modules()).values())
    unused = _declared() - used - set(COMMANDS)
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"


def _lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """A lock as {normalised name: (version, hashes)}; fails on an entry without a hash."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = (ROOT / "requirements" / f"{name}.txt").read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        if m := re.match(r"([A-Za-z0-9._-]+)==(\S+)", block):
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
            assert hashes, f"{name}: {m[1]} has no hash"
            entries[_name(m[1])] = (m[2], hashes)
    return entries


def _requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = list(project["dependencies"])
    for extra in extras:
        found += project["optional-dependencies"][extra]
    return [Requirement(r) for r in found]


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_each_lock_holds_every_declared_package_but_torch_at_an_allowed_version(name):
    lock = _lock(name)
    assert "torch" not in lock, "torch comes by version from its own index (Makefile, Dockerfile)"
    stale = {}
    for req in _requirements(LOCKS[name]):
        if _name(req.name) == "torch":
            continue
        version = lock.get(_name(req.name), ("absent",))[0]
        if version == "absent" or not req.specifier.contains(version, prereleases=True):
            stale[req.name] = f"{version} (pyproject: {req.specifier})"
    assert not stale, f"requirements/{name}.txt is stale, run `make lock`: {stale}"


def test_both_locks_agree_on_every_version_they_share():
    cpu, cu126 = _lock("cpu"), _lock("cu126")
    assert set(cpu) <= set(cu126), "the cluster set holds the CPU set and its extras"
    differ = {n: (cpu[n][0], cu126[n][0]) for n in cpu if cpu[n][0] != cu126[n][0]}
    assert not differ, f"one version per package in both locks: {differ}"


def test_torchs_own_requirements_are_locked():
    """requirements/torch.in is what the installed torch declares (less the CUDA runtime), so
    that the packages torch alone pulls in are locked too."""
    listed = (ROOT / "requirements" / "torch.in").read_text().split("\n")
    listed = {_name(line) for line in listed if line.strip() and not line.startswith("#")}
    declared = {
        _name(r)
        for r in importlib.metadata.requires("torch") or []
        if "extra ==" not in r and not CUDA_RUNTIME.match(_name(r))
    }
    assert listed == declared, (
        "update requirements/torch.in to the installed torch, then `make lock`"
    )
    for name in LOCKS:
        assert declared <= set(_lock(name)), name
