"""Does weighing validation patients alike choose better thresholds for new patients?

Run: ``.venv/bin/python benchmarks/validation_weighting.py --data $IDC_REAL_DATA --out /tmp/vw
--seeds 0 --epochs 3 --draws 200``

A few patients hold most patches (8 of the 239 shared patients hold 42% of them), so a
validation part of a patient split is often mostly one patient's patches, and the threshold
that maximises balanced accuracy there is that patient's. Per seed, this trains row 2's
centralized recipe (the one training loop, a fixed number of epochs) on the training patients
of that seed's patient split, and scores the patients it did not train on once. Then, many
times, it deals those held-out patients afresh into validation and test (1 : 3, stratified as
:func:`common.partition.split_by_patient` deals), chooses the threshold on the validation
patients two ways, every patch alike and every patient alike (a patch weighs 1 / its
patient's patches), and scores each, and 0.5, on that draw's test patients: balanced accuracy
per patch (the issue's metric) and per patient. One training serves every draw, so the
comparison is paired and the draws show the spread a single split hides. Test patients never
choose. One JSON line per seed: means, spreads, and the paired difference.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.data import PatchSet, load_patches
from common.metrics import balanced_accuracy, patient_weights, roc_auc
from common.partition import split_by_patient
from common.threshold import DEFAULT, best_exact
from simulation.centralized import BaselineConfig, fit
from simulation.reproduce_cohort import make_cohort
from simulation.scoring import probabilities

WAYS = ("patch", "patient")  # how validation weighs its patches when choosing the threshold
VAL_SHARE = 0.25  # of the held-out patients: the product's 10 : 30 validation : test


def one_draw(labels: np.ndarray, probs: np.ndarray, patients: np.ndarray, draw: int) -> dict:
    """Deal held-out patients into validation and test; score each way's threshold on test."""
    deal = split_by_patient(patients, labels, (VAL_SHARE, 0.0, 1 - VAL_SHARE), seed=draw)
    val, test = deal.train, deal.test
    if len(np.unique(labels[val])) < 2 or len(np.unique(labels[test])) < 2:
        return {}
    t_w = patient_weights(patients[test])
    out: dict[str, float] = {}
    for way, w in (("0.5", None), ("patch", None), ("patient", patient_weights(patients[val]))):
        found = best_exact(labels[val], probs[val], w) if way != "0.5" else None
        t = found[0] if found else DEFAULT
        out[f"t_{way}"] = t
        out[f"bac_{way}"] = balanced_accuracy(labels[test], probs[test], t)
        out[f"bac_pp_{way}"] = balanced_accuracy(labels[test], probs[test], t, t_w)
    sizes = np.unique(patients[val], return_counts=True)[1]
    out["val_largest_share"] = float(sizes.max() / sizes.sum())
    return out


def one_seed(patches: PatchSet, seed: int, epochs: int, draws: int) -> dict[str, Any]:
    """Train on split ``seed``'s training patients; score thresholds over many deals of the rest."""
    split = split_by_patient(patches.patients, patches.labels, seed=seed)
    held = np.concatenate([split.val, split.test])
    config = BaselineConfig(epochs=epochs, weight_decay=1e-4, seed=seed, patience=None)
    start = time.monotonic()
    model, _ = fit(patches, split.train, None, config)
    labels, probs, _ = probabilities(model, patches, held)
    patients = patches.patients[held]
    rows = [r for r in (one_draw(labels, probs, patients, d) for d in range(draws)) if r]
    table = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    diff = table["bac_patient"] - table["bac_patch"]
    return {
        "seed": seed,
        "train_patches": len(split.train),
        "held_out_patients": len(np.unique(patients)),
        "held_out_auc": roc_auc(labels, probs),
        "held_out_auc_per_patient": roc_auc(labels, probs, patient_weights(patients)),
        "draws": len(rows),
        **{f"{k}_mean": float(v.mean()) for k, v in table.items()},
        **{f"{k}_sd": float(v.std()) for k, v in table.items() if k.startswith("bac")},
        "patient_minus_patch_mean": float(diff.mean()),
        "patient_minus_patch_se": float(diff.std() / np.sqrt(len(diff))),
        "patient_better_share": float((diff > 0).mean()),
        "patient_worse_share": float((diff < 0).mean()),
        "seconds": time.monotonic() - start,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="cohort links and cache")
    parser.add_argument("--patients", type=int, default=None, help="seeded subsample; all")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cohort = make_cohort(args.data, args.out, args.patients, 0)
    patches = load_patches(cohort.data, cache_dir=cohort.cache)
    for seed in (int(s) for s in args.seeds.split(",")):
        print(json.dumps(one_seed(patches, seed, args.epochs, args.draws)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
