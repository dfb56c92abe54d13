"""Frozen configs parsed once from Flower's run config and node config; the only reader of keys.

Run-wide defaults live in ``[tool.flwr.app.config]`` of pyproject.toml; ``--run-config``
overrides them. Site-local facts (data folder, site name, state folder, privacy cap) come only
from the site's own node config, never from the coordinator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from common import config_digest
from common.paths import SitePaths

Norm = Literal["batch", "group"]
# The paper's exact network, or global average pooling; "-ws": weight-standardized convolutions
ModelKind = Literal["paper", "gap", "paper-ws", "gap-ws"]
Augment = Literal["none", "dihedral", "dihedral+color"]
LRSchedule = Literal["constant", "cosine"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
AUGMENTS: tuple[str, ...] = get_args(Augment)
LR_SCHEDULES: tuple[str, ...] = get_args(LRSchedule)
Optimizer = Literal["adam", "sgd"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
Accountant = Literal["rdp", "prv"]
CentralDPMode = Literal["none", "client-fixed", "server-fixed"]
SmallPolicy = Literal["pad", "skip"]
StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedavgm"]
CENTRAL_DP_MODES: tuple[str, ...] = get_args(CentralDPMode)
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
Precision = Literal["auto", "fp32", "bf16"]  # applied by common.accel
ChannelsLast = Literal["auto", "on", "off"]
Compile = Literal["auto", "on", "off"]  # torch.compile in the loops (common.accel)
PRECISIONS: tuple[str, ...] = get_args(Precision)
CHANNELS_LAST: tuple[str, ...] = get_args(ChannelsLast)
COMPILE_MODES: tuple[str, ...] = get_args(Compile)
Scalar = str | int | float | bool  # what a Flower run-config value may be
RENAMED_KEY = "dp.target-epsilon"


def _get(cfg: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    if key not in cfg:
        if default is None:
            raise ValueError(f"config key {key!r} is missing")
        return default
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config key {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _check(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ValueError(f"config key {key!r} must be {want}, got {value!r}")


@dataclass(frozen=True)
class RunConfig:
    """Run-wide settings the coordinator chooses (``[tool.flwr.app.config]``)."""

    num_server_rounds: int = 3
    local_epochs: int = 1
    learning_rate: float = 1e-4
    batch_size: int = 64
    fraction_train: float = 1.0
    min_sites: int = 2
    round_timeout: float = 600.0
    seed: int = 42
    norm: Norm = "batch"
    model: ModelKind = "paper"
    # auto: bf16 autocast (fp32 master weights) on CUDA, fp32 on CPU; channels-last on both
    precision: Precision = "auto"
    channels_last: ChannelsLast = "auto"
    compile: Compile = "auto"  # auto: off (measured slower on CPU; unmeasured on GPU)
    # The training recipe of each call to the loop (a round's local training at a site).
    augment: Augment = "dihedral+color"
    weight_decay: float = 0.0  # > 0: AdamW; 0 keeps the paper's Adam
    lr_schedule: LRSchedule = "constant"
    ema: float = 0.0  # decay of the parameter average; 0: off
    optimizer: Optimizer = "adam"  # "sgd": momentum 0.9 (for DP-SGD: its step follows the noise)
    max_examples_per_site: int = 1_000_000  # weight bound of sites that declared no count
    max_update_norm: float = 0.0  # 0: no bound on an update's L2 distance from the model
    # Flower's aggregation strategy (server/aggregators.py); the coordinator's checks wrap it.
    strategy: StrategyName = "fedavg"
    proximal_mu: float = 0.01  # fedprox: weight of (mu/2)||w - w_global||^2 in local training
    server_learning_rate: float = 0.0  # fedadam, fedavgm; 0: Flower's (0.1 and 1.0)
    server_momentum: float = 0.9  # fedavgm (Flower's 0.0 would make it plain FedAvg)
    dp_enabled: bool = False
    dp_noise_multiplier: float = 0.0  # 0 means: derive it from dp_epsilon_per_round
    # The epsilon of ONE round at each site (noise calibrated per round), not of the run: every
    # other target epsilon of the product (idc-sim budget, a site's cap) is a total.
    dp_epsilon_per_round: float = 0.0
    dp_max_grad_norm: float = 1.0
    dp_augmult: int = 1  # augmented views per sampled patch, averaged before clipping
    dp_delta: float = 1e-5
    dp_accountant: Accountant = "rdp"
    central_dp_mode: CentralDPMode = "none"
    central_dp_noise: float = 0.0
    central_dp_clip: float = 1.0
    run_dir: str = ""  # coordinator-local: where the ServerApp writes results
    coord_dir: str = ""  # coordinator-local: registered sites, keys, audit log
    resume: bool = False
    sim_sites_dir: str = ""  # simulation only: virtual sites by partition id

    @staticmethod
    def key(field_name: str) -> str:
        """The run-config key of a field: kebab-case, ``dp.`` and ``central-dp.`` groups."""
        key = field_name.replace("_", "-")
        if key.startswith("dp-"):
            return "dp." + key[3:]
        if key.startswith("central-dp-"):
            return "central-dp." + key[len("central-dp-") :]
        return key

    def to_run_config(self) -> dict[str, Scalar]:
        """THE serialiser: every field under its run-config key (the inverse of the parser)."""
        return {self.key(f.name): getattr(self, f.name) for f in fields(self)}

    def digest(self) -> str:
        """SHA-256 of the settings that define the run (:mod:`common.config_digest`).

        ``run.submitted`` and ``run.started`` log it as ``config_hash``; a resume checks it.
        """
        return config_digest.digest(self.to_run_config())

    def matches(self, recorded: str) -> bool:
        """Whether ``recorded``, a run's ``config_hash`` from any release, is of these settings."""
        return recorded in config_digest.accepted(self.to_run_config())

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's run config (kebab-case, dotted groups) and check every value.

        Raises
        ------
        ValueError
            Naming the first unknown key, or the key whose value has the wrong type or range.
        """
        if RENAMED_KEY in cfg:  # its old meaning (per round) must not be read as a total
            raise ValueError(
                f"config key {RENAMED_KEY!r} was renamed 'dp.epsilon-per-round' (the epsilon "
                "of one round at each site); use that name"
            )
        known = {cls.key(f.name) for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(
                f"unknown run-config key {unknown[0]!r}; known keys: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = cls.key(f.name)
            kind = type(f.default)
            values[f.name] = _get(cfg, key, kind, f.default) if key in cfg else f.default
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Raise ValueError naming the first key whose value is out of range."""
        _check(self.num_server_rounds >= 1, "num-server-rounds", self.num_server_rounds, ">= 1")
        _check(self.local_epochs >= 1, "local-epochs", self.local_epochs, ">= 1")
        lr = self.learning_rate
        _check(lr > 0 and math.isfinite(lr), "learning-rate", lr, "a positive number")
        _check(self.batch_size >= 1, "batch-size", self.batch_size, ">= 1")
        _check(0 < self.fraction_train <= 1, "fraction-train", self.fraction_train, "in (0, 1]")
        _check(self.min_sites >= 1, "min-sites", self.min_sites, ">= 1")
        _check(self.round_timeout > 0, "round-timeout", self.round_timeout, "> 0 seconds")
        _check(self.norm in ("batch", "group"), "norm", self.norm, "'batch' or 'group'")
        _check(self.precision in PRECISIONS, "precision", self.precision, f"one of {PRECISIONS}")
        cl = self.channels_last
        _check(cl in CHANNELS_LAST, "channels-last", cl, f"one of {CHANNELS_LAST}")
        _check(self.compile in COMPILE_MODES, "compile", self.compile, f"one of {COMPILE_MODES}")
        _check(self.model in MODEL_KINDS, "model", self.model, f"one of {MODEL_KINDS}")
        _check(self.augment in AUGMENTS, "augment", self.augment, f"one of {AUGMENTS}")
        wd = self.weight_decay
        _check(wd >= 0 and math.isfinite(wd), "weight-decay", wd, ">= 0 (0: plain Adam)")
        sched = self.lr_schedule
        _check(sched in LR_SCHEDULES, "lr-schedule", sched, f"one of {LR_SCHEDULES}")
        _check(0 <= self.ema < 1, "ema", self.ema, "in [0, 1) (0: off)")
        opt = self.optimizer
        _check(opt in OPTIMIZERS, "optimizer", opt, f"one of {OPTIMIZERS}")
        cap = self.max_examples_per_site
        _check(cap >= 0, "max-examples-per-site", cap, ">= 0 (0: no bound)")
        norm = self.max_update_norm
        _check(norm >= 0 and math.isfinite(norm), "max-update-norm", norm, ">= 0 (0: off)")
        _check(
            self.dp_accountant in ("rdp", "prv"),
            "dp.accountant",
            self.dp_accountant,
            "'rdp' or 'prv'",
        )
        _check(
            self.central_dp_mode in CENTRAL_DP_MODES,
            "central-dp.mode",
            self.central_dp_mode,
            f"one of {CENTRAL_DP_MODES}",
        )
        _check(self.seed >= 0, "seed", self.seed, ">= 0 (numpy's generators refuse others)")
        self._check_strategy()
        if self.central_dp_mode != "none":  # else Flower's wrapper refuses it after submission
            noise, clip = self.central_dp_noise, self.central_dp_clip
            _check(0 <= noise < math.inf, "central-dp.noise", noise, "a number >= 0")
            _check(0 < clip < math.inf, "central-dp.clip", clip, "a number > 0")
        if self.dp_enabled:
            if self.norm != "group":  # the README's DP example must not fail after submission
                raise ValueError(
                    f"config key 'norm' is {self.norm!r} but dp.enabled needs norm=\"group\" "
                    "(Opacus clips each sample's gradient; batch norm mixes samples): add "
                    'norm="group"'
                )
            _check(
                self.dp_noise_multiplier > 0 or self.dp_epsilon_per_round > 0,
                "dp.noise-multiplier",
                self.dp_noise_multiplier,
                "> 0 (or set dp.epsilon-per-round > 0)",
            )
            # Opacus's per-sample gradients are validated in float32 only: DP trains in fp32.
            prec = self.precision
            _check(prec != "bf16", "precision", prec, "'auto' or 'fp32' with DP")
            # Opacus's per-sample-gradient hooks do not run under torch.compile.
            _check(self.compile != "on", "compile", self.compile, "'auto' or 'off' with DP")
            _check(self.dp_max_grad_norm > 0, "dp.max-grad-norm", self.dp_max_grad_norm, "> 0")
            k = self.dp_augmult
            _check(k >= 1, "dp.augmult", k, ">= 1 (1: off)")
            _check(k == 1 or self.augment != "none", "dp.augmult", k, "1 when augment is 'none'")
            _check(0 < self.dp_delta < 1, "dp.delta", self.dp_delta, "in (0, 1)")

    def _check_strategy(self) -> None:
        _check(self.strategy in STRATEGIES, "strategy", self.strategy, f"one of {STRATEGIES}")
        mu, lr, momentum = self.proximal_mu, self.server_learning_rate, self.server_momentum
        _check(mu >= 0 and math.isfinite(mu), "proximal-mu", mu, ">= 0")
        _check(lr >= 0 and math.isfinite(lr), "server-learning-rate", lr, ">= 0 (0: Flower's)")
        _check(0 <= momentum < 1, "server-momentum", momentum, "in [0, 1)")
        if self.strategy == "fedprox" and self.dp_enabled:  # fail closed, never silently FedAvg
            raise ValueError(
                "config key 'strategy' is 'fedprox' but dp.enabled is true: Opacus builds the "
                "update from per-sample gradients only, so the proximal term would be dropped; "
                'use strategy="fedavg", "fedadam" or "fedavgm" with DP-SGD'
            )


def sim_site_dir(sites_dir: Path, partition_id: int) -> Path:
    """Folder of virtual site ``partition_id`` in a simulation (``data/`` and ``state/``)."""
    return Path(sites_dir) / f"site-{partition_id:03d}"


# Evaluations a site answers a run unless it says otherwise (idc-client start --max-evaluations):
# each one sends test metrics and validation histograms of a model the coordinator chose, none of
# it differentially private, so a run gets a bounded number (the longest schedule has 10 rounds).
DEFAULT_MAX_EVALUATIONS = 100


@dataclass(frozen=True)
class SiteConfig:
    """Facts only the hospital knows, from its SuperNode's ``--node-config``."""

    site_name: str
    data_dir: Path
    state_dir: Path
    cache_dir: Path
    max_epsilon: float = math.inf
    delta: float = 0.0  # the site's own delta; required with a cap; 0: none, use the run's
    small_policy: SmallPolicy = "pad"
    # Evaluations of global models this site answers a run (client.site.claim_evaluation)
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS
    # A virtual site of `idc-sim` (its node config names no data folder of its own): its DP
    # noise may come from the run's seed so that experiments repeat (client.private). Never
    # set from a real site's node config, which always names its data folder.
    simulated: bool = False

    def __post_init__(self) -> None:
        """A cap is an (epsilon, delta) pair of the site's: never completed by the run."""
        if math.isfinite(self.max_epsilon) and not 0 < self.delta < 1:
            raise ValueError(
                "config key 'delta' is required with 'max-epsilon': the cap means epsilon at "
                "the site's own delta (idc-client start --max-epsilon E --delta D)"
            )

    @classmethod
    def from_context(cls, node_config: Mapping[str, Any], run: RunConfig) -> SiteConfig:
        """A real site's node config; in simulation, the virtual site of its partition id."""
        if "data-dir" in node_config or not run.sim_sites_dir:
            return cls.from_node_config(node_config)
        pid = _get(node_config, "partition-id", int)
        folder = sim_site_dir(Path(run.sim_sites_dir), pid)
        return cls(
            site_name=folder.name,
            data_dir=folder / "data",
            state_dir=folder / "state",
            cache_dir=SitePaths(folder / "state").cache,
            simulated=True,
        )

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any]) -> SiteConfig:
        """Parse the node config written by ``idc-client start``."""
        name = _get(cfg, "site-name", str)
        _check(bool(name.strip()), "site-name", name, "a non-empty name")
        state = Path(_get(cfg, "state-dir", str))
        max_eps = _get(cfg, "max-epsilon", float, math.inf) if "max-epsilon" in cfg else math.inf
        _check(max_eps > 0, "max-epsilon", max_eps, "> 0")
        delta = _get(cfg, "delta", float, 0.0) if "delta" in cfg else 0.0
        _check(0 <= delta < 1, "delta", delta, "in [0, 1)")
        _check(delta > 0 or max_eps == math.inf, "delta", delta, "> 0 with 'max-epsilon'")
        small = _get(cfg, "small-policy", str, "pad") if "small-policy" in cfg else "pad"
        _check(small in get_args(SmallPolicy), "small-policy", small, "'pad' or 'skip'")
        cache = _get(cfg, "cache-dir", str) if "cache-dir" in cfg else None
        evals = _get(cfg, "max-evaluations", int, DEFAULT_MAX_EVALUATIONS)
        _check(evals >= 1, "max-evaluations", evals, ">= 1")
        return cls(
            site_name=name,
            data_dir=Path(_get(cfg, "data-dir", str)),
            state_dir=state,
            cache_dir=Path(cache) if cache else SitePaths(state).cache,
            max_epsilon=max_eps,
            delta=delta,
            small_policy=small,  # type: ignore[arg-type]  # checked just above
            max_evaluations=evals,
        )
