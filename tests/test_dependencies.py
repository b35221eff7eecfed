"""The declared dependencies are exactly what the code uses: every third-party module that
`pipeline/` or `stages/` imports comes from a package pyproject.toml declares, and every declared
package is imported, or is a command the project runs (listed below with why)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Declared for their command, never imported by the code.
COMMANDS = {"dvc": "`make demo` runs `dvc repro`; the stages are its commands"}


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
