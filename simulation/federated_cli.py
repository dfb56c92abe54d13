"""idc-sim federated and privacy-sweep: their flags, and the plan both build from them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli_util import add_command
from common.errors import EXIT_OK

if TYPE_CHECKING:
    from simulation.plan import SimPlan


def _say(message: str) -> None:
    print(message, flush=True)


def _plan(args: argparse.Namespace, seed: int | None = None) -> SimPlan:
    from simulation.plan import SimPlan
    from simulation.sim_runtime import Resources, auto_gpus_per_site

    gpus = args.gpus_per_site
    if gpus is None:
        gpus = auto_gpus_per_site(args.sites, args.ray_address)
    plan = SimPlan(
        data=args.data,
        sites=args.sites,
        partition=args.partition,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        norm=getattr(args, "norm", "group"),
        seed=args.seed if seed is None else seed,
        partition_seed=args.partition_seed,
        alpha=args.alpha,
        exponent=args.exponent,
        timeout=args.timeout,
        resources=Resources(
            cpus_per_site=args.cpus_per_site, gpus_per_site=gpus, ray_address=args.ray_address
        ),
        strategy=args.strategy,
        proximal_mu=args.proximal_mu,
        server_learning_rate=args.server_learning_rate,
        server_momentum=args.server_momentum,
    )
    if not args.recipe:
        return plan
    from simulation.recipe import Recipe, parse_recipe, with_recipe

    return with_recipe(plan, Recipe.of(parse_recipe(args.recipe)))


def _federated(args: argparse.Namespace) -> int:
    from simulation.federated import run_compare
    from simulation.plan import DPSpec
    from simulation.report import compare_table

    dp = None
    if args.dp is not None or args.dp_noise is not None:
        dp = DPSpec(
            epsilon=args.dp,
            noise_multiplier=args.dp_noise,
            max_grad_norm=args.dp_clip,
            delta=args.dp_delta,
        )
    results = run_compare(_plan(args), args.out, {"fedavg": dp}, say=_say)
    print(
        f"\nheld-out: every site's own test patients ({results['union_test']['patients']} "
        f"patients, {results['union_test']['patches']} patches)"
    )
    print(compare_table(results))
    print(f"report: {args.out / 'report.md'}")
    return EXIT_OK


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads``: torch threads of this process (the baselines; ClientApps get Ray's)."""
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the centralized and local-only training in this "
        "process (default 1: on a small or shared machine more threads spin "
        "and slow down; each simulated site gets one Ray CPU anyway)",
    )


def _add_strategy_arguments(p: argparse.ArgumentParser) -> None:
    from common.config import STRATEGIES, RunConfig

    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=RunConfig.strategy,
        help="Flower's aggregation strategy (the run config's `strategy` key)",
    )
    p.add_argument("--proximal-mu", type=float, default=RunConfig.proximal_mu, help="fedprox: mu")
    p.add_argument(
        "--server-learning-rate",
        type=float,
        default=RunConfig.server_learning_rate,
        help="fedadam, fedavgm (0: Flower's default, 0.1 and 1.0)",
    )
    p.add_argument(
        "--server-momentum",
        type=float,
        default=RunConfig.server_momentum,
        help="fedavgm's server momentum",
    )


def _add_site_arguments(p: argparse.ArgumentParser) -> None:
    from simulation.partitioners import PARTITIONS

    add_threads_argument(p)

    p.add_argument("--data", type=Path, required=True, help="patches in the Kaggle layout")
    p.add_argument("--sites", type=int, required=True, help="number of virtual sites")
    p.add_argument(
        "--partition",
        choices=PARTITIONS,
        default="iid",
        help="how patients are dealt to sites (site-shift: synth data only)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="label-skew Dirichlet alpha")
    p.add_argument("--exponent", type=float, default=1.0, help="size-skew power-law exponent")
    p.add_argument("--partition-seed", type=int, default=0)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--cpus-per-site",
        type=int,
        default=1,
        help="Ray CPUs per ClientApp: how many virtual sites train at once",
    )
    p.add_argument(
        "--gpus-per-site",
        type=float,
        default=None,
        metavar="F",
        help="fraction of a GPU per virtual site (Ray's num_gpus); default: 0 without a GPU, "
        "else min(1, GPUs / sites)",
    )
    p.add_argument(
        "--ray-address",
        default="",
        metavar="HOST:PORT",
        help="run on this existing Ray cluster (`ray start --head` prints it) instead of a "
        "private Ray on this machine; every node needs this project installed",
    )
    _add_strategy_arguments(p)
    p.add_argument(
        "--recipe",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="training-recipe keys of the run config, for the FedAvg runs and the pooled and "
        "local-only baselines alike: model=gap (the DP-friendly network), augment, "
        "weight-decay, lr-schedule, ema, optimizer, dp.augmult (see `idc-server run --help`)",
    )
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds per FedAvg run")
    p.add_argument("--out", type=Path, required=True, help="results folder (replaced if ours)")


def add_federated(sub: argparse._SubParsersAction) -> None:
    """``idc-sim federated``: FedAvg against pooled and local-only training on the same sites."""
    p = add_command(
        sub, "federated", _federated, "centralized vs FedAvg vs local-only on the same patients"
    )
    _add_site_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="model init, site splits, shuffling")
    p.add_argument(
        "--norm",
        choices=("batch", "group"),
        default="group",
        help="group (default): what DP-SGD needs, and no batch statistics to average",
    )
    p.add_argument(
        "--dp",
        type=float,
        default=None,
        metavar="EPSILON",
        help="DP-SGD at every site with this total epsilon per site over the run",
    )
    p.add_argument("--dp-noise", type=float, default=None, help="or a fixed noise multiplier")
    p.add_argument("--dp-clip", type=float, default=1.0, help="per-sample clipping norm")
    p.add_argument("--dp-delta", type=float, default=1e-5)


def _sweep(args: argparse.Namespace) -> int:
    from simulation.plan import DPSpec
    from simulation.report import sweep_table
    from simulation.sweep import parse_epsilons, parse_seeds, run_sweep

    epsilons, seeds = parse_epsilons(args.epsilons), parse_seeds(args.seeds)
    spec = DPSpec(epsilon=1.0, max_grad_norm=args.dp_clip, delta=args.dp_delta)
    plan = _plan(args, seed=seeds[0])
    results = run_sweep(plan, epsilons, seeds, args.out, spec, say=_say)
    print()
    print(sweep_table(results))
    print(f"report: {args.out / 'sweep.md'} (plot sweep.png, numbers sweep.json)")
    return EXIT_OK


def add_sweep(sub: argparse._SubParsersAction) -> None:
    """``idc-sim privacy-sweep``: FedAvg at several total epsilons and seeds."""
    p = add_command(sub, "privacy-sweep", _sweep, "FedAvg accuracy against the total DP budget")
    _add_site_arguments(p)
    p.add_argument(
        "--epsilons",
        required=True,
        help="total epsilon per site over the run, e.g. 1,3,8,inf (inf: no DP)",
    )
    p.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1 (mean and spread)")
    p.add_argument("--dp-clip", type=float, default=1.0, help="per-sample clipping norm")
    p.add_argument("--dp-delta", type=float, default=1e-5)
