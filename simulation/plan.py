"""What a simulation runs: its sites, schedule and privacy plan (``SimPlan``, ``DPSpec``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from common.accounting import loader_batches, noise_for_target, schedule
from common.config import Accountant, Norm, RunConfig, StrategyName
from common.site_data import Site
from simulation.centralized import BaselineConfig
from simulation.partitioners import PARTITIONS
from simulation.sim_runtime import Resources


@dataclass(frozen=True)
class DPSpec:
    """Sample-level DP-SGD at every site: a total per-site ``epsilon`` or a fixed noise."""

    epsilon: float | None = None  # total over the whole run, per site
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    accountant: Accountant = "rdp"

    def __post_init__(self) -> None:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "give exactly one of a DP epsilon and a noise multiplier, got "
                f"epsilon={self.epsilon}, noise={self.noise_multiplier}"
            )
        if self.epsilon is not None and not (0 < self.epsilon < float("inf")):
            raise ValueError(f"DP epsilon must be a positive finite number, got {self.epsilon}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"noise multiplier must be > 0, got {self.noise_multiplier}")


@dataclass(frozen=True)
class SimPlan:
    """One comparison: the data, how it is split into sites, and the training schedule."""

    data: Path
    sites: int
    partition: str = "iid"
    rounds: int = 3
    local_epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 64
    norm: Norm = "group"
    seed: int = 0  # model init, each site's train/val/test split, shuffling
    partition_seed: int = 0
    alpha: float = 0.5
    exponent: float = 1.0
    timeout: float = 24 * 3600.0
    resources: Resources = field(default_factory=Resources)
    # Flower's aggregation strategy and its settings; defaults are the run config's.
    strategy: StrategyName = RunConfig.strategy
    proximal_mu: float = RunConfig.proximal_mu
    server_learning_rate: float = RunConfig.server_learning_rate
    server_momentum: float = RunConfig.server_momentum

    def __post_init__(self) -> None:
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {self.partition!r}")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError(
                f"rounds and local epochs must be >= 1, got {self.rounds}, {self.local_epochs}"
            )
        self.strategy_config().check()  # a bad strategy setting fails before any work

    def strategy_config(self) -> RunConfig:
        """The run config's strategy keys as this plan sets them (every other key default)."""
        return RunConfig(
            strategy=self.strategy,
            proximal_mu=self.proximal_mu,
            server_learning_rate=self.server_learning_rate,
            server_momentum=self.server_momentum,
        )

    def run_config(
        self, run_dir: Path, coord: Path, sites_dir: Path, dp: tuple[DPSpec, float] | None = None
    ) -> RunConfig:
        """The ServerApp's run config; ``dp`` is the spec and the noise chosen for it."""
        run = RunConfig(
            num_server_rounds=self.rounds,
            local_epochs=self.local_epochs,
            learning_rate=self.lr,
            batch_size=self.batch_size,
            min_sites=self.sites,
            round_timeout=min(self.timeout, 24 * 3600.0),
            seed=self.seed,
            norm=self.norm,
            strategy=self.strategy,
            proximal_mu=self.proximal_mu,
            server_learning_rate=self.server_learning_rate,
            server_momentum=self.server_momentum,
            run_dir=str(run_dir),
            coord_dir=str(coord),
            sim_sites_dir=str(sites_dir),
        )
        if dp is not None:
            spec, noise = dp
            run = replace(
                run,
                dp_enabled=True,
                dp_noise_multiplier=noise,
                norm="group",
                dp_max_grad_norm=spec.max_grad_norm,
                dp_delta=spec.delta,
                dp_accountant=spec.accountant,
            )
        run.check()
        return run

    def baseline(self, epochs_scale: int = 1) -> BaselineConfig:
        """The baselines' recipe: as many passes over the data as FedAvg makes, no stopping."""
        return BaselineConfig(
            epochs=self.rounds * self.local_epochs * epochs_scale,
            batch_size=self.batch_size,
            lr=self.lr,
            patience=None,
            seed=self.seed,
            norm=self.norm,
        )


def noise_for_plan(plan: SimPlan, sites: Sequence[Site], spec: DPSpec) -> float:
    """One noise multiplier that keeps every site's total epsilon within ``spec.epsilon``.

    Opacus samples at ``q = 1 / len(train loader)``, so a smaller site needs more noise for
    the same budget; the largest noise over the sites is the one every site can accept.
    """
    if spec.noise_multiplier is not None:
        return spec.noise_multiplier
    if spec.epsilon is None:  # DPSpec holds exactly one of the two
        raise ValueError("a DP spec needs an epsilon or a noise multiplier")
    epochs = plan.rounds * plan.local_epochs
    return max(site_noise(len(s.split.train), plan.batch_size, epochs, spec)[0] for s in sites)


def site_noise(
    patches: int, batch_size: int, epochs: int, spec: DPSpec
) -> tuple[float, float, int]:
    """(noise multiplier, sampling rate, steps) that spend ``spec.epsilon`` in ``epochs``.

    For one site of ``patches`` training patches over its whole run. The schedule is the one
    the site's plan_round will use: Opacus's, from its loader's length.
    """
    if spec.epsilon is None:
        raise ValueError("a DP spec needs an epsilon to set the noise from")
    rate, per_epoch = schedule(loader_batches(patches, batch_size))
    steps = epochs * per_epoch
    return noise_for_target(spec.epsilon, spec.delta, rate, steps, spec.accountant), rate, steps


def plan_facts(plan: SimPlan) -> dict[str, Any]:
    """The plan as JSON-ready values."""
    facts = asdict(plan)
    facts["data"] = str(plan.data)
    return facts
