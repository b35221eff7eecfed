"""What every `python -m stages.<name>` shares: logging set-up and user-error reporting."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def stage_main(name: str, body: Callable[[], str]) -> int:
    """Run a stage body; print its closing line, or one sentence for a user error.

    `body` returns the stage's closing line, naming the stage ("extract: 400 of 400 clips ...").
    A `PipelineError` exits with status 1 and no traceback; other exceptions propagate.
    """
    if not sys.stderr.isatty():
        # Under DVC or CI a progress bar is a log line: one every 10 s, not one per item.
        os.environ.setdefault("TQDM_MININTERVAL", "10")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        summary = body()
    except PipelineError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted; rerun to resume", file=sys.stderr)
        return 130
    print(summary)
    return 0
