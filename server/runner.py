"""idc-server run, and how the coordinator's commands reach its SuperLink (the loopback one)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import flowerctl
from common.config import RunConfig
from common.protocol import RoundRow
from server.registry import CoordPaths
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


def _require_superlink(paths: CoordPaths, run_dir: Path) -> None:
    """Fail when the SuperLink this run was submitted to is gone (follow_run would wait on)."""
    live = paths.root / LIVE_FILE
    pid = json.loads(live.read_text())["pid"] if live.is_file() else None
    if pid is None or not flowerctl.alive(int(pid)):
        raise RuntimeError(
            f"the SuperLink of {paths.root} stopped during the run; start it again "
            f"(`idc-server start`), then continue with `idc-server run --resume {run_dir}`"
        )


def _fingerprint(public_key: bytes) -> str:
    from cryptography.hazmat.primitives import serialization

    from common import keys

    key = (
        serialization.load_ssh_public_key(public_key)
        if public_key.startswith(b"ecdsa-")
        else serialization.load_pem_public_key(public_key)
    )
    return keys.public_key_fingerprint(key)  # type: ignore[arg-type]


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
    with AuditLog(paths.audit, keys.load_private_key(paths.key), "coordinator") as audit:
        audit.append(
            "run.submitted",
            "run",
            "ok",
            {
                "app_hash": digest,
                "resume": bool(args.resume),
                "config_hash": hashlib.sha256(
                    json.dumps(config, sort_keys=True).encode()
                ).hexdigest(),
            },
        )
    run_id = flowerctl.submit_run(conn, PROJECT_ROOT, config)
    print(f"run {run_id} submitted; results in {run_dir}", flush=True)
    shown = 0

    def progress() -> None:
        nonlocal shown
        shown = _print_progress(run_dir, shown)
        _require_superlink(paths, run_dir)

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
    from server.serve import start

    p = sub.add_parser("start", help="run the SuperLink (loopback) and its public Fleet-only front")
    p.add_argument("--dir", type=Path, required=True, help="the coordinator's folder")
    p.add_argument(
        "--address", default="127.0.0.1:8000", help="HOST:PORT the sites dial (Fleet API only)"
    )
    p.add_argument(
        "--local-port",
        type=int,
        default=0,
        help="the SuperLink's port on 127.0.0.1, for this host's commands (default: any free)",
    )
    p.add_argument("--insecure", action="store_true", help="plain HTTP, no auth (testing only)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    p.set_defaults(func=start)
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
