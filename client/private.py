"""A site's training round, plain or DP-SGD, with the site's own privacy budget enforced.

What the site sets holds whatever the coordinator asks:

- **A cap means DP-SGD only.** A site started with ``--max-epsilon`` refuses every round
  that is not DP-SGD under that cap (a run with ``dp.enabled=false`` included): no weights
  leave, the refusal goes to the site's audit log and ledger and back to the coordinator.
- **The cap is the site's (epsilon, delta).** Its delta is required with the cap, and the
  cap is checked with the site's accountant (:data:`~common.accounting.SITE_ACCOUNTANT`),
  so the run's ``dp.delta`` and ``dp.accountant`` cannot change what it means.
- **One budget per site.** Every DP round the site trains composes into one ledger history
  whatever its data folder holds (:mod:`common.ledger`); editing the folder opens no fresh
  budget. The round's planned cost is reserved under the ledger's lock before training.
- **A lost ledger stops the site.** When the site's audit log records more spent rounds
  than the ledger holds (deleted, emptied or cut), every round is refused until the ledger
  is restored from a backup (:func:`check_ledger`).
- **The noise is secret.** A real site draws DP-SGD's sampling and noise from the secure
  random source; no run config can seed them (only a virtual site of ``idc-sim`` does:
  :func:`noise_seed`).
- **A DP reply carries no training or validation metrics**: only the patch count and the
  epsilon figures, which :data:`~common.privacy.PRIVACY_UNIT` names as outside the accounting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from client.site import local_config, local_train
from common import accounting
from common.audit import AuditLog
from common.audit_format import rotated_files
from common.config import Accountant, RunConfig, SiteConfig
from common.ledger import LedgerEntry, LedgerError, PrivacyLedger, history
from common.model import build_model
from common.paths import SitePaths
from common.privacy import DPConfig, make_private, plan_round, release, steps_taken
from common.protocol import NO_CAP, OK, REFUSED, TrainMetrics
from common.recipe import Recipe, make_optimizer
from common.site_data import Site, model_arrays, set_weights
from common.training import train

log = logging.getLogger(__name__)
PRIVACY_SPENT = "privacy.spent"
PRIVACY_REFUSED = "privacy.refused"


class RoundRefused(Exception):
    """The site will not train this round; the message is the reason it gives."""


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
    proximal_mu: float = 0.0,
) -> RoundOutcome:
    """Train one round as the run asks, privately when DP is on, refusing what the site bars.

    ``proximal_mu`` (FedProx) is refused with DP-SGD: Opacus would drop the term silently.
    """
    cfg = site.config
    if proximal_mu > 0 and run.dp_enabled:
        raise ValueError(
            f"the round asks for FedProx (proximal-mu {proximal_mu:g}) with DP-SGD; Opacus "
            "builds the update from per-sample gradients only and would drop the proximal term"
        )
    ledger = PrivacyLedger(SitePaths(cfg.state_dir).ledger)
    try:
        check_ledger(cfg.state_dir)
        if capped(cfg) and not run.dp_enabled:
            raise RoundRefused(
                f"this site allows only DP-SGD rounds under its cap (max epsilon "
                f"{cfg.max_epsilon:g} at delta {cfg.delta:g}); the run has dp.enabled=false"
            )
    except LedgerError as exc:  # never write to a ledger that must be restored
        reason = str(exc).replace(str(cfg.state_dir), "SITE_DIR")  # no site paths on the wire
        return _refuse(site, None, audit, run_id, server_round, reason)
    except RoundRefused as exc:
        spent = accounting.epsilon(history(ledger.entries()), cfg.delta)
        return _refuse(site, ledger, audit, run_id, server_round, str(exc), spent)
    if not run.dp_enabled:
        new, metrics = local_train(site, run, arrays, server_round, proximal_mu)
        return RoundOutcome(OK, "", metrics, new)
    return _private_round(site, run, arrays, run_id, server_round, audit, ledger)


def capped(cfg: SiteConfig) -> bool:
    """Whether the site set a privacy cap."""
    return math.isfinite(cfg.max_epsilon)


def site_accounting(cfg: SiteConfig, run: RunConfig) -> tuple[float, Accountant]:
    """The delta and accountant of the site's totals and its cap check.

    A capped site's own delta and :data:`~common.accounting.SITE_ACCOUNTANT`, whatever the
    run says; a site without a cap reports at its delta if it set one, else the run's, with
    the run's accountant (figures for the run's reports; there is no cap to protect).
    """
    if capped(cfg):
        return cfg.delta, accounting.SITE_ACCOUNTANT
    return cfg.delta or run.dp_delta, run.dp_accountant


def spent_rounds_in_audit(state_dir: Path) -> int:
    """How many DP rounds the site's audit log (all its files) says were spent."""
    live = SitePaths(Path(state_dir)).audit
    files = [p for _, p in rotated_files(live)] + ([live] if live.exists() else [])
    count = 0
    for path in files:
        for line in path.read_bytes().splitlines():
            try:
                count += json.loads(line).get("action") == PRIVACY_SPENT
            except (ValueError, AttributeError):  # a torn line: audit verify names it
                continue
    return count


def check_ledger(state_dir: Path) -> None:
    """Raise :class:`LedgerError` unless the ledger holds every round the audit log spent.

    The ledger is the site's budget; deleted, emptied or cut short, it would read as a fresh
    one. The signed audit log, kept beside it, says how many rounds were spent.
    """
    ledger = PrivacyLedger(SitePaths(Path(state_dir)).ledger)
    audited = spent_rounds_in_audit(state_dir)
    held = len(ledger.entries())
    if held < audited:
        what = "is missing" if not ledger.exists() else f"holds {held} round(s)"
        raise LedgerError(
            f"privacy ledger {ledger.path} {what} but the site's audit log records {audited} "
            "DP round(s) spent; restore the ledger from a backup before this site trains again"
        )


def _refuse(
    site: Site,
    ledger: PrivacyLedger | None,
    audit: AuditLog,
    run_id: str,
    server_round: int,
    reason: str,
    spent: float = 0.0,
) -> RoundOutcome:
    if ledger is not None:
        ledger.record_refusal(run_id, server_round, reason)
    audit.append(PRIVACY_REFUSED, run_id, "refused", {"round": server_round, "reason": reason})
    log.warning("round %d refused: %s", server_round, reason)
    metrics = TrainMetrics(len(site.split.train), **_dp_fields(0.0, spent, site.config.max_epsilon))
    return RoundOutcome(REFUSED, reason, metrics, None)


def _dp_config(run: RunConfig, delta: float) -> DPConfig:
    return DPConfig(
        noise_multiplier=run.dp_noise_multiplier or None,
        epsilon_per_round=None if run.dp_noise_multiplier else run.dp_epsilon_per_round,
        max_grad_norm=run.dp_max_grad_norm,
        delta=delta,
        accountant=run.dp_accountant,  # calibrates a per-round target; never the cap
    )


def _reserve(site: Site, ledger: PrivacyLedger, entry: LedgerEntry) -> None:
    """Reserve ``entry`` in the ledger if the site's cap allows it (BudgetExceeded if not)."""
    cfg = site.config

    def within_cap(entries: list[LedgerEntry]) -> None:
        if capped(cfg):
            accounting.check_cap(history(entries), entry.step, cfg.max_epsilon, cfg.delta)

    ledger.reserve(entry, within_cap)


def noise_seed(cfg: SiteConfig, run: RunConfig, server_round: int) -> int | None:
    """Where DP-SGD's sampling and noise come from: None, the secure source, at a real site.

    A simulated site (``cfg.simulated``: a partition of ``idc-sim``) draws them from the run's
    seed, its name and the round, so that the same experiment with the same seed repeats, and
    its seeds are what tell runs apart. A real site's node config always names its data
    folder, which keeps it off this path: no run config can make its noise predictable.
    """
    if not cfg.simulated:
        return None
    text = f"dp-noise/{run.seed}/{cfg.site_name}/{server_round}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def _private_round(
    site: Site,
    run: RunConfig,
    arrays: Mapping[str, np.ndarray],
    run_id: str,
    server_round: int,
    audit: AuditLog,
    ledger: PrivacyLedger,
) -> RoundOutcome:
    cfg = site.config
    delta, accountant = site_accounting(cfg, run)
    accounting.check_delta(delta, len(site.split.train))
    seed = run.seed + server_round
    model = build_model("group", seed=run.seed, kind=run.model)
    set_weights(model, arrays)
    loader = site.loader("train", run.batch_size, seed, train=True)
    dp = _dp_config(run, delta)
    plan = plan_round(dp, loader, run.local_epochs)
    fp = site.patches.fingerprint
    entry = LedgerEntry(
        run_id, server_round, plan.noise_multiplier, plan.sample_rate, plan.steps, delta, fp
    )
    try:
        _reserve(site, ledger, entry)
    except accounting.BudgetExceeded as exc:
        return _refuse(site, ledger, audit, run_id, server_round, str(exc), exc.spent)
    optimizer = make_optimizer(model.parameters(), run.learning_rate, Recipe.from_run(run))
    private = make_private(
        model,
        optimizer,
        loader,
        dp,
        run.local_epochs,
        seed=noise_seed(cfg, run, server_round),
        views=run.dp_augmult,
    )
    try:
        # fp32 and the default layout: Opacus's per-sample gradients are validated there only.
        cfg_train = replace(local_config(run, seed), precision="fp32", channels_last="off")
        train(
            private.model,
            private.loader,
            cfg_train,
            optimizer=private.optimizer,
            criterion=private.criterion,
        )
        steps = steps_taken(private)
    finally:
        release(private)
    done = ledger.settle(entry.id, steps)  # before any weight leaves the site
    total = accounting.epsilon(history(ledger.entries()), delta, accountant)
    this_round = accounting.epsilon([done.step], delta, accountant)
    audit.append(
        PRIVACY_SPENT,
        run_id,
        "ok",
        {
            "round": server_round,
            "fingerprint": fp,
            "epsilon_round": this_round,
            "epsilon_total": total,
            "delta": delta,
            "accountant": accountant,
            "steps": steps,
            "noise_multiplier": done.noise_multiplier,
            "sample_rate": done.sample_rate,
        },
    )
    # Training and validation metrics stay home: they are not covered by the accounting.
    metrics = TrainMetrics(len(site.split.train), **_dp_fields(this_round, total, cfg.max_epsilon))
    return RoundOutcome(OK, "", metrics, model_arrays(model))


def _dp_fields(eps_round: float, eps_total: float, cap: float) -> dict[str, float]:
    return {
        "dp": 1.0,
        "epsilon_round": float(eps_round),
        "epsilon_total": float(eps_total),
        "epsilon_cap": float(cap) if math.isfinite(cap) else NO_CAP,
    }


def ledger_report(
    state_dir: Path, delta: float | None = None, accountant: Accountant = "rdp"
) -> str:
    """The site's ledger as a table: every round of every run (full run ids), running total.

    ``delta`` defaults to the latest round's (a capped site's own delta).
    """
    ledger = PrivacyLedger(SitePaths(Path(state_dir)).ledger)
    entries, refusals = ledger.entries(), ledger.refusals()
    at = delta if delta is not None else (entries[-1].delta if entries else None)
    lines = [f"privacy ledger {ledger.path}: one budget for the whole site"]
    if at is not None:
        lines[0] += f" (epsilon at delta={at:g}, {accountant})"
    width = max([len("run"), *(len(e.run_id) for e in entries)]) + 2  # Flower ids: 20 digits
    lines.append(
        f"{'run':<{width}}{'round':>6}{'noise':>9}{'rate':>9}{'steps':>7}"
        f"{'total eps':>11}  {'status':<9}{'data set':<14}time"
    )
    for i, e in enumerate(entries):
        eps = accounting.epsilon(history(entries[: i + 1]), at, accountant) if at else 0.0
        lines.append(
            f"{e.run_id:<{width}}{e.round:>6}{e.noise_multiplier:>9.4g}{e.sample_rate:>9.4g}"
            f"{e.steps:>7}{eps:>11.4g}  {e.status:<9}{e.fingerprint[:12]:<14}{e.time}"
        )
    if not entries:
        lines.append("(no DP rounds)")
    lines += [f"refused: run {r.run_id} round {r.round} at {r.time}: {r.reason}" for r in refusals]
    return "\n".join(lines)
