"""The only network code of `visual-echoes weights`: one file over HTTP(S), resumable.

`download(url, part)` makes `part` the whole body of `url`. It resumes from what `part` already
holds with `Range: bytes=N-` (a 206 appends, a 200 from a server that ignores ranges starts
over, a 416 whose `Content-Range: bytes */N` equals the part's size means it is already whole),
follows redirects (requests' default), asks for the bytes as stored (`Accept-Encoding:
identity`, and no decoding of a `Content-Encoding` either: a `.tar.gz` must stay gzip), and ends
an attempt when no byte arrives for `timeout_s` or the connection is cut. Each attempt resumes
from where the last one stopped; 408, 429 and 5xx answers are retried too, any other 4xx is
final. What was received stays in `part` for the next run, with the response's validator
(a strong ETag, else Last-Modified) in `<part>.if-range`: a resume sends it as `If-Range`, so a
file changed on the server since comes whole (200) instead of being spliced onto the old bytes.
Whether the bytes are the right ones is the caller's question (pipeline.weights.store verifies
them).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import requests
import urllib3
from tqdm import tqdm

from pipeline.weights.registry import WeightsError

TIMEOUT_S = 60.0  # connect, and the longest silence within a body
ATTEMPTS = 5
CHUNK = 1 << 20
FALLBACK_CHUNK = 1 << 16
MAX_PAUSE_S = 30.0
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class DownloadError(WeightsError):
    """A download that cannot complete: a final HTTP error, or every attempt cut short."""


class _Retry(Exception):
    """An attempt that ended early for a reason worth another attempt."""


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header; None where absent or `*`."""
    m = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not m:
        return None, None
    first, total = m.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _body(raw: urllib3.HTTPResponse) -> Iterator[bytes]:
    """The body as it arrives, undecoded. urllib3 >= 2's read1 hands over what one read got,
    so a body cut by the timeout loses nothing; read(amt) would wait to fill the chunk and
    drop what it holds when the timeout strikes (then at most FALLBACK_CHUNK is lost)."""
    if hasattr(raw, "read1"):
        while chunk := raw.read1(CHUNK, decode_content=False):
            yield chunk
    else:
        yield from raw.stream(FALLBACK_CHUNK, decode_content=False)


def _validator_file(part: Path) -> Path:
    return part.with_name(part.name + ".if-range")


def _attempt(session: requests.Session, url: str, part: Path, timeout_s: float, desc: str) -> None:
    have = part.stat().st_size if part.is_file() else 0
    validator = _validator_file(part)
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator.is_file():
            headers["If-Range"] = validator.read_text().strip()
    with session.get(url, headers=headers, stream=True, timeout=(timeout_s, timeout_s)) as r:
        if r.status_code == 416 and have:
            if _content_range(r.headers.get("Content-Range"))[1] == have:
                return
            part.unlink()
            raise _Retry("the server would not resume the partial file; starting over")
        if r.status_code in RETRY_STATUS:
            raise _Retry(f"HTTP {r.status_code}")
        if r.status_code >= 400 or r.status_code not in (200, 206):
            raise DownloadError(f"{url} answered HTTP {r.status_code} {r.reason}".rstrip())
        if r.status_code == 206:
            first, total = _content_range(r.headers.get("Content-Range"))
            if first != have:
                part.unlink()
                raise _Retry(f"the server resumed at byte {first}, not {have}; starting over")
        else:
            have = 0
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            etag = r.headers.get("ETag", "")
            tag = etag if etag and not etag.startswith("W/") else r.headers.get("Last-Modified", "")
            part.parent.mkdir(parents=True, exist_ok=True)
            if tag:  # If-Range takes a strong ETag or a date
                validator.write_text(tag)
            else:
                validator.unlink(missing_ok=True)
        with (
            open(part, "ab" if have else "wb") as f,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=desc, disable=None, leave=False) as bar,
        ):  # fmt: skip
            for chunk in _body(r.raw):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Retry(f"the body ended after {size} of {total} bytes")


def download(
    url: str,
    part: str | Path,
    *,
    timeout_s: float = TIMEOUT_S,
    attempts: int = ATTEMPTS,
    desc: str = "",
) -> None:
    """Make the file `part` hold the whole body of `url`, resuming what it already holds.

    Raises DownloadError (one sentence: the URL and the last reason) when the server refuses
    or every one of `attempts` is cut short; the bytes received so far stay in `part`.
    """
    part = Path(part)
    reason = ""
    with requests.Session() as session:
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                time.sleep(min(2.0 ** (attempt - 2), MAX_PAUSE_S))
            try:
                _attempt(session, url, part, timeout_s, desc)
                _validator_file(part).unlink(missing_ok=True)
                return
            except _Retry as err:
                reason = str(err)
            except requests.Timeout:
                reason = f"no answer within {timeout_s:g} s"
            except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
                # A read timeout inside the body surfaces as urllib3's ReadTimeoutError.
                silent = isinstance(err, urllib3.exceptions.ReadTimeoutError) or "timed out" in str(
                    err
                )
                reason = (
                    f"no byte for {timeout_s:g} s"
                    if silent
                    else f"connection failed ({type(err).__name__})"
                )
    have = part.stat().st_size if part.is_file() else 0
    raise DownloadError(
        f"{url}: {attempts} attempts failed, the last: {reason} ({have} bytes kept in "
        f"{part.name}; rerun to resume)"
    )
