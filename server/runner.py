"""idc-server start and run: the SuperLink process, site registration, and run submission."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import flowerctl
from common.config import RunConfig
from common.fileio import write_private
from common.protocol import RoundRow
from server.registry import CoordPaths, load_sites
from server.rundir import RunDir

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
LIVE_FILE = "superlink.json"


def _tls(paths: CoordPaths) -> flowerctl.TlsPaths:
    t = paths.tls
    return flowerctl.TlsPaths(t / "ca.pem", t / "ca.key", t / "server.pem", t / "server.key")


def connection(paths: CoordPaths) -> flowerctl.Connection:
    """How this coordinator's own CLI reaches its running SuperLink."""
    live = paths.root / LIVE_FILE
    if not live.is_file():
        raise RuntimeError(
            f"no SuperLink is running for {paths.root} (start one with `idc-server start`)"
        )
    info = json.loads(live.read_text())
    ca = Path(info["ca"]) if info.get("ca") else None
    return flowerctl.write_cli_config(paths.root / "flwr-cli", info["local_address"], ca)


def _fingerprint(public_key: bytes) -> str:
    from cryptography.hazmat.primitives import serialization

    from common import keys

    key = (
        serialization.load_ssh_public_key(public_key)
        if public_key.startswith(b"ecdsa-")
        else serialization.load_pem_public_key(public_key)
    )
    return keys.public_key_fingerprint(key)  # type: ignore[arg-type]


def sync_sites(paths: CoordPaths, conn: flowerctl.Connection) -> dict[str, int]:
    """Make the SuperLink's registered nodes match the registry, keys included.

    A site removed from the registry, or whose key was rotated (remove-site, add-site), has
    its old node unregistered; every registry key not yet registered is registered.
    """
    sites = load_sites(paths)
    known: dict[str, int] = {}
    for node in flowerctl.list_nodes(conn):
        if node.status == "unregistered":
            continue
        info = sites.get(node.name)
        if info is None or _fingerprint(bytes(node.public_key)) != info["fingerprint"]:
            flowerctl.unregister_supernode(conn, node.node_id)
            log.info("unregistered %s (node %d): removed or key rotated", node.name, node.node_id)
        else:
            known[node.name] = node.node_id
    out = {}
    for name in sites:
        out[name] = known.get(name) or flowerctl.register_supernode(
            conn, paths.site_keys / f"{name}.pub", name
        )
    return out


def _start(args: argparse.Namespace) -> int:
    paths = CoordPaths(args.dir).require()
    host, _, port = args.address.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"--address must be HOST:PORT, got {args.address!r}")
    tls = None if args.insecure else _tls(paths)
    if tls is None:
        print(
            "WARNING: --insecure: plain HTTP and no SuperNode authentication; "
            "never use this with patient data",
            file=sys.stderr,
        )
    log_path = paths.root / "logs" / "superlink.log"
    proc = flowerctl.start_superlink(
        paths.superlink, int(port), tls, log_path, host=host or "127.0.0.1"
    )
    live = paths.root / LIVE_FILE
    try:
        local = f"127.0.0.1:{port}" if host in ("", "0.0.0.0") else args.address
        flowerctl.wait_superlink_ready(local, tls.ca_cert if tls else None, args.timeout, proc)
        info = {
            "address": args.address,
            "local_address": local,
            "pid": proc.pid,
            "ca": str(tls.ca_cert) if tls else None,
        }
        write_private(live, json.dumps(info).encode())  # owner-only, as the whole folder
        if tls is not None:
            nodes = sync_sites(paths, connection(paths))
            print(f"registered sites: {', '.join(sorted(nodes)) or '(none)'}")
        print(f"SuperLink ready at {args.address} (log: {log_path}); Ctrl-C stops it", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        live.unlink(missing_ok=True)
        flowerctl.stop_process(proc)


def app_hash(root: Path = PROJECT_ROOT) -> str:
    """Digest of the app's code as submitted (pyproject and the four packages)."""
    h = hashlib.sha256()
    packages = ("common", "client", "server", "simulation")
    files = [root / "pyproject.toml"]
    files += sorted(p for pkg in packages for p in (root / pkg).rglob("*.py"))
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parse as TOML scalars (numbers, booleans, quoted strings)."""
    import tomli

    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--run-config entries must be key=value, got {item!r}")
        try:
            out[key.strip()] = tomli.loads(f"v = {value.strip()}")["v"]
        except tomli.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def _print_progress(run_dir: Path, shown: int) -> int:
    rows = RunDir(run_dir).read_rounds()
    for row in map(RoundRow.from_row, rows[shown:]):
        bacc = row.evaluate.get("balanced-accuracy", float("nan"))
        print(
            f"round {row.round}: {len(row.sites)} site(s), eval balanced accuracy {bacc:.4f}, "
            f"rejected {len(row.rejected)}, failed {len(row.failures)}",
            flush=True,
        )
    return len(rows)


def _run(args: argparse.Namespace) -> int:
    from common import keys
    from common.audit import AuditLog

    paths = CoordPaths(args.dir).require()
    run_dir = args.resume or args.out
    if run_dir is None:
        raise ValueError("give --out RUN_DIR for a new run or --resume RUN_DIR")
    run_dir = run_dir.resolve()
    config = parse_overrides(args.run_config)
    if args.resume:
        if not (run_dir / "run.json").is_file():
            raise FileNotFoundError(f"{run_dir} holds no run to resume (no run.json)")
        previous = RunConfig(**json.loads((run_dir / "run.json").read_text())["config"])
        config = {**previous.to_run_config(), **config}
    if args.rounds is not None:
        config["num-server-rounds"] = args.rounds
    config.update(
        {
            "run-dir": str(run_dir),
            "coord-dir": str(paths.root.resolve()),
            "resume": bool(args.resume),
        }
    )
    conn = connection(paths)
    digest = app_hash()
    # Held across the submission so that run.submitted (written only once the SuperLink
    # accepted the run, with its id) precedes the ServerApp's entries; the ServerApp waits.
    with AuditLog(paths.audit, keys.load_private_key(paths.key), "coordinator") as audit:
        run_id = flowerctl.submit_run(conn, PROJECT_ROOT, config)
        audit.append(
            "run.submitted",
            f"run {run_id}",
            "ok",
            {
                "run_id": str(run_id),
                "app_hash": digest,
                "resume": bool(args.resume),
                "config_hash": hashlib.sha256(
                    json.dumps(config, sort_keys=True).encode()
                ).hexdigest(),
            },
        )
    print(f"run {run_id} submitted; results in {run_dir}", flush=True)
    shown = 0

    def progress() -> None:
        nonlocal shown
        shown = _print_progress(run_dir, shown)

    status = flowerctl.follow_run(conn, run_id, args.timeout, on_poll=progress)
    _print_progress(run_dir, shown)
    print(f"run {run_id}: {status.text}")
    if status.sub_status != "completed":
        failure = run_dir / "status.json"
        if failure.is_file():
            print(f"error: {json.loads(failure.read_text())['error']}", file=sys.stderr)
        else:
            print(flowerctl.run_logs(conn, run_id)[-3000:], file=sys.stderr)
        return 1
    print(f"final model: {run_dir / 'final' / 'model.pt'}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-server start`` and ``idc-server run``."""
    p = sub.add_parser("start", help="run the SuperLink with TLS and site authentication")
    p.add_argument("--dir", type=Path, required=True, help="the coordinator's folder")
    p.add_argument("--address", default="127.0.0.1:8000", help="HOST:PORT to serve on")
    p.add_argument("--insecure", action="store_true", help="plain HTTP, no auth (testing only)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    p.set_defaults(func=_start)
    p = sub.add_parser("run", help="submit a training run and follow it to the end")
    p.add_argument("--dir", type=Path, required=True, help="the coordinator's folder")
    p.add_argument("--out", type=Path, default=None, help="new run folder")
    p.add_argument("--resume", type=Path, default=None, help="continue this run folder")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument(
        "--run-config",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of [tool.flwr.app.config], e.g. local-epochs=2",
    )
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="give up after seconds")
    p.set_defaults(func=_run)
