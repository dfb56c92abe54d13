"""idc-server run, and how the coordinator's commands reach its SuperLink (the loopback one)."""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import fields
from pathlib import Path

import tomli_w

import flowerctl
from common import config_digest, keys
from common.audit import AuditLog
from common.cli_util import DefaultsFormatter, add_command
from common.config import RunConfig
from common.fileio import read_json
from common.overrides import parse_overrides
from common.paths import CoordPaths
from common.rundir import RunDir
from server import ops
from server import status as server_status
from server.link import connection
from server.ops import follow
from server.runrecord import note_latest, read_record, set_state

log = logging.getLogger(__name__)
SUBMIT_LOCK_WAIT = 30.0  # a shared writer (a running ServerApp, add-site) may be appending
_SET_BY_RUN = {"run_dir", "coord_dir", "resume", "sim_sites_dir"}  # not the user's to set


class RunHelpFormatter(DefaultsFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults on options, and the run-config key list kept one key a line."""


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


def previous_config(run_dir: Path) -> RunConfig:
    """The full config of the run in ``run_dir``, as it started (what ``--resume`` continues)."""
    record = run_dir / "run.json"
    if not record.is_file():
        raise FileNotFoundError(f"{run_dir} holds no run to resume (no run.json)")
    saved = read_json(record)
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ValueError(f"{record} has no 'config' object; it was not written by idc-server run")
    try:  # a key the run predates keeps what the run did, not today's default
        return RunConfig.from_run_config(config_digest.with_added_values(saved["config"]))
    except ValueError as exc:
        raise ValueError(f"{record}: {exc}") from exc


def refuse_changed_settings(run_dir: Path, before: RunConfig, after: RunConfig) -> None:
    """Refuse, before submitting, a resume whose settings are not those its rounds used.

    The ServerApp refuses it too, but only after the submission has replaced run.json's
    config with the changed one; here the line names each changed key and run.json is kept.
    """
    state = RunDir(run_dir).read_state()
    recorded = state.get("config_hash")
    if not state.get("completed_round") or recorded is None or after.matches(recorded):
        return
    old, new = before.to_run_config(), after.to_run_config()
    changed = [
        f"{key} {old[key]!r} -> {value!r}"
        for key, value in new.items()
        if key not in config_digest.NOT_DIGESTED and old[key] != value
    ]
    if changed:
        raise ValueError(
            f"cannot resume {run_dir}: changed since its rounds were trained: "
            f"{'; '.join(changed)}; resume without those changes, or start a new run with --out"
        )
    raise ValueError(
        f"cannot resume {run_dir}: the config in its run.json is not the one its rounds were "
        "trained with (config_hash in state.json); restore run.json or start a new run with --out"
    )


def run_config(args: argparse.Namespace, paths: CoordPaths, run_dir: Path) -> RunConfig:
    """What ``idc-server run`` submits: the resumed run's config, then the overrides."""
    before = previous_config(run_dir) if args.resume else None
    config = before.to_run_config() if before else {}
    config.update(parse_overrides(args.run_config, config))
    if args.rounds is not None:
        config["num-server-rounds"] = args.rounds
    config.update(
        {"run-dir": str(run_dir), "coord-dir": str(paths.root), "resume": bool(args.resume)}
    )
    run = RunConfig.from_run_config(config)
    if before is not None:
        refuse_changed_settings(run_dir, before, run)
    return run


def refuse_existing_out(run_dir: Path, paths: CoordPaths) -> None:
    """A new run's --out must not hold a run already (before anything is submitted)."""
    if (run_dir / "run.json").is_file() or RunDir(run_dir).read_state().get("completed_round"):
        done = int(RunDir(run_dir).read_state().get("completed_round", 0))
        raise FileExistsError(
            f"--out {run_dir} already holds a run ({done} completed round(s)); continue it with "
            f"`idc-server run --dir {paths.root} --resume {run_dir}`, or give a new --out"
        )


def _run(args: argparse.Namespace) -> int:
    paths = CoordPaths(args.dir).require()
    if args.resume and args.out:
        raise ValueError("give either --out RUN_DIR (a new run) or --resume RUN_DIR, not both")
    run_dir = args.resume or args.out
    if run_dir is None:
        raise ValueError("give --out RUN_DIR for a new run or --resume RUN_DIR")
    run_dir = run_dir.resolve()
    if not args.resume:
        refuse_existing_out(run_dir, paths)
    run = run_config(args, paths, run_dir)
    conn = connection(paths)
    digest = app_hash()
    # Held (exclusively) across the submission so that run.submitted, written only once the
    # SuperLink accepted the run and with its id, precedes the ServerApp's entries (it waits).
    key = keys.load_private_key(paths.key)
    with AuditLog(paths.audit, key, "coordinator", lock_wait=SUBMIT_LOCK_WAIT) as audit:
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
    if read_record(run_dir).get("run_id") != str(run_id):  # the ServerApp may be first
        set_state(
            run_dir,
            "submitted",
            run_id=str(run_id),
            config=run.to_run_config(),
            config_hash=run.digest(),
        )
    note_latest(paths, run_dir, run_id)
    print(
        f"run {run_id} submitted; results in {run_dir} (Ctrl-C detaches; the run goes on)",
        flush=True,
    )
    return follow(paths, run_dir, run_id, args.timeout)


def config_help() -> str:
    """Every run-config key with its default, for ``run --help``."""
    lines = ["run-config keys (--run-config KEY=VALUE), with their defaults:"]
    for f in fields(RunConfig):
        if f.name in _SET_BY_RUN:
            continue
        value = tomli_w.dumps({"v": f.default}).partition("=")[2].strip()
        lines.append(f"  {RunConfig.key(f.name)} = {value}")
    lines.append(
        'dp.enabled=true needs norm="group": Opacus clips each sample\'s gradient, and batch '
        "norm mixes samples"
    )
    return "\n".join(lines)


def _start(args: argparse.Namespace) -> int:
    """``idc-server start``; Flower's SuperLink modules load only for this command (~2 s)."""
    from server.serve import start

    return start(args)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-server start`` and ``idc-server run``."""
    p = add_command(
        sub, "start", _start, "run the SuperLink (loopback) and its public Fleet-only front"
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
    p.formatter_class = RunHelpFormatter
    p.epilog = config_help()
    p.add_argument("--dir", type=Path, required=True, help="the coordinator's folder")
    p.add_argument("--out", type=Path, default=None, help="new run folder")
    p.add_argument("--resume", type=Path, default=None, help="continue this run folder")
    p.add_argument("--rounds", type=int, default=None, help="sets num-server-rounds")
    p.add_argument(
        "--run-config",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of [tool.flwr.app.config], e.g. local-epochs=2",
    )
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="give up after seconds")
    ops.add_parsers(sub)
    server_status.add_parser(sub)
