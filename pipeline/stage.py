"""What every `python -m stages.<name>` shares: logging set-up and user-error reporting."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from collections.abc import Callable

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def stage_main(name: str, body: Callable[[], str]) -> int:
    """Run a stage body; print its closing line, or one sentence for a user error.

    `body` returns the stage's closing line, naming the stage ("extract: 400 of 400 clips ...").
    A `PipelineError` or a full disk exits with status 1 and one sentence, no traceback; Ctrl-C
    and SIGTERM exit with 130 after the body has unwound; other exceptions propagate.
    """
    if not sys.stderr.isatty():
        # Under DVC or CI a progress bar is a log line: one every 10 s, not one per item.
        os.environ.setdefault("TQDM_MININTERVAL", "10")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # SIGTERM (a scheduler, `kill`, a cancelled job) unwinds like Ctrl-C, so that progress is
    # saved and temporaries are removed on the way out.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = body()
    except PipelineError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted; rerun to resume", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(
            f"{name}: error: no space left on the device{where}; free some space and rerun "
            "(finished work is kept, nothing half-written is)",
            file=sys.stderr,
        )
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
