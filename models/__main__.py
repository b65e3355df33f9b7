"""Command line of the mtkernels application: ``python -m models COMMAND``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from . import MODELS, build_model
from .summary import format_table, summarize


def cmd_summary(args: argparse.Namespace) -> int:
    rows = [summarize(name, build_model(name)) for name in args.models]
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models",
        description="Multi-task face-attribute networks of Sang & Cuong 2018 (BKNet, ResNet ver1/ver2) "
                    "and Saroop et al. 2021 (4-task CNN), built on mtkernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("summary", help="parameter count and multiply-accumulates per image of each network",
                       description="Build each network and count its parameters and the multiply-accumulates "
                                   "of one image through its conv and linear layers (measured, not tabulated).")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS), metavar="NAME",
                   help=f"networks to summarise (default: all of {', '.join(MODELS)})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.set_defaults(func=cmd_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
