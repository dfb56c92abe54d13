"""idc-client: what a hospital runs (deployment flags only; training settings come from the run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli_util import default_cache_dir, setup_logging
from common.data import LoadOptions, NoUsableData, load_patches


def _check(args: argparse.Namespace) -> int:
    options = LoadOptions(small=args.small)
    try:
        patches = load_patches(args.data, cache_dir=args.cache_dir, options=options, workers=2)
    except NoUsableData as exc:
        print(f"idc-client check: {exc}", file=sys.stderr)
        return 1
    report = patches.report
    print(report.summary())
    for title, items in (("unreadable", report.unreadable), ("mislabelled", report.mislabelled),
                         ("ignored", report.ignored)):  # fmt: skip
        for rel in items[: args.list]:
            print(f"  {title}: {rel}")
        if len(items) > args.list:
            print(f"  ... and {len(items) - args.list} more {title}")
    print(f"data set fingerprint: {patches.fingerprint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The idc-client argument parser."""
    parser = argparse.ArgumentParser(prog="idc-client", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--cache-dir", type=Path, default=None,
        help="decoded-patch cache (default $IDC_CACHE_DIR or ~/.cache/idc-fl)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="preflight: what is usable in a data folder")
    p.add_argument("--data", type=Path, required=True, help="folder in the Kaggle layout")
    p.add_argument("--small", choices=("pad", "skip"), default="pad",
                   help="patches under 50x50: pad with background (default) or skip")  # fmt: skip
    p.add_argument("--list", type=int, default=10, help="how many problem files to name")
    p.set_defaults(func=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``idc-client``."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.cache_dir is None:
        args.cache_dir = default_cache_dir()
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"idc-client {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
