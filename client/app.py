"""The ClientApp: Message in, the site's own training or evaluation, Message out (glue only)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.held import HELD_MODEL
from common import protocol
from common.config import RunConfig, SiteConfig
from common.metrics import json_safe
from common.packing import pack, unpack

if TYPE_CHECKING:
    from common.audit import AuditLog
    from common.site_data import Site

log = logging.getLogger(__name__)
app = ClientApp()
HISTOGRAMS_SENT = "histograms.sent"  # a refinement's counts left the site (server.refine)


def _held_digest(msg: Message) -> str | None:
    """The digest of the model a train instruction says this site holds (None: it is sent)."""
    layout = msg.content.config_records.get(protocol.LAYOUT)
    digest = layout.get(protocol.HELD) if layout is not None else None
    if digest is not None and not isinstance(digest, str):
        raise ValueError(f"{protocol.HELD!r} must be text, got {type(digest).__name__}")
    return digest


def _arrays(msg: Message, run: RunConfig, run_id: str) -> dict[str, np.ndarray]:
    """The instruction's model, unpacked strictly against the model this site builds itself.

    A model that differs in any name, dtype or shape, or holds a non-finite float, fails
    here (:class:`common.packing.PackingError`) before it reaches training or evaluation. A
    train instruction that names a model the site holds (:mod:`client.held`) gets that one,
    checked when it arrived for evaluation.
    """
    from common.model import build_model
    from common.site_data import model_arrays

    if (digest := _held_digest(msg)) is not None:
        return HELD_MODEL.take(run_id, digest)
    reference = model_arrays(build_model(run.norm, seed=run.seed, kind=run.model))
    content = msg.content
    return unpack(
        content.array_records[protocol.ARRAYS], content.config_records[protocol.LAYOUT], reference
    )


def _round(msg: Message) -> int:
    return int(msg.content.config_records[protocol.CONFIG][protocol.SERVER_ROUND])  # type: ignore[arg-type]


def _proximal_mu(msg: Message) -> float:
    """FedProx's mu from the train config (0 when absent); anything but a number >= 0 fails."""
    value = msg.content.config_records[protocol.CONFIG].get(protocol.PROXIMAL_MU, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"train config {protocol.PROXIMAL_MU!r} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"train config {protocol.PROXIMAL_MU!r} must be >= 0, got {value!r}")
    return float(value)


class Received(NamedTuple):
    """What both handlers start from.

    The parsed configs, the message's run and round, the site's open audit log (the message
    already recorded in it) and the site's data.
    """

    run: RunConfig
    site_cfg: SiteConfig
    run_id: str
    server_round: int
    audit: AuditLog
    site: Site


@contextmanager
def _received(msg: Message, context: Context, asked: dict) -> Iterator[Received]:
    """Both handlers' preamble: parse the configs, open the audit log, record the message.

    The message (``asked``: what it asks, besides its round) is recorded before the site's
    data is opened; the audit log closes when the block ends, however it ends.
    """
    from client.site import open_audit
    from common.site_data import Site

    run = RunConfig.from_run_config(context.run_config)
    site_cfg = SiteConfig.from_context(context.node_config, run)
    run_id, server_round = str(msg.metadata.run_id), _round(msg)
    with open_audit(site_cfg) as audit:
        audit.append("message.received", run_id, "ok", {"round": server_round, **asked})
        site = Site.open(site_cfg, run.seed)
        yield Received(run, site_cfg, run_id, server_round, audit, site)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this site's own patients and reply with signed weights and metrics."""
    from client.private import train_round
    from client.site import clip_update, sign_and_record

    mu = _proximal_mu(msg)  # a bad mu fails before anything is recorded
    held = _held_digest(msg)
    asked = (
        {"action": "train"}
        | ({"proximal_mu": mu} if mu else {})
        | ({"model_held": held} if held else {})
    )
    with _received(msg, context, asked) as received:
        run, site_cfg, run_id, server_round, audit, site = received
        audit.append(
            "data.read",
            run_id,
            "ok",
            {
                "round": server_round,
                "fingerprint": site.patches.fingerprint,
                "patches": len(site.patches),
                "train_patches": int(len(site.split.train)),
            },
        )
        try:
            global_arrays = _arrays(msg, run, run_id)  # a model that does not fit: failed round
            outcome = train_round(site, run, global_arrays, run_id, server_round, audit, mu)
        except Exception as exc:  # recorded, then the coordinator sees the error reply
            reason = f"{type(exc).__name__}: {exc}"[:500]
            audit.append("round.failed", run_id, "error", {"round": server_round, "reason": reason})
            raise
        meta = ConfigRecord(
            {
                protocol.SITE_NAME: site_cfg.site_name,
                protocol.STATUS: outcome.status,
                protocol.REASON: outcome.reason,
            }
        )
        metrics = MetricRecord(outcome.metrics.to_record())  # type: ignore[arg-type]
        if outcome.arrays is None:  # refused: no weights leave the site
            return Message(
                RecordDict({protocol.METRICS: metrics, protocol.SITE: meta}), reply_to=msg
            )
        clip = msg.content.config_records[protocol.CONFIG].get(KEY_CLIPPING_NORM)
        if clip is not None:  # central DP, client-side clipping: clip before signing
            clip_update(outcome.arrays, global_arrays, float(clip))  # type: ignore[arg-type]
        digest, signature = sign_and_record(audit, site_cfg, run_id, server_round, outcome.arrays)
        meta[protocol.DIGEST], meta[protocol.SIGNATURE] = digest, signature
        arrays, layout = pack(outcome.arrays)
        content = RecordDict(
            {
                protocol.ARRAYS: arrays,
                protocol.LAYOUT: layout,
                protocol.METRICS: metrics,
                protocol.SITE: meta,
            }
        )
        return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this site's held-out test patients (the site's cap a run)."""
    from client.site import claim_evaluation, local_evaluate

    with _received(msg, context, {"action": "evaluate"}) as received:
        run, site_cfg, run_id, server_round, audit, site = received
        claim_evaluation(site_cfg, run_id)  # at most the site's cap a run
        arrays = _arrays(msg, run, run_id)
        metrics = local_evaluate(site, run, arrays).to_record()
        audit.append("metrics.sent", run_id, "ok", json_safe({"round": server_round, **metrics}))  # type: ignore[arg-type]
    meta = ConfigRecord({protocol.SITE_NAME: site_cfg.site_name})
    if (holds := HELD_MODEL.keep(run_id, arrays)) is not None:
        meta[protocol.HOLDS] = holds  # the next train instruction may name it instead
    content = RecordDict(
        {
            protocol.METRICS: MetricRecord(metrics),  # type: ignore[arg-type]
            protocol.SITE: meta,
        }
    )
    return Message(content, reply_to=msg)


@app.query()
def refine(msg: Message, context: Context) -> Message:
    """The final global model's validation histograms on a narrower range (no test data).

    After its last round the coordinator asks once more, on the range where the sites'
    validation patches fell (:mod:`server.refine`), to choose the decision threshold finer
    than :data:`common.threshold.BINS` bins on [0, 1] allow. Counts only, as in evaluation,
    and once a run (:func:`client.site.claim_refinement`).
    """
    from client.site import claim_refinement, refine_histograms
    from common.threshold import check_span

    span = check_span(msg.content.config_records[protocol.CONFIG].get(protocol.VAL_RANGE))
    held = _held_digest(msg)
    asked = {"action": "refine", "range": list(span)} | ({"model_held": held} if held else {})
    with _received(msg, context, asked) as received:
        run, site_cfg, run_id, server_round, audit, site = received
        claim_refinement(site_cfg, run_id)
        arrays = _arrays(msg, run, run_id)
        counts = refine_histograms(site, run, arrays, span).to_record()
        audit.append(HISTOGRAMS_SENT, run_id, "ok", {"round": server_round, **counts})
    meta = ConfigRecord({protocol.SITE_NAME: site_cfg.site_name})
    content = RecordDict({protocol.METRICS: MetricRecord(counts), protocol.SITE: meta})  # type: ignore[arg-type]
    return Message(content, reply_to=msg)
