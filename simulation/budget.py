"""Offline privacy-budget maths for planning a DP run (``idc-sim budget``): no model, no data."""

from __future__ import annotations

import argparse
import sys

from common.accounting import (
    ACCOUNTANTS,
    check_delta,
    epsilon,
    loader_batches,
    noise_for_target,
    schedule,
    steps_per_epoch_at_rate,
)
from common.config import Accountant
from common.privacy import PRIVACY_UNIT


def plan_steps(
    sample_rate: float,
    steps: int | None = None,
    rounds: int | None = None,
    local_epochs: int | None = None,
) -> int:
    """Total DP steps of a plan given as ``steps`` or as ``rounds`` x ``local_epochs``.

    With rounds and epochs, ``steps = rounds * local_epochs * ceil(1 / sample_rate)``
    (:func:`~common.accounting.steps_per_epoch_at_rate`: never fewer than Opacus takes).
    """
    if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if (steps is None) == (rounds is None and local_epochs is None):
        raise ValueError("give either steps or rounds and local_epochs, not both or neither")
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return steps
    if rounds is None or local_epochs is None or rounds < 1 or local_epochs < 1:
        raise ValueError(
            f"rounds and local_epochs must both be >= 1, got rounds={rounds}, "
            f"local_epochs={local_epochs}"
        )
    return rounds * local_epochs * steps_per_epoch_at_rate(sample_rate)


def epsilon_for_plan(
    noise_multiplier: float,
    sample_rate: float,
    steps: int | None = None,
    rounds: int | None = None,
    local_epochs: int | None = None,
    delta: float = 1e-5,
    accountant: Accountant = "rdp",
) -> float:
    """Total epsilon at ``delta`` of a whole plan (all rounds) on one site's data set.

    Parameters
    ----------
    noise_multiplier : float
        DP-SGD noise multiplier (noise std / clipping norm).
    sample_rate : float
        Poisson sampling rate, ``1 / len(loader)`` (about batch size / patches).
    steps : int, optional
        Total DP steps; or give ``rounds`` and ``local_epochs`` (see :func:`plan_steps`).
    rounds, local_epochs : int, optional
        Federated rounds the site takes part in, and local epochs per round.
    delta : float
        Target delta; it should be below 1 / (patches at the site).
    accountant : {"rdp", "prv"}
        Opacus accountant.
    """
    total = plan_steps(sample_rate, steps, rounds, local_epochs)
    return epsilon([(noise_multiplier, sample_rate, total)], delta, accountant)


def noise_for_epsilon(
    target_epsilon: float,
    sample_rate: float,
    steps: int | None = None,
    rounds: int | None = None,
    local_epochs: int | None = None,
    delta: float = 1e-5,
    accountant: Accountant = "rdp",
) -> float:
    """Noise multiplier whose whole plan spends at most ``target_epsilon`` (Opacus search)."""
    total = plan_steps(sample_rate, steps, rounds, local_epochs)
    return noise_for_target(target_epsilon, delta, sample_rate, total, accountant)


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``budget`` subcommand's options to ``parser``."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--noise", type=float, help="noise multiplier: report total epsilon")
    what.add_argument("--target-epsilon", type=float, help="total epsilon: report the noise")
    rate = parser.add_mutually_exclusive_group(required=True)
    rate.add_argument("--sample-rate", type=float, help="Poisson sampling rate q")
    rate.add_argument("--patches", type=int, help="patches at the site (q = 1/ceil(n/batch))")
    parser.add_argument("--batch-size", type=int, default=64, help="with --patches (64)")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="total DP steps")
    length.add_argument("--rounds", type=int, help="rounds (with --local-epochs)")
    parser.add_argument("--local-epochs", type=int, default=1, help="with --rounds (1)")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta (1e-5)")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp")


def _rate_and_steps(args: argparse.Namespace) -> tuple[float, int]:
    if args.sample_rate is not None:
        q = float(args.sample_rate)
        epochs = args.local_epochs if args.rounds is not None else None
        return q, plan_steps(q, args.steps, args.rounds, epochs)
    if args.patches < 1 or args.batch_size < 1:
        raise ValueError(
            f"--patches and --batch-size must be >= 1, got {args.patches}, {args.batch_size}"
        )
    check_delta(args.delta, args.patches)
    # A site of this many patches: exactly the schedule its rounds will account.
    q, per_epoch = schedule(loader_batches(args.patches, args.batch_size))
    if args.steps is not None:
        return q, plan_steps(q, steps=args.steps)
    if args.rounds < 1 or args.local_epochs < 1:
        raise ValueError(
            f"--rounds and --local-epochs must be >= 1, got {args.rounds}, {args.local_epochs}"
        )
    return q, args.rounds * args.local_epochs * per_epoch


def run_budget(args: argparse.Namespace) -> int:
    """Print the plan's epsilon (or the noise for a target) and the privacy unit."""
    try:
        q, steps = _rate_and_steps(args)
        plan = (
            f"{steps} steps, sample rate {q:.4g}, delta {args.delta:g}, "
            f"{args.accountant.upper()} accountant"
        )
        if args.noise is not None:
            eps = epsilon_for_plan(
                args.noise, q, steps, delta=args.delta, accountant=args.accountant
            )
            result = f"noise multiplier {args.noise:g} -> total epsilon {eps:.2f}"
        else:
            noise = noise_for_epsilon(
                args.target_epsilon, q, steps, delta=args.delta, accountant=args.accountant
            )
            result = f"total epsilon {args.target_epsilon:g} -> noise multiplier {noise:.4f}"
    except ValueError as exc:
        print(f"idc-sim budget: {exc}", file=sys.stderr)
        return 2
    print(f"plan: {plan}\n{result}\n\n{PRIVACY_UNIT}")
    return 0
