"""Row 4 of ``idc-sim reproduce``: DP-SGD at every site, per model.

Each model's DP recipe is chosen among the schedule's candidates on validation patients only,
then swept over the schedule's epsilons and the seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from simulation import recipe
from simulation.dp_speed import step_times
from simulation.plan import DPSpec, SimPlan
from simulation.reproduce_cohort import Cohort
from simulation.reproduce_schedule import Late, Say, Schedule, sim_plan
from simulation.scoring import AT_CHOSEN, best_on_validation, validation_score
from simulation.sweep import run_sweep


def dp_models() -> list[str]:
    """The paper's network, and the DP-friendly one when this checkout's RunConfig has it."""
    return [m for m in recipe.DP_MODELS if m == "paper" or recipe.supports("model", m)]


def row_dp(
    cohort: Cohort, sched: Schedule, out: Path, seeds: Sequence[int], say: Say, late: Late
) -> dict[str, Any]:
    """Row 4: DP-SGD at every site, whole-run epsilon per site, per model and seed."""
    sites = sched.site_counts[0]
    spec = DPSpec(epsilon=1.0, max_grad_norm=recipe.DP_CLIP, delta=recipe.DP_DELTA)
    out_rows: dict[str, Any] = {
        "seeds": list(seeds),
        "sites": sites,
        "delta": spec.delta,
        "clip": spec.max_grad_norm,
        "models": {},
        "not_run": [],
    }
    for model in dp_models():
        if late():
            out_rows["not_run"].append(model)
            continue
        layer = {"model": model} if recipe.supports("model") else {}
        base = replace(sim_plan(cohort.data, sched, sites, "iid", seeds[0]), rounds=sched.dp_rounds)
        # Beside the sweep's folder, not in it: run_sweep empties the folder it writes
        choice = _choose_dp(
            base, sched, layer, out / f"{model}-candidates", seeds[0], spec, say, late
        )
        rec = choice["recipe"]
        plan = recipe.with_recipe(base, rec)
        say(f"[dp {model}] epsilon {list(sched.dp_epsilons)} x seeds {list(seeds)} ...")
        res = run_sweep(
            plan,
            sched.dp_epsilons,
            seeds,
            out / model,
            spec,
            say=say,
            late=late,
            done=choice["done"],
        )
        out_rows["not_run"] += [f"{model} {point}" for point in res["not_run"]]
        res["candidates"], res["chosen"] = choice["tried"], choice["chosen"]
        out_rows["not_run"] += [f"{model} {c}" for c in choice["not_run"]]
        speed = step_times(model, plan.batch_size, timed=sched.speed_steps)
        say(f"[dp {model}] step time at batch {plan.batch_size}: {speed['ratio']:.2f}x plain")
        out_rows["models"][model] = {
            "recipe": rec.facts(),
            "folder": str(out / model),
            **res,
            "step_time": speed,
        }
    return out_rows


def _choose_dp(
    base: SimPlan,
    sched: Schedule,
    layer: dict[str, Any],
    out: Path,
    seed: int,
    spec: DPSpec,
    say: Say,
    late: Late,
) -> dict[str, Any]:
    """Row 4's recipe for one model, chosen among ``sched.dp_candidates`` on validation only.

    Each candidate runs the sweep's point of the largest epsilon and ``seed``; the one whose
    coordinator scores best on the sites' validation patients (balanced accuracy at its chosen
    threshold) is kept, and its point is handed to the sweep instead of run again. With one
    candidate nothing runs here.
    """
    recipes = [recipe.Recipe.of(recipe.BASE, cand, layer) for cand in sched.dp_candidates]
    if len(recipes) == 1:
        return {"recipe": recipes[0], "done": {}, "tried": [], "chosen": 0, "not_run": []}
    eps = max(sched.dp_epsilons)
    tried: list[dict[str, Any]] = []
    not_run: list[str] = []
    for k, rec in enumerate(recipes):
        if k and late():  # the first always runs: the row reports the one chosen
            not_run.append(f"candidate-{k}")
            continue
        say(f"[dp {layer.get('model', 'paper')}] candidate {k}: {rec.applied} ...")
        res = run_sweep(
            recipe.with_recipe(base, rec), [eps], [seed], out / f"candidate-{k}", spec, say=say
        )
        [point] = res["points"]
        tried.append(
            {
                "candidate": k,
                "recipe": rec.facts(),
                "folder": str(out / f"candidate-{k}"),
                "epsilon": eps,
                "seed": seed,
                "val_balanced_accuracy": validation_score(point[AT_CHOSEN]),
                "point": point,
            }
        )
    best = best_on_validation([t["val_balanced_accuracy"] for t in tried])
    return {
        "recipe": recipes[tried[best]["candidate"]],
        "done": {(eps, seed): tried[best]["point"]},
        "tried": tried,
        "chosen": tried[best]["candidate"],
        "not_run": not_run,
    }
