"""The `visual-echoes` command.

visual-echoes profile profiles/tiny.yaml    apply a params profile (keeps comments)
visual-echoes check                         say which ffmpeg is used and validate params.yaml
"""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import PipelineError


def _profile(args: argparse.Namespace) -> str:
    from pipeline.profiles import apply_profile

    apply_profile(args.profile, args.params)
    return f"applied {args.profile} to {args.params}"


def _check(args: argparse.Namespace) -> str:
    from pipeline.config import load_params
    from pipeline.media import ffmpeg_exe

    load_params(args.params)
    return f"{args.params} is valid; ffmpeg: {ffmpeg_exe()}"


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
    c = sub.add_parser("check", help="validate params.yaml and find ffmpeg")
    c.add_argument("--params", default="params.yaml")
    c.set_defaults(func=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(args.func(args))
    except PipelineError as err:
        print(f"visual-echoes: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
