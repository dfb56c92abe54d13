"""The wire contract between ServerApp and ClientApp, and the rounds.jsonl row: named once.

A training or evaluation instruction carries the global model in the ArrayRecord ``ARRAYS``
and Flower's ConfigRecord ``CONFIG`` (with ``SERVER_ROUND``). A reply carries its weights in
``ARRAYS`` (training only, and only when the site accepted the round), its numbers in the
MetricRecord ``METRICS`` and facts about itself in the ConfigRecord ``SITE``.

Replies come from other parties: :meth:`TrainMetrics.from_record` and
:meth:`EvalMetrics.from_record` keep exactly the expected keys, require finite numbers (NaN
only for an undefined AUC) and raise :class:`ValueError` naming the bad key otherwise, so one
odd reply is rejected on its own instead of reaching the average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Record keys (``arrayrecord_key`` and ``weighted_by_key`` of Flower's FedAvg take these).
ARRAYS = "arrays"
METRICS = "metrics"
SITE = "site"
CONFIG = "config"
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # in CONFIG, put there by Flower's FedProx.configure_train

# Keys of the reply's SITE ConfigRecord.
SITE_NAME = "site"
STATUS = "status"
REASON = "reason"
DIGEST = "digest"
SIGNATURE = "signature"

# Values of STATUS.
OK = "ok"
REFUSED = "refused"

# Metric names: what FedAvg weights by.
NUM_EXAMPLES = "num-examples"
UNIFORM_WEIGHT = "uniform-weight"  # 1 per site: the weight under client-level (central) DP
EPSILON_ROUND = "epsilon-round"
EPSILON_TOTAL = "epsilon-total"
NO_CAP = -1.0  # epsilon-cap of a site that set no cap


def _finite(
    record: Mapping[str, Any], key: str, required: bool, allow_nan: bool = False
) -> float | None:
    if key not in record:
        if required:
            raise ValueError(f"metric {key!r} is missing")
        return None
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) and not (allow_nan and math.isnan(value)):
        raise ValueError(f"metric {key!r} must be finite, got {value!r}")
    return float(value)


def _wire(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class TrainMetrics:
    """The numbers of a training reply; the optional ones are absent in a refusal."""

    num_examples: float
    dp: float = 0.0  # 1.0 when the round ran DP-SGD
    epsilon_round: float = 0.0
    epsilon_total: float = 0.0
    epsilon_cap: float = NO_CAP
    uniform_weight: float = 1.0
    train_loss: float | None = None
    train_accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_balanced_accuracy: float | None = None

    def to_record(self) -> dict[str, float]:
        """The MetricRecord content (kebab-case keys; absent values left out)."""
        return {_wire(k): float(v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainMetrics:
        """Expected keys only, finite numbers; ValueError names the first bad key."""
        values = {}
        for f in fields(cls):
            value = _finite(record, _wire(f.name), required=f.name == "num_examples")
            if value is not None:
                values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class EvalMetrics:
    """The numbers of an evaluation reply (the site's held-out test patients).

    ``auc`` is NaN when a site's test patients hold one class only (ROC AUC is undefined).
    """

    num_examples: float
    loss: float
    accuracy: float
    balanced_accuracy: float
    f1: float
    auc: float

    def to_record(self) -> dict[str, float]:
        """The MetricRecord content."""
        return {_wire(k): float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvalMetrics:
        """Expected keys only, all required, finite numbers; ValueError names the bad key."""
        values = {
            f.name: _finite(record, _wire(f.name), required=True, allow_nan=f.name == "auc")
            for f in fields(cls)
        }
        return cls(**values)  # type: ignore[arg-type]  # required=True never gives None


@dataclass
class RoundRow:
    """One line of a run's rounds.jsonl: what the coordinator saw in one round."""

    round: int
    train: dict[str, float] = field(default_factory=dict)  # aggregated training metrics
    evaluate: dict[str, float] = field(default_factory=dict)  # aggregated evaluation
    sites: dict[str, dict[str, float]] = field(default_factory=dict)  # accepted updates
    evaluations: dict[str, dict[str, float]] = field(default_factory=dict)  # per site
    rejected: list[dict[str, Any]] = field(default_factory=list)  # site, reason, kind
    failures: list[dict[str, Any]] = field(default_factory=list)  # site, reason[, phase]
    seconds: float = 0.0

    def to_row(self) -> dict[str, Any]:
        """The JSON object written as one line."""
        return asdict(self)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RoundRow:
        """Read a line back (unknown keys from older versions are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    def epsilon_by_site(self) -> dict[str, float]:
        """Each accepted site's total epsilon (0 when it trained without DP)."""
        return {name: float(m.get(EPSILON_TOTAL, 0.0)) for name, m in self.sites.items()}
