"""The coordinator's duties as a strategy wrapper: wait with a deadline, vet, audit, commit.

Flower's strategy does the sampling and aggregation (FedAvg or the run's choice of FedProx,
FedAdam, FedAvgM: :mod:`server.aggregators`; optionally inside Flower's own central-DP
wrapper); :class:`CoordinatorStrategy` wraps whichever it is given, the way Flower adds DP by
wrapping, and keeps the aggregate in the global model's dtypes. Round numbers continue after
a resume; a round waits for the minimum number of *registered* sites with a deadline instead
of forever; the strategy samples from a view of the grid that holds only nodes whose key is
registered (:mod:`server.sitegrid`), for training and evaluation alike; every reply,
training or evaluation, is vetted on its own (:mod:`server.vetting`) and only rebuilt
canonical replies reach the strategy; and a round is committed to disk (checkpoint, metrics
line, resume state) once its evaluation is in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from common import keys, protocol
from common.audit import AuditLog
from common.config import RunConfig
from common.digests import digest_update
from common.errors import FederationError
from common.protocol import RoundRow
from common.rundir import RunDir
from server.aggregators import base_kwargs
from server.sitegrid import SiteGrid
from server.vetting import Vetter, same_metric_keys
from server.wire import floats, naming_held, packed, to_numpy

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5


class TooFewSites(FederationError, RuntimeError):
    """Fewer sites than the minimum connected or replied in time; the run stops."""


def fedavg(run: RunConfig) -> FedAvg:
    """Flower's FedAvg with the run's site minimums and weighting (:mod:`server.aggregators`)."""
    return FedAvg(**base_kwargs(run))


class CoordinatorStrategy(Strategy):
    """Wraps a strategy with the checks and records a coordinator owes.

    The wrapped strategy sees a :class:`SiteGrid` (registered nodes only) for sampling, and
    only replies that :class:`Vetter` accepted, rebuilt to their canonical records; the
    messages it configures leave with their model packed (:func:`packed`).
    """

    def __init__(
        self,
        inner: Strategy,
        run: RunConfig,
        run_dir: RunDir,
        run_id: str,
        offset: int,
        site_keys: Mapping[str, keys.PublicKey],
        audit: AuditLog | None,
        declared_patches: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.run, self.run_dir, self.run_id, self.offset = run, run_dir, run_id, offset
        self.audit = audit
        # Flower's simulation engine has no node keys: nodes there are the coordinator's own.
        self.vetter = Vetter(
            run, run_id, site_keys, declared_patches or {}, audit, keyless=bool(run.sim_sites_dir)
        )
        self.by_fingerprint = {keys.public_key_fingerprint(k): n for n, k in site_keys.items()}
        self.view: SiteGrid | None = None
        self.global_arrays: dict[str, np.ndarray] = {}
        self.global_digest = ""  # digest_update(global_arrays), computed once per model
        self.current: RoundRow | None = None
        self.state_extra: dict[str, Any] = {"run_id": run_id}
        self.sampled: set[int] = set()
        self.round_started = time.monotonic()
        # node -> digest of the model it evaluated and keeps (protocol.HOLDS): the next train
        # instruction to it names that model instead of carrying it again
        self.holding: dict[int, str] = {}

    @property
    def node_names(self) -> dict[int, str]:
        """Node id -> registered site name, for the nodes seen so far."""
        return self.vetter.node_names

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    # -- helpers --------------------------------------------------------------------------
    def _audit(self, action: str, obj: str, outcome: str, details: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append(action, obj, outcome, details)

    def sites_of(self, grid: Grid) -> SiteGrid:
        """The registered-nodes view of ``grid`` (made once per grid)."""
        if self.view is None or self.view.grid is not grid:
            self.view = SiteGrid(grid, self.by_fingerprint, keyless=self.vetter.keyless)
        return self.view

    def _wait_for_sites(self, view: SiteGrid, server_round: int) -> dict[int, str]:
        deadline = time.monotonic() + self.run.round_timeout
        while len(sites := view.sites()) < self.run.min_sites:
            if time.monotonic() > deadline:
                strangers = sorted(set(view.strangers.values()))
                ignored = (
                    f"; {len(view.strangers)} connected node(s) hold no registered key and are "
                    f"ignored (names {strangers[:5]})"
                    if view.strangers
                    else ""
                )
                raise TooFewSites(
                    f"round {server_round}: only {len(sites)} registered site(s) connected, "
                    f"{self.run.min_sites} needed (min-sites); waited "
                    f"{self.run.round_timeout:.0f} s{ignored}"
                )
            time.sleep(POLL_SECONDS)
        return sites

    # -- training -------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Wait (with a deadline) for enough registered sites, then send them the model."""
        r = server_round + self.offset
        view = self.sites_of(grid)
        sites = self._wait_for_sites(view, r)
        if not self.vetter.keyless:  # a node's name is its key's name in the registry
            self.node_names.update(sites)
        self.global_arrays = to_numpy(arrays)
        self.global_digest = digest = digest_update(self.global_arrays)
        self.current = RoundRow(r)
        self.round_started = time.monotonic()
        messages = packed(self.inner.configure_train(r, arrays, config, view))
        held = {n for n, d in self.holding.items() if d == digest}
        messages = [
            naming_held(m, digest) if m.metadata.dst_node_id in held else m for m in messages
        ]
        self.holding = {}  # a claim serves one train instruction
        self.sampled = {m.metadata.dst_node_id for m in messages}
        selected = sorted(self.vetter.name_of(n) for n in self.sampled)
        self._audit(
            "round.started",
            f"round {r}",
            "ok",
            {
                "run_id": self.run_id,
                "round": r,
                "sites_selected": selected,
                "global_digest": digest,
                "sites_holding_it": sorted(self.vetter.name_of(n) for n in self.sampled & held),
            },
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Vet every reply on its own, average the accepted ones, refuse a thin round."""
        r = server_round + self.offset
        assert self.current is not None  # configure_train always runs first
        replies = list(replies)
        accepted = [
            ok
            for msg in replies
            if (ok := self.vetter.train(r, msg, self.global_arrays, self.current)) is not None
        ]
        accepted.sort(key=self._site_of)  # replies arrive in any order; float sums do not commute
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
        agg, metrics = self.inner.aggregate_train(r, same_metric_keys(accepted))
        if agg is None:
            raise TooFewSites(f"round {r}: aggregation produced no model")
        agg = self._as_global_dtypes(agg)
        self.current.train = floats(metrics)
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

    def _as_global_dtypes(self, agg: ArrayRecord) -> ArrayRecord:
        """``agg`` in the global model's dtypes (FedAdam's float64 step would change them).

        The sites reply in the dtypes they were sent, and vetting refuses any other: a model
        that drifted to float64 would have every later reply rejected.
        """
        arrays = to_numpy(agg)
        if all(arrays[k].dtype == v.dtype for k, v in self.global_arrays.items() if k in arrays):
            return agg
        cast = {k: v.astype(self.global_arrays[k].dtype) for k, v in arrays.items()}
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in cast.items()})

    def _site_of(self, msg: Message) -> str:
        return self.vetter.name_of(msg.metadata.src_node_id)

    def _record_silent(self, r: int, nodes: set[int]) -> None:
        assert self.current is not None
        waited = time.monotonic() - self.round_started
        named = {f["site"] for f in self.current.failures}
        for node in sorted(nodes):
            name = self.vetter.name_of(node)
            if name in named:  # its error reply is recorded already: one line per site
                continue
            reason = (
                f"no reply after {waited:.0f} s (disconnected or timed out); the run goes on "
                "without it, and `idc-server run --resume` continues a stopped run"
            )
            self.current.failures.append({"site": name, "reason": reason})
            log.warning("round %d: %s failed: %s", r, name, reason)
            self._audit("site.failed", name, "error", {"round": r, "reason": reason})

    # -- evaluation and commit ------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the new global model to every registered site for evaluation."""
        self.global_arrays = to_numpy(arrays)
        self.global_digest = digest_update(self.global_arrays)
        view = self.sites_of(grid)
        return packed(
            self.inner.configure_evaluate(server_round + self.offset, arrays, config, view)
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Vet and record per-site evaluations, average the good ones, commit the round."""
        r = server_round + self.offset
        assert self.current is not None
        good, digest = [], self.global_digest
        for msg in replies:
            if (ok := self.vetter.evaluate(r, msg, self.current)) is None:
                continue
            good.append(ok)
            if msg.content.config_records[protocol.SITE].get(protocol.HOLDS) == digest:
                self.holding[msg.metadata.src_node_id] = digest
        good.sort(key=self._site_of)
        metrics = self.inner.aggregate_evaluate(r, good) if good else None
        self.current.evaluate = floats(metrics)
        self._commit(r)
        return metrics

    def _commit(self, r: int) -> None:
        assert self.current is not None
        cur = self.current
        cur.seconds = round(time.monotonic() - self.round_started, 3)
        self.run_dir.commit_round(r, cur.to_row(), self.global_arrays, self.state_extra)
        digest = self.global_digest
        self._audit(
            "checkpoint.written",
            f"round {r}",
            "ok",
            {"run_id": self.run_id, "round": r, "digest": digest},
        )
        log.info("round %d committed: %s", r, {k: round(v, 4) for k, v in cur.evaluate.items()})
