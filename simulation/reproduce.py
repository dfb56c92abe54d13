"""idc-sim reproduce: the issue's whole matrix on the same patients, one command, one report.

Rows (each one a call to an existing runner; no second training loop):

1. ``paper``: the paper's protocol (balanced classes, random patch split, Adam, up to the
   schedule's epochs) with :func:`simulation.centralized.run_centralized`.
2. ``central``: patients split once by seed into train/validation/test; each candidate of
   :data:`simulation.recipe.CENTRAL_CANDIDATES` is trained and scored on the test patients
   once; the one reported is chosen on validation patients only.
3. ``fedavg``: :func:`simulation.federated.run_compare` per partition (iid by patient at each
   site count, label skew, size skew), FedAvg with the same total local epochs as its pooled
   baseline on the same patients, local-only for contrast.
4. ``dp``: :func:`simulation.sweep.run_sweep` at each total epsilon and seed, per model, and
   the model's DP-SGD step time against a plain step at the row's batch
   (:func:`simulation.dp_speed.step_times`).

Every row works on one cohort: the source's patients (or a seeded subsample of them, for
``--quick``) linked once into ``OUT/cohort``. A row that fails is recorded with its error and
the others go on; the command then exits non-zero. ``--max-minutes`` skips the rows, and the
runs inside a row (candidates, partitions, DP points), that would start after the deadline,
and names them in the report. The report is written after every row, the rows not reached
yet marked so, and once more at the end: a command stopped from outside (a job's time limit,
a lost machine) leaves the rows it finished.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from common.cli_util import one_line
from simulation import recipe, sim_runtime
from simulation.centralized import BaselineConfig, run_centralized
from simulation.federated import run_compare
from simulation.partitioners import MIN_PATIENTS
from simulation.reproduce_cohort import Cohort, link_balanced, make_cohort
from simulation.reproduce_dp import row_dp
from simulation.reproduce_schedule import FULL, QUICK, Late, Say, Schedule, sim_plan
from simulation.scoring import AT_CHOSEN, best_on_validation, validation_score

log = logging.getLogger(__name__)
ROWS = ("paper", "central", "fedavg", "dp")
# what a requested row holds in a report written before the row ended
NOT_REACHED = {"skipped": "not reached when this report was written (a later write replaces it)"}
__all__ = ["FULL", "QUICK", "ROWS", "Request", "Schedule", "reproduce"]


def row_paper(cohort: Cohort, sched: Schedule, out: Path, seed: int) -> dict[str, Any]:
    """Row 1: balanced classes, random 70/30 patch split, Adam 1e-4, inputs /255.

    Every epoch of the schedule runs, as in the paper, and the one of lowest validation loss
    is kept. Early stopping with the baselines' patience of 5 ended the first full-data run at
    epoch 20 of 40 with training accuracy no higher than validation's (0.87 and 0.86): the
    validation loss of 1,283 patches wandered by +-0.02 while the model still underfitted.
    """
    data, balanced = link_balanced(cohort, out / "balanced-data", seed)
    config = BaselineConfig(
        split="random",
        epochs=sched.paper_epochs,
        batch_size=sched.batch_size,
        seed=seed,
        patience=sched.paper_epochs,  # never stops early; the best epoch is still restored
    )
    summary = run_centralized(data, out / "run", config, out / "cache")
    return {"balanced": balanced, "seed": seed, "folder": str(out / "run"), **summary}


def row_central(
    cohort: Cohort, sched: Schedule, out: Path, seed: int, late: Late
) -> dict[str, Any]:
    """Row 2: patient split fixed by seed; candidates chosen on validation patients only."""
    tried, not_run = [], []
    for k, cand in enumerate(recipe.CENTRAL_CANDIDATES[: sched.candidates]):
        if k and late():  # the first always runs: the row reports the one chosen
            not_run.append(f"candidate-{k}")
            continue
        rec = recipe.Recipe.of(recipe.BASE, cand)
        config = replace(
            BaselineConfig(split="patient", epochs=sched.epochs, batch_size=sched.batch_size),
            seed=seed,
            **rec.baseline(),
        )
        summary = run_centralized(cohort.data, out / f"candidate-{k}", config, cohort.cache)
        tried.append(
            {
                "candidate": k,
                "recipe": rec.facts(),
                "folder": str(out / f"candidate-{k}"),
                "val_balanced_accuracy": validation_score(summary["test"][AT_CHOSEN]),
                **summary,
            }
        )
    best = best_on_validation([t["val_balanced_accuracy"] for t in tried])
    return {
        "seed": seed,
        "chosen": best,
        "candidates": tried,
        "not_run": not_run,
        "test": tried[best]["test"],
    }


FedRow = tuple[str, int, str, dict[str, Any]]


def fed_configs(sched: Schedule) -> list[FedRow]:
    """(name, sites, partition, strategy overrides) of every federated row of ``sched``."""
    rows: list[FedRow] = []

    def add(sites: int, part: str, strategies: tuple[str, ...]) -> None:
        rows.append((f"{part}-{sites}", sites, part, {}))
        for name in strategies:
            if recipe.supports("strategy", name):
                rows.append((f"{part}-{sites}-{name}", sites, part, recipe.strategy(name)))

    for n in sched.site_counts:
        add(n, "iid", sched.iid_strategies)
    for p in sched.skews:
        add(sched.site_counts[0], p, sched.alt_strategies)
    return rows


def row_fedavg(
    cohort: Cohort, sched: Schedule, out: Path, seed: int, say: Say, late: Late
) -> dict[str, Any]:
    """Row 3: FedAvg per partition beside its pooled baseline on the same patients."""
    base = recipe.Recipe.of(recipe.BASE)
    results: dict[str, Any] = {"recipe": base.facts(), "seed": seed, "runs": {}, "not_run": []}
    for name, sites, part, layer in fed_configs(sched):
        if late():
            results["not_run"].append(name)
            continue
        say(f"[fedavg {name}] {sites} sites, {part}, {sched.rounds} rounds ...")
        rec = recipe.Recipe.of(recipe.BASE, layer)
        plan = recipe.with_recipe(sim_plan(cohort.data, sched, sites, part, seed), rec)
        local = part in sched.local_only and not layer  # one local-only contrast per split
        res = run_compare(plan, out / name, local=local, say=say)
        results["runs"][name] = {"folder": str(out / name), "recipe": rec.facts(), **res}
    return results


@dataclass(frozen=True)
class Request:
    """One reproduce command: where, what and how long."""

    data: Path
    out: Path
    schedule: Schedule
    seeds: tuple[int, ...] = (0, 1, 2)
    rows: tuple[str, ...] = ROWS
    max_minutes: float = math.inf

    def __post_init__(self) -> None:
        bad = [r for r in self.rows if r not in ROWS]
        if bad or not self.rows:
            raise ValueError(f"--rows: {bad or 'none'} not among {', '.join(ROWS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct integers, got {self.seeds}")
        if not self.max_minutes > 0:
            raise ValueError(f"--max-minutes must be > 0, got {self.max_minutes}")
        asked, need = self.schedule.patients, self.schedule.patients_needed(self.rows)
        if asked is not None and asked < need:  # else rows 3 and 4 fail after the cohort
            split = ",".join(r for r in self.rows if r in ("fedavg", "dp"))
            raise ValueError(
                f"--patients {asked}: rows {split} need at least {need} patients ({MIN_PATIENTS} "
                f"per site at {self.schedule.sites_needed(self.rows)} sites); give --patients "
                f"{need} or more, or --rows paper,central"
            )


def _one_row(name: str, cohort: Cohort, req: Request, say: Say, late: Late) -> dict[str, Any]:
    folder, seed = req.out / name, req.seeds[0]
    if name == "paper":
        return row_paper(cohort, req.schedule, folder, seed)
    if name == "central":
        return row_central(cohort, req.schedule, folder, seed, late)
    if name == "fedavg":
        return row_fedavg(cohort, req.schedule, folder, seed, say, late)
    return row_dp(cohort, req.schedule, folder, req.seeds, say, late)


Clock = Callable[[], float]  # seconds, for --max-minutes (time.monotonic)


def run_rows(
    req: Request,
    cohort: Cohort,
    say: Say,
    started: float,
    clock: Clock = time.monotonic,
    after_row: Callable[[dict[str, Any]], None] = lambda _: None,
) -> dict[str, Any]:
    """Every requested row in order; a failed row is recorded, a late one skipped.

    ``after_row`` is called with the rows so far after each one that ran.
    """
    rows: dict[str, Any] = {}

    def late() -> bool:
        return (clock() - started) / 60 >= req.max_minutes

    for i, name in enumerate(req.rows, 1):
        minutes = (clock() - started) / 60
        if minutes >= req.max_minutes:
            rows[name] = {"skipped": f"--max-minutes {req.max_minutes:g} reached"}
            say(f"[{i}/{len(req.rows)}] {name}: skipped, {minutes:.1f} min used")
            continue
        say(f"[{i}/{len(req.rows)}] {name}: starting at {minutes:.1f} min ...")
        t0 = clock()
        try:
            rows[name] = _one_row(name, cohort, req, say, late)
        except (ValueError, OSError) as exc:  # bad input met inside a row: one line (-v: more)
            log.error("row %s failed: %s", name, one_line(exc))
            log.debug("row %s", name, exc_info=True)
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # one row's failure is reported; the others still run
            log.exception("row %s failed", name)
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
        rows[name]["seconds"] = clock() - t0
        say(f"[{i}/{len(req.rows)}] {name}: done in {rows[name]['seconds'] / 60:.1f} min")
        after_row(rows)
    return rows


def reproduce(req: Request, say: Say = log.info, clock: Clock = time.monotonic) -> dict[str, Any]:
    """Run the matrix of ``req``; write results.json, report.md and figures into ``req.out``.

    ``--max-minutes`` is kept before each row and, inside a row, before each run.
    """
    from simulation import reproduce_report

    started, wall = clock(), time.time()
    out = sim_runtime.fresh_output(req.out)
    say(f"cohort: linking and decoding the patients of {req.data} ...")
    need = req.schedule.patients_needed(req.rows)
    cohort = make_cohort(req.data, out, req.schedule.patients, req.seeds[0], need)
    say(f"cohort: {cohort.facts['patients']} patients, {cohort.facts['patches']} patches")

    def results(rows: dict[str, Any], finished: bool) -> dict[str, Any]:
        done = {name: rows.get(name, NOT_REACHED) for name in req.rows}
        return {
            "label": req.schedule.name.upper(),
            "schedule": asdict(req.schedule),
            "seeds": list(req.seeds),
            "rows_requested": list(req.rows),
            "max_minutes": req.max_minutes,
            "data": cohort.facts,
            "machine": reproduce_report.machine(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall)),
            "wall_seconds": clock() - started,
            "finished": finished,
            "rows": done,
        }

    def partial(rows: dict[str, Any]) -> None:
        reproduce_report.write(out, results(rows, finished=False))

    final = results(run_rows(replace(req, out=out), cohort, say, started, clock, partial), True)
    reproduce_report.write(out, final)
    return final
