"""The centralized baseline: the paper's recipe on pooled patches, with its figures."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from common.config import Augment, LRSchedule, ModelKind, Optimizer
from common.data import PatchSet, load_patches
from common.dataset import PatchDataset, make_loader
from common.metrics import ACCURACY, AUC, BALANCED_ACCURACY, F1, json_safe
from common.model import Norm, build_model
from common.partition import Split, balance, split_by_patient, split_random
from common.plots import plot_confusion, plot_curves, plot_examples
from common.recipe import Recipe
from common.site_data import EVAL_BATCH
from common.training import TrainConfig, train
from simulation.scoring import AT_CHOSEN, both, on_validation, probabilities
from simulation.scoring import eval_loader as eval_loader  # its old home: benchmarks use it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineConfig:
    """The paper's recipe by default: Adam 1e-4, 40 epochs, 70/30 (validation taken from 70)."""

    split: Literal["patient", "random"] = "patient"
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-4
    patience: int | None = 5
    balance: bool = False
    augment: Augment = "dihedral+color"  # the loop augments on the device
    weight_decay: float = 0.0
    lr_schedule: LRSchedule = "constant"
    ema: float = 0.0
    optimizer: Optimizer = "adam"
    seed: int = 0
    norm: Norm = "batch"
    model: ModelKind = "paper"
    fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)
    progress: bool = False

    def __post_init__(self) -> None:
        if self.split not in ("patient", "random"):
            raise ValueError(f"split must be 'patient' or 'random', got {self.split!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        self.recipe()  # a bad lever is named before any data is read

    def recipe(self) -> Recipe:
        """The recipe levers of this baseline."""
        return Recipe.from_run(self)

    def train_config(self) -> TrainConfig:
        """The loop's part of this config."""
        return TrainConfig(
            epochs=self.epochs,
            lr=self.lr,
            patience=self.patience,
            progress=self.progress,
            recipe=self.recipe(),
            seed=self.seed,
        )


def make_split(patches: PatchSet, config: BaselineConfig) -> Split:
    """Split as configured, balancing the training part when asked."""
    if config.split == "patient":
        split = split_by_patient(patches.patients, patches.labels, config.fractions, config.seed)
    else:
        split = split_random(len(patches), config.fractions, config.seed)
    if config.balance:
        split = Split(balance(split.train, patches.labels, config.seed), split.val, split.test)
    if len(split.train) == 0 or len(split.test) == 0:
        raise ValueError(
            f"split left an empty part: {len(split.train)} train, "
            f"{len(split.test)} test patches; add patients"
        )
    return split


def fit(
    patches: PatchSet, train_idx: np.ndarray, val_idx: np.ndarray | None, config: BaselineConfig
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train a fresh model on ``train_idx`` with the one training loop."""
    model = build_model(config.norm, seed=config.seed, kind=config.model)
    train_ds = PatchDataset(patches.images, patches.labels, train_idx)
    loader = make_loader(train_ds, config.batch_size, shuffle=True, seed=config.seed)
    val_loader = None
    if val_idx is not None and len(val_idx):
        val_loader = make_loader(
            PatchDataset(patches.images, patches.labels, val_idx), EVAL_BATCH, shuffle=False
        )
    result = train(model, loader, config.train_config(), val_loader)
    return model, result.history


def run_centralized(
    data: Path, out: Path, config: BaselineConfig, cache_dir: Path | None = None
) -> dict[str, Any]:
    """Train, evaluate on the held-out part, write metrics, weights and figures to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    patches = load_patches(data, cache_dir=cache_dir, workers=2)
    split = make_split(patches, config)
    log.info(
        "split (%s): %d train, %d val, %d test patches",
        config.split,
        len(split.train),
        len(split.val),
        len(split.test),
    )
    model, history = fit(patches, split.train, split.val, config)
    where = f"this run's {config.split}-split validation part, seed {config.seed}"
    choice = on_validation(model, patches, split.val, where)
    labels, probs, loss = probabilities(model, patches, split.test)
    test = both((labels, probs, loss), choice, patches.patients[split.test])
    summary: dict[str, Any] = {
        "config": asdict(config),
        "data": {
            "root": patches.report.root,
            "fingerprint": patches.fingerprint,
            "usable": patches.report.usable,
            "patients": patches.report.patients,
        },
        "split_sizes": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "history": history,
        "test": test,  # at 0.5, and under AT_CHOSEN at the validation-chosen threshold
    }
    (out / "metrics.json").write_text(json.dumps(json_safe(summary), indent=2))
    torch.save(model.state_dict(), out / "model.pt")
    plot_curves(history, out / "curves.png")
    plot_confusion(test["confusion"], out / "confusion.png", "test at 0.5")
    chosen = test[AT_CHOSEN]
    plot_confusion(
        chosen["confusion"],
        out / "confusion-chosen.png",
        f"test at the validation-chosen threshold {chosen['threshold']:.3g}",
    )
    plot_examples(patches.images[split.test], labels, probs, out / "examples.png")
    return summary


def results_table(rows: dict[str, dict[str, object]]) -> str:
    """A short fixed-width table of the headline metrics, one row per named result."""
    cols = (ACCURACY, BALANCED_ACCURACY, F1, AUC)
    lines = [f"{'':<24}" + "".join(f"{c:>19}" for c in cols)]
    for name, res in rows.items():
        cells = []
        for c in cols:
            v = res.get(c)
            cells.append(f"{v:>19.4f}" if isinstance(v, float) else f"{'n/a':>19}")
        lines.append(f"{name:<24}" + "".join(cells))
    return "\n".join(lines)
