"""DP-SGD for one site's round: the DP config, its plan, and Opacus objects for the shared loop.

A round with DP on goes (:mod:`client.private`): :func:`plan_round` (noise, sample rate,
steps) -> the plan reserved in the site's :class:`~common.ledger.PrivacyLedger` if
:func:`~common.accounting.check_cap` allows it -> :func:`make_private` ->
``common.training.train(private.model, private.loader, ..., optimizer=private.optimizer)`` ->
``ledger.settle`` with :func:`steps_taken` -> only then may weights leave the site. The loop
is never copied here: privacy swaps the objects passed into it. The maths is
:mod:`common.accounting`.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from common.accounting import ACCOUNTANTS, noise_for_target, schedule
from common.augmult import check_views, fold_views, repeat_views
from common.config import Accountant
from common.grad_samplers import use_fast_samplers

log = logging.getLogger(__name__)

PRIVACY_UNIT = (
    "Privacy unit: one 50x50 patch. The (epsilon, delta) guarantee is sample-level "
    "differential privacy: it bounds what the shared model reveals about any single patch. "
    "A patient contributes hundreds of patches, so the guarantee for a whole patient is far "
    "weaker: by group privacy, k patches of one patient are protected only at about "
    "k*epsilon, with delta growing to about k*exp((k-1)*epsilon)*delta, which for hundreds "
    "of patches is no meaningful patient-level protection. The accounting covers the model "
    "updates a site sends in DP rounds, and nothing else that leaves it: each reply's count "
    "of training patches and its epsilon figures, a refused round and its reason, and the "
    "coordinator's evaluation of every global model on the site's held-out test patients "
    "(their count, loss, accuracy, balanced accuracy, F1, AUC) and counts of its validation "
    "patches per P(IDC) bin (50 bins, and once more on a narrower range after the last round, "
    "to choose the decision threshold): none of these is differentially private. "
    "Training and validation loss and accuracy are not sent in DP rounds."
)

GradSampleMode = Literal["hooks", "functorch", "ew", "ghost"]
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "functorch", "ew", "ghost")
# functorch cannot take an empty batch (vmap over 0 samples fails); Poisson draws one with
# probability ~exp(-expected batch), so below this batch hooks is used.
FUNCTORCH_MIN_BATCH = 32
# The engine used from FUNCTORCH_MIN_BATCH up: hooks, with common.grad_samplers' convolution
# kernel (functorch computes every layer itself and cannot use it). benchmarks/dp_overhead.py,
# gap model, shared 2-core CPU under heavy load: batch 64, hooks 1.60x plain, functorch 3.83x;
# batch 256, hooks 3.02x, functorch 3.07x, ghost 2.72x (ratios swing with the load).
# simulation/dp_speed.py, idle 2-core CPU, 1 thread (2026-12-01), hooks vs ghost: gap 1.89x vs
# 2.40x at batch 64, 1.50x vs 2.24x at 256; paper 2.73x vs 2.34x at 64, 1.88x vs 2.06x at 256.
LARGE_BATCH_MODE: GradSampleMode = "hooks"
# Loss of one batch: the plain cross-entropy, or ghost clipping's two-pass criterion.
Criterion = Callable[[torch.Tensor, torch.Tensor], Any]


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings of one round; exactly one of noise_multiplier and epsilon_per_round.

    ``epsilon_per_round`` is the epsilon of this round alone (``dp.epsilon-per-round``); the
    noise multiplier that reaches it is found by :func:`~common.accounting.noise_for_target`.
    A noise multiplier of 0 is accepted (tests, clipping-only studies) but its epsilon is
    infinite, so :func:`~common.accounting.check_cap` refuses it.
    """

    noise_multiplier: float | None
    epsilon_per_round: float | None
    max_grad_norm: float
    delta: float
    accountant: Accountant = "rdp"

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.epsilon_per_round is None):
            raise ValueError(
                "exactly one of noise_multiplier and epsilon_per_round must be set, got "
                f"noise_multiplier={self.noise_multiplier!r}, "
                f"epsilon_per_round={self.epsilon_per_round!r}"
            )
        if self.noise_multiplier is not None and not _finite(self.noise_multiplier, 0.0):
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if self.epsilon_per_round is not None and not _finite(self.epsilon_per_round, 0.0, False):
            raise ValueError(f"epsilon_per_round must be > 0, got {self.epsilon_per_round!r}")
        if not _finite(self.max_grad_norm, 0.0, False):
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm!r}")
        if not (_finite(self.delta, 0.0, False) and self.delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")


def _finite(value: object, low: float, inclusive: bool = True) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return False
    return value >= low if inclusive else value > low


@dataclass(frozen=True)
class RoundPlan:
    """What one DP round will cost: Opacus's sample rate and step count, and the noise."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def plan_round(dp: DPConfig, loader: Sized, epochs: int) -> RoundPlan:
    """The noise, sample rate and steps Opacus will account for ``epochs`` over ``loader``.

    The schedule is :func:`common.accounting.schedule` of ``len(loader)``, Opacus's own
    arithmetic, so the budget check and the ledger see what the accountant will record.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if len(loader) < 1:
        raise ValueError("the training loader is empty: no data to train on")
    sample_rate, per_epoch = schedule(len(loader))
    steps = epochs * per_epoch
    if dp.epsilon_per_round is not None:
        noise = noise_for_target(dp.epsilon_per_round, dp.delta, sample_rate, steps, dp.accountant)
    else:  # DPConfig guarantees the noise multiplier is then set
        noise = float(dp.noise_multiplier or 0.0)
    return RoundPlan(noise, sample_rate, steps)


class CountingDPDataLoader(DPDataLoader):
    """Opacus's Poisson-sampling loader, counting the batches it hands to the loop.

    :func:`steps_taken` compares the count with the optimizer's steps: more steps than
    Poisson batches means the loop iterated some other (plain) loader, and the accounted
    guarantee does not hold for what was trained.
    """

    batches_drawn = 0
    views = 1  # augmentation multiplicity: each sampled patch handed on this many times

    def __iter__(self) -> Iterator[Any]:
        for x, y in super().__iter__():
            self.batches_drawn += 1
            yield repeat_views(x, y, self.views)


@dataclass
class PrivateObjects:
    """What the shared training loop must be given instead of the plain objects.

    ``model`` wraps the caller's model and shares its parameters (its ``state_dict`` keys
    gain a ``_module.`` prefix, so read weights from the original model). ``loader`` is the
    Poisson-sampling ``DPDataLoader``: iterating any other loader voids the guarantee.
    """

    model: AbstractGradSampleModule
    optimizer: DPOptimizer
    loader: CountingDPDataLoader
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    engine: PrivacyEngine
    grad_sample_mode: str
    criterion: Criterion = F.cross_entropy  # pass to the loop; ghost clipping has its own
    views: int = 1


def _generator(seed: int | None, stream: int) -> torch.Generator:
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    state = np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def _check_inputs(model: nn.Module, optimizer: torch.optim.Optimizer, loader: object) -> None:
    if isinstance(model, AbstractGradSampleModule) or isinstance(optimizer, DPOptimizer):
        raise ValueError("model or optimizer is already private; pass the plain objects")
    if not isinstance(loader, DataLoader):
        raise TypeError(f"loader must be a torch DataLoader, got {type(loader).__name__}")
    model.train()  # the validator also rejects eval mode, which is no privacy problem
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(
            f"model cannot be trained with DP-SGD: {'; '.join(map(str, errors))}. Build it "
            "with build_model(norm='group'); privacy never swaps layers silently."
        )


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    dp: DPConfig,
    epochs: int,
    seed: int | None = None,
    grad_sample_mode: GradSampleMode | None = None,
    views: int = 1,
) -> PrivateObjects:
    """Wrap model, optimizer and loader for DP-SGD with Poisson sampling (Opacus).

    Parameters
    ----------
    model, optimizer, loader
        The plain training objects; ``loader`` fixes the dataset and the expected batch size.
    dp : DPConfig
        Noise (or per-round target epsilon), clipping norm, delta and accountant.
    epochs : int
        Local epochs this round; with ``epsilon_per_round`` it sets the noise.
    seed : int, optional
        Seeds Poisson sampling and the noise, for reproducible experiments only: the
        guarantee then assumes the seed is secret from everyone who sees the weights (so
        never the coordinator's run-config seed in deployment). ``None`` draws fresh seeds
        from the OS.
    grad_sample_mode : {"hooks", "functorch", "ew", "ghost"}, optional
        Opacus per-sample-gradient engine; by default :data:`LARGE_BATCH_MODE`, or hooks when
        the expected batch is under ``FUNCTORCH_MIN_BATCH`` or ``views`` > 1 with ghost. Ghost
        clipping trains through its own criterion: pass ``criterion`` to the loop.
    views : int
        Augmentation multiplicity (:mod:`common.augmult`): each sampled patch trains on this
        many augmented views, their per-sample gradients averaged before clipping. Sampling
        and accounting are per patch and do not change.

    Raises
    ------
    ValueError
        The model has layers Opacus cannot train privately (e.g. BatchNorm), or is already
        private, or ghost clipping is asked for with ``views`` > 1. Nothing is fixed silently.
    """
    if not isinstance(dp, DPConfig):
        raise TypeError(f"dp must be a DPConfig, got {type(dp).__name__}")
    check_views(views)
    mode = _grad_sample_mode(grad_sample_mode, loader, views)
    _check_inputs(model, optimizer, loader)
    plan = plan_round(dp, loader, epochs)
    _warn(plan, seed)
    # The loader's own generator comes from make_loader's seed, which the coordinator may
    # know; whoever can predict the batches removes the amplification by subsampling that
    # the accountant counts on. So the Poisson loader is built here, with its own generator,
    # and Opacus is told to leave it as it is (poisson_sampling=False means "unchanged").
    poisson = CountingDPDataLoader.from_data_loader(loader, generator=_generator(seed, 0))
    poisson.views = views
    if len(poisson) * epochs != plan.steps:
        raise RuntimeError(f"Opacus plans {len(poisson) * epochs} steps, not {plan.steps}")
    engine = PrivacyEngine(accountant=dp.accountant)
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=poisson,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=False,
        grad_sample_mode=mode,
        noise_generator=_generator(seed, 1),
    )
    dp_model, dp_optimizer = wrapped[0], wrapped[1]
    if mode in ("hooks", "ghost"):
        use_fast_samplers(dp_model)  # same gradients, faster (common.grad_samplers)
    criterion: Criterion = wrapped[2] if mode == "ghost" else F.cross_entropy
    if wrapped[-1] is not poisson:
        raise RuntimeError("Opacus replaced the Poisson-sampling loader; refusing to train")
    if views > 1:
        dp_optimizer = fold_views(dp_optimizer, views)
    dp_model.forbid_grad_accumulation()  # what poisson_sampling=True would have done
    log.info(
        "DP-SGD (%s, %d view(s) per patch): noise %.4g, clip %.4g, sample rate %.4g, "
        "%d steps planned",
        mode,
        views,
        plan.noise_multiplier,
        dp.max_grad_norm,
        plan.sample_rate,
        plan.steps,
    )
    return PrivateObjects(
        dp_model,
        dp_optimizer,
        poisson,
        plan.noise_multiplier,
        plan.sample_rate,
        plan.steps,
        engine,
        mode,
        criterion,
        views,
    )


def _grad_sample_mode(
    asked: GradSampleMode | None, loader: DataLoader[Any], views: int
) -> GradSampleMode:
    if asked is not None and asked not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {asked!r}")
    if asked == "ghost" and views > 1:
        raise ValueError(
            "ghost clipping computes per-sample gradient norms only, so it cannot average "
            f"a patch's {views} views before clipping; use hooks or functorch with views > 1"
        )
    if asked is not None:
        return asked
    expected = len(loader.dataset) / len(loader)  # type: ignore[arg-type]
    if expected < FUNCTORCH_MIN_BATCH:
        return "hooks"
    if LARGE_BATCH_MODE == "ghost" and views > 1:
        return "functorch"
    return LARGE_BATCH_MODE


def _warn(plan: RoundPlan, seed: int | None) -> None:
    if plan.noise_multiplier == 0:
        log.warning("DP-SGD with noise multiplier 0: clipping only, no privacy")
    if seed is not None:
        log.warning(
            "DP sampling and noise seeded with %d: reproducible, and private only "
            "while that seed stays secret",
            seed,
        )


def steps_taken(private: PrivateObjects) -> int:
    """DP steps the engine's accountant recorded; what the ledger must be told.

    Raises
    ------
    RuntimeError
        The accountant saw a noise or sample rate other than the planned one, or the
        optimizer stepped more often than the Poisson loader produced batches (the loop
        iterated another loader). Either way the round's guarantee is not what was planned,
        so its weights must not leave the site.
    """
    total = 0
    for noise, rate, steps in private.engine.accountant.history:
        if noise != private.noise_multiplier or rate != private.sample_rate:
            raise RuntimeError(
                f"accountant recorded noise={noise}, sample_rate={rate}; planned "
                f"noise={private.noise_multiplier}, sample_rate={private.sample_rate}"
            )
        total += int(steps)
    if total > private.loader.batches_drawn:
        raise RuntimeError(
            f"the DP optimizer took {total} steps but the Poisson loader produced only "
            f"{private.loader.batches_drawn} batches: training iterated another loader"
        )
    return total


def release(private: PrivateObjects) -> None:
    """Remove Opacus's hooks and per-sample attributes from the caller's model."""
    private.model._close()
