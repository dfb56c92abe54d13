"""idc-sim federated: centralized, FedAvg (Flower's simulation engine) and local-only training.

All three train on the same patients and are scored on the same held-out patients: the union
of every site's own test patients, split exactly as the ClientApp splits them. Centralized
and local-only use the baseline's ``fit`` (the one training loop); FedAvg is the project's
real ServerApp and ClientApp run by :class:`~simulation.sim_runtime.SimEngine`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.config import Norm
from common.data import PatchSet, scan
from common.metrics import BALANCED_ACCURACY
from common.partition import Split
from common.provenance import load_model
from common.rundir import RunDir
from common.site_data import Site
from common.threshold import Choice
from simulation import sim_runtime
from simulation.centralized import fit
from simulation.partitioners import PatientTable, partition, site_positive_shares
from simulation.plan import DPSpec, SimPlan, noise_for_plan, plan_facts
from simulation.scoring import (
    AT_CHOSEN,
    as_model,
    federated_choice,
    mean_spread,
    metrics,
    on_validation,
    score,
)

log = logging.getLogger(__name__)
Say = Callable[[str], None]
STRATEGY_NAMES = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "fedavgm": "FedAvgM",
}


@dataclass
class Prepared:
    """The virtual sites of a plan on disk, decoded, with their patches pooled."""

    sites_dir: Path
    table: PatientTable
    parts: list[np.ndarray]
    pooled: PatchSet
    offsets: np.ndarray  # where each site's patches start in ``pooled``

    def open(self, seed: int) -> list[Site]:
        """Each site as the ClientApp opens it: same patches, same train/val/test split."""
        return open_sites(self.sites_dir, len(self.parts), seed)

    def pooled_split(self, sites: Sequence[Site]) -> Split:
        """The sites' own train/val/test parts, as indices into ``pooled``."""
        pairs = list(zip(sites, self.offsets, strict=True))
        return Split(
            *(
                np.concatenate([getattr(s.split, part) + o for s, o in pairs])
                for part in ("train", "val", "test")
            )
        )


def open_sites(sites_dir: Path, count: int, seed: int) -> list[Site]:
    """Open virtual sites ``0..count-1`` with the ClientApp's own ``Site.open``."""
    return [Site.open(sim_runtime.site_config(sites_dir, k), seed) for k in range(count)]


def _pool(sets: Sequence[PatchSet]) -> tuple[PatchSet, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sets])[:-1]]).astype(np.int64)
    pooled = PatchSet(
        images=np.concatenate([np.asarray(s.images) for s in sets]),
        labels=np.concatenate([s.labels for s in sets]),
        patients=np.concatenate([s.patients for s in sets]),
        xs=np.concatenate([s.xs for s in sets]),
        ys=np.concatenate([s.ys for s in sets]),
        files=[f for s in sets for f in s.files],
        report=sets[0].report,
        fingerprint="pooled:" + ",".join(s.fingerprint[:12] for s in sets),
    )
    return pooled, offsets


def prepare(plan: SimPlan, out: Path, say: Say = log.info) -> Prepared:
    """Partition the patients, link them into site folders and decode each site once."""
    records, report = scan(plan.data)
    if not records:
        raise ValueError(f"no patch files in {report.root}")
    table = PatientTable.from_patches([r.patient for r in records], [r.label for r in records])
    site_of = None
    if plan.partition == "site-shift":
        manifest = Path(plan.data) / "synth.json"
        if not manifest.is_file():
            raise ValueError(f"partition 'site-shift' needs a synth output; {manifest} is missing")
        site_of = json.loads(manifest.read_text())["site_of"]
    parts = partition(
        plan.partition,
        table,
        plan.sites,
        plan.partition_seed,
        alpha=plan.alpha,
        exponent=plan.exponent,
        site_of=site_of,
    )
    sites_dir = sim_runtime.build_sites(plan.data, records, parts, out / "sites")
    (out / "partition.json").write_text(
        json.dumps(
            {
                "partition": plan.partition,
                "seed": plan.partition_seed,
                "alpha": plan.alpha,
                "exponent": plan.exponent,
                "sites": {f"site-{k:03d}": p.tolist() for k, p in enumerate(parts)},
            },
            indent=1,
        )
    )
    say(
        f"{len(table.ids)} patients, {len(records)} patches -> {plan.sites} sites "
        f"({plan.partition}); decoding each site once ..."
    )
    sim_runtime.decode_sites(sites_dir, plan.sites)
    pooled, offsets = _pool([s.patches for s in open_sites(sites_dir, plan.sites, plan.seed)])
    return Prepared(sites_dir, table, parts, pooled, offsets)


def final_choice(
    run: Path, norm: Norm, prep: Prepared, sites: Sequence[Site]
) -> tuple[Any, Choice]:
    """The final model of the run folder ``run`` and the threshold it is scored at."""
    run_dir = RunDir(run)
    final, record = load_model(run_dir.final_model)
    model = as_model(final, norm)
    val = prep.pooled_split(sites).val
    return model, federated_choice(record, run_dir.read_rounds(), model, prep.pooled, val)


def run_fedavg(
    plan: SimPlan, prep: Prepared, root: Path, dp: tuple[DPSpec, float] | None, say: Say = log.info
) -> list[dict[str, Any]]:
    """FedAvg on the prepared sites through Flower's simulation engine; returns rounds.jsonl."""
    sites_dir, coord = sim_runtime.make_run_sites(prep.sites_dir, plan.sites, root)
    run = plan.run_config(root / "run", coord, sites_dir, dp)

    def progress(row: dict[str, Any]) -> None:
        ev, eps = row.get("evaluate", {}), sim_runtime.epsilon_by_site([row])
        dp_text = f", epsilon so far <= {max(eps.values()):.2f}" if dp and eps else ""
        say(
            f"  round {row['round']}/{plan.rounds}: {len(row.get('sites', {}))} sites trained, "
            f"mean site-test balanced accuracy {ev.get('balanced-accuracy', float('nan')):.3f}"
            f"{dp_text} ({row.get('seconds', 0):.0f} s)"
        )

    with sim_runtime.SimEngine(root / "engine", plan.resources) as engine:
        return engine.run(run, plan.sites, plan.timeout, progress)


def fedavg_scores(
    plan: SimPlan, prep: Prepared, sites: Sequence[Site], root: Path, norm: Norm
) -> dict[str, Any]:
    """The FedAvg global model after every round, on the union test and each site's test."""
    run_dir, test = RunDir(root / "run"), prep.pooled_split(sites).test
    curve = []
    for r in range(plan.rounds + 1):
        m = score(run_dir.read_checkpoint(r), norm, prep.pooled, test)
        curve.append({"epoch": r * plan.local_epochs, **m})
    model, choice = final_choice(root / "run", norm, prep, sites)
    per_site = {
        s.config.site_name: metrics(model, prep.pooled, s.split.test + o, choice)
        for s, o in zip(sites, prep.offsets, strict=True)
    }
    union = metrics(model, prep.pooled, test, choice)
    return {"union": union, "curve": curve, "sites": per_site}


def centralized(plan: SimPlan, prep: Prepared, sites: Sequence[Site]) -> dict[str, Any]:
    """Pooled training on every site's train patients; the curve tracks the union test.

    The union test is only watched (no early stopping, nothing selected on it).
    """
    split = prep.pooled_split(sites)
    model, history = fit(prep.pooled, split.train, split.test, plan.baseline())
    choice = on_validation(model, prep.pooled, split.val, "pooled validation of the sites")
    per_site = {
        s.config.site_name: metrics(model, prep.pooled, s.split.test + o, choice)
        for s, o in zip(sites, prep.offsets, strict=True)
    }
    union = metrics(model, prep.pooled, split.test, choice)
    return {"union": union, "curve": history, "sites": per_site}


def local_only(plan: SimPlan, prep: Prepared, sites: Sequence[Site], say: Say) -> dict[str, Any]:
    """Each site trains alone on its own train patients; scored on its own and the union test."""
    test = prep.pooled_split(sites).test
    out: dict[str, Any] = {"sites": {}, "union_by_site": {}, "curves": {}}
    for site in sites:
        name = site.config.site_name
        model, history = fit(site.patches, site.split.train, site.split.test, plan.baseline())
        choice = on_validation(model, site.patches, site.split.val, f"{name}'s own validation")
        out["sites"][name] = metrics(model, site.patches, site.split.test, choice)
        out["union_by_site"][name] = metrics(model, prep.pooled, test, choice)
        out["curves"][name] = history
        say(
            f"  local-only {name}: balanced accuracy on its own test "
            f"{out['sites'][name][BALANCED_ACCURACY]:.3f}"
        )
    unions = list(out["union_by_site"].values())
    out["union"] = mean_spread(unions)
    out["union"][AT_CHOSEN] = mean_spread([u[AT_CHOSEN] for u in unions])
    return out


def site_facts(prep: Prepared, sites: Sequence[Site]) -> dict[str, dict[str, Any]]:
    """Patients, patches and IDC share of each site, and the size of its own parts."""
    shares = site_positive_shares(prep.parts, prep.table)
    return {
        s.config.site_name: {
            "patients": int(len(part)),
            "patches": int(len(s.patches)),
            "idc_share": float(share),
            "train": int(len(s.split.train)),
            "val": int(len(s.split.val)),
            "test": int(len(s.split.test)),
        }
        for s, part, share in zip(sites, prep.parts, shares, strict=True)
    }


def fedavg_result(
    plan: SimPlan, prep: Prepared, sites: Sequence[Site], root: Path, spec: DPSpec | None, say: Say
) -> dict[str, Any]:
    """Run FedAvg (with DP-SGD when ``spec`` is given) and score it; folder ``root``."""
    noise = noise_for_plan(plan, sites, spec) if spec else 0.0
    name = STRATEGY_NAMES[plan.strategy] + (" + DP-SGD" if spec else "")
    say(
        f"{name}: {plan.sites} sites x {plan.rounds} rounds x "
        f"{plan.local_epochs} local epoch(s) in Flower's simulation engine"
        + (f", noise multiplier {noise:.3f}" if spec else "")
        + " ..."
    )
    rows = run_fedavg(plan, prep, root, None if spec is None else (spec, noise), say)
    res = fedavg_scores(plan, prep, sites, root, plan.norm)
    res.update(
        epsilon=sim_runtime.epsilon_by_site(rows),
        run=str(root / "run"),
        reported=rows[-1].get("evaluations", {}) if rows else {},
        dp=None if spec is None else {**asdict(spec), "noise_multiplier": noise},
    )
    return res


def run_compare(
    plan: SimPlan,
    out: Path,
    fedavg_runs: Mapping[str, DPSpec | None] | None = None,
    local: bool = True,
    say: Say = log.info,
) -> dict[str, Any]:
    """Prepare the sites, train every contender, write results.json, the plots and report.md.

    ``fedavg_runs`` maps a folder name under ``out`` to the DP-SGD spec of one FedAvg run
    (None: no DP); by default one plain FedAvg run in ``out/fedavg``.
    """
    runs = dict(fedavg_runs or {"fedavg": None})
    if any(runs.values()):  # DP-SGD needs group norm; every model uses it then, like for like
        plan = replace(plan, norm="group")
    for spec in runs.values():  # every run's settings (fedprox with DP...) before any work
        plan.run_config(out, out, out, None if spec is None else (spec, 1.0))
    from simulation import report

    out = sim_runtime.fresh_output(out)
    prep = prepare(plan, out, say)
    sites = prep.open(plan.seed)
    fed = {
        name: fedavg_result(plan, prep, sites, out / name, spec, say) for name, spec in runs.items()
    }
    say(f"centralized: {plan.rounds * plan.local_epochs} epoch(s) on the pooled patients ...")
    cen = centralized(plan, prep, sites)
    loc = None
    if local:
        say(f"local-only: each of {plan.sites} sites alone ...")
        loc = local_only(plan, prep, sites, say)
    test = prep.pooled_split(sites).test
    results = {
        "plan": plan_facts(plan),
        "sites": site_facts(prep, sites),
        "union_test": {
            "patches": int(len(test)),
            "patients": len(set(prep.pooled.patients[test].tolist())),
        },
        "centralized": cen,
        "fedavg": fed,
        "local_only": loc,
    }
    report.write_compare(out, results)
    return results
