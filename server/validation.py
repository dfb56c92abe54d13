"""Checks on one site's reply before anything else reads it: pure functions, no state.

A reply comes from another party, so each check assumes the worst and raises
:class:`Rejected` naming what is wrong; the strategy rejects that one reply and the run goes
on. The order matters and is the contract:

1. the records: exactly the expected ones, of the expected kinds (a second MetricRecord or
   ArrayRecord, or a missing one, is refused here, before Flower's FedAvg could see it);
2. the SITE facts (name, status, signature) are strings;
3. the packed model (:mod:`common.packing`): one raw-bytes Array and its layout, whose
   names, dtypes and shapes must equal the global model's *before* anything is decoded (a
   layout claiming a huge shape never allocates; the dtype decoded is the global model's,
   never the sender's), then the exact byte count, then finite values;
4. only then the digest (which assumes numeric arrays) and the signature;
5. the metrics through :class:`TrainMetrics`/:class:`EvalMetrics` (expected keys only, finite
   numbers), then the weight bound ``0 < num-examples <= bound``, integral, and an optional
   bound on the update's L2 distance from the global model.

Evaluation replies carry no signature (sites sign weights, not metrics); their author is the
node's authenticated key, checked by the strategy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common import protocol
from common.packing import PackingError, unpack

# The records a reply may hold, by kind of reply.
TRAIN_RECORDS = {
    protocol.ARRAYS: ArrayRecord,
    protocol.LAYOUT: ConfigRecord,
    protocol.METRICS: MetricRecord,
    protocol.SITE: ConfigRecord,
}
REFUSAL_RECORDS = {protocol.METRICS: MetricRecord, protocol.SITE: ConfigRecord}
EVAL_RECORDS = REFUSAL_RECORDS


class Rejected(ValueError):
    """A reply that must not reach the average; ``str()`` is the one-line reason."""


@dataclass(frozen=True)
class SiteFacts:
    """The reply's SITE ConfigRecord: who it claims to be and what it says it did."""

    name: str | None
    status: str
    reason: str
    signature: str | None


def check_records(content: RecordDict, expected: Mapping[str, type]) -> None:
    """The reply must hold exactly ``expected``: these names, each of that record kind."""
    names = set(content.keys())
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        raise Rejected(f"reply records differ: missing {missing}, unexpected {extra[:3]}")
    for name, kind in expected.items():
        if not isinstance(content[name], kind):
            got = type(content[name]).__name__
            raise Rejected(f"reply record {name!r} is a {got}, expected a {kind.__name__}")


def site_facts(content: RecordDict) -> SiteFacts:
    """Read the SITE record; every value used must be a string."""
    meta = content.get(protocol.SITE)
    if not isinstance(meta, ConfigRecord):
        raise Rejected(f"reply has no {protocol.SITE!r} ConfigRecord")

    def text(key: str, default: str | None) -> str | None:
        value = meta.get(key, default)
        if value is not None and not isinstance(value, str):
            raise Rejected(f"reply field {key!r} must be text, got {type(value).__name__}")
        return value

    return SiteFacts(
        name=text(protocol.SITE_NAME, None),
        status=text(protocol.STATUS, protocol.OK) or protocol.OK,
        reason=(text(protocol.REASON, "") or "")[:500],
        signature=text(protocol.SIGNATURE, None),
    )


def decode_arrays(
    content: RecordDict, reference: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Unpack an update (:mod:`common.packing`) strictly against the global model.

    Raises
    ------
    Rejected
        Naming the first array that does not fit the global model or does not decode.
    """
    try:
        return unpack(
            content.array_records[protocol.ARRAYS],
            content.config_records[protocol.LAYOUT],
            reference,
        )
    except PackingError as exc:
        raise Rejected(str(exc)) from None


def train_metrics(record: MetricRecord) -> protocol.TrainMetrics:
    """Parse a training reply's metrics strictly (expected keys, finite numbers)."""
    try:
        metrics = protocol.TrainMetrics.from_record(record)
    except ValueError as exc:
        raise Rejected(f"training metrics: {exc}") from None
    if metrics.uniform_weight != 1.0:
        # Under central DP FedAvg weighs by this key; a site may not raise its own weight.
        raise Rejected(f"{protocol.UNIFORM_WEIGHT} must be 1, got {metrics.uniform_weight}")
    return metrics


def eval_metrics(record: MetricRecord) -> protocol.EvalMetrics:
    """Parse an evaluation reply's metrics strictly (every key, finite numbers)."""
    try:
        return protocol.EvalMetrics.from_record(record)
    except ValueError as exc:
        raise Rejected(f"evaluation metrics: {exc}") from None


def check_weight(num_examples: float, bound: float | None, where: str) -> None:
    """A reply's weight: a whole number of examples, ``0 < n <= bound`` (None: no bound).

    FedAvg divides by the sum of the weights: a negative count can make that sum tiny and
    the average explode; a huge one lets one site outweigh every other.
    """
    if not (num_examples > 0 and float(num_examples).is_integer()):
        raise Rejected(
            f"{protocol.NUM_EXAMPLES} must be a positive whole number, got {num_examples}"
        )
    if bound is not None and num_examples > bound:
        raise Rejected(f"{protocol.NUM_EXAMPLES} {num_examples:.0f} exceeds {where} ({bound:.0f})")


def update_distance(reference: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over every floating-point array."""
    total = 0.0
    for name, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            diff = update[name].astype(np.float64) - ref.astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)
