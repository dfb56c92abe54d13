"""After the last round: the decision threshold chosen finer, on the range the patches fill.

The sites' validation histograms have :data:`common.threshold.BINS` equal bins on [0, 1]. A
model whose P(IDC) sits in a narrow band (a short federated run, ten small sites averaged, a
noised DP model) fills only a few of them, and the threshold can then only be chosen as
coarsely as those few edges allow: at 10 iid sites on the shared real patches the chosen edge
cost 4 balanced-accuracy points on the test patients against the exact choice. So, once the
rounds are done, the coordinator asks every site that sent the last round's histograms for
the final model's histograms again, still :data:`~common.threshold.BINS` counts, on the range
:func:`common.threshold.zoom_range` reads off the summed counts (around the best coarse edge);
a site that kept the model from its evaluation (:mod:`client.held`) is sent only its digest.

The refined choice replaces the coarse one only if every one of those sites answered with
counts that add up to what it sent for that round (same patches, same model): anything else
keeps the coarse choice, and the record says why. Replies are vetted like any other: the
node must be the registered site it names, the records exactly the expected ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from common import protocol
from common.packing import pack
from common.threshold import Choice, Range, choose_refined, zoom_range
from server import validation as V
from server.strategy import CoordinatorStrategy
from server.vetting import reason_of
from server.wire import naming_held

log = logging.getLogger(__name__)
THRESHOLD_REFINED = "threshold.refined"


def _read(strategy: CoordinatorStrategy, msg: Message) -> tuple[str, protocol.Histograms]:
    """The site that answered and its counts; :class:`server.validation.Rejected` if odd."""
    if msg.has_error():
        raise V.Rejected(f"error reply: {msg.error.reason}")
    name = strategy.vetter.identify(msg.metadata.src_node_id, V.site_facts(msg.content).name)
    V.check_records(msg.content, V.EVAL_RECORDS)
    try:
        return name, protocol.Histograms.from_record(msg.content.metric_records[protocol.METRICS])
    except ValueError as exc:
        raise V.Rejected(f"histograms: {exc}") from None


class Refinement:
    """One refinement query to the sites of round ``last``, and its verdict."""

    def __init__(self, strategy: CoordinatorStrategy, last: int, row: Mapping[str, Any]) -> None:
        self.strategy, self.last = strategy, last
        v = row.get("validation") or {}
        self.coarse: tuple[Sequence[int], Sequence[int]] = (
            v.get("positives") or [],
            v.get("negatives") or [],
        )
        self.sites: list[str] = list(v.get("sites") or [])
        self.span: Range | None = zoom_range(*self.coarse) if self.sites else None

    def run(self, grid: Grid, timeout: float) -> Choice | None:
        """Ask, vet, sum and choose; None (and the reason in the audit log) keeps the coarse."""
        assert self.span is not None
        s = self.strategy
        view = s.sites_of(grid)
        connected = set(view.sites())
        nodes = {
            n: name for n, name in s.node_names.items() if name in self.sites and n in connected
        }
        missing = sorted(set(self.sites) - set(nodes.values()))
        if missing:
            return self._keep(f"site(s) {missing} no longer connected")
        config = ConfigRecord(
            {protocol.SERVER_ROUND: self.last, protocol.VAL_RANGE: list(self.span)}
        )
        arrays, layout = pack(s.global_arrays)
        content: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            protocol.ARRAYS: arrays,
            protocol.LAYOUT: layout,
            protocol.CONFIG: config,
        }
        messages = []
        for n in nodes:
            msg = Message(
                RecordDict(content),
                dst_node_id=n,
                message_type=MessageType.QUERY,
                group_id=str(self.last),
            )
            held = s.holding.get(n) == s.global_digest
            messages.append(naming_held(msg, s.global_digest) if held else msg)
        pos, neg = np.zeros(len(self.coarse[0]), np.int64), np.zeros(len(self.coarse[1]), np.int64)
        answered: set[str] = set()
        for msg in view.send_and_receive(messages, timeout=timeout):
            try:
                name, counts = _read(s, msg)
            except Exception as exc:  # noqa: BLE001 - whatever a reply holds, only it is refused
                return self._keep(f"{s.vetter.name_of(msg.metadata.src_node_id)}: {reason_of(exc)}")
            answered.add(name)
            pos += counts.positives
            neg += counts.negatives
        if answered != set(self.sites):
            return self._keep(
                f"no answer from {sorted(set(self.sites) - answered)} in {timeout:.0f} s"
            )
        if (pos.sum(), neg.sum()) != (sum(self.coarse[0]), sum(self.coarse[1])):
            return self._keep(
                f"the refined counts ({int(pos.sum())} positives, {int(neg.sum())} negatives) "
                f"differ from round {self.last}'s ({sum(self.coarse[0])}, {sum(self.coarse[1])})"
            )
        choice = choose_refined(pos.tolist(), neg.tolist(), self.span, len(answered), self.last)
        if choice is None:
            return self._keep("the refined histograms hold one class or one bin")
        self._audit(
            "ok", {"threshold": choice.threshold, "balanced_accuracy": choice.balanced_accuracy}
        )
        log.info("decision threshold refined: %g (%s)", choice.threshold, choice.source)
        return choice

    def _keep(self, why: str) -> Choice | None:
        log.warning("decision threshold not refined, the coarse choice stands: %s", why)
        self._audit("failed", {"reason": why[:500]})
        return None

    def _audit(self, outcome: str, extra: dict[str, Any]) -> None:
        s = self.strategy
        details = {"run_id": s.run_id, "round": self.last, "range": list(self.span or ())}
        if s.audit is not None:
            s.audit.append(
                THRESHOLD_REFINED,
                f"round {self.last}",
                outcome,
                {**details, "sites": self.sites, **extra},
            )


def refine(
    strategy: CoordinatorStrategy,
    grid: Grid,
    last: int,
    row: Mapping[str, Any] | None,
    timeout: float,
) -> Choice | None:
    """The refined threshold for the final model of round ``last``, or None (coarse stands)."""
    if row is None or strategy.global_digest == "":
        return None
    ref = Refinement(strategy, last, row)
    if ref.span is None:  # one class, or already spread wide: nothing to gain
        return None
    return ref.run(grid, timeout)
