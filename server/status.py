"""``idc-server status``: the federation at a glance, by site name.

Reads the registry, the SuperLink's node list on loopback (when one runs) and the latest
run's folder (``runs.json`` names it). Without a SuperLink it says so and still shows the
registry and the run folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import flowerctl
from common.errors import EXIT_OK
from common.paths import CoordPaths
from common.protocol import RoundRow
from common.registry import load_sites
from common.rundir import RunDir
from server.link import LIVE_FILE, connection, node_key_fingerprint
from server.runrecord import latest, read_record


def superlink_state(paths: CoordPaths) -> tuple[str, list[Any] | None]:
    """A line about the SuperLink, and its nodes (None when it cannot be asked)."""
    live = read_record(paths.root, LIVE_FILE)
    pid = live.get("pid")
    if not live or pid is None or not flowerctl.alive(int(pid)):
        return (
            f"SuperLink: not running (start it with `idc-server start --dir {paths.root}`); "
            "site status unknown",
            None,
        )
    where = f"SuperLink: running, pid {pid}, sites dial {live.get('address')}"
    try:
        return where, flowerctl.list_nodes(connection(paths))
    except flowerctl.FlowerProcError as exc:
        return f"{where}; not answering ({exc})", None


def _seen(node: Any) -> str:
    if node.status == "online":
        return "now"
    if node.status == "registered":
        return "never connected"
    return f"last seen {node.last_deactivated_at or node.last_activated_at or 'unknown'}"


def site_states(
    sites: dict[str, dict[str, str]], nodes: list[Any] | None
) -> tuple[list[dict[str, str]], list[str], list[str]]:
    """Each registered site's status, last seen and key; revoked names; unregistered nodes.

    Status is ``online``, ``offline``, ``revoked``, ``not admitted`` or (no node list)
    ``unknown``.
    """
    by_key = {info["fingerprint"]: name for name, info in sites.items()}
    state: dict[str, Any] = {}
    revoked: list[str] = []
    strangers: list[str] = []
    for node in nodes or []:
        name = by_key.get(node_key_fingerprint(bytes(node.public_key)))
        if name is None:
            if node.status != "unregistered":
                strangers.append(f"node {node.node_id} ({node.status})")
        elif node.status == "unregistered":
            revoked.append(name)
        else:
            state[name] = node
    rows = []
    for name in sorted(sites):
        node = state.get(name)
        if nodes is None:
            status, seen = "unknown", ""
        elif node is None:
            status, seen = ("revoked" if name in revoked else "not admitted"), ""
        else:
            status, seen = ("online" if node.status == "online" else "offline"), _seen(node)
        key = sites[name]["fingerprint"]
        rows.append({"site": name, "status": status, "seen": seen, "key": key})
    return rows, sorted(set(revoked) - state.keys()), strangers


def site_lines(sites: dict[str, dict[str, str]], nodes: list[Any] | None) -> list[str]:
    """One line per registered site (status, last seen, key), then revoked keys, strangers."""
    rows, revoked, strangers = site_states(sites, nodes)
    lines = [f"sites ({len(sites)} registered):"]
    width = max((len(n) for n in sites), default=4)
    for row in rows:
        name, status, key = row["site"], row["status"], row["key"][:16]
        lines.append(f"  {name:<{width}}  {status:<12}  key {key}  {row['seen']}".rstrip())
    for name in revoked:
        lines.append(
            f"  revoked key: site {name!r}: rotate it (`idc-client init` at the site, "
            "then remove-site and add-site)"
        )
    lines += [f"  not registered: {s}" for s in strangers]
    return lines


def run_lines(paths: CoordPaths, superlink_up: bool) -> list[str]:
    """The latest run: id, state, round, and each site's epsilon spent."""
    found = latest(paths)
    if found is None:
        return ["run: none submitted yet"]
    run_dir, run_id = found
    record = read_record(run_dir)
    state = record.get("status", "unknown")
    rounds = (record.get("config") or {}).get("num-server-rounds", "?")
    done = int(RunDir(run_dir).read_state().get("completed_round", 0))
    lines = [f"run {run_id}: {state}, {done} of {rounds} round(s) completed, in {run_dir}"]
    if state in ("submitted", "running") and not superlink_up:
        lines.append(
            "  the SuperLink is not running, so neither is this run: start it, then "
            f"`idc-server run --dir {paths.root} --resume {run_dir}`"
        )
    if state == "failed":
        lines.append(f"  error: {read_record(run_dir, 'status.json').get('error')}")
    spent: dict[str, tuple[int, float]] = {}
    for row in map(RoundRow.from_row, RunDir(run_dir).read_rounds()):
        for site, eps in row.epsilon_by_site().items():
            spent[site] = (row.round, eps)
    if spent:
        lines.append("epsilon spent per site (total at the last round it trained):")
        lines += [f"  {s}: {eps:.3f} (round {r})" for s, (r, eps) in sorted(spent.items())]
    return lines


def online_sites(paths: CoordPaths, conn: flowerctl.Connection) -> tuple[list[str], list[str]]:
    """Registered sites online now, and those not, by name (from the SuperLink's node list)."""
    sites = load_sites(paths)
    by_key = {info["fingerprint"]: name for name, info in sites.items()}
    online = {
        by_key.get(node_key_fingerprint(bytes(n.public_key)))
        for n in flowerctl.list_nodes(conn)
        if n.status == "online"
    }
    return sorted(s for s in sites if s in online), sorted(s for s in sites if s not in online)


def status(args: argparse.Namespace) -> int:
    """``idc-server status``: print sites, the SuperLink and the latest run."""
    paths = CoordPaths(args.dir).require()
    head, nodes = superlink_state(paths)
    print(f"coordinator: {paths.root}")
    print(head)
    up = head.startswith("SuperLink: running")
    for line in site_lines(load_sites(paths), nodes) + run_lines(paths, up):
        print(line)
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-server status``."""
    from common.cli_util import add_command

    p = add_command(sub, "status", status, "sites by name, the SuperLink, the latest run")
    p.add_argument("--dir", type=Path, required=True, help="the coordinator's folder")
