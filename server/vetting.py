"""The coordinator's verdict on each reply: who sent it, whether it may count, and the record.

:class:`Vetter` takes one reply at a time. Everything read from the reply is checked inside
one ``try`` (:mod:`server.validation` says in which order), so an odd reply, whatever it
holds, is rejected on its own (recorded in the round's row and, for training, audited as
``update.received`` ``rejected`` with the reason) while the run goes on. An accepted reply is
*rebuilt*: the message handed to Flower's FedAvg holds exactly the canonical records (the
decoded arrays and the parsed metrics), so nothing a site adds can reach the average or trip
Flower's consistency checks. Audit writes stay outside the ``try``: an audit failure still
stops the run (fail closed).

Identity: a reply's author is the node that sent it, named by the key it authenticated with
(:mod:`server.sitegrid`); the name written inside the reply must agree. In simulation (no node
keys) a node is bound to the registered name its first reply claims, one node per name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message  # a reply with its metadata, new content

from common import keys, protocol
from common.audit import UPDATE_RECEIVED, AuditLog
from common.config import RunConfig
from common.digests import digest_update
from common.protocol import RoundRow
from server import validation as V
from server.validation import Rejected

log = logging.getLogger(__name__)
EVALUATION_REJECTED = "evaluation.rejected"


@dataclass
class _Seen:
    """What is known of a reply so far, for its record if it is rejected part way."""

    name: str
    digest: str = ""
    signature_valid: bool = False


def reason_of(exc: Exception) -> str:
    """One line for the record: our own verdict as is, anything else named as malformed."""
    text = (
        str(exc) if isinstance(exc, Rejected) else f"malformed reply: {type(exc).__name__}: {exc}"
    )
    return text[:500]


class Vetter:
    """Checks replies for one run; ``node_names`` maps node ids to registered site names."""

    def __init__(
        self,
        run: RunConfig,
        run_id: str,
        site_keys: Mapping[str, keys.PublicKey],
        declared_patches: Mapping[str, int],
        audit: AuditLog | None,
        keyless: bool,
    ) -> None:
        self.run, self.run_id, self.audit, self.keyless = run, run_id, audit, keyless
        self.site_keys = dict(site_keys)
        self.declared = dict(declared_patches)
        self.node_names: dict[int, str] = {}

    def name_of(self, node: int) -> str:
        """The site a node is, or ``node N`` for a node that is no site."""
        return self.node_names.get(node, f"node {node}")

    def _audit(self, action: str, obj: str, outcome: str, details: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append(action, obj, outcome, {"run_id": self.run_id, **details})

    # -- identity and bounds ----------------------------------------------------------------
    def identify(self, node: int, claimed: str | None) -> str:
        """The registered site that sent a reply; Rejected if the node is none or lies."""
        if self.keyless and node not in self.node_names:
            if claimed is None or claimed not in self.site_keys:
                raise Rejected(f"site {claimed!r} is not registered with this coordinator")
            other = [n for n, s in self.node_names.items() if s == claimed]
            if other:
                raise Rejected(f"site {claimed!r} already answered from node {other[0]}")
            self.node_names[node] = claimed
        name = self.node_names.get(node)
        if name is None:
            raise Rejected(f"node {node} holds no key registered with this coordinator")
        if claimed is not None and claimed != name:
            raise Rejected(f"reply claims to be {claimed!r} but came from registered node {name!r}")
        return name

    def weight_bound(self, name: str) -> tuple[float | None, str]:
        """The most examples ``name`` may claim, and where that bound comes from."""
        if name in self.declared:
            return float(self.declared[name]), f"the {self.declared[name]} patches it declared"
        cap = self.run.max_examples_per_site
        return (float(cap), "max-examples-per-site") if cap > 0 else (None, "")

    # -- training ---------------------------------------------------------------------------
    def train(
        self, r: int, msg: Message, reference: Mapping[str, np.ndarray], row: RoundRow
    ) -> Message | None:
        """Vet one training reply: the rebuilt message to average, or None (recorded)."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            self._failure(r, self.name_of(node), str(msg.error.reason), row)
            return None
        seen = _Seen(self.name_of(node))
        try:
            metrics, arrays, refusal = self._read_train(r, msg, reference, seen)
        except Exception as exc:  # noqa: BLE001 - whatever a reply holds, only it is rejected
            reason = reason_of(exc)
            self._received(r, seen, reason, {})
            row.rejected.append({"site": seen.name, "reason": reason, "kind": "invalid"})
            log.warning("round %d: update from %s rejected: %s", r, seen.name, reason)
            return None
        if arrays is None:
            self._refused(r, seen.name, refusal, metrics, row)
            return None
        eps = {
            protocol.EPSILON_ROUND: metrics.epsilon_round,
            protocol.EPSILON_TOTAL: metrics.epsilon_total,
        }
        self._received(r, seen, None, {"num_examples": int(metrics.num_examples), **eps})
        row.sites[seen.name] = metrics.to_record()
        canonical = {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        content = RecordDict(
            {
                protocol.ARRAYS: ArrayRecord(canonical),
                protocol.METRICS: MetricRecord(dict(metrics.to_record())),
            }
        )
        return make_message(msg.metadata, content)

    def _read_train(
        self, r: int, msg: Message, reference: Mapping[str, np.ndarray], seen: _Seen
    ) -> tuple[protocol.TrainMetrics, dict[str, np.ndarray] | None, str]:
        """Metrics, then arrays (None for a refusal) and the refusal's reason; raises if odd.

        ``seen`` collects what is known so far (name, digest, signature) for the record.
        """
        content = msg.content
        facts = V.site_facts(content)
        seen.name = self.identify(msg.metadata.src_node_id, facts.name)
        if facts.status == protocol.REFUSED:
            V.check_records(content, V.REFUSAL_RECORDS)
            return V.train_metrics(content.metric_records[protocol.METRICS]), None, facts.reason
        if facts.status != protocol.OK:
            raise Rejected(f"status must be {protocol.OK!r} or {protocol.REFUSED!r}")
        V.check_records(content, V.TRAIN_RECORDS)
        arrays = V.decode_arrays(content, reference)
        seen.digest = digest_update(arrays)
        seen.signature_valid = facts.signature is not None and keys.verify_update(
            self.site_keys[seen.name], self.run_id, r, seen.digest, facts.signature
        )
        if not seen.signature_valid:
            raise Rejected("update signature missing or invalid for this site's registered key")
        metrics = V.train_metrics(content.metric_records[protocol.METRICS])
        self._check_bounds(seen.name, metrics.num_examples, reference, arrays)
        return metrics, arrays, ""

    def _check_bounds(
        self,
        name: str,
        num_examples: float,
        reference: Mapping[str, np.ndarray],
        arrays: Mapping[str, np.ndarray],
    ) -> None:
        bound, where = self.weight_bound(name)
        V.check_weight(num_examples, bound, where)
        limit = self.run.max_update_norm
        if limit > 0 and (dist := V.update_distance(reference, arrays)) > limit:
            raise Rejected(
                f"update is {dist:.4g} from the global model (L2 distance), more than "
                f"max-update-norm {limit:g}"
            )

    def _received(self, r: int, seen: _Seen, reason: str | None, extra: dict[str, Any]) -> None:
        details = {
            "round": r,
            "digest": seen.digest,
            "signature_valid": seen.signature_valid,
            "accepted": reason is None,
            "reason": reason or "",
        }
        outcome = "accepted" if reason is None else "rejected"
        self._audit(UPDATE_RECEIVED, seen.name, outcome, {**details, **extra})

    def _refused(
        self, r: int, name: str, reason: str, metrics: protocol.TrainMetrics, row: RoundRow
    ) -> None:
        eps = {
            protocol.EPSILON_ROUND: metrics.epsilon_round,
            protocol.EPSILON_TOTAL: metrics.epsilon_total,
        }
        row.rejected.append({"site": name, "reason": reason, "kind": "refused", **eps})
        log.warning("round %d: %s refused to train: %s", r, name, reason)
        self._audit("site.refused", name, "refused", {"round": r, "reason": reason})

    def _failure(
        self, r: int, name: str, reason: str, row: RoundRow, phase: str | None = None
    ) -> None:
        row.failures.append({"site": name, "reason": reason, **({"phase": phase} if phase else {})})
        log.warning("round %d: %s failed: %s", r, name, reason)
        if phase is None:
            self._audit("site.failed", name, "error", {"round": r, "reason": reason})

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, r: int, msg: Message, row: RoundRow) -> Message | None:
        """Vet one evaluation reply like a training one; None leaves it out of the average."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            self._failure(r, self.name_of(node), str(msg.error.reason), row, phase="evaluate")
            return None
        name = self.name_of(node)
        try:
            name = self.identify(node, V.site_facts(msg.content).name)
            V.check_records(msg.content, V.EVAL_RECORDS)
            metrics = V.eval_metrics(msg.content.metric_records[protocol.METRICS])
            bound, where = self.weight_bound(name)
            V.check_weight(metrics.num_examples, bound, where)
        except Exception as exc:  # noqa: BLE001 - whatever a reply holds, only it is rejected
            reason = reason_of(exc)
            row.rejected.append(
                {"site": name, "reason": reason, "kind": "invalid", "phase": "evaluate"}
            )
            log.warning("round %d: evaluation from %s rejected: %s", r, name, reason)
            self._audit(EVALUATION_REJECTED, name, "rejected", {"round": r, "reason": reason})
            return None
        record = metrics.scalars()  # histograms are summed here, never averaged by FedAvg
        row.evaluations[name] = record
        row.add_validation(name, metrics)
        if self.run.central_dp_mode != "none":  # FedAvg then weighs evaluations by this key
            record = {**record, protocol.UNIFORM_WEIGHT: 1.0}
        content = RecordDict({protocol.METRICS: MetricRecord(dict(record))})
        return make_message(msg.metadata, content)


def same_metric_keys(replies: list[Message]) -> list[Message]:
    """Keep only the metric keys every reply has: FedAvg refuses records whose keys differ."""
    if not replies:
        return replies
    common = set.intersection(*(set(m.content.metric_records[protocol.METRICS]) for m in replies))
    for msg in replies:
        record = msg.content.metric_records[protocol.METRICS]
        msg.content[protocol.METRICS] = MetricRecord({k: record[k] for k in sorted(common)})
    return replies
