"""DP-SGD accounting, and only that: pure functions over Opacus's accountants, no files.

A history is what an Opacus accountant keeps: ``(noise_multiplier, sample_rate, steps)``
entries that compose in order. Everything that turns a plan or a history into an epsilon, or
a target epsilon into a noise, lives here, so the site's round (:mod:`common.privacy`,
:mod:`client.private`), the coordinator's client-level summary and the offline planners
(:mod:`simulation.budget`, :mod:`simulation.plan`) cannot disagree. The site's ledger
(:mod:`common.ledger`) only stores histories.

Steps per epoch have one definition, Opacus's own (:func:`schedule`): a plain loader of
``B`` batches becomes a Poisson loader sampling each patch with ``q = 1 / B``; Opacus gives
that loader ``int(1 / q)`` batches per epoch and accounts every step at ``1 / int(1 / q)``.
By float rounding ``int(1 / (1 / B))`` is sometimes ``B - 1`` (93 gives 92), so the rate
accounted is then a little above the true one: conservative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, get_args

from common.config import Accountant
from common.errors import RefusedError

ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)
# What a site's cap is checked with, whatever the run asks: RDP is an analytic upper bound
# with no numerical-error parameter, the one Opacus defaults to. PRV is tighter (smaller
# epsilon) but approximate, so a coordinator choosing it must not buy a capped site's rounds.
SITE_ACCOUNTANT: Accountant = "rdp"
# 1/q is floating point: 1/(1/49) comes out just above 49, and ceil would then plan a 50th
# step per epoch; this slack keeps such rates at their intended whole number of batches.
_SLACK = 1e-9

Step = tuple[float, float, int]


class BudgetExceeded(RefusedError):
    """Training this round would take the site's total epsilon past its cap."""

    def __init__(self, spent: float, projected: float, cap: float, delta: float) -> None:
        self.spent, self.projected, self.cap, self.delta = spent, projected, cap, delta
        self.cost = projected - spent
        super().__init__(
            f"privacy budget exceeded: spent epsilon={spent:.4g}, this round would add "
            f"{self.cost:.4g} (total {projected:.4g}), cap {cap:.4g} at delta={delta:g}"
        )


class Schedule(NamedTuple):
    """One epoch as Opacus samples and accounts it."""

    sample_rate: float
    steps_per_epoch: int


def _positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _finite_positive(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return math.isfinite(value) and value > 0


def loader_batches(patches: int, batch_size: int) -> int:
    """Batches of the plain training loader: ``ceil(patches / batch_size)`` (no drop_last)."""
    n, b = _positive_int(patches, "patches"), _positive_int(batch_size, "batch_size")
    return -(-n // b)


def schedule(batches: int) -> Schedule:
    """Opacus's sample rate and steps per epoch for a plain loader of ``batches`` batches."""
    steps = int(1 / (1 / _positive_int(batches, "batches")))
    return Schedule(1 / steps, steps)


def steps_per_epoch_at_rate(sample_rate: float) -> int:
    """Steps per epoch of a plan given only its rate: ``ceil(1 / q)``, never below Opacus's.

    Opacus takes ``int(1 / q)`` steps, which is this or one fewer, so a plan made from a
    rate alone never understates the cost.
    """
    if not (_finite_positive(sample_rate) and sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return math.ceil(1 / sample_rate - _SLACK)


def _check(delta: float, accountant: str) -> None:
    if not (_finite_positive(delta) and delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def epsilon(history: Sequence[Step], delta: float, accountant: Accountant = "rdp") -> float:
    """Total epsilon at ``delta`` of a ``(noise_multiplier, sample_rate, steps)`` history.

    Returns 0.0 for an empty history and ``inf`` once any step had no noise (a noise-free
    step releases its batch exactly).
    """
    _check(delta, accountant)
    used = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not used:
        return 0.0
    if any(s == 0 for s, _, _ in used):
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant  # lazy: torch, 2-4 s a command

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = used
    return float(acc.get_epsilon(delta=delta))


def noise_for_target(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
) -> float:
    """Smallest noise multiplier (within Opacus's 0.01 epsilon tolerance) giving the target.

    Uses ``opacus.accountants.utils.get_noise_multiplier``, which returns the upper end of
    its bisection, so the epsilon reached is at most ``target_epsilon``.
    """
    if not _finite_positive(target_epsilon):
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if not (_finite_positive(sample_rate) and sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    _positive_int(steps, "steps")
    _check(delta, accountant)
    from opacus.accountants.utils import get_noise_multiplier  # lazy, as above

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    )


def check_delta(delta: float, n_patches: int) -> None:
    """Raise ``ValueError`` unless 0 < delta < 1/n_patches.

    A delta of 1/n or more allows a mechanism that publishes one patch outright.
    """
    _positive_int(n_patches, "n_patches")
    if not (_finite_positive(delta) and delta < 1 / n_patches):
        raise ValueError(
            f"delta={delta!r} is too large for n={n_patches} patches: it must be in "
            f"(0, 1/n) = (0, {1 / n_patches:.3g})"
        )


def check_cap(
    history: Sequence[Step],
    planned: Step,
    max_epsilon: float,
    delta: float,
    accountant: Accountant = SITE_ACCOUNTANT,
) -> float:
    """Return the total epsilon if ``planned`` is added to ``history``, or raise.

    Raises
    ------
    BudgetExceeded
        The projected total is above ``max_epsilon`` (or infinite: no noise).
    """
    if not _finite_positive(max_epsilon):
        raise ValueError(f"max_epsilon must be a finite number > 0, got {max_epsilon!r}")
    projected = epsilon([*history, planned], delta, accountant)
    if not projected <= max_epsilon:  # also catches inf and nan
        raise BudgetExceeded(epsilon(history, delta, accountant), projected, max_epsilon, delta)
    return projected
