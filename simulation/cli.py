"""idc-sim: synthetic data, the centralized baseline, budgets, simulations and the demo."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.cli_util import default_cache_dir, setup_logging
from common.data import NoUsableData

log = logging.getLogger(__name__)


def _synth(args: argparse.Namespace) -> int:
    from simulation.synth import SynthSpec, synthesize

    spec = SynthSpec(patients=args.patients, seed=args.seed, sites=args.sites,
                     site_shift=args.site_shift,
                     patches_per_patient=(args.min_patches, args.max_patches))  # fmt: skip
    summary = synthesize(args.out, spec, workers=args.workers)
    print(f"wrote {summary.patches} patches ({summary.positives} IDC-positive) from "
          f"{len(summary.patients)} patients to {args.out} in {summary.seconds:.1f} s")  # fmt: skip
    return 0


def _centralized(args: argparse.Namespace) -> int:
    from simulation.centralized import BaselineConfig, results_table, run_centralized

    config = BaselineConfig(split=args.split, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, patience=args.patience or None, balance=args.balance,
                            seed=args.seed, progress=sys.stderr.isatty())  # fmt: skip
    summary = run_centralized(args.data, args.out, config, args.cache_dir)
    print(results_table({f"centralized ({args.split} split)": summary["test"]}))  # type: ignore[dict-item]
    print(f"results in {args.out}")
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write synthetic H&E-like patches in the Kaggle layout")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or a synth output)")
    p.add_argument("--patients", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sites", type=int, default=1, help="stain groups (patients round-robin)")
    p.add_argument("--site-shift", type=float, default=0.0, help="per-site stain shift, 0..1")
    p.add_argument("--min-patches", type=int, default=40, help="fewest patches per patient")
    p.add_argument("--max-patches", type=int, default=80, help="most patches per patient")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=_synth)


def _add_centralized(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("centralized", help="train the paper's model on pooled patches")
    p.add_argument("--data", type=Path, required=True, help="folder in the Kaggle layout")
    p.add_argument("--out", type=Path, required=True, help="run folder for metrics and figures")
    p.add_argument("--split", choices=("patient", "random"), default="patient")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--patience", type=int, default=5, help="early stopping; 0 turns it off")
    p.add_argument("--balance", action="store_true", help="undersample the majority class")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_centralized)


def build_parser() -> argparse.ArgumentParser:
    """The idc-sim argument parser."""
    parser = argparse.ArgumentParser(prog="idc-sim", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--cache-dir", type=Path, default=None,
        help="decoded-patch cache (default $IDC_CACHE_DIR or ~/.cache/idc-fl)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synth(sub)
    _add_centralized(sub)
    from simulation.budget import add_budget_arguments, run_budget

    p = sub.add_parser("budget", help="offline privacy maths: epsilon of a plan, or its noise")
    add_budget_arguments(p)
    p.set_defaults(func=run_budget)
    from simulation import demo

    demo.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``idc-sim``."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.cache_dir is None:
        args.cache_dir = default_cache_dir()
    try:
        return int(args.func(args))
    except (ValueError, NoUsableData, FileNotFoundError) as exc:
        print(f"idc-sim {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
