"""``idc-client status``: the site at a glance, from its own files only.

Whether ``idc-client start`` is running (its lock, :mod:`client.sitestate`), the privacy cap
it was started with and what is left of it (the ledger, :mod:`common.ledger`), its cap on
evaluations a run and the latest run's count (``SITE_DIR/evaluations.json``), whether the
audit log verifies, and the site's last rounds as its signed audit log records them.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.answered import read_evaluations
from client.sitestate import StartSettings, running_pid
from common import accounting, keys
from common.audit import UPDATE_SENT
from common.audit_verify import iter_entries, verify_log
from common.cli_util import add_command
from common.errors import EXIT_CHECK_FAILED, EXIT_OK
from common.fileio import read_json
from common.ledger import PrivacyLedger, history
from common.paths import SitePaths


@dataclass
class RoundSeen:
    """One round of one run as the site's audit log tells it."""

    run: str
    round: int
    time: str = ""
    facts: list[str] = field(default_factory=list)


def _fact(entry: dict[str, Any]) -> str | None:
    """What one audit entry adds to its round's line, or None."""
    action, details = entry["action"], entry.get("details") or {}
    if action == "data.read":
        return f"trained on {details.get('train_patches')} patches"
    if action == "privacy.spent":
        return (
            f"epsilon {details.get('epsilon_round', 0):.3g} this round, "
            f"{details.get('epsilon_total', 0):.3g} total"
        )
    if action == "privacy.refused":
        return f"refused: {details.get('reason')}"
    if action == UPDATE_SENT:
        return "update sent"
    if action == "metrics.sent":
        return f"evaluated (balanced accuracy {details.get('balanced-accuracy', math.nan):.3f})"
    if action == "histograms.sent":
        return "sent validation histograms for the decision threshold"
    if action == "round.failed":
        return f"failed: {details.get('reason')}"
    return None


def last_rounds(audit: Path, count: int) -> list[RoundSeen]:
    """The last ``count`` rounds in the audit log, oldest first."""
    rounds: dict[tuple[str, int], RoundSeen] = {}
    for entry in iter_entries(audit):
        details = entry.get("details") or {}
        rnd = details.get("round")
        fact = _fact(entry)
        if not isinstance(rnd, int) or (fact is None and entry["action"] != "message.received"):
            continue
        run = str(details.get("run_id", entry["object"]))
        seen = rounds.setdefault((run, rnd), RoundSeen(run, rnd, entry["time"]))
        if fact is not None:
            seen.facts.append(fact)
    return list(rounds.values())[-count:]


def privacy_lines(site_dir: Path, settings: StartSettings | None) -> list[str]:
    """The cap the site last started with, what its ledger spent, and what is left."""
    ledger = PrivacyLedger(SitePaths(site_dir).ledger)
    entries = ledger.entries() if ledger.exists() else []
    delta = (settings.delta if settings else None) or (entries[-1].delta if entries else None)
    spent = accounting.epsilon(history(entries), delta) if entries and delta else 0.0
    where = f" at delta {delta:g}" if delta else ""
    lines = [f"privacy: {len(entries)} DP round(s) in the ledger, epsilon {spent:.4g} spent{where}"]
    if settings is None:
        lines.append("privacy cap: unknown (this site never ran `idc-client start`)")
    elif math.isfinite(settings.cap):
        left = max(settings.cap - spent, 0.0)
        lines.append(
            f"privacy cap: epsilon {settings.cap:g}{where} (set by the latest start); "
            f"{left:.4g} left"
        )
    else:
        lines.append("privacy cap: none (the latest start set no --max-epsilon)")
    return lines


def evaluation_lines(site_dir: Path, settings: StartSettings | None) -> list[str]:
    """The evaluation cap the site last started with and the latest run's count against it."""
    if settings is None or settings.max_evaluations is None:
        line = "evaluation cap: unknown (not recorded by the latest start)"
    else:
        line = f"evaluation cap: {settings.max_evaluations} a run (set by the latest start)"
    path = SitePaths(site_dir).evaluations
    try:
        answered = read_evaluations(path)
    except ValueError as exc:
        return [line, f"evaluations: {exc} (every evaluation is refused until it is restored)"]
    if answered:
        run, count = list(answered.items())[-1]  # runs are recorded in the order first seen
        line += f"; latest run {run}: {count} answered"
    return [line]


def _status(args: argparse.Namespace) -> int:
    paths = SitePaths(args.dir).require()
    name = read_json(paths.info)["site-name"]
    settings = StartSettings.read(args.dir)
    pid = running_pid(args.dir)
    print(f"site {name!r} ({args.dir})")
    if pid is not None:
        where = f" for {settings.server} since {settings.started}" if settings else ""
        print(f"start: running, pid {pid}{where}")
    elif settings is not None:
        print(f"start: not running (last started {settings.started} for {settings.server})")
    else:
        print("start: never started")
    for line in privacy_lines(args.dir, settings) + evaluation_lines(args.dir, settings):
        print(line)
    if not paths.audit.exists():
        print("audit log: none yet")
        return EXIT_OK
    report = verify_log(paths.audit, keys.load_public_key(paths.pub))
    state = "chain and signatures verified" if report.ok else f"BAD: {report.reason}"
    print(f"audit log: {report.entries} entries, {state}")
    rounds = last_rounds(paths.audit, args.rounds)
    print(f"last {len(rounds)} round(s):" if rounds else "no rounds yet")
    for seen in rounds:
        facts = "; ".join(seen.facts) or "message received"
        print(f"  {seen.time} run {seen.run} round {seen.round}: {facts}")
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def add_status_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-client status``."""
    p = add_command(sub, "status", _status, "this site at a glance: running, privacy, rounds")
    p.add_argument("--dir", type=Path, required=True, help="the site's state folder")
    p.add_argument("--rounds", type=int, default=10, help="how many recent rounds to show")
