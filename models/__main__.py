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


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.sources import write_synthetic

    for name in args.sources:
        print(f"{name}: written to {write_synthetic(name, args.out)}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.faces import CropSettings, prepare_source
    from .data.sources import read_source

    settings = CropSettings(size=args.size, level_eyes=args.level_eyes, max_rotation=args.max_rotation)
    for name in args.sources:
        try:
            records = read_source(name, args.data_root)
        except FileNotFoundError as e:
            print(f"{name}: not found ({e})", file=sys.stderr)
            return 2
        images, _, split, report = prepare_source(records, args.cache, settings, progress=not args.quiet)
        splits = ", ".join(f"{s} {int((split == s).sum())}" for s in sorted(set(split)))
        print(f"{name}: {len(images)} faces ({splits}); skipped: {report.summary()}")
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

    from .data.sources import READERS

    p = sub.add_parser("synth", help="write synthetic datasets in the real formats (to try the pipeline)",
                       description="Write small GENKI-4K, FER-2013, Wiki, IMDB and RAF-DB datasets in their exact "
                                   "on-disk formats, with real faces from scikit-image, class-dependent (learnable) "
                                   "pixels, and a few rows each reader must report and skip.")
    p.add_argument("--out", required=True, metavar="DATA_ROOT", help="folder to write DATA_ROOT/<source>/ into")
    p.add_argument("--sources", nargs="+", choices=sorted(READERS), default=sorted(READERS), metavar="NAME",
                   help=f"datasets to write (default: all of {', '.join(sorted(READERS))})")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="read datasets, crop faces with MTCNN once, cache them",
                       description="Read each dataset from DATA_ROOT/<source>/ in its distributed format, detect "
                                   "and crop faces (MTCNN, gray, SIZE x SIZE) and cache the crops in CACHE; a rerun "
                                   "uses the cache, an interrupted run resumes. Prints kept and skipped counts.")
    p.add_argument("--data-root", required=True, help="folder holding genki4k/, fer2013/, wiki/, imdb/, rafdb/")
    p.add_argument("--sources", nargs="+", choices=sorted(READERS), required=True, metavar="NAME",
                   help=f"datasets to prepare: {', '.join(sorted(READERS))}")
    p.add_argument("--cache", default="cache", help="folder for the cropped-face cache (default: ./cache)")
    p.add_argument("--size", type=int, default=48, help="crop side in pixels (paper 1: 48, paper 2: 50)")
    p.add_argument("--level-eyes", action="store_true", help="rotate so the eye line is level (paper 2)")
    p.add_argument("--max-rotation", type=float, default=10.0, help="cap on that rotation, degrees (default 10)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
