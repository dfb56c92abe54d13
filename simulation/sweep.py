"""idc-sim privacy-sweep: what each total privacy budget costs FedAvg in accuracy.

For every seed and every epsilon, one FedAvg run with sample-level DP-SGD at every site
(``inf``: no DP), the noise multiplier computed offline so that each site's total epsilon
over the whole run stays within the budget. The partition is fixed; a seed changes the model
initialisation, each site's train/val/test split and the shuffling. Every run is scored on
the union of the sites' test patients of its seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common.metrics import ACCURACY, AUC, BALANCED_ACCURACY, F1
from simulation import sim_runtime
from simulation.federated import Prepared, Say, final_choice, prepare, run_fedavg
from simulation.plan import DPSpec, SimPlan, noise_for_plan, plan_facts
from simulation.scoring import AT_CHOSEN, metrics

log = logging.getLogger(__name__)
SWEPT = (BALANCED_ACCURACY, AUC, F1, ACCURACY)


def parse_epsilons(text: str) -> list[float]:
    """``"1,3,8,inf"`` -> [1.0, 3.0, 8.0, inf]; every value must be > 0."""
    out = []
    for item in text.split(","):
        try:
            value = float(item.strip())
        except ValueError as exc:
            raise ValueError(f"--epsilons: {item.strip()!r} is not a number or 'inf'") from exc
        if not value > 0:
            raise ValueError(f"--epsilons: every epsilon must be > 0, got {item.strip()!r}")
        out.append(value)
    if not out:
        raise ValueError("--epsilons needs at least one value")
    return out


def parse_seeds(text: str) -> list[int]:
    """``"0,1"`` -> [0, 1]."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError as exc:
        raise ValueError(f"--seeds must be integers separated by commas, got {text!r}") from exc
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be distinct integers >= 0, got {text!r}")
    return seeds


def tag(epsilon: float, seed: int) -> str:
    """The run folder of one sweep point."""
    return f"eps-{'inf' if math.isinf(epsilon) else f'{epsilon:g}'}-seed-{seed}"


def one_point(
    plan: SimPlan, prep: Prepared, epsilon: float, spec: DPSpec, out: Path, say: Say
) -> dict[str, Any]:
    """Run and score one (epsilon, seed) point."""
    sites = prep.open(plan.seed)
    dp = None
    if math.isfinite(epsilon):
        spec = replace(spec, epsilon=epsilon)
        dp = (spec, noise_for_plan(plan, sites, spec))
    say(
        f"epsilon {epsilon:g}, seed {plan.seed}: "
        + (f"noise multiplier {dp[1]:.4f}" if dp else "no DP")
        + " ..."
    )
    root = out / "runs" / tag(epsilon, plan.seed)
    rows = run_fedavg(plan, prep, root, dp, say)
    model, choice = final_choice(root / "run", plan.norm, prep, sites)
    test = metrics(model, prep.pooled, prep.pooled_split(sites).test, choice)
    spent = sim_runtime.epsilon_by_site(rows)
    return {
        "epsilon": epsilon,
        "no_dp": dp is None,
        "seed": plan.seed,
        "noise_multiplier": dp[1] if dp else 0.0,
        "epsilon_spent_max": max(spent.values()) if dp and spent else 0.0,
        "epsilon_spent": spent,
        "run": str(root / "run"),
        **{k: test[k] for k in SWEPT},
        AT_CHOSEN: test[AT_CHOSEN],
    }


def _mean_std(row: dict[str, Any], points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    for key in SWEPT:
        vals = np.array([p[key] for p in points if p[key] is not None], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        row[key] = float(vals.mean()) if len(vals) else float("nan")
        row[f"{key}_std"] = float(vals.std()) if len(vals) > 1 else float("nan")
    return row


def summarise(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds, one row per epsilon (in the order given).

    At 0.5 (top level) and at each point's validation-chosen threshold (:data:`AT_CHOSEN`,
    with the thresholds themselves).
    """
    rows = []
    for eps in dict.fromkeys(p["epsilon"] for p in points):
        mine = [p for p in points if p["epsilon"] == eps]
        row: dict[str, Any] = {
            "epsilon": eps,
            "no_dp": math.isinf(eps),
            "seeds": [p["seed"] for p in mine],
            "noise_multiplier": float(np.mean([p["noise_multiplier"] for p in mine])),
            "epsilon_spent_max": max(p["epsilon_spent_max"] for p in mine),
        }
        chosen = [p[AT_CHOSEN] for p in mine if AT_CHOSEN in p]
        if chosen:
            row[AT_CHOSEN] = _mean_std({"thresholds": [c["threshold"] for c in chosen]}, chosen)
        rows.append(_mean_std(row, mine))
    return rows


def run_sweep(
    plan: SimPlan,
    epsilons: Sequence[float],
    seeds: Sequence[int],
    out: Path,
    spec: DPSpec | None = None,
    say: Say = log.info,
    late: Callable[[], bool] = lambda: False,
    done: Mapping[tuple[float, int], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every (seed, epsilon) point; writes sweep.json, sweep.md and sweep.png into ``out``.

    ``late`` is asked before each point; once it says yes, the points left are not run and
    are named in ``not_run`` (their folder tags), the summary covering the points run.
    ``done`` holds points already run with this plan elsewhere, by (epsilon, seed): they are
    taken as they are (their ``run`` names their folder), not run again.
    """
    done = done or {}
    # Group norm everywhere, no-DP point included, so that only the noise differs.
    plan = replace(plan, norm="group")
    spec = spec or DPSpec(epsilon=1.0)
    from simulation import report

    if any(math.isfinite(e) for e in epsilons):  # a DP point's settings, before any work
        plan.run_config(out, out, out, (spec, 1.0))
    out = sim_runtime.fresh_output(out)
    prep = prepare(plan, out, say)
    points, not_run = [], []
    for seed in seeds:
        for eps in epsilons:
            if (eps, seed) in done:
                points.append(done[(eps, seed)])
                continue
            if late():  # each point is a whole FedAvg run: a deadline is kept between them
                not_run.append(tag(eps, seed))
                say(f"epsilon {eps:g}, seed {seed}: not run, the time allowed is spent")
                continue
            points.append(one_point(replace(plan, seed=seed), prep, eps, spec, out, say))
            p, at = points[-1], points[-1][AT_CHOSEN]
            say(
                f"  -> balanced accuracy {p[BALANCED_ACCURACY]:.4f} at 0.5, "
                f"{at[BALANCED_ACCURACY]:.4f} at the validation-chosen threshold "
                f"{at['threshold']:.4g}; AUC {p[AUC]:.4f}"
            )
    results = {
        "plan": plan_facts(plan),
        "seeds": list(seeds),
        "epsilons": list(epsilons),
        "dp": {
            "max_grad_norm": spec.max_grad_norm,
            "delta": spec.delta,
            "accountant": spec.accountant,
        },
        "points": points,
        "not_run": not_run,
        "summary": summarise(points),
    }
    report.write_sweep(out, results)
    return results
