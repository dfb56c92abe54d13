"""idc-server start: the loopback SuperLink, its Fleet-only gateway, its executor, site sync.

The SuperLink (every Flower API, no login on Control and Runtime) listens on 127.0.0.1 only;
the coordinator's own commands reach it there through ``superlink.json``'s ``local_address``.
The address the sites dial is served by :mod:`flowerctl.gateway`: TLS, the Fleet API and
``/health``, nothing else. The SuperLink runs no app itself (``--isolation process``):
:mod:`server.executor` runs the installed ServerApp for runs of the installed app and refuses
every other. All three are started and stopped here, by pid, as one command.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import flowerctl
from common.fileio import write_private
from common.paths import CoordPaths
from common.registry import load_sites
from flowerctl.gateway import start_gateway
from server.executor import start_executor, write_secret
from server.link import LIVE_FILE, connection, node_key_fingerprint, tls_paths
from server.lock import StartLock

log = logging.getLogger(__name__)
REFUSED_LOG = "gateway-refused.log"  # under COORD/logs: one line per refused request


@dataclass(frozen=True)
class SyncReport:
    """What :func:`sync_sites` left: the nodes admitted, and the sites that must rotate keys."""

    nodes: dict[str, int]  # site -> node id of its registered key
    revoked: list[str]  # sites whose key Flower holds as unregistered (it never takes it again)


def sync_sites(paths: CoordPaths, conn: flowerctl.Connection) -> SyncReport:
    """Make the SuperLink's registered nodes match the registry, matched by key.

    A node whose key is not in the registry (site removed, key rotated, or a stranger's) is
    unregistered; every registry key Flower does not know yet is registered. A registry key
    that Flower holds as unregistered (someone unregistered it behind the coordinator's back)
    can never be registered again: that site is reported in ``revoked``, the others go on.
    """
    sites = load_sites(paths)
    by_key = {info["fingerprint"]: name for name, info in sites.items()}
    known: dict[str, int] = {}
    revoked: set[str] = set()
    for node in flowerctl.list_nodes(conn):
        name = by_key.get(node_key_fingerprint(bytes(node.public_key)))
        if node.status == "unregistered":
            if name is not None:
                revoked.add(name)
        elif name is None:
            flowerctl.unregister_supernode(conn, node.node_id)
            log.info("unregistered %s (node %d): key not in the registry", node.name, node.node_id)
        else:
            if node.name != name:  # sites are their keys: the registry's name is the one used
                log.warning(
                    "node %d holds %s's key under the name %r", node.node_id, name, node.name
                )
            known[name] = node.node_id
    nodes = dict(known)
    for name in sites:
        if name not in known and name not in revoked:
            key = paths.site_key(name)
            nodes[name] = flowerctl.register_supernode(conn, key, name)
    return SyncReport(nodes, sorted(revoked - known.keys()))


def print_sync(report: SyncReport) -> None:
    """One line for the admitted sites, and one per site whose key was revoked."""
    print(f"registered sites: {', '.join(sorted(report.nodes)) or '(none)'}")
    for name in report.revoked:
        print(
            f"site {name!r}: key revoked: rotate it (the site makes a new key with "
            "`idc-client init`; then `idc-server remove-site` and `add-site` with it)",
            file=sys.stderr,
        )


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not host:
        raise ValueError(f"--address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _dial(host: str, port: int) -> str:
    """Where this host reaches a listener bound to ``host`` (a wildcard: by loopback)."""
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "::") else f"{host}:{port}"


def start(args: argparse.Namespace) -> int:
    """``idc-server start``: serve until Ctrl-C, SIGTERM, or either process exits."""
    paths = CoordPaths(args.dir).require()
    host, port = _split(args.address)
    tls = None if args.insecure else tls_paths(paths)
    if tls is None:
        print(
            "WARNING: --insecure: plain HTTP and no SuperNode authentication; "
            "never use this with patient data",
            file=sys.stderr,
        )
    if args.local_port == port:
        raise ValueError(f"--local-port {port} is the public port: choose another (or none)")
    local_port = args.local_port
    while not local_port or local_port == port:
        local_port = flowerctl.free_port()
    # Before anything is started or written: a second start must leave the first's files be.
    lock = StartLock(paths, args.address)
    try:
        return _serve(args, paths, local_port, tls)
    finally:
        lock.release()


def _serve(
    args: argparse.Namespace, paths: CoordPaths, local_port: int, tls: flowerctl.TlsPaths | None
) -> int:
    host, port = _split(args.address)
    local, logs = f"127.0.0.1:{local_port}", paths.logs
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ca = tls.ca_cert if tls else None
    # `--isolation process`: the SuperLink runs no app; the executor runs ours only, and only
    # the executor (holding this start's secret) may claim the ServerApp tasks
    secret = write_secret(paths)
    isolation = ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    procs = {
        "SuperLink": flowerctl.start_superlink(
            paths.superlink, local_port, tls, logs / "superlink.log", args=isolation
        )
    }
    live = paths.root / LIVE_FILE
    try:
        flowerctl.wait_superlink_ready(local, ca, args.timeout, procs["SuperLink"])
        procs["executor"] = start_executor(paths, local, ca)
        procs["gateway"] = start_gateway(
            args.address, local, tls, logs / "gateway.log", logs / REFUSED_LOG
        )
        flowerctl.wait_superlink_ready(_dial(host, port), ca, args.timeout, procs["gateway"])
        info = {
            "address": args.address,
            "local_address": local,
            "pid": procs["SuperLink"].pid,
            "gateway_pid": procs["gateway"].pid,
            "executor_pid": procs["executor"].pid,
            "ca": str(ca) if ca else None,
        }
        write_private(live, json.dumps(info).encode())  # addresses and pids: owner-only
        if tls is not None:
            print_sync(sync_sites(paths, connection(paths)))
        print(
            f"SuperLink ready: sites dial {args.address} (Fleet API only; every other request "
            f"refused and logged in {logs / REFUSED_LOG}); this host's commands use {local}. "
            "Ctrl-C stops all",
            flush=True,
        )
        return _wait_any(procs)
    except KeyboardInterrupt:
        return 0
    finally:
        live.unlink(missing_ok=True)
        for proc in reversed(procs.values()):  # the front first: nothing new gets in
            flowerctl.stop_process(proc)


def _wait_any(procs: dict[str, subprocess.Popen[bytes]]) -> int:
    """Block until one of ``procs`` exits; name it and return a non-zero code."""
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                print(
                    f"{name} (pid {proc.pid}) exited with {proc.returncode}; stopping",
                    file=sys.stderr,
                )
                return proc.returncode or 1
        time.sleep(0.5)
