"""The reproduction's schedules: how much of the matrix runs, for how long, on how many patients.

``FULL`` is meant for a GPU; ``QUICK`` for a 2-core CPU (about an hour on the shared real
patches) and is labelled in the report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.config import Scalar
from simulation import recipe
from simulation.partitioners import MIN_PATIENTS
from simulation.plan import SimPlan

Say = Callable[[str], None]
Late = Callable[[], bool]  # whether --max-minutes has passed


@dataclass(frozen=True)
class Schedule:
    """How much of the matrix runs and for how long; ``quick`` is labelled in the report."""

    name: str
    patients: int | None  # a seeded subsample of the patients; None: all of them
    paper_epochs: int  # all run; the epoch of lowest loss on the (random) validation patches kept
    rounds: int  # FedAvg rounds; the pooled baselines get rounds x local_epochs epochs
    local_epochs: int
    site_counts: tuple[int, ...]
    skews: tuple[str, ...]  # partitions at the first site count besides iid
    local_only: tuple[str, ...]  # partitions whose comparison also trains each site alone
    dp_epsilons: tuple[float, ...]
    dp_rounds: int
    candidates: int  # how many of recipe.CENTRAL_CANDIDATES row 2 tries
    # The DP recipes row 4 chooses among on validation patients, per model (one: no choice)
    dp_candidates: tuple[Mapping[str, Scalar], ...] = (recipe.DP,)
    # Other Flower strategies tried on the skewed partitions (only where RunConfig knows them)
    alt_strategies: tuple[str, ...] = ()
    # ... and on the iid partitions (FedAvgM: chosen on validation at both QUICK site counts by
    # benchmarks/strategy_compare.py, 2026-12-02; it narrowed the 10-site gap from -4.9 to -1.9)
    iid_strategies: tuple[str, ...] = ()
    batch_size: int = 64
    speed_steps: int = 5  # timed plain and DP-SGD steps of row 4's step-time measurement

    @property
    def epochs(self) -> int:
        """Total local epochs of every FedAvg run and of its pooled baseline."""
        return self.rounds * self.local_epochs

    def sites_needed(self, rows: Sequence[str]) -> int:
        """The most virtual sites ``rows`` split the patients into (row 4: the first count)."""
        counts = self.site_counts if "fedavg" in rows else self.site_counts[:1]
        return max(counts) if "fedavg" in rows or "dp" in rows else 0

    def patients_needed(self, rows: Sequence[str]) -> int:
        """Fewest patients ``rows`` can run on: each site needs its own train/val/test ones."""
        return max(MIN_PATIENTS, MIN_PATIENTS * self.sites_needed(rows))


FULL = Schedule(
    name="full",
    patients=None,
    paper_epochs=40,
    rounds=10,
    local_epochs=2,
    site_counts=(5, 10),
    skews=("label-skew", "size-skew"),
    local_only=("iid", "label-skew", "size-skew"),
    dp_epsilons=(1.0, 3.0, 8.0),
    dp_rounds=10,
    candidates=len(recipe.CENTRAL_CANDIDATES),
    dp_candidates=recipe.DP_CANDIDATES,
    alt_strategies=("fedprox", "fedadam", "fedavgm"),
    iid_strategies=("fedavgm",),
)
# About an hour on a 2-core CPU for the shared real patches. Rounds x local epochs is 4 x 1, not
# 2 x 2: the first QUICK report (2 x 2) had FedAvg iid-5 6.3 BAC points under its pooled
# baseline, starved of rounds as the FLamby note warns; the same compute in 4 rounds
# averages twice as often. DP: one round of one epoch, the schedule its recipe was chosen with
# on validation patients (simulation/recipe.py).
QUICK = Schedule(
    name="quick",
    patients=60,
    paper_epochs=16,
    rounds=4,
    local_epochs=1,
    site_counts=(5, 10),
    skews=("label-skew", "size-skew"),
    local_only=("iid",),
    dp_epsilons=(3.0, 8.0),
    dp_rounds=1,
    candidates=1,
)


def sim_plan(data: Path, sched: Schedule, sites: int, partition: str, seed: int) -> SimPlan:
    """The FedAvg plan of a row of ``sched``: ``sites`` sites of ``partition``, seeded."""
    return SimPlan(
        data=data,
        sites=sites,
        partition=partition,
        rounds=sched.rounds,
        local_epochs=sched.local_epochs,
        batch_size=sched.batch_size,
        seed=seed,
        partition_seed=seed,
    )
