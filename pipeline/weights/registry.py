"""What the official files are (registry.yaml) and the hashes recorded for them (the lock file).

`load_registry()` parses registry.yaml (or a replacement given with `--registry`, e.g. a
mirror's own) into `Weight` entries with params.yaml's strictness: every key present and known.
`Lock` is weights.lock.json, committed beside params.yaml: per name, the size and sha256 of the
first verified download (and, for a tarball, of the file inside it that the params point at).
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from pipeline import io
from pipeline.config import ConfigError, Params, doc, parse_section
from pipeline.errors import PipelineError

REGISTRY_FILE = Path(__file__).with_name("registry.yaml")
WEIGHTS_DIR = "weights"  # default download folder, relative to the checkout (git/DVC-ignored)
LOCK_FILE = "weights.lock.json"
SHA_SHOWN = 12  # hex digits of a hash shown in tables and messages


class WeightsError(PipelineError):
    """A problem with the official files, their registry or the lock file, in one sentence."""


def _hex(value: str, lengths: range, key: str, what: str) -> None:
    if value and not (len(value) in lengths and re.fullmatch(r"[0-9a-f]+", value)):
        raise ConfigError(f"{key}: must be empty or {what}")


def _params_field_is_path(key: str) -> bool:
    """Whether the dotted `key` names a string field of params.yaml."""
    cls: Any = Params
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return cls is str


@dataclass(frozen=True)
class Weight:
    """One official file, as its project publishes it (registry.yaml documents each key)."""

    name: str = doc("The registry key, e.g. clip_vit_b32.")
    used_by: str = doc("What in the pipeline uses it.")
    params_key: str = doc("The params.yaml key that holds its path.")
    file: str = doc("Its path under the weights folder.")
    archive: str = doc("'' for a plain file, else the tarball holding file's first folder.")
    url: str = doc("The URL its project publishes.")
    published_at: str = doc("Where that URL (and any hash) is published.")
    size: int = doc("Published size in bytes of the download (0: none).")
    sha256: str = doc("Published sha256 of the download, or its first 8+ hex digits ('': none).")
    md5: str = doc("Published md5 of the download ('': none).")
    git_blob_sha1: str = doc("Git object id of the download in its repository ('': none).")

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9_]+", self.name):
            raise ConfigError("name: must be lower-case letters, digits and underscores")
        if not _params_field_is_path(self.params_key):
            raise ConfigError(f"params_key: {self.params_key!r} is not a path key of params.yaml")
        path = PurePosixPath(self.file)
        if not self.file or path.is_absolute() or ".." in path.parts or "\\" in self.file:
            raise ConfigError("file: must be a relative path inside the weights folder")
        if self.archive and ("/" in self.archive or len(path.parts) < 2):
            raise ConfigError("archive: must be a file name, and file a path inside its folder")
        if not re.match(r"https?://", self.url):
            raise ConfigError("url: must be an http:// or https:// URL")
        if self.size < 0:
            raise ConfigError("size: must be 0 (not published) or positive")
        _hex(self.sha256, range(8, 65), "sha256", "8 to 64 lower-case hex digits")
        _hex(self.md5, range(32, 33), "md5", "32 lower-case hex digits")
        _hex(self.git_blob_sha1, range(40, 41), "git_blob_sha1", "40 lower-case hex digits")

    @property
    def download_name(self) -> str:
        """The name of what is downloaded: the tarball, or the file itself."""
        return self.archive or PurePosixPath(self.file).name

    @property
    def folder(self) -> str:
        """The folder a tarball unpacks to (its members must all lie inside it)."""
        return PurePosixPath(self.file).parts[0]

    @property
    def full_sha256(self) -> bool:
        """Whether the whole sha256 of the download is published."""
        return len(self.sha256) == 64


def load_registry(path: str | Path | None = None) -> dict[str, Weight]:
    """The entries of registry.yaml (default: the one beside this module) by name."""
    path = Path(path) if path else REGISTRY_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: registry file not found") from None
    except yaml.YAMLError as err:
        raise WeightsError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(data, dict) or not data:
        raise WeightsError(f"{path}: must map names to entries")
    out: dict[str, Weight] = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or "name" in entry:
            raise WeightsError(f"{path}: {name}: must be a mapping of fields (without name)")
        try:
            out[str(name)] = parse_section(Weight, {"name": str(name), **entry}, str(name))
        except ConfigError as err:
            raise WeightsError(f"{path}: {err}") from None
    keys = [w.params_key for w in out.values()]
    if len(set(keys)) != len(keys):
        raise WeightsError(f"{path}: two entries fill the same params key")
    return out


def select(registry: dict[str, Weight], names: typing.Sequence[str]) -> list[Weight]:
    """The entries called `names` (all of them when empty), in registry order."""
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise WeightsError(f"{unknown[0]}: not a known weight file (known: {', '.join(registry)})")
    return [w for n, w in registry.items() if not names or n in names]


class Lock:
    """weights.lock.json: {name: {url, recorded, download: {size, sha256}, file: {...}}}.

    `download` is what was downloaded (a tarball for an archive entry), `file` the file the
    params point at (the same as `download` for a plain file). Entries are only ever added.
    """

    def __init__(self, path: str | Path = LOCK_FILE) -> None:
        self.path = Path(path)
        try:
            self.entries: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.entries = {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise WeightsError(f"{self.path}: not valid JSON ({err})") from None
        if not isinstance(self.entries, dict):
            raise WeightsError(f"{self.path}: must map names to recorded hashes")

    def recorded(self, name: str, part: typing.Literal["download", "file"]) -> dict | None:
        """The {size, sha256} recorded for `name`'s download or file, or None."""
        entry = self.entries.get(name)
        record = entry.get(part) if isinstance(entry, dict) else None
        if record is None:
            return None
        if not (isinstance(record.get("size"), int) and isinstance(record.get("sha256"), str)):
            raise WeightsError(f"{self.path}: {name}.{part} needs an integer size and a sha256")
        return record

    def record(self, name: str, url: str, download: dict, file: dict) -> None:
        """Add `name`'s hashes (each {size, sha256}) and write the file atomically."""
        when = datetime.now(UTC).strftime("%Y-%m-%d")
        self.entries[name] = {"url": url, "recorded": when, "download": download, "file": file}
        io.write_json(self.path, self.entries)
