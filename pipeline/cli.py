"""The `visual-echoes` command.

visual-echoes profile profiles/tiny.yaml    apply a params profile (keeps comments)
visual-echoes check                         validate params.yaml, say which ffmpeg is used and
                                            whether the weight files it points at are there
visual-echoes weights fetch --all           download and verify the paper profile's official files
visual-echoes image2audio --image cat.jpg --out cat.wav
visual-echoes audio2image --audio bark.wav --out bark.png
visual-echoes cogenerate --samples 4 --out generated/
visual-echoes inpaint-audio --image cat.jpg --audio cat.wav --start 3 --end 5 --out fixed.wav
visual-echoes inpaint-image --audio bark.wav --image dog.png --box 4 12 4 12 --out fixed.png
visual-echoes compare --sort fd              table of MLflow runs (evaluate + sweep trials)
visual-echoes submit --address http://HEAD:8265 --in-place train
                                            `dvc repro train` as a Ray job; Ctrl-C stops it
"""

from __future__ import annotations

import argparse
import sys

from pipeline.compare import add_subcommand as add_compare
from pipeline.errors import PipelineError
from pipeline.inference.command import add_subcommands
from pipeline.submit import add_subcommand as add_submit
from pipeline.weights.command import add_registry_arguments
from pipeline.weights.command import add_subcommand as add_weights


def _profile(args: argparse.Namespace) -> str:
    from pipeline.profiles import apply_profile

    apply_profile(args.profile, args.params)
    return f"applied {args.profile} to {args.params}"


def _check(args: argparse.Namespace) -> str:
    from pathlib import Path

    from pipeline.config import load_params
    from pipeline.media import describe_ffmpeg
    from pipeline.weights.registry import LOCK_FILE, Lock, WeightsError, load_registry
    from pipeline.weights.store import params_report

    params = load_params(args.params)
    root = Path(args.params).parent  # the stages run beside params.yaml
    lock = Lock(args.lock or root / LOCK_FILE)
    report, problem = params_report(params, load_registry(args.registry), lock, root)
    out = f"{args.params} is valid; ffmpeg: {describe_ffmpeg()}\n{report}"
    if problem:  # the stage that reads a missing or wrong file would fail hours into a run
        print(out)
        raise WeightsError(problem)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visual-echoes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="apply a params profile to params.yaml")
    p.add_argument("profile", help="overlay YAML, e.g. profiles/tiny.yaml")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=_profile)
    c = sub.add_parser("check", help="validate params.yaml, find ffmpeg, verify weight files")
    c.add_argument("--params", default="params.yaml")
    add_registry_arguments(c, None)
    c.set_defaults(func=_check)
    add_subcommands(sub)
    add_compare(sub)
    add_submit(sub)
    add_weights(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(args.func(args))
    except PipelineError as err:
        print(f"visual-echoes: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("visual-echoes: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
