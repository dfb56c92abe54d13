"""A site's training round, plain or DP-SGD, with the site's own privacy budget enforced.

The site's cap (``--max-epsilon``) and delta win over anything the coordinator asks: before a
DP round trains, the epsilon it would add to the data set's lifetime total is computed from
the site's ledger; past the cap the round is refused, recorded, and no weights leave.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from client.site import local_train, train_metrics
from common.audit import AuditLog
from common.config import RunConfig
from common.ledger import LedgerEntry, PrivacyLedger, epsilon_from_history
from common.model import build_model
from common.paths import SitePaths
from common.privacy import (
    BudgetExceeded,
    DPConfig,
    check_budget,
    check_delta,
    make_private,
    plan_round,
    release,
    steps_taken,
)
from common.protocol import NO_CAP, OK, REFUSED, TrainMetrics
from common.site_data import Site, model_arrays, set_weights
from common.training import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """What a round produced: weights (None when refused) and metrics for the reply."""

    status: str  # protocol.OK or protocol.REFUSED
    reason: str
    metrics: TrainMetrics
    arrays: dict[str, np.ndarray] | None


def train_round(
    site: Site,
    run: RunConfig,
    arrays: Mapping[str, np.ndarray],
    run_id: str,
    server_round: int,
    audit: AuditLog,
) -> RoundOutcome:
    """Train one round as the run asks, privately when DP is on."""
    if not run.dp_enabled:
        new, metrics = local_train(site, run, arrays, server_round)
        return RoundOutcome(OK, "", metrics, new)
    return _private_round(site, run, arrays, run_id, server_round, audit)


def site_delta(site: Site, run: RunConfig) -> float:
    """The site's own delta when it set one, else the run's; must be below 1/patches."""
    delta = site.config.delta or run.dp_delta
    check_delta(delta, len(site.split.train))
    return delta


def _private_round(
    site: Site,
    run: RunConfig,
    arrays: Mapping[str, np.ndarray],
    run_id: str,
    server_round: int,
    audit: AuditLog,
) -> RoundOutcome:
    cfg = site.config
    delta = site_delta(site, run)
    ledger = PrivacyLedger(SitePaths(cfg.state_dir).ledger)
    fp = site.patches.fingerprint
    seed = run.seed + server_round
    model = build_model("group", seed=run.seed)
    set_weights(model, arrays)
    loader = site.loader("train", run.batch_size, seed, train=True)
    dp = DPConfig(
        noise_multiplier=run.dp_noise_multiplier or None,
        target_epsilon=None if run.dp_noise_multiplier else run.dp_target_epsilon,
        max_grad_norm=run.dp_max_grad_norm,
        delta=delta,
        accountant=run.dp_accountant,
    )
    plan = plan_round(dp, loader, run.local_epochs)
    spent = ledger.epsilon(fp, delta, dp.accountant)
    try:
        if math.isfinite(cfg.max_epsilon):
            check_budget(
                ledger,
                fp,
                cfg.max_epsilon,
                delta,
                plan.noise_multiplier,
                plan.sample_rate,
                plan.steps,
                dp.accountant,
            )
    except BudgetExceeded as exc:
        ledger.record_refusal(fp, run_id, server_round, str(exc))
        audit.append(
            "privacy.refused",
            run_id,
            "refused",
            {"round": server_round, "fingerprint": fp, "reason": str(exc)},
        )
        log.warning("round %d refused: %s", server_round, exc)
        refusal = TrainMetrics(len(site.split.train), **_dp_fields(0.0, spent, cfg.max_epsilon))
        return RoundOutcome(REFUSED, str(exc), refusal, None)
    optimizer = torch.optim.Adam(model.parameters(), lr=run.learning_rate)
    private = make_private(model, optimizer, loader, dp, run.local_epochs, seed=None)
    try:
        cfg_train = TrainConfig(epochs=run.local_epochs, lr=run.learning_rate, patience=None)
        result = train(private.model, private.loader, cfg_train, optimizer=private.optimizer)
        steps = steps_taken(private)
    finally:
        release(private)
    entry = LedgerEntry(
        run_id, server_round, private.noise_multiplier, private.sample_rate, steps, delta
    )
    ledger.record(fp, entry)  # before any weight leaves the site
    total = ledger.epsilon(fp, delta, dp.accountant)
    this_round = epsilon_from_history(
        [(entry.noise_multiplier, entry.sample_rate, entry.steps)], delta, dp.accountant
    )
    audit.append(
        "privacy.spent",
        run_id,
        "ok",
        {
            "round": server_round,
            "fingerprint": fp,
            "epsilon_round": this_round,
            "epsilon_total": total,
            "delta": delta,
            "steps": steps,
            "noise_multiplier": private.noise_multiplier,
        },
    )
    metrics = replace(
        train_metrics(site, run, model, result, seed),
        **_dp_fields(this_round, total, cfg.max_epsilon),
    )
    return RoundOutcome(OK, "", metrics, model_arrays(model))


def _dp_fields(eps_round: float, eps_total: float, cap: float) -> dict[str, float]:
    return {
        "dp": 1.0,
        "epsilon_round": float(eps_round),
        "epsilon_total": float(eps_total),
        "epsilon_cap": float(cap) if math.isfinite(cap) else NO_CAP,
    }
