"""The official VGGSound clip lists, parsed as untrusted input.

Two formats exist (hche11/VGGSound, no header in either):

* `vggsound.csv`: `youtube_id,start_seconds,label,split`;
* `train.csv` / `test.csv`: `<youtube_id>_<start:06d>.mp4,label` (CRLF), split given by the caller.

The format is told from the first row. YouTube ids and labels come from a file anyone could have
edited: an id must be 11 characters of `[A-Za-z0-9_-]` before it may reach a path or a URL, and a
label must be non-empty printable text. A bad line is reported with its number and reason and
never stops the parse. The clip id is `{youtube_id}_{start:06d}`, as in the authors' own lists.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import PipelineError

YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{11}")
_START = re.compile(r"[0-9]{1,6}")
_SPLIT_NAME = re.compile(r"(?P<id>[A-Za-z0-9_-]{11})_(?P<start>[0-9]{1,6})\.mp4")
SPLITS = ("train", "test")
# Test rows of the official lists: test.csv, and the test rows of vggsound.csv
# (docs/references.md, "VGGSound lists").
TEST_LIST_CLIPS = (15_446, 15_496)
MAX_LABEL_CHARS = 200

ListFormat = Literal["vggsound", "split"]


class ListFormatError(PipelineError, ValueError):
    """A list file whose format cannot be recognised; the message names the file and line."""


@dataclass(frozen=True)
class VGGSoundEntry:
    """One clip of the list, every field validated."""

    youtube_id: str
    start_s: int
    label: str
    split: str
    line: int

    @property
    def clip_id(self) -> str:
        return clip_id(self.youtube_id, self.start_s)


@dataclass(frozen=True)
class Rejected:
    """A line that was skipped: its 1-based number, its text (shortened) and why."""

    line: int
    text: str
    reason: str


@dataclass(frozen=True)
class ParsedList:
    """The outcome of parsing a list: valid entries in file order, and the rejected lines."""

    format: ListFormat
    entries: tuple[VGGSoundEntry, ...]
    rejected: tuple[Rejected, ...]


@dataclass(frozen=True)
class ClassInfo:
    """One row of stat.csv: label, number of clips in VGGSound, coarse category."""

    label: str
    count: int
    category: str


def validate_youtube_id(value: str) -> str:
    """`value` if it is a well-formed YouTube id (11 chars of [A-Za-z0-9_-]); else ValueError."""
    if not isinstance(value, str) or not YOUTUBE_ID.fullmatch(value):
        raise ValueError(f"{_show(value)} is not a YouTube id (11 characters of A-Z a-z 0-9 _ -)")
    return value


def clean_label(value: str) -> str:
    """`value` stripped and NFC-normalised; ValueError if empty, too long or with control chars.

    Unicode letters are kept; control, format (bidi overrides, zero-width), private-use and
    unassigned characters are refused because labels end up in logs, reports and plots.
    """
    label = unicodedata.normalize("NFC", value).strip()
    if not label:
        raise ValueError("label is empty")
    if len(label) > MAX_LABEL_CHARS:
        raise ValueError(f"label is longer than {MAX_LABEL_CHARS} characters")
    bad = next((ch for ch in label if unicodedata.category(ch).startswith("C")), None)
    if bad is not None:
        raise ValueError(f"label contains the control character U+{ord(bad):04X}")
    return label


def clip_id(youtube_id: str, start_s: int) -> str:
    """The canonical clip id `{youtube_id}_{start:06d}`, after validating both parts."""
    validate_youtube_id(youtube_id)
    if not 0 <= start_s <= 999_999:
        raise ValueError(f"start {start_s} is outside 0..999999 seconds")
    return f"{youtube_id}_{start_s:06d}"


def video_url(template: str, youtube_id: str) -> str:
    """`template` with `{id}` replaced by the validated id (no other formatting is applied)."""
    return template.replace("{id}", validate_youtube_id(youtube_id))


def parse_list(text: str, *, split: str, source: str = "list") -> ParsedList:
    """Parse a VGGSound list given as text; `split` applies to train.csv/test.csv rows.

    The format is detected from the first non-blank row (4 fields: vggsound.csv, 2 fields:
    train/test list). Duplicated (youtube_id, start) pairs keep their first occurrence.
    Raises `ListFormatError` only when the file as a whole is unrecognisable.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    rows = [(n, row) for n, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1) if row]
    if not rows:
        raise ListFormatError(f"{source} has no rows")
    first_line, first = rows[0]
    if len(first) == 4:
        fmt: ListFormat = "vggsound"
    elif len(first) == 2:
        fmt = "split"
    else:
        raise ListFormatError(
            f"{source} line {first_line}: expected 4 fields (vggsound.csv) or 2 fields "
            f"(train.csv/test.csv), found {len(first)}"
        )
    entries: list[VGGSoundEntry] = []
    rejected: list[Rejected] = []
    seen: dict[tuple[str, int], int] = {}
    for line, row in rows:
        try:
            entry = (
                _parse_vggsound_row(row, line)
                if fmt == "vggsound"
                else _parse_split_row(row, line, split)
            )
        except ValueError as err:
            rejected.append(Rejected(line, _show(",".join(row)), str(err)))
            continue
        key = (entry.youtube_id, entry.start_s)
        if key in seen:
            rejected.append(
                Rejected(
                    line,
                    _show(",".join(row)),
                    f"duplicate of clip {entry.clip_id} on line {seen[key]}",
                )
            )
            continue
        seen[key] = line
        entries.append(entry)
    return ParsedList(fmt, tuple(entries), tuple(rejected))


def read_list(path: str | Path, *, split: str) -> ParsedList:
    """Read and parse a list file (UTF-8, optional BOM, LF or CRLF); see `parse_list`."""
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return parse_list(text, split=split, source=str(path))


def read_classes(path: str | Path) -> list[ClassInfo]:
    """The class list of stat.csv (`label,count,category`, no header), in file order."""
    path = Path(path)
    classes: list[ClassInfo] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for line, row in enumerate(csv.reader(fh), 1):
            if not row:
                continue
            if len(row) != 3 or not row[1].strip().isdigit():
                raise ListFormatError(f"{path} line {line}: expected 'label,count,category'")
            try:
                classes.append(ClassInfo(clean_label(row[0]), int(row[1]), clean_label(row[2])))
            except ValueError as err:
                raise ListFormatError(f"{path} line {line}: {err}") from None
    return classes


# ---------------------------------------------------------------------------------------- rows


def _parse_vggsound_row(row: list[str], line: int) -> VGGSoundEntry:
    if len(row) != 4:
        raise ValueError(f"line {line}: expected 4 fields, found {len(row)}")
    youtube_id, start, label, split = (field.strip() for field in row)
    split = split.lower()
    if split not in SPLITS:
        raise ValueError(f"line {line}: split {_show(split)} is not 'train' or 'test'")
    return _entry(youtube_id, start, label, split, line)


def _parse_split_row(row: list[str], line: int, split: str) -> VGGSoundEntry:
    if len(row) != 2:
        raise ValueError(f"line {line}: expected 2 fields, found {len(row)}")
    name, label = row[0].strip(), row[1]
    match = _SPLIT_NAME.fullmatch(name)
    if not match:
        raise ValueError(f"line {line}: {_show(name)} is not '<11-char youtube id>_<start>.mp4'")
    return _entry(match["id"], match["start"], label, split, line)


def _entry(youtube_id: str, start: str, label: str, split: str, line: int) -> VGGSoundEntry:
    try:
        validate_youtube_id(youtube_id)
        if not _START.fullmatch(start):
            raise ValueError(f"start {_show(start)} is not a whole number of seconds (0..999999)")
        label = clean_label(label)
    except ValueError as err:
        raise ValueError(f"line {line}: {err}") from None
    return VGGSoundEntry(youtube_id, int(start), label, split, line)


def _show(value: object, limit: int = 60) -> str:
    """A printable, shortened repr for messages (never echoes raw control characters)."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
