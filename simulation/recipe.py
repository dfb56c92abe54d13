"""The reproduction's chosen hyperparameters, in ONE place, as run-config overrides.

A recipe is a mapping of run-config keys (kebab-case, as in ``[tool.flwr.app.config]``) to
values. Some keys are added by other work in parallel (``augment``, ``weight-decay``,
``lr-schedule``, ``ema``, ``model``, ``precision``, ``strategy``, ``proximal-mu``); a recipe
is therefore always *filtered* to the keys :class:`~common.config.RunConfig` knows in this
checkout, and what was applied and what was left out are both recorded, so a report says
which levers its numbers had. :class:`RecipePlan` carries the applied overrides into every
FedAvg run of a :class:`~simulation.plan.SimPlan`.

Choosing: the values below were set before any test patient was scored; row 2 of the
reproduction picks among :data:`CENTRAL_CANDIDATES` on validation patients only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from common.config import RunConfig, Scalar
from simulation.plan import DPSpec, SimPlan

# Levers wanted for every run of the reproduction; applied only where RunConfig knows them.
BASE: dict[str, Scalar] = {
    "augment": "dihedral",  # the 8 flips/rotations: histology has no orientation
    "weight-decay": 1e-4,
    "lr-schedule": "cosine",
    "ema": 0.999,
    "strategy": "fedavg",
}
# Row 2 chooses among these on validation patients (best validation balanced accuracy).
CENTRAL_CANDIDATES: tuple[dict[str, Scalar], ...] = (
    {"learning-rate": 1e-4},
    {"learning-rate": 3e-4},
)
# Extra keys of a strategy tried where FedAvg falls short (the skewed partitions).
STRATEGY_EXTRAS: dict[str, dict[str, Scalar]] = {"fedprox": {"proximal-mu": 0.01}}
# DP-SGD rows: larger logical batches and a larger step (noise is set for the whole run).
DP: dict[str, Scalar] = {"batch-size": 256, "learning-rate": 1e-3}
DP_CLIP = 1.0
DP_DELTA = 1e-5
# Models of the DP rows: the paper's network, and the DP-friendly one when RunConfig has it.
DP_MODELS: tuple[str, ...] = ("paper", "gap")


def known_keys() -> frozenset[str]:
    """Every run-config key this checkout's RunConfig parses."""
    return frozenset(RunConfig.key(f.name) for f in fields(RunConfig))


@dataclass(frozen=True)
class Recipe:
    """Overrides RunConfig accepts here (``applied``) and the rest (``skipped``, never sent)."""

    applied: dict[str, Scalar]
    skipped: dict[str, Scalar]

    @classmethod
    def of(cls, *layers: Mapping[str, Scalar]) -> Recipe:
        """Later layers win; a key or value RunConfig does not accept is kept aside."""
        merged: dict[str, Scalar] = {}
        for layer in layers:
            merged.update(layer)
        ok = {k: supports(k, v) for k, v in merged.items()}
        return cls(
            applied={k: v for k, v in merged.items() if ok[k]},
            skipped={k: v for k, v in merged.items() if not ok[k]},
        )

    def facts(self) -> dict[str, Any]:
        """JSON-ready record of what this recipe applied and left out."""
        return {"applied": dict(self.applied), "not_accepted_here": dict(self.skipped)}

    def baseline(self) -> dict[str, Any]:
        """The BaselineConfig fields (centralized, local-only) this recipe sets."""
        out: dict[str, Any] = {}
        if "learning-rate" in self.applied:
            out["lr"] = float(self.applied["learning-rate"])
        if "batch-size" in self.applied:
            out["batch_size"] = int(self.applied["batch-size"])
        return out


def supports(key: str, value: Scalar | None = None) -> bool:
    """Whether RunConfig knows ``key`` (and, given ``value``, accepts it)."""
    if key not in known_keys():
        return False
    if value is None:
        return True
    try:
        RunConfig.from_run_config({key: value})
    except ValueError:
        return False
    return True


def strategy(name: str) -> dict[str, Scalar]:
    """The run-config layer that selects Flower strategy ``name`` (with its own keys)."""
    return {"strategy": name, **STRATEGY_EXTRAS.get(name, {})}


@dataclass(frozen=True)
class RecipePlan(SimPlan):
    """A SimPlan whose every FedAvg run config also carries the recipe's overrides."""

    overrides: tuple[tuple[str, Scalar], ...] = field(default=())

    def run_config(
        self, run_dir: Path, coord: Path, sites_dir: Path, dp: tuple[DPSpec, float] | None = None
    ) -> RunConfig:
        """The plan's run config with the overrides applied and every value checked."""
        run = super().run_config(run_dir, coord, sites_dir, dp)
        if not self.overrides:
            return run
        merged = {**run.to_run_config(), **dict(self.overrides)}
        return RunConfig.from_run_config(merged)


def with_recipe(plan: SimPlan, recipe: Recipe) -> RecipePlan:
    """``plan`` with the recipe's learning rate and batch size, and its overrides for the rest."""
    lr = float(recipe.applied.get("learning-rate", plan.lr))
    batch = int(recipe.applied.get("batch-size", plan.batch_size))
    base = {f.name: getattr(plan, f.name) for f in fields(SimPlan)}
    rest = tuple(
        (k, v) for k, v in recipe.applied.items() if k not in ("learning-rate", "batch-size")
    )
    return replace(RecipePlan(**base), lr=lr, batch_size=batch, overrides=rest)
