"""Following, re-attaching to and stopping runs: ``idc-server attach`` and ``idc-server stop``.

``idc-server run`` follows its run here too; Ctrl-C detaches (the run goes on at the
SuperLink) and prints the exact commands that attach to or stop it again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import flowerctl
from common.errors import EXIT_FEDERATION, EXIT_INTERRUPTED, EXIT_OK
from common.paths import CoordPaths
from common.protocol import RoundRow
from common.rundir import RunDir
from server.link import connection, require_superlink
from server.runrecord import latest, read_record, run_id_of, set_state

if TYPE_CHECKING:
    from common.audit import AuditLog


def open_audit(paths: CoordPaths) -> AuditLog:
    """The coordinator's audit log, shared: a running ServerApp appends to the same chain."""
    from common import keys
    from common.audit import AuditLog

    return AuditLog(paths.audit, keys.load_private_key(paths.key), "coordinator", shared=True)


def print_progress(run_dir: Path, shown: int) -> int:
    """Print the rounds committed since the first ``shown``; return how many are shown now."""
    rows = RunDir(run_dir).read_rounds()
    for row in map(RoundRow.from_row, rows[shown:]):
        bacc = row.evaluate.get("balanced-accuracy", float("nan"))
        print(
            f"round {row.round}: {len(row.sites)} site(s), eval balanced accuracy {bacc:.4f}, "
            f"rejected {len(row.rejected)}, failed {len(row.failures)}",
            flush=True,
        )
    return len(rows)


def how_to_return(paths: CoordPaths, run_dir: Path) -> str:
    """The exact commands that follow or stop the run in ``run_dir`` again."""
    return (
        f"follow it again: idc-server attach --dir {paths.root} {run_dir}\n"
        f"stop it:         idc-server stop --dir {paths.root} {run_dir}"
    )


def follow(paths: CoordPaths, run_dir: Path, run_id: int, timeout: float) -> int:
    """Print the run's rounds as they commit until it ends; Ctrl-C detaches cleanly."""
    conn = connection(paths)
    shown, sites = 0, ""

    def progress() -> None:
        nonlocal shown, sites
        shown = print_progress(run_dir, shown)
        require_superlink(paths, run_dir)
        now = _sites_line(paths, conn)
        if now and now != sites:  # a site came or went: say so once, by name
            print(now, flush=True)
            sites = now

    try:
        status = flowerctl.follow_run(conn, run_id, timeout, on_poll=progress)
    except flowerctl.FlowerProcError as exc:  # the SuperLink is gone, or the run timed out
        set_state(run_dir, "failed", run_id=str(run_id), error=str(exc))
        raise
    except KeyboardInterrupt:
        print(
            f"\ndetached from run {run_id}; it goes on at the SuperLink\n"
            f"{how_to_return(paths, run_dir)}",
            flush=True,
        )
        return EXIT_INTERRUPTED
    print_progress(run_dir, shown)
    print(f"run {run_id}: {status.text}")
    if status.sub_status == "stopped":
        print(f"continue it with: idc-server run --dir {paths.root} --resume {run_dir}")
        return EXIT_FEDERATION
    if status.sub_status != "completed":
        error = read_record(run_dir, "status.json").get("error")
        if error:
            print(f"error: {error}", file=sys.stderr)
        elif status.details:  # e.g. the coordinator's executor refused the run's app
            print(f"error: {status.details}", file=sys.stderr)
        else:
            print(flowerctl.run_logs(conn, run_id)[-3000:], file=sys.stderr)
        print(f"continue it with: idc-server run --dir {paths.root} --resume {run_dir}")
        return EXIT_FEDERATION
    print(f"final model: {RunDir(run_dir).final_model}")
    chosen = read_record(run_dir, "summary.json").get("threshold") or {}
    if chosen:
        print(f"decision threshold: {chosen['threshold']:g} ({chosen['threshold_source']})")
    return EXIT_OK


def _sites_line(paths: CoordPaths, conn: flowerctl.Connection) -> str:
    """``sites online: a, b; offline: c`` now, or "" when the SuperLink cannot say."""
    from server.status import online_sites

    try:
        online, offline = online_sites(paths, conn)
    except (flowerctl.FlowerProcError, ValueError):
        return ""
    line = f"sites online: {', '.join(online) or '(none)'}"
    return f"{line}; offline: {', '.join(offline)}" if offline else line


def _target(paths: CoordPaths, arg: str) -> tuple[Path | None, int]:
    """RUN (a run folder, or a run id) as (its folder, or None when unknown; run id)."""
    if arg.isdigit() and not Path(arg).is_dir():
        found = latest(paths)
        return (found[0] if found and found[1] == int(arg) else None), int(arg)
    run_dir = Path(arg).resolve()
    return run_dir, run_id_of(run_dir)


def attach(args: argparse.Namespace) -> int:
    """``idc-server attach``: follow a running run's progress again (Ctrl-C detaches)."""
    paths = CoordPaths(args.dir).require()
    run_dir = Path(args.run).resolve()
    run_id = run_id_of(run_dir)
    print(f"following run {run_id} ({run_dir}); Ctrl-C detaches, the run goes on", flush=True)
    return follow(paths, run_dir, run_id, args.timeout)


def stop(args: argparse.Namespace) -> int:
    """``idc-server stop``: ask the SuperLink to stop a run, and record who stopped it."""
    paths = CoordPaths(args.dir).require()
    run_dir, run_id = _target(paths, args.run)
    conn = connection(paths)
    status = flowerctl.run_status(conn, run_id)
    if status.finished:
        print(f"run {run_id} has already ended ({status.text}); nothing to stop")
        return EXIT_OK
    with open_audit(paths) as audit:  # the record first: no unaudited stop
        audit.append(
            "run.stopped", f"run {run_id}", "ok", {"run_id": str(run_id), "by": "coordinator"}
        )
    # Before the stop: the ServerApp, interrupted, must find it was stopped, not failed.
    before = read_record(run_dir).get("status", "running") if run_dir else None
    if run_dir is not None:
        set_state(run_dir, "stopped", run_id=str(run_id), by="coordinator")
    try:
        flowerctl.stop_run(conn, run_id)
    except flowerctl.FlowerProcError:
        if run_dir is not None and before is not None:
            set_state(run_dir, before, run_id=str(run_id))
        raise
    print(f"run {run_id} stopped; the sites stop training after their current step")
    if run_dir is not None:
        print(f"continue it with: idc-server run --dir {paths.root} --resume {run_dir}")
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-server attach`` and ``idc-server stop``."""
    from common.cli_util import add_command

    p = add_command(sub, "attach", attach, "follow a running run's progress again")
    p.add_argument("--dir", type=Path, required=True, help="the coordinator's folder")
    p.add_argument("run", metavar="RUN_DIR", help="the run folder `idc-server run` wrote")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="give up after seconds")
    p = add_command(sub, "stop", stop, "stop a run (it can be continued with run --resume)")
    p.add_argument("--dir", type=Path, required=True, help="the coordinator's folder")
    p.add_argument("run", metavar="RUN", help="the run folder, or the run id")
