"""`visual-echoes weights`: list, fetch and check the official files of the paper profile.

visual-echoes weights list                   each file: use, params key, source, hashes, state
visual-echoes weights fetch --all            download, verify and unpack them into weights/
visual-echoes weights fetch vggish wav2clip  only these
visual-echoes weights check                  verify what is in weights/

profiles/paper.yaml points at weights/. A cut download resumes on the next run. Where a
project publishes no sha256, the first verified download records one in weights.lock.json
(commit it); later downloads must match it. --mirror URL fetches <URL>/<name>/<file name>
instead of the official URLs (the same checks apply).
"""

from __future__ import annotations

import argparse
import os

from pipeline.weights.download import ATTEMPTS, TIMEOUT_S
from pipeline.weights.registry import (
    LOCK_FILE,
    WEIGHTS_DIR,
    Lock,
    WeightsError,
    load_registry,
    select,
)

MIRROR_ENV = "VISUAL_ECHOES_WEIGHTS_MIRROR"


def add_registry_arguments(parser: argparse.ArgumentParser, lock_default: str | None) -> None:
    """--registry and --lock, shared by `weights` and `check`."""
    parser.add_argument("--registry", default=None, metavar="FILE",
                        help="a registry YAML to use instead of the built-in one (a mirror's)")  # fmt: skip
    parser.add_argument("--lock", default=lock_default, metavar="FILE",
                        help=f"the lock file of recorded hashes (default {LOCK_FILE})")  # fmt: skip


def _list(args: argparse.Namespace) -> str:
    from pipeline.weights.store import list_table

    return list_table(load_registry(args.registry), args.dir, Lock(args.lock))


def _fetch(args: argparse.Namespace) -> str:
    from pipeline.weights.store import FetchOptions, fetch

    if bool(args.names) == args.all:
        raise WeightsError(
            "name the files to fetch (see `visual-echoes weights list`) or pass --all"
        )
    if args.timeout <= 0 or args.attempts < 1:
        raise WeightsError("--timeout must be positive and --attempts at least 1")
    weights = select(load_registry(args.registry), args.names)
    opts = FetchOptions(args.mirror or "", args.timeout, args.attempts, args.force)
    return fetch(
        weights, args.dir, Lock(args.lock), opts, echo=lambda line: print(line, flush=True)
    )


def _check(args: argparse.Namespace) -> str:
    from pipeline.weights.store import check_dir

    weights = select(load_registry(args.registry), args.names)
    report, problem = check_dir(weights, args.dir, Lock(args.lock))
    if problem:
        print(report)
        raise WeightsError(problem)
    return report


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="list, fetch and verify the official pretrained files (paper profile)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=WEIGHTS_DIR,
                        help=f"the weights folder (default {WEIGHTS_DIR}/, as profiles/paper.yaml)")  # fmt: skip
    add_registry_arguments(common, LOCK_FILE)
    wsub = p.add_subparsers(dest="weights_command", required=True)
    ls = wsub.add_parser("list", parents=[common], help="what each file is and whether it is here")
    ls.set_defaults(func=_list)
    f = wsub.add_parser("fetch", parents=[common], help="download, verify, unpack")
    f.add_argument("names", nargs="*", metavar="NAME", help="files to fetch (names from `list`)")
    f.add_argument("--all", action="store_true", help="fetch every file")
    f.add_argument("--mirror", default=os.environ.get(MIRROR_ENV), metavar="URL",
                   help=f"fetch <URL>/<name>/<file name> instead (default ${MIRROR_ENV})")  # fmt: skip
    f.add_argument("--timeout", type=float, default=TIMEOUT_S,
                   help=f"seconds without a byte before an attempt is cut (default {TIMEOUT_S:g})")  # fmt: skip
    f.add_argument("--attempts", type=int, default=ATTEMPTS,
                   help=f"attempts per file, each resuming the last (default {ATTEMPTS})")  # fmt: skip
    f.add_argument("--force", action="store_true",
                   help="download again even when a file is there")  # fmt: skip
    f.set_defaults(func=_fetch)
    c = wsub.add_parser("check", parents=[common], help="verify the files in the weights folder")
    c.add_argument("names", nargs="*", metavar="NAME", help="files to check (default all)")
    c.set_defaults(func=_check)
