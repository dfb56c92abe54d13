"""Which Flower strategy closes the gap to the pooled model? Row 3's comparison, per strategy.

Run: ``.venv/bin/python benchmarks/strategy_compare.py --data $IDC_REAL_DATA --out /tmp/sc
--strategies fedavg fedavgm fedadam``

Each strategy gets the comparison ``idc-sim reproduce`` runs in row 3 (the same cohort, seed,
partition, recipe and schedule: QUICK's by default, iid at 5 sites), FedAvg's place taken by
the strategy (with the run config's own keys for it, as ``simulation.recipe.strategy`` sets
them), beside its pooled baseline on the same patients. One line per strategy: the BAC its
coordinator reached on the sites' validation patients at the threshold it chose there (what
a choice between strategies may use), then the test patients' BAC at that threshold and at
0.5, and AUC, each beside the pooled model's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from common.cli_util import run_script
from simulation import recipe
from simulation.federated import run_compare
from simulation.federated_cli import add_threads_argument
from simulation.reproduce_cohort import make_cohort
from simulation.reproduce_schedule import FULL, QUICK, sim_plan
from simulation.scoring import AT_CHOSEN


def _line(name: str, res: dict[str, Any], seconds: float) -> dict[str, Any]:
    fed, pooled = res["fedavg"]["fedavg"]["union"], res["centralized"]["union"]
    at, pooled_at = fed[AT_CHOSEN], pooled[AT_CHOSEN]
    return {
        "strategy": name,
        "validation_bac_at_t": at["validation_balanced_accuracy"],
        "t": at["threshold"],
        "test_bac_at_t": at["balanced_accuracy"],
        "pooled_test_bac_at_t": pooled_at["balanced_accuracy"],
        "gap_points": 100 * (at["balanced_accuracy"] - pooled_at["balanced_accuracy"]),
        "test_bac_at_0.5": fed["balanced_accuracy"],
        "test_auc": fed["auc"],
        "pooled_test_auc": pooled["auc"],
        "seconds": round(seconds),
    }


def main() -> None:
    """Parse the flags, run one comparison per strategy, print one JSON line each."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("IDC_REAL_DATA", "")))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--strategies", nargs="+", default=["fedavg", "fedavgm", "fedadam"])
    p.add_argument("--schedule", choices=("quick", "full"), default="quick")
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--partition", default="iid")
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p)  # 1 by default, as idc-sim reproduce: its numbers come out the same
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sched = QUICK if args.schedule == "quick" else FULL
    cohort = make_cohort(args.data, args.out, sched.patients, args.seed, 3 * args.sites)
    print(json.dumps({"cohort": cohort.facts, "schedule": sched.name}), flush=True)
    for name in args.strategies:
        layer = {} if name == "fedavg" else recipe.strategy(name)
        rec = recipe.Recipe.of(recipe.BASE, layer)
        plan = recipe.with_recipe(
            sim_plan(cohort.data, sched, args.sites, args.partition, args.seed), rec
        )
        t0 = time.monotonic()
        res = run_compare(plan, args.out / f"{args.partition}-{args.sites}-{name}", local=False)
        print(json.dumps(_line(name, res, time.monotonic() - t0)), flush=True)


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks/strategy_compare.py"))
