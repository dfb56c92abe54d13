"""idc-server run, and how the coordinator's commands reach its SuperLink (the loopback one)."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import flowerctl
from common.cli_util import add_command
from common.config import RunConfig, Scalar
from common.errors import EXIT_FEDERATION, EXIT_OK
from common.fileio import read_json
from common.paths import CoordPaths
from common.protocol import RoundRow
from common.rundir import RunDir
from server.link import connection, require_superlink

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def app_hash(root: Path = PROJECT_ROOT) -> str:
    """Digest of the app's code as submitted (pyproject and the four packages)."""
    h = hashlib.sha256()
    packages = ("common", "client", "server", "simulation")
    files = [root / "pyproject.toml"]
    files += sorted(p for pkg in packages for p in (root / pkg).rglob("*.py"))
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def parse_overrides(
    items: list[str], base: Mapping[str, Scalar] | None = None
) -> dict[str, Scalar]:
    """``key=value`` pairs over ``base``, checked by :class:`RunConfig` (bad keys and values named).

    Values parse as TOML scalars (numbers, booleans, quoted strings); anything else is a string.
    """
    import tomli

    out: dict[str, Scalar] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--run-config entries must be key=value, got {item!r}")
        try:
            out[key.strip()] = tomli.loads(f"v = {value.strip()}")["v"]
        except tomli.TOMLDecodeError:
            out[key.strip()] = value.strip()
    RunConfig.from_run_config({**(base or {}), **out})
    return out


def previous_config(run_dir: Path) -> RunConfig:
    """The full config of the run in ``run_dir``, as it started (what ``--resume`` continues)."""
    record = run_dir / "run.json"
    if not record.is_file():
        raise FileNotFoundError(f"{run_dir} holds no run to resume (no run.json)")
    saved = read_json(record)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ValueError(f"{record} has no 'config' object; it was not written by idc-server run")
    try:
        return RunConfig.from_run_config(saved["config"])
    except ValueError as exc:
        raise ValueError(f"{record}: {exc}") from exc


def run_config(args: argparse.Namespace, paths: CoordPaths, run_dir: Path) -> RunConfig:
    """What ``idc-server run`` submits: the resumed run's config, then the overrides."""
    config = previous_config(run_dir).to_run_config() if args.resume else {}
    config.update(parse_overrides(args.run_config, config))
    if args.rounds is not None:
        config["num-server-rounds"] = args.rounds
    config.update(
        {"run-dir": str(run_dir), "coord-dir": str(paths.root), "resume": bool(args.resume)}
    )
    return RunConfig.from_run_config(config)


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
    run = run_config(args, paths, run_dir)
    conn = connection(paths)
    digest = app_hash()
    # Held across the submission so that run.submitted (written only once the SuperLink
    # accepted the run, with its id) precedes the ServerApp's entries; the ServerApp waits.
    with AuditLog(paths.audit, keys.load_private_key(paths.key), "coordinator") as audit:
        run_id = flowerctl.submit_run(conn, PROJECT_ROOT, run.to_run_config())
        audit.append(
            "run.submitted",
            f"run {run_id}",
            "ok",
            {
                "run_id": str(run_id),
                "app_hash": digest,
                "resume": bool(args.resume),
                "config_hash": run.digest(),
            },
        )
    print(f"run {run_id} submitted; results in {run_dir}", flush=True)
    shown = 0

    def progress() -> None:
        nonlocal shown
        shown = _print_progress(run_dir, shown)
        require_superlink(paths, run_dir)

    status = flowerctl.follow_run(conn, run_id, args.timeout, on_poll=progress)
    _print_progress(run_dir, shown)
    print(f"run {run_id}: {status.text}")
    if status.sub_status != "completed":
        failure = run_dir / "status.json"
        if failure.is_file():
            print(f"error: {read_json(failure)['error']}", file=sys.stderr)
        else:
            print(flowerctl.run_logs(conn, run_id)[-3000:], file=sys.stderr)
        return EXIT_FEDERATION
    print(f"final model: {RunDir(run_dir).final_model}")
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-server start`` and ``idc-server run``."""
    from server.serve import start

    p = add_command(
        sub, "start", start, "run the SuperLink (loopback) and its public Fleet-only front"
    )
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
    p = add_command(sub, "run", _run, "submit a training run and follow it to the end")
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
