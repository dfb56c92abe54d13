"""The coordinator's duties as a strategy wrapper: wait with a deadline, vet, audit, commit.

Flower's FedAvg does the sampling and weighted averaging (optionally inside Flower's own
central-DP wrapper); :class:`CoordinatorStrategy` wraps whichever it is given, the way Flower
adds DP by wrapping. Round numbers continue after a resume, a round waits for the minimum
number of sites with a deadline instead of forever, every reply is checked (names, shapes,
dtypes, finite values, the site's signature) before anything else sees it, and a round is
committed to disk (checkpoint, metrics line, resume state) once its evaluation is in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from common import keys, protocol
from common.audit import UPDATE_RECEIVED, AuditLog, digest_update
from common.config import RunConfig
from common.errors import FederationError
from common.protocol import RoundRow
from common.rundir import RunDir
from server.validation import validate_update

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5


class TooFewSites(FederationError, RuntimeError):
    """Fewer sites than the minimum connected or replied in time; the run stops."""


def _floats(record: MetricRecord | None) -> dict[str, float]:
    """Scalar metrics as plain floats (lists, which we never send, are dropped)."""
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as named numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def fedavg(run: RunConfig) -> FedAvg:
    """Flower's FedAvg with the run's site minimums.

    Weighted by ``num-examples``; under central DP by ``uniform-weight`` (1 per site), since
    the client-level guarantee of Flower's wrappers assumes every site weighs the same.
    """
    weight = protocol.NUM_EXAMPLES if run.central_dp_mode == "none" else protocol.UNIFORM_WEIGHT
    return FedAvg(
        weighted_by_key=weight,
        arrayrecord_key=protocol.ARRAYS,
        fraction_train=run.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=run.min_sites,
        min_evaluate_nodes=run.min_sites,
        min_available_nodes=run.min_sites,
    )


class CoordinatorStrategy(Strategy):
    """Wraps a strategy with the checks and records a coordinator owes."""

    def __init__(
        self,
        inner: Strategy,
        run: RunConfig,
        run_dir: RunDir,
        run_id: str,
        offset: int,
        site_keys: Mapping[str, keys.PublicKey],
        audit: AuditLog | None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.run, self.run_dir, self.run_id, self.offset = run, run_dir, run_id, offset
        self.site_keys, self.audit = dict(site_keys), audit
        self.node_names: dict[int, str] = {}
        self.global_arrays: dict[str, np.ndarray] = {}
        self.current: RoundRow | None = None
        self.state_extra: dict[str, Any] = {"run_id": run_id}
        self.sampled: set[int] = set()
        self.round_started = time.monotonic()

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    # -- helpers --------------------------------------------------------------------------
    def _audit(self, action: str, obj: str, outcome: str, details: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append(action, obj, outcome, details)

    def _wait_for_sites(self, grid: Grid, server_round: int) -> None:
        deadline = time.monotonic() + self.run.round_timeout
        while (n := len(list(grid.get_node_ids()))) < self.run.min_sites:
            if time.monotonic() > deadline:
                raise TooFewSites(
                    f"round {server_round}: only {n} site(s) connected, {self.run.min_sites} "
                    f"needed (min-sites); waited {self.run.round_timeout:.0f} s"
                )
            time.sleep(POLL_SECONDS)

    def _node(self, msg: Message) -> str:
        node = msg.metadata.src_node_id
        return self.node_names.get(node, f"node {node}")

    # -- training -------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Wait (with a deadline) for enough sites, then send the global model."""
        r = server_round + self.offset
        self._wait_for_sites(grid, r)
        # The SuperLink knows which registered key (and name) each node authenticated with.
        self.node_names.update({n.node_id: n.name for n in grid.get_nodes() if n.name})
        self.global_arrays = to_numpy(arrays)
        self.current = RoundRow(r)
        self.round_started = time.monotonic()
        messages = list(self.inner.configure_train(r, arrays, config, grid))
        self.sampled = {m.metadata.dst_node_id for m in messages}
        selected = sorted(self.node_names.get(n, f"node {n}") for n in self.sampled)
        self._audit(
            "round.started",
            f"round {r}",
            "ok",
            {
                "run_id": self.run_id,
                "round": r,
                "sites_selected": selected,
                "global_digest": digest_update(self.global_arrays),
            },
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Vet every reply, average the accepted ones, refuse a round below the minimum."""
        r = server_round + self.offset
        assert self.current is not None  # configure_train always runs first
        replies = list(replies)
        accepted = [msg for msg in replies if self._vet(r, msg)]
        self._record_silent(r, self.sampled - {m.metadata.src_node_id for m in replies})
        if len(accepted) < self.run.min_sites:
            self._audit(
                "round.failed",
                f"round {r}",
                "failed",
                {"run_id": self.run_id, "round": r, "accepted": len(accepted)},
            )
            raise TooFewSites(
                f"round {r}: {len(accepted)} usable update(s), {self.run.min_sites} needed; "
                f"failures: {self.current.failures}; rejected: {self.current.rejected}"
            )
        agg, metrics = self.inner.aggregate_train(r, accepted)
        if agg is None:
            raise TooFewSites(f"round {r}: aggregation produced no model")
        self.current.train = _floats(metrics)
        self._audit(
            "aggregate.computed",
            f"round {r}",
            "ok",
            {
                "run_id": self.run_id,
                "round": r,
                "sites": len(accepted),
                "digest": digest_update(to_numpy(agg)),
            },
        )
        return agg, metrics

    def _record_silent(self, r: int, nodes: set[int]) -> None:
        assert self.current is not None
        for node in sorted(nodes):
            name = self.node_names.get(node, f"node {node}")
            reason = f"no reply within {self.run.round_timeout:.0f} s (disconnected or timed out)"
            self.current.failures.append({"site": name, "reason": reason})
            log.warning("round %d: %s failed: %s", r, name, reason)
            self._audit("site.failed", name, "error", {"round": r, "reason": reason})

    def _vet(self, r: int, msg: Message) -> bool:
        assert self.current is not None
        if msg.has_error():
            reason = msg.error.reason
            self.current.failures.append({"site": self._node(msg), "reason": reason})
            log.warning("round %d: %s failed: %s", r, self._node(msg), reason)
            self._audit("site.failed", self._node(msg), "error", {"round": r, "reason": reason})
            return False
        meta = msg.content.config_records.get(protocol.SITE)
        claimed = (
            str(meta[protocol.SITE_NAME])
            if meta is not None and protocol.SITE_NAME in meta
            else None
        )
        name = self.node_names.setdefault(msg.metadata.src_node_id, claimed or self._node(msg))
        if claimed is not None and claimed != name:
            reason = f"reply claims to be {claimed!r} but came from registered node {name!r}"
            self.current.rejected.append({"site": name, "reason": reason, "kind": "invalid"})
            self._audit(
                UPDATE_RECEIVED,
                name,
                "rejected",
                {
                    "run_id": self.run_id,
                    "round": r,
                    "digest": "",
                    "signature_valid": False,
                    "accepted": False,
                    "reason": reason,
                },
            )
            return False
        metrics = _floats(msg.content.metric_records.get(protocol.METRICS))
        eps: dict[str, Any] = {
            k: metrics[k] for k in (protocol.EPSILON_ROUND, protocol.EPSILON_TOTAL) if k in metrics
        }
        if meta is not None and meta.get(protocol.STATUS) == protocol.REFUSED:
            row = {"site": name, "reason": str(meta.get(protocol.REASON)), **eps}
            self.current.rejected.append({**row, "kind": "refused"})
            log.warning("round %d: %s refused to train: %s", r, name, row["reason"])
            self._audit(
                "site.refused",
                name,
                "refused",
                {"run_id": self.run_id, "round": r, "reason": row["reason"]},
            )
            return False
        reason, digest, sig_ok = self._check_reply(r, msg, name, meta)
        self._audit(
            UPDATE_RECEIVED,
            name,
            "accepted" if reason is None else "rejected",
            {
                "run_id": self.run_id,
                "round": r,
                "digest": digest,
                "signature_valid": sig_ok,
                "accepted": reason is None,
                "reason": reason or "",
                "num_examples": int(metrics.get(protocol.NUM_EXAMPLES, 0)),
                **eps,
            },
        )
        if reason is not None:
            self.current.rejected.append({"site": name, "reason": reason, "kind": "invalid"})
            log.warning("round %d: update from %s rejected: %s", r, name, reason)
            return False
        self.current.sites[name] = metrics
        return True

    def _check_reply(
        self, r: int, msg: Message, name: str, meta: ConfigRecord | None
    ) -> tuple[str | None, str, bool]:
        records = list(msg.content.array_records.values())
        if len(records) != 1:
            return f"expected one ArrayRecord, got {len(records)}", "", False
        arrays = to_numpy(records[0])
        digest = digest_update(arrays)
        reason = validate_update(self.global_arrays, arrays)
        sig_ok = False
        key = self.site_keys.get(name)
        if meta is not None and key is not None and protocol.SIGNATURE in meta:
            sig_ok = keys.verify_update(key, self.run_id, r, digest, str(meta[protocol.SIGNATURE]))
        if reason is None and key is None:
            reason = f"site {name!r} is not registered with this coordinator"
        elif reason is None and not sig_ok:
            reason = "update signature missing or invalid for this site's registered key"
        return reason, digest, sig_ok

    # -- evaluation and commit ------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the new global model to every site for evaluation on its held-out patients."""
        self.global_arrays = to_numpy(arrays)
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record per-site evaluations, then commit the round to disk."""
        r = server_round + self.offset
        assert self.current is not None
        good = []
        for msg in replies:
            if msg.has_error():
                self.current.failures.append(
                    {"site": self._node(msg), "phase": "evaluate", "reason": msg.error.reason}
                )
                continue
            good.append(msg)
            name = self._node(msg)
            self.current.evaluations[name] = _floats(
                msg.content.metric_records.get(protocol.METRICS)
            )
        metrics = self.inner.aggregate_evaluate(r, good) if good else None
        self.current.evaluate = _floats(metrics)
        self._commit(r)
        return metrics

    def _commit(self, r: int) -> None:
        assert self.current is not None
        cur = self.current
        cur.seconds = round(time.monotonic() - self.round_started, 3)
        self.run_dir.commit_round(r, cur.to_row(), self.global_arrays, self.state_extra)
        digest = digest_update(self.global_arrays)
        self._audit(
            "checkpoint.written",
            f"round {r}",
            "ok",
            {"run_id": self.run_id, "round": r, "digest": digest},
        )
        log.info("round %d committed: %s", r, {k: round(v, 4) for k, v in cur.evaluate.items()})
