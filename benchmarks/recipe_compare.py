"""Centralized, patient-split comparison of training recipes on a subsample of real patches.

Not a speed benchmark: a short quality check of the recipe levers (``common/recipe.py``) for
machines too slow for the full baseline (``idc-sim centralized``). Patients are split
60/10/30 as the baseline splits them; then ``--train``/``--val``/``--test`` patches are drawn
at random from each part (the same draw for every recipe), and each recipe trains the same
seeded network with the one training loop and is scored once on the test patches.

    python benchmarks/recipe_compare.py --data $IDC_REAL_DATA --epochs 4 \
        --recipe none,constant,0,0 --recipe dihedral+color,cosine,0.05,0.99
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from common.data import load_patches
from common.metrics import json_safe
from common.training import evaluate, resolve_device
from simulation.centralized import BaselineConfig, eval_loader, fit, make_split


def _subsample(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(idx, size=min(n, len(idx)), replace=False))


def main() -> None:
    """Train each recipe on the same subsample; print and write one JSON line per recipe."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("IDC_REAL_DATA", "../shared/data/idc-real")
    p.add_argument("--data", type=Path, default=Path(default_data))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train", type=int, default=2400)
    p.add_argument("--val", type=int, default=400)
    p.add_argument("--test", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="paper")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    p.add_argument("--recipe", action="append", required=True, help="augment,schedule,wd,ema")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    patches = load_patches(args.data, workers=2)
    split = make_split(patches, BaselineConfig())
    rng = np.random.default_rng(0)
    train_idx = _subsample(split.train, args.train, rng)
    val_idx = _subsample(split.val, args.val, rng)
    test_idx = _subsample(split.test, args.test, rng)
    for spec in args.recipe:
        augment, schedule, wd, ema = spec.split(",")
        config = BaselineConfig(
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            patience=None,
            augment=augment,  # type: ignore[arg-type]  # checked by Recipe
            lr_schedule=schedule,  # type: ignore[arg-type]
            weight_decay=float(wd),
            ema=float(ema),
            model=args.model,
        )
        t0 = time.perf_counter()
        model, history = fit(patches, train_idx, val_idx, config)
        test = evaluate(model, eval_loader(patches, test_idx), resolve_device())
        row = {
            "recipe": spec,
            "model": args.model,
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "patches": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
            "patients": len(np.unique(patches.patients)),
            "data": str(args.data),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads "
            f"{torch.get_num_threads()}",
            "seconds": round(time.perf_counter() - t0, 1),
            "history": history,
            "test": test.as_dict(),
        }
        line = json.dumps(json_safe(row))
        print(line, flush=True)
        if args.out is not None:
            with args.out.open("a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
