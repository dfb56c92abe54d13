"""Strategies other than FedAvg in Flower's simulation engine: real ServerApp and ClientApps.

The maths of each strategy is checked against oracles in ``tests/unit/test_aggregators.py``;
here, what only a real run shows. FedAdam: two rounds complete with every reply accepted
(its float64 step must not change the model's dtypes, or vetting would reject round 2), and
its first step is bounded by Adam's step size, far below what local training moves (FedAvg's
answer). FedProx: Flower's strategy sends mu, and every site trains with it and records it.
FedAvgM adds nothing a real run shows beyond the unit tests; FedAvg is ``test_simulation``'s.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from common.rundir import RunDir
from simulation import sim_runtime
from simulation.federated import prepare
from simulation.plan import SimPlan
from simulation.synth import SynthSpec, synthesize

pytestmark = pytest.mark.slow
SITES = 2
ETA = 1e-5  # FedAdam's server learning rate: its steps stay <= ~0.74 ETA; local Adam's ~1e-3


def _asked(tmp_path, run: str, site: int) -> list[dict]:
    audit = tmp_path / run / "sites" / f"site-{site:03d}" / "state" / "audit" / "site-audit.jsonl"
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    return [
        e["details"]
        for e in entries
        if e["action"] == "message.received" and e["details"]["action"] == "train"
    ]


def test_fedadam_and_fedprox_run_in_the_simulation_engine(tmp_path):
    data = tmp_path / "data"
    synthesize(data, SynthSpec(patients=6, patches_per_patient=(12, 16), seed=5))
    plan = SimPlan(data=data, sites=SITES, rounds=2, lr=1e-3, batch_size=16, seed=0, timeout=600)
    prep = prepare(plan, tmp_path / "prep")
    runs = {
        "fedadam": replace(plan, strategy="fedadam", server_learning_rate=ETA),
        "fedprox": replace(plan, strategy="fedprox", proximal_mu=0.5, rounds=1),
    }
    ckpt: dict[str, list[dict[str, np.ndarray]]] = {}
    with sim_runtime.SimEngine(tmp_path / "engine", plan.resources) as engine:
        for name, p in runs.items():
            sites, coord = sim_runtime.make_run_sites(prep.sites_dir, SITES, tmp_path / name)
            rows = engine.run(p.run_config(tmp_path / name / "run", coord, sites), SITES, 600)
            assert [r["round"] for r in rows] == list(range(1, p.rounds + 1)), name
            for row in rows:
                assert len(row["sites"]) == SITES and not row["rejected"], (name, row)
            run_dir = RunDir(tmp_path / name / "run")
            ckpt[name] = [run_dir.read_checkpoint(r) for r in range(p.rounds + 1)]

    start, adam = ckpt["fedadam"][0], ckpt["fedadam"]
    for arrays in adam[1:]:
        assert {k: v.dtype for k, v in arrays.items()} == {k: v.dtype for k, v in start.items()}
    # Adam's first step: eta * sqrt(1 - 0.99^2) / (1 - 0.9^2) * d / (|d| + 10 tau) < that bound
    bound = ETA * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    step = max(float(np.abs(adam[1][k].astype(np.float64) - start[k]).max()) for k in start)
    assert 0 < step <= bound * 1.001, (step, bound)
    local = max(float(np.abs(ckpt["fedprox"][1][k] - start[k]).max()) for k in start)
    assert local > 20 * bound  # what averaging the sites' updates moves: not FedAdam's answer

    for site in range(SITES):
        assert [a.get("proximal_mu") for a in _asked(tmp_path, "fedprox", site)] == [0.5]
        assert all("proximal_mu" not in a for a in _asked(tmp_path, "fedadam", site))
