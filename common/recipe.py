"""The training recipe's levers around THE loop: augmentation, optimizer, schedule, averaging.

:class:`Recipe` is what a run chooses (run-config keys ``augment``, ``weight-decay``,
``lr-schedule``, ``ema``, ``optimizer``); :class:`RecipeRun` is one call of
:func:`common.training.train` applying it. The defaults are the paper's: no augmentation in
the loop, Adam, a constant learning rate, no averaging.

Scope of one call. The cosine schedule runs over the call's own steps and the average starts
from the call's starting weights. In a federated run a call is one round's local training at
one site, so both restart every round: a global schedule would need the round number and the
run's length in every site's hands, and an average kept across rounds would mix weights the
server has since replaced. The averaging decay is warmed up as ``min(ema, (1+t)/(10+t))``
after ``t`` updates (TensorFlow's ExponentialMovingAverage rule) so a short round's average
still moves away from its starting point.

The average covers the state dict (parameters and batch-norm statistics), read and written
through the model it is given, so it works unchanged on an Opacus ``GradSampleModule``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from common.augment import augment_batch, check_augment
from common.config import LR_SCHEDULES, OPTIMIZERS, Augment, LRSchedule, Optimizer, RunConfig

EMA_WARMUP = 10.0


@dataclass(frozen=True)
class Recipe:
    """The levers one training call applies; the defaults change nothing in the paper's loop."""

    augment: Augment = "none"
    weight_decay: float = 0.0  # > 0: AdamW with this decoupled decay; 0: Adam
    lr_schedule: LRSchedule = "constant"
    ema: float = 0.0  # decay of the parameter average; 0: off
    optimizer: Optimizer = "adam"  # "sgd": momentum 0.9, its step as large as the gradient

    def __post_init__(self) -> None:
        check_augment(self.augment)
        wd = self.weight_decay
        if not (wd >= 0 and math.isfinite(wd)):
            raise ValueError(f"weight decay must be >= 0, got {wd}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema decay must be in [0, 1) (0: off), got {self.ema}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    @classmethod
    def from_run(cls, run: RunConfig | object) -> Recipe:
        """The recipe a run config names (or a baseline's config: the same fields by name).

        Read by field name, so a lever added to the recipe reaches every caller at once.
        """
        return cls(**{f.name: getattr(run, f.name) for f in fields(cls)})


def make_optimizer(
    params: Iterable[nn.Parameter], lr: float, recipe: Recipe
) -> torch.optim.Optimizer:
    """Adam at ``lr`` (the paper), AdamW when the recipe asks for weight decay, or SGD.

    SGD (momentum 0.9, the weight decay coupled) is for DP-SGD: Adam divides each coordinate's
    step by its running gradient size, so where the noise outweighs the clipped gradients
    (most of a large layer) it takes lr-sized random steps; SGD's step is as small as the
    averaged noise is.
    """
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=recipe.weight_decay)
    if recipe.weight_decay > 0:
        return torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=lr)


class ParameterAverage:
    """Exponential moving average of a model's state dict, with a warmed-up decay."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current state into the average."""
        self.updates += 1
        decay = min(self.decay, (1.0 + self.updates) / (EMA_WARMUP + self.updates))
        for key, value in model.state_dict().items():
            avg = self.state[key]
            if avg.is_floating_point():
                avg.lerp_(value.detach(), 1.0 - decay)
            else:  # step counters: the latest, not an average
                avg.copy_(value)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Run the body with the averaged weights in ``model``, then put the live ones back."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield
        finally:
            model.load_state_dict(live)


class RecipeRun:
    """One training call's recipe state: the augmentation stream, schedule and average."""

    def __init__(
        self,
        recipe: Recipe,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        seed: int = 0,
    ) -> None:
        self.recipe = recipe
        self.model = model
        self.generator = torch.Generator().manual_seed(seed)
        self.schedule: torch.optim.lr_scheduler.LRScheduler | None = None
        if recipe.lr_schedule == "cosine":
            if total_steps < 1:
                raise ValueError("lr-schedule 'cosine' needs a loader whose length is known")
            total = total_steps

            def cosine(step: int) -> float:
                return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

            self.schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        self.average = ParameterAverage(model, recipe.ema) if recipe.ema > 0 else None

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Augment a training batch that is already on its device."""
        return augment_batch(x, self.recipe.augment, self.generator)

    def after_step(self) -> None:
        """Advance the schedule and the average after one optimizer step."""
        if self.schedule is not None:
            self.schedule.step()
        if self.average is not None:
            self.average.update(self.model)

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Evaluate what this call will return: the averaged weights when averaging."""
        if self.average is None:
            yield
        else:
            with self.average.applied(self.model):
                yield

    def snapshot(self) -> dict[str, Any]:
        """A copy of the weights this call would return now (for the best epoch)."""
        state = self.model.state_dict() if self.average is None else self.average.state
        return {k: v.detach().clone() for k, v in state.items()}

    def final_state(self) -> dict[str, Any] | None:
        """The weights to leave in the model at the end when no best epoch overrides them."""
        return None if self.average is None else self.average.state
