"""idc-sim: synthetic data, the centralized baseline, budgets, simulations and the demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli_util import add_command, dispatch, new_parser
from common.config import AUGMENTS, LR_SCHEDULES, MODEL_KINDS, OPTIMIZERS
from common.errors import EXIT_OK
from simulation.federated_cli import add_federated, add_sweep, add_threads_argument


def _synth(args: argparse.Namespace) -> int:
    from simulation.synth import SynthSpec, synthesize

    spec = SynthSpec(
        patients=args.patients,
        seed=args.seed,
        sites=args.sites,
        site_shift=args.site_shift,
        patches_per_patient=(args.min_patches, args.max_patches),
    )
    summary = synthesize(args.out, spec, workers=args.workers)
    print(
        f"wrote {summary.patches} patches ({summary.positives} IDC-positive) from "
        f"{len(summary.patients)} patients to {args.out} in {summary.seconds:.1f} s"
    )
    return EXIT_OK


def _centralized(args: argparse.Namespace) -> int:
    from simulation.centralized import BaselineConfig, results_table, run_centralized

    config = BaselineConfig(
        split=args.split,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience or None,
        balance=args.balance,
        augment=args.augment,
        weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule,
        ema=args.ema,
        optimizer=args.optimizer,
        model=args.model,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    summary = run_centralized(args.data, args.out, config, args.cache_dir)
    print(results_table({f"centralized ({args.split} split)": summary["test"]}))
    print(f"results in {args.out}")
    return EXIT_OK


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "synth", _synth, "write synthetic H&E-like patches in the Kaggle layout")
    p.add_argument("--out", type=Path, required=True, help="output folder (new or a synth output)")
    p.add_argument("--patients", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sites", type=int, default=1, help="stain groups (patients round-robin)")
    p.add_argument(
        "--site-shift",
        type=float,
        default=0.0,
        help="per-site stain shift, 0 (none) to 1 (strongest)",
    )
    p.add_argument("--min-patches", type=int, default=40, help="fewest patches per patient")
    p.add_argument("--max-patches", type=int, default=80, help="most patches per patient")
    p.add_argument("--workers", type=int, default=2)


def _add_centralized(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "centralized", _centralized, "train the paper's model on pooled patches")
    p.add_argument("--data", type=Path, required=True, help="folder in the Kaggle layout")
    p.add_argument("--out", type=Path, required=True, help="run folder for metrics and figures")
    p.add_argument("--split", choices=("patient", "random"), default="patient")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--patience", type=int, default=5, help="early stopping; 0 turns it off")
    p.add_argument("--balance", action="store_true", help="undersample the majority class")
    p.add_argument("--augment", choices=AUGMENTS, default="dihedral+color")
    p.add_argument("--weight-decay", type=float, default=0.0, help="> 0: AdamW")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant")
    p.add_argument("--ema", type=float, default=0.0, help="parameter averaging decay; 0: off")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="sgd: momentum 0.9")
    p.add_argument("--model", choices=MODEL_KINDS, default="paper", help="gap: DP-friendly")
    p.add_argument("--seed", type=int, default=0)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from simulation.demo import run_demo

    p = add_command(
        sub, "demo", run_demo, "three synthetic hospitals: centralized vs FedAvg vs FedAvg+DP"
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where results go")
    p.add_argument("--patients", type=int, default=15, help="synthetic patients (3 sites)")
    p.add_argument("--rounds", type=int, default=4, help="FedAvg rounds")
    p.add_argument("--local-epochs", type=int, default=1, help="epochs per round at each site")
    p.add_argument(
        "--epsilon",
        type=float,
        default=8.0,
        help="total DP budget of each site over the run (sample-level)",
    )
    add_threads_argument(p)


def build_parser() -> argparse.ArgumentParser:
    """The idc-sim argument parser."""
    parser, sub = new_parser("idc-sim", __doc__)
    _add_synth(sub)
    _add_centralized(sub)
    add_federated(sub)
    add_sweep(sub)
    from simulation.budget import add_budget_arguments, run_budget

    p = add_command(
        sub, "budget", run_budget, "offline privacy maths: epsilon of a plan, or its noise"
    )
    add_budget_arguments(p)
    _add_demo(sub)
    from simulation.reproduce_cli import add_reproduce

    add_threads_argument(add_reproduce(sub))
    return parser


def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None) is None:
        return
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``idc-sim``."""
    args = build_parser().parse_args(argv)
    return dispatch(args, "idc-sim", prepare=_set_threads)


if __name__ == "__main__":
    sys.exit(main())
