"""Choose the DP-SGD recipe of ``idc-sim reproduce`` on VALIDATION patients only.

Run: ``.venv/bin/python benchmarks/dp_recipe_search.py --data $IDC_REAL_DATA --out /tmp/dps
--patients 60 --config 'model=gap,batch=64,lr=1e-3,rounds=2,epochs=2,ema=0,augmult=1' ...``

The reproduction's DP row on a small CPU is the QUICK cohort (a seeded subsample of patients)
split into iid sites by patient, each site's patients split 70/10/20 as the ClientApp splits
them. Every candidate trains FedAvg with DP-SGD at every site, the noise set once for the whole
run so that each site's total epsilon is the budget (:func:`simulation.plan.noise_for_plan`),
through the project's own pieces: :func:`common.privacy.make_private` and THE training loop,
a weighted average of the sites' weights per round (what FedAvg does), and no Flower processes
(that is the only difference from the real row, and what makes a search affordable on a CPU).
The global model is scored on the union of the sites' VALIDATION patients; test patients are
never read. One line per candidate: validation balanced accuracy, AUC, the AUC that weighs
every validation patient the same (a few patients hold most validation patches), wall time.
``--epsilons 0`` is the control: the same sites, loaders, optimizer and loop without DP-SGD.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.metrics import patient_weights, roc_auc
from common.model import build_model
from common.privacy import DPConfig, make_private, release
from common.recipe import Recipe, make_optimizer
from common.site_data import Site, model_arrays, set_weights
from common.training import TrainConfig, predict, score, train
from simulation.centralized import eval_loader
from simulation.federated import Prepared, prepare
from simulation.plan import DPSpec, SimPlan, noise_for_plan
from simulation.reproduce_cohort import make_cohort


@dataclass(frozen=True)
class Candidate:
    """One DP recipe tried."""

    model: str = "gap"
    batch: int = 64
    lr: float = 1e-3
    rounds: int = 2
    epochs: int = 2  # local epochs per round
    ema: float = 0.0
    augmult: int = 1
    clip: float = 1.0
    optimizer: str = "adam"  # or "sgd" (common.recipe.make_optimizer)

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """``model=gap,batch=64,...`` -> a Candidate (unnamed fields keep their defaults)."""
        kinds = {
            "model": str,
            "optimizer": str,
            "batch": int,
            "rounds": int,
            "epochs": int,
            "augmult": int,
        }
        values: dict[str, Any] = {}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            values[key.strip()] = kinds.get(key.strip(), float)(value)
        return replace(cls(), **values)


def _average(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in updates)
    keys = updates[0][0]
    return {k: sum(a[k] * (n / total) for a, n in updates) for k in keys}  # type: ignore[misc]


def _site_round(
    site: Site, arrays: dict[str, np.ndarray], cand: Candidate, noise: float | None, seed: int
) -> dict[str, np.ndarray]:
    """One site's local epochs from ``arrays``: DP-SGD at ``noise``, or plain when None."""
    model = set_weights(build_model("group", seed=0, kind=cand.model), arrays)  # type: ignore[arg-type]
    recipe = Recipe("dihedral+color", 1e-4, ema=cand.ema, optimizer=cand.optimizer)  # type: ignore[arg-type]
    opt = make_optimizer(model.parameters(), cand.lr, recipe)
    loader = site.loader("train", cand.batch, seed, train=True)
    config = TrainConfig(
        epochs=cand.epochs, lr=cand.lr, patience=None, device="cpu", recipe=recipe, seed=seed
    )
    if noise is None:  # the no-DP control: the same loader, optimizer and loop
        train(model, loader, config, optimizer=opt)
        return model_arrays(model)
    dp = DPConfig(noise, None, cand.clip, 1e-5)
    private = make_private(model, opt, loader, dp, cand.epochs, seed=seed, views=cand.augmult)
    try:
        train(
            private.model,
            private.loader,
            config,
            optimizer=private.optimizer,
            criterion=private.criterion,
        )
    finally:
        release(private)
    return model_arrays(model)


def run(prep: Prepared, data: Path, cand: Candidate, epsilon: float, seed: int) -> dict[str, Any]:
    """FedAvg with DP-SGD at every site; scores on the sites' validation patients."""
    plan = SimPlan(
        data=data,
        sites=len(prep.parts),
        rounds=cand.rounds,
        local_epochs=cand.epochs,
        batch_size=cand.batch,
        seed=seed,
    )
    sites = prep.open(seed)
    noise = None  # epsilon 0: no DP (the control)
    if epsilon > 0:
        noise = noise_for_plan(plan, sites, DPSpec(epsilon=epsilon, max_grad_norm=cand.clip))
    start = time.monotonic()
    arrays = model_arrays(build_model("group", seed=seed, kind=cand.model))  # type: ignore[arg-type]
    for rnd in range(1, cand.rounds + 1):
        updates = [
            (_site_round(s, arrays, cand, noise, seed * 1000 + rnd * 10 + k), len(s.split.train))
            for k, s in enumerate(sites)
        ]
        arrays = _average(updates)
    model = set_weights(build_model("group", seed=0, kind=cand.model), arrays)  # type: ignore[arg-type]
    val = prep.pooled_split(sites).val
    labels, probs, loss = predict(model, eval_loader(prep.pooled, val), torch.device("cpu"))
    ev = score(labels, probs, float(loss) / max(len(labels), 1))
    patients = prep.pooled.patients[val]
    return {
        "candidate": cand.__dict__,
        "epsilon": epsilon,
        "seed": seed,
        "noise": noise,
        "val_patches": int(len(val)),
        "val_patients": int(len(set(patients))),
        "val_balanced_accuracy": ev.balanced_accuracy,
        "val_auc": ev.auc,
        "val_auc_per_patient": roc_auc(labels, probs, patient_weights(patients)),
        "val_p_range": [float(np.percentile(probs, 5)), float(np.percentile(probs, 95))],
        "seconds": time.monotonic() - start,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--epsilons", default="8", help="0: no DP, the control")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--config", action="append", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="Full backward hook")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    args.out.mkdir(parents=True, exist_ok=True)
    cohort = make_cohort(args.data, args.out, args.patients, 0)
    prep = prepare(SimPlan(data=cohort.data, sites=args.sites), args.out / "prep", print)
    results = args.out / "results.jsonl"
    for text in args.config:
        cand = Candidate.parse(text)
        for seed in (int(s) for s in args.seeds.split(",")):
            for eps in (float(e) for e in args.epsilons.split(",")):
                row = run(prep, cohort.data, cand, eps, seed)
                with results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                noise = "no DP" if row["noise"] is None else f"noise {row['noise']:.3f}"
                print(
                    f"{text} eps {eps:g} seed {seed}: {noise}, val BAC "
                    f"{row['val_balanced_accuracy']:.3f} AUC {row['val_auc']:.3f} "
                    f"per-patient AUC {row['val_auc_per_patient']:.3f} "
                    f"({row['seconds'] / 60:.1f} min)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
