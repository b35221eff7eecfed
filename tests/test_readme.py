"""README.md is a user's guide whose every command, params key and CLI flag exists.

Checked: its size; the five task sections, each ending with what the user gets; every
`params.yaml` key it names (in backticks, YAML snippets and `dvc exp run -S`); every
`visual-echoes` subcommand and flag it uses (against `pipeline.cli.build_parser()`); the first
word of every command in its bash/sh/console blocks; its links; and its dependency table
against pyproject.toml. The params keys and links of docs/*.md are checked too. The checkers
are also run on a README with one mistake of each kind, so that each of them is seen to fail.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_BYTES = 15 * 1024

# First words a README command may start with. The project's own entry points (`visual-echoes`,
# the Makefile's targets, `python -m stages.<name>` / `python bench/<script>.py`, both checked
# further below); the tools the pipeline is built on that a user drives by hand (dvc, mlflow,
# ray); git, for the commit the cluster runs; and the shell built-ins a session needs (cd,
# source, export). Cluster tooling (docker, kubectl, aws) belongs to infra/README.md.
COMMANDS = {
    "visual-echoes",
    "make",
    "python",
    "dvc",
    "mlflow",
    "ray",
    "git",
    "cd",
    "source",
    "export",
}
COMMAND_BLOCKS = {"bash", "sh", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
# `train.csv` and the like name files, not params keys: a section name, a dot and a file type.
FILE_NAME = re.compile(r"^[a-z_]+\.(csv|json|yaml|png|wav|md|py|parquet|db|pt|ckpt|safetensors)$")
TASKS = 5


def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def inline_code(text: str) -> list[str]:
    """The contents of `single backticks` outside fenced blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", prose)


def words(line: str) -> list[str]:
    """Shell words of one line, comments dropped, `&&`, `|`, `;` as words of their own."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def commands(text: str) -> list[list[str]]:
    """Every command (words up to a separator) of every bash/sh/console block."""
    found = []
    for lang, body in code_blocks(text):
        if lang not in COMMAND_BLOCKS:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if lang == "console":
                if not line.startswith("$ "):
                    continue  # output, not a command
                line = line[2:]
            segment: list[str] = []
            for word in [*words(line), ";"]:
                if word in SEPARATORS:
                    while segment and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", segment[0]):
                        segment.pop(0)  # NAME=value before a command
                    if segment:
                        found.append(segment)
                    segment = []
                else:
                    segment.append(word)
    return found


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*):(?!=)", text, flags=re.M))


def command_problems(text: str) -> list[str]:
    """Commands that do not start with an allowed word, or name a missing target or script."""
    problems = []
    targets = make_targets()
    for cmd in commands(text):
        first, args = cmd[0], cmd[1:]
        if first not in COMMANDS:
            problems.append(f"{' '.join(cmd)!r}: {first!r} is not a command of this project")
        elif first == "make":
            for target in (a for a in args if "=" not in a and not a.startswith("-")):
                if target not in targets:
                    problems.append(f"{' '.join(cmd)!r}: the Makefile has no target {target!r}")
        elif first == "python":
            if args[:1] == ["-m"] and len(args) > 1:
                module = ROOT / args[1].replace(".", "/")
                if not (module.with_suffix(".py").is_file() or (module / "__init__.py").is_file()):
                    problems.append(f"{' '.join(cmd)!r}: no module {args[1]!r} here")
            elif not (args and args[0].endswith(".py") and (ROOT / args[0]).is_file()):
                problems.append(f"{' '.join(cmd)!r}: not `python -m <module>` or a script here")
    return problems


def option(word: str) -> str | None:
    """`--steps` of `--steps=30` or `--steps`; None for a value (`3`, `-1`, `cat.jpg`)."""
    if word.startswith("-") and not re.match(r"^-\d", word):
        return word.split("=", 1)[0]
    return None


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_problems(text: str) -> list[str]:
    """`visual-echoes` subcommands and flags that the parser does not have."""
    root = build_parser()
    every_flag = set()
    stack = [root]
    while stack:
        parser = stack.pop()
        every_flag |= set(parser._option_string_actions)
        stack += subparsers(parser).values()
    uses = [cmd for cmd in commands(text) if cmd[0] == "visual-echoes"]
    uses += [words(c) for c in inline_code(text) if re.match(r"^visual-echoes(\s|$)", c)]
    problems = []
    for argv in uses:
        parser, rest, name = root, argv[1:], "visual-echoes"
        while subparsers(parser) and rest and not rest[0].startswith("-"):
            if rest[0] not in subparsers(parser):
                problems.append(f"{' '.join(argv)!r}: {name} has no subcommand {rest[0]!r}")
                break
            name += " " + rest[0]
            parser, rest = subparsers(parser)[rest[0]], rest[1:]
        for flag in filter(None, map(option, rest)):
            if flag not in parser._option_string_actions:
                problems.append(f"{' '.join(argv)!r}: {name} has no option {flag!r}")
    # Options named alone in the prose (`--seed`) must belong to some subcommand.
    for code in inline_code(text):
        if code.startswith("-"):
            for flag in filter(None, map(option, words(code))):
                if flag not in every_flag:
                    problems.append(f"`{code}`: no visual-echoes subcommand has {flag!r}")
    return problems


def flatten(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + str(key))
        if isinstance(value, dict):
            keys += flatten(value, f"{prefix}{key}.")
    return keys


def mentioned_keys(text: str, sections: set[str]) -> list[str]:
    """Dotted params keys the text names: in backticks, YAML blocks and `-S key=value`."""
    keys = []
    for code in inline_code(text):
        if m := re.match(r"^(\w+):$", code):  # `generate:`, a section
            keys.append(m.group(1))
        m = re.match(r"^([A-Za-z_]\w*(?:\.\w+)+)\s*(?:[:=].*)?$", code)
        if m and m.group(1).split(".")[0] in sections and not FILE_NAME.match(m.group(1)):
            keys.append(m.group(1))
    for lang, body in code_blocks(text):
        if lang in ("yaml", "yml"):
            keys += flatten(yaml.safe_load(body) or {})
    for cmd in commands(text):
        for flag, value in zip(cmd, cmd[1:], strict=False):
            if flag in ("-S", "--set-param"):
                keys.append(value.split("=", 1)[0].split(":")[-1])
    return keys


def params_problems(text: str) -> list[str]:
    tree = params()
    problems = []
    for key in mentioned_keys(text, set(tree)):
        node = tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                problems.append(f"`{key}` is not a key of params.yaml")
                break
            node = node[part]
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def link_problems(text: str, base: Path = ROOT) -> list[str]:
    """Relative links of `text` (a file in `base`) whose file or heading anchor is missing."""
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        file = (base / path).resolve() if path else None
        if file is not None and not file.exists():
            problems.append(f"link to {target} leads nowhere")
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text() if file else text, flags=re.M)
            if anchor not in {slug(h) for h in headings}:
                problems.append(f"link to {target}: no such heading")
    return problems


def section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    return m.group(1) if m else ""


def structure_problems(text: str) -> list[str]:
    problems = []
    titles = re.findall(r"^## (.+)$", text, flags=re.M)
    if "Two commands" not in titles:
        problems.append("no 'Two commands' section")
    for n in range(1, TASKS + 1):
        title = next((t for t in titles if t.startswith(f"{n}. ")), None)
        if title is None:
            problems.append(f"no task section '{n}. ...'")
        elif "What you get" not in section(text, title):
            problems.append(f"section {title!r} does not say what you get")
    return problems


def pyproject_dependencies() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    return {re.match(r"^[A-Za-z0-9_.-]+(?:\[[^\]]*\])?", s).group(0).lower() for s in specs}


def readme_dependencies(text: str) -> set[str]:
    rows = re.findall(r"^\| ([^|]+?) \|", section(text, "Dependencies"), flags=re.M)
    names = set()
    for cell in rows[1:]:  # below the header; the |---| row does not match
        cell = re.sub(r"\(.*?\)", "", cell)
        names |= {n.strip().lower() for n in re.split(r",\s+(?![^\[]*\])", cell) if n.strip()}
    return names


# ------------------------------------------------------------------------------- the README


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


def test_readme_is_at_most_15_kb():
    size = README.stat().st_size
    assert size <= MAX_BYTES, f"README.md is {size} bytes; move reference text to docs/"


def test_readme_has_the_two_commands_and_five_task_sections(readme):
    assert structure_problems(readme) == []
    assert {"make demo", "make test"} <= {" ".join(c[:2]) for c in commands(readme)}


def test_every_params_key_in_the_readme_exists(readme):
    assert len(mentioned_keys(readme, set(params()))) >= 5, "the key scan found nothing"
    assert params_problems(readme) == []


@pytest.mark.parametrize("doc", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_every_params_key_in_the_docs_exists(doc):
    # docs/paper.md names the key that restores each of the paper's choices
    assert params_problems((ROOT / "docs" / doc).read_text(encoding="utf-8")) == []


def test_every_visual_echoes_flag_in_the_readme_exists(readme):
    assert any(c[0] == "visual-echoes" for c in commands(readme))
    assert cli_problems(readme) == []


def test_every_readme_command_is_a_command_of_this_project(readme):
    assert commands(readme), "no command block found"
    assert command_problems(readme) == []


@pytest.mark.parametrize(
    "doc", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))]
)
def test_links_of_the_readme_and_docs_lead_somewhere(doc):
    path = README if doc == "README.md" else ROOT / "docs" / doc
    assert link_problems(path.read_text(encoding="utf-8"), path.parent) == []


def test_readme_lists_every_direct_dependency_and_no_other(readme):
    assert readme_dependencies(readme) == pyproject_dependencies()


# ------------------------------------------------------------------- the checkers can fail

BAD = """\
## Two commands

## 1. Demo

Set `train.stepz: 10`, see `train.csv`, then `--fast`.

```yaml
download:
  local:
    video_dir: x
```

```bash
visual-echoes image2audio --image a.jpg --fast
visual-echoes publish out/
docker build . && make deploy
python -m stages.nothing
NAME=1 dvc exp run -S train.nope=1
```

Read [the stages](docs/nowhere.md) and [the download](docs/stages.md#fetching).

## Dependencies

| package | why |
|---|---|
| torch | models |
| left-pad, numpy (`test` extra) | padding |
"""


def test_each_checker_finds_its_mistake():
    assert structure_problems(BAD) == [
        "section '1. Demo' does not say what you get",
        "no task section '2. ...'",
        "no task section '3. ...'",
        "no task section '4. ...'",
        "no task section '5. ...'",
    ]
    assert sorted(params_problems(BAD)) == [
        "`download.local.video_dir` is not a key of params.yaml",
        "`train.nope` is not a key of params.yaml",
        "`train.stepz` is not a key of params.yaml",
    ]
    assert cli_problems(BAD) == [
        "'visual-echoes image2audio --image a.jpg --fast': visual-echoes image2audio has no "
        "option '--fast'",
        "'visual-echoes publish out/': visual-echoes has no subcommand 'publish'",
        "`--fast`: no visual-echoes subcommand has '--fast'",
    ]
    assert command_problems(BAD) == [
        "'docker build .': 'docker' is not a command of this project",
        "'make deploy': the Makefile has no target 'deploy'",
        "'python -m stages.nothing': no module 'stages.nothing' here",
    ]
    assert link_problems(BAD) == [
        "link to docs/nowhere.md leads nowhere",
        "link to docs/stages.md#fetching: no such heading",
    ]
    assert readme_dependencies(BAD) == {"torch", "left-pad", "numpy"}
