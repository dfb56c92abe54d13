"""What the dashboard shows, read from the coordinator's folder: one snapshot, one figure.

:func:`snapshot` gathers, as plain JSON, what ``idc-server status`` knows (sites by name with
status, last seen and key fingerprint; the SuperLink; the latest run), the current round's
progress from the coordinator's audit log (sites selected, replies received), each site's
privacy spent against its cap from the run's rounds, and the audit chain's verification
(:func:`common.audit_verify.verify_log` with this coordinator's own key). Everything is read
from files and the SuperLink's Control API on loopback; nothing is written.

:func:`curves_svg` draws the rounds so far as SVG for people: a title per panel, labelled
axes, integer rounds, one line per site and the weighted mean.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common import keys
from common.audit_verify import chain_files, iter_entries, verify_log
from common.paths import CoordPaths
from common.protocol import EPSILON_TOTAL, NO_CAP
from common.registry import load_sites
from common.rundir import RunDir
from server.runrecord import latest, read_record
from server.status import site_states, superlink_state

_verified: dict[str, Any] = {}  # the last verification, keyed by the log's size and mtime


def audit_state(paths: CoordPaths) -> dict[str, Any]:
    """The audit chain's verification: ok, entries, and the one-line reason."""
    files = chain_files(paths.audit)
    stamp = tuple((str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
    if _verified.get("stamp") != stamp:  # verifying is a signature per entry: once per change
        key = keys.load_private_key(paths.key).public_key()
        report = verify_log(paths.audit, key)
        state = {"ok": report.ok, "entries": report.entries, "reason": report.reason}
        state["key"] = keys.public_key_fingerprint(key)
        _verified.update(stamp=stamp, state=state)
    return dict(_verified["state"])


def round_progress(paths: CoordPaths, run_id: int | str) -> dict[str, Any] | None:
    """The run's latest round as the audit log tells it: selected sites and their replies."""
    current: dict[str, Any] | None = None
    try:
        for entry in iter_entries(paths.audit):
            d = entry.get("details") or {}
            if str(d.get("run_id")) != str(run_id):
                continue
            if entry["action"] == "round.started":
                current = {"round": d.get("round"), "selected": d.get("sites_selected", [])}
                current.update(received=[], rejected=[], committed=False)
            elif current is not None and d.get("round") == current["round"]:
                if entry["action"] == "update.received":
                    key = "received" if d.get("accepted") else "rejected"
                    current[key].append(entry["object"])
                elif entry["action"] == "checkpoint.written":
                    current["committed"] = True
    except (OSError, ValueError):  # a damaged log: audit_state says so
        return current
    return current


def privacy_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per site: total epsilon at its last DP round, its cap (None: no cap), what is left."""
    spent: dict[str, dict[str, Any]] = {}
    for row in rows:
        replies = dict(row.get("sites") or {})
        replies.update({r["site"]: r for r in row.get("rejected") or [] if EPSILON_TOTAL in r})
        for site, m in replies.items():
            cap = m.get("epsilon-cap")
            entry = spent.setdefault(site, {"site": site, "epsilon": None, "cap": None})
            if m.get("dp") or m.get(EPSILON_TOTAL):
                entry.update(epsilon=float(m[EPSILON_TOTAL]), round=int(row["round"]))
            if cap is not None and cap != NO_CAP:
                entry["cap"] = float(cap)
    for entry in spent.values():
        eps, cap = entry["epsilon"], entry["cap"]
        entry["left"] = None if cap is None or eps is None else max(cap - eps, 0.0)
    return [spent[s] for s in sorted(spent)]


def run_state(paths: CoordPaths) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The latest run (id, state, rounds done of planned, current round) and its rows."""
    found = latest(paths)
    if found is None:
        return None, []
    run_dir, run_id = found
    record = read_record(run_dir)
    rd = RunDir(run_dir)
    rows = rd.read_rounds()
    run = {
        "id": str(run_id),  # Flower's ids are 64-bit: a JS number would round them
        "dir": str(run_dir),
        "status": record.get("status", "unknown"),
        "rounds": (record.get("config") or {}).get("num-server-rounds"),
        "completed": int(rd.read_state().get("completed_round", 0)),
        "error": read_record(run_dir, "status.json").get("error"),
        "progress": round_progress(paths, run_id),
    }
    return run, rows


def snapshot(root: Path) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data (rounds as rows for the plot)."""
    paths = CoordPaths(root).require()
    head, nodes = superlink_state(paths)
    sites, revoked, strangers = site_states(load_sites(paths), nodes)
    run, rows = run_state(paths)
    return {
        "coordinator": str(paths.root),
        "superlink": head,
        "sites": sites,
        "revoked": revoked,
        "strangers": strangers,
        "run": run,
        "privacy": privacy_rows(rows),
        "audit": audit_state(paths),
    }


def _per_site(ax: Any, rows: Sequence[Mapping[str, Any]], part: str, key: str) -> int:
    """One line per site for ``rows[*][part][site][key]``; returns how many were drawn."""
    names = sorted({n for r in rows for n in (r.get(part) or {})})
    drawn = 0
    for name in names:
        pts = [(r["round"], r[part][name][key]) for r in rows if key in r[part].get(name, {})]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            drawn += 1
    return drawn


def curves_svg(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """Evaluation balanced accuracy and training loss per round, per site, as SVG text."""
    from matplotlib.ticker import MaxNLocator

    from common.plots import CHANCE, MAX_LABELLED_TICKS, plt  # Agg: set there

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    _per_site(left, rows, "evaluations", "balanced-accuracy")
    mean = [(r["round"], r["evaluate"]["balanced-accuracy"]) for r in rows if r.get("evaluate")]
    if mean:
        left.plot(*zip(*mean, strict=True), "k-", linewidth=2.5, label="all sites (weighted)")
    left.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label="chance (0.5)")
    left.set_ylim(-0.02, 1.02)
    left.set_title("evaluation: balanced accuracy (global model, test patients)", fontsize=10)
    left.set_ylabel("balanced accuracy")
    drawn = _per_site(right, rows, "sites", "train-loss")
    right.set_title("training: loss (each site's local training)", fontsize=10)
    right.set_ylabel("cross-entropy")
    if not drawn:  # DP rounds send no training loss: say so rather than draw nothing
        why = "not reported (DP rounds send none)" if rows else "no rounds yet"
        right.text(0.5, 0.5, why, ha="center", transform=right.transAxes)
    rounds = sorted({int(r["round"]) for r in rows})
    for ax in (left, right):
        ax.set_xlabel("round")
        if len(rounds) <= MAX_LABELLED_TICKS:  # rounds are counts: integer ticks only
            ax.set_xticks(rounds or [1])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    out = io.StringIO()
    fig.savefig(out, format="svg")
    plt.close(fig)
    return out.getvalue()
