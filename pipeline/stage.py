"""What every `python -m stages.<name>` shares: logging set-up and user-error reporting."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def stage_main(name: str, body: Callable[[], str]) -> int:
    """Run a stage body; print its closing line, or one sentence for a user error.

    `body` returns the stage's closing summary ("wrote 480 clips to data/clips in 93 s").
    A `PipelineError` exits with status 1 and no traceback; other exceptions propagate.
    """
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
    print(f"{name}: {summary}")
    return 0
