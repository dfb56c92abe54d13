"""The wire contract between ServerApp and ClientApp, and the rounds.jsonl row: named once.

A training or evaluation instruction carries the global model in the ArrayRecord ``ARRAYS``
with its ConfigRecord ``LAYOUT``, and Flower's ConfigRecord ``CONFIG`` (with
``SERVER_ROUND``). A reply carries its weights in ``ARRAYS`` and ``LAYOUT`` (training only,
and only when the site accepted the round), its numbers in the MetricRecord ``METRICS`` and
facts about itself in the ConfigRecord ``SITE``.

On the wire a model is packed (:mod:`common.packing`): ``ARRAYS`` holds ONE Array named
``PACKED`` (raw little-endian bytes, stype ``RAW_BYTES``) and ``LAYOUT[LAYOUT_KEY]`` a JSON
list of ``[name, dtype, shape, offset]``; each side unpacks it against its own reference
model (a site: the model it builds itself; the coordinator: the global model) and refuses
any difference. Inside the coordinator, Flower's strategy sees the named arrays as always:
packing happens only where a message leaves or arrives. Digests (audit, signatures) cover
the named arrays, never the packed bytes, so they mean what they meant before packing.

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

from common.threshold import check_counts

# Record keys (``arrayrecord_key`` and ``weighted_by_key`` of Flower's FedAvg take these).
ARRAYS = "arrays"
METRICS = "metrics"
SITE = "site"
CONFIG = "config"
LAYOUT = "layout"  # ConfigRecord beside a packed ARRAYS (common.packing)

# Inside a packed model: the one Array's name and stype, and the layout's key in LAYOUT.
PACKED = "packed"
RAW_BYTES = "idc-fl.raw-le"
LAYOUT_KEY = "entries"
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
# An evaluation's validation histograms of P(IDC) (counts only): see common.threshold.
VAL_POSITIVES = "val-positives"
VAL_NEGATIVES = "val-negatives"
NO_CAP = -1.0  # epsilon-cap of a site that set no cap
# Each global model crosses the network once a round. A site whose executor keeps the model it
# last evaluated names it in its evaluation reply (HOLDS, in the SITE record: the model's
# digest); the next train instruction to that site then carries no weights, only that digest
# (HELD, in place of the packed layout), and the site trains from its own copy.
HOLDS = "holds-model"
HELD = "held-model"
# A refinement query (after the last round, :mod:`server.refine`): its CONFIG names the range
# [lo, hi] of P(IDC) the site bins its validation patches on; the reply's METRICS hold only
# VAL_POSITIVES and VAL_NEGATIVES (:class:`Histograms`).
VAL_RANGE = "val-range"


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
    ``val_positives`` / ``val_negatives``: counts of the site's validation patches per P(IDC)
    bin (:mod:`common.threshold`), both or neither (a site of an older idc-fl sends neither).
    """

    num_examples: float
    loss: float
    accuracy: float
    balanced_accuracy: float
    f1: float
    auc: float
    val_positives: tuple[int, ...] | None = None
    val_negatives: tuple[int, ...] | None = None

    def scalars(self) -> dict[str, float]:
        """The numbers without the histograms (what rounds.jsonl and FedAvg's mean take)."""
        return {
            _wire(f.name): float(getattr(self, f.name))
            for f in fields(self)
            if f.name not in _HISTOGRAMS
        }

    def to_record(self) -> dict[str, float | list[int]]:
        """The MetricRecord content (histograms only when present)."""
        record: dict[str, float | list[int]] = dict(self.scalars())
        if self.val_positives is not None and self.val_negatives is not None:
            record[VAL_POSITIVES] = list(self.val_positives)
            record[VAL_NEGATIVES] = list(self.val_negatives)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvalMetrics:
        """Expected keys only, finite numbers, whole counts; ValueError names the bad key."""
        values: dict[str, Any] = {
            f.name: _finite(record, _wire(f.name), required=True, allow_nan=f.name == "auc")
            for f in fields(cls)
            if f.name not in _HISTOGRAMS
        }
        present = [k for k in (VAL_POSITIVES, VAL_NEGATIVES) if k in record]
        if len(present) == 1:
            raise ValueError(f"metric {present[0]!r} comes without its pair")
        for key in present:
            value = record[key]
            if not isinstance(value, list | tuple):
                raise ValueError(f"metric {key!r} must be a list, got {type(value).__name__}")
            values[key.replace("-", "_")] = tuple(check_counts(key, value))
        return cls(**values)


_HISTOGRAMS = ("val_positives", "val_negatives")


@dataclass(frozen=True)
class Histograms:
    """A refinement reply's numbers: the validation histograms on the range it was asked."""

    positives: tuple[int, ...]
    negatives: tuple[int, ...]

    def to_record(self) -> dict[str, list[int]]:
        """The MetricRecord content."""
        return {VAL_POSITIVES: list(self.positives), VAL_NEGATIVES: list(self.negatives)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Histograms:
        """Both histograms as whole counts (other keys ignored); ValueError names the bad key."""
        counts = []
        for key in (VAL_POSITIVES, VAL_NEGATIVES):
            value = record.get(key)
            if not isinstance(value, list | tuple):
                raise ValueError(f"metric {key!r} must be a list of counts, got {value!r:.60}")
            counts.append(tuple(check_counts(key, value)))
        return cls(*counts)


@dataclass
class RoundRow:
    """One line of a run's rounds.jsonl: what the coordinator saw in one round."""

    round: int
    train: dict[str, float] = field(default_factory=dict)  # aggregated training metrics
    evaluate: dict[str, float] = field(default_factory=dict)  # aggregated evaluation
    sites: dict[str, dict[str, float]] = field(default_factory=dict)  # accepted updates
    evaluations: dict[str, dict[str, float]] = field(default_factory=dict)  # per site
    # Validation histograms summed over the sites that sent them: positives, negatives, sites.
    validation: dict[str, Any] = field(default_factory=dict)
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

    def add_validation(self, site: str, metrics: EvalMetrics) -> None:
        """Add one site's validation histograms (if it sent them) to the round's sums."""
        if metrics.val_positives is None or metrics.val_negatives is None:
            return
        v = self.validation
        if not v:
            v.update(positives=[0] * len(metrics.val_positives), sites=[])
            v["negatives"] = [0] * len(metrics.val_negatives)
        v["positives"] = [a + b for a, b in zip(v["positives"], metrics.val_positives, strict=True)]
        v["negatives"] = [a + b for a, b in zip(v["negatives"], metrics.val_negatives, strict=True)]
        v["sites"] = sorted({*v["sites"], site})

    def epsilon_by_site(self) -> dict[str, float]:
        """Each accepted site's total epsilon (0 when it trained without DP)."""
        return {name: float(m.get(EPSILON_TOTAL, 0.0)) for name, m in self.sites.items()}
