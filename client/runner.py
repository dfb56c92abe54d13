"""idc-client start: preflight the data, then run the SuperNode and the site's own executor."""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from client import console
from client.events import Tail, events_path
from client.sitestate import StartLock, StartSettings, parse_server
from common.cli_util import add_command
from common.config import DEFAULT_MAX_EVALUATIONS
from common.data import LoadOptions, load_patches
from common.fileio import read_json
from common.paths import SitePaths


def node_config(args: argparse.Namespace, name: str, cache_dir: Path) -> dict[str, str | float]:
    """Site-local facts for the ClientApp (``context.node_config``); never from the server."""
    cfg: dict[str, str | float] = {
        "site-name": name,
        "data-dir": str(args.data.resolve()),
        "state-dir": str(args.dir.resolve()),
        "cache-dir": str(cache_dir.resolve()),
        "small-policy": args.small,
    }
    if args.max_epsilon is not None:
        cfg["max-epsilon"] = float(args.max_epsilon)
    if args.delta is not None:
        cfg["delta"] = float(args.delta)
    if args.max_evaluations is not None:
        cfg["max-evaluations"] = int(args.max_evaluations)
    return cfg


def check_privacy_flags(args: argparse.Namespace, n_patches: int) -> None:
    """The site's cap: a positive epsilon with the site's own delta, below 1/number of patches.

    Also refuses a cap on evaluations under 1, and to start while the privacy ledger is
    missing rounds the audit log spent.
    """
    from client.private import check_ledger

    if args.max_evaluations is not None and args.max_evaluations < 1:
        raise ValueError(
            f"--max-evaluations must be at least 1 (evaluations a run), got {args.max_evaluations}"
        )

    if args.max_epsilon is not None and not (
        args.max_epsilon > 0 and math.isfinite(args.max_epsilon)
    ):
        raise ValueError(f"--max-epsilon must be a positive number, got {args.max_epsilon}")
    if args.max_epsilon is not None and args.delta is None:
        raise ValueError(
            "--max-epsilon needs --delta: the cap is epsilon at this site's own delta "
            f"(below 1/number of patches = {1 / n_patches:.3g}); no run can set it"
        )
    if args.delta is not None and not 0 < args.delta < 1 / n_patches:
        raise ValueError(
            f"--delta {args.delta} must be in (0, 1/number of patches) = "
            f"(0, {1 / n_patches:.3g}) for {n_patches} patches"
        )
    check_ledger(args.dir)


def _preflight(args: argparse.Namespace) -> str:
    """The site's name, once its folder, certificate, data and privacy flags check out."""
    paths = SitePaths(args.dir).require()
    name = str(read_json(paths.info)["site-name"])
    if not args.insecure and (args.ca is None or not args.ca.is_file()):
        raise FileNotFoundError(f"--ca {args.ca}: the coordinator's CA certificate is needed")
    patches = load_patches(
        args.data, cache_dir=args.cache_dir, options=LoadOptions(small=args.small), workers=2
    )
    print(patches.report.summary(), flush=True)
    check_privacy_flags(args, len(patches))
    return name


def _start(args: argparse.Namespace) -> int:
    if args.insecure:  # before anything else, so that no error hides it
        print(
            "WARNING: --insecure: plain HTTP and no site key: anyone on the path reads this "
            "site's updates or poses as the coordinator; never use this with patient data",
            file=sys.stderr,
            flush=True,
        )
    server = parse_server(args.server)  # before anything starts
    SitePaths(args.dir).require()
    lock = StartLock(args.dir)
    lock.acquire()  # one start per site folder; the kernel drops it when we end
    try:
        name = _preflight(args)
        cap = args.max_evaluations
        evaluations = DEFAULT_MAX_EVALUATIONS if cap is None else cap
        StartSettings.now(args.server, args.max_epsilon, args.delta, evaluations).write(args.dir)
        return _run(args, name, server)
    finally:
        lock.release()


def _run(args: argparse.Namespace, name: str, server: tuple[str, int]) -> int:
    import flowerctl

    paths = SitePaths(args.dir)
    flwr_home = paths.flwr_home
    flwr_home.mkdir(parents=True, exist_ok=True)
    key = None
    if not args.insecure:
        key = flowerctl.to_openssh_private_key(paths.key, flwr_home / "supernode.key")
    port = args.port or flowerctl.free_port()
    logs = {what: paths.logs / f"{what}.log" for what in ("supernode", "executor")}
    offsets = {what: _size(path) for what, path in logs.items()}  # this start's lines only
    watch = console.Console(
        name,
        server,
        Tail(logs["supernode"], offsets["supernode"]),
        Tail(events_path(args.dir), _size(events_path(args.dir))),
    )
    supernode = flowerctl.start_supernode(
        args.server,
        None if args.insecure else args.ca,
        key,
        node_config(args, name, args.cache_dir),
        port,
        logs["supernode"],
        home=flwr_home,
        args=["--isolation", "process"],  # tasks wait for our executor, never flwr-clientapp
    )
    print(
        f"site {name!r}: SuperNode started for {args.server} (pid {supernode.pid}, "
        f"log {logs['supernode']})",
        flush=True,
    )
    try:
        executor = _start_executor(f"127.0.0.1:{port}", flwr_home, logs["executor"])
    except BaseException:
        flowerctl.stop_process(supernode)
        raise
    print(f"site {name!r}: executor started (pid {executor.pid}, log {logs['executor']})")
    procs = {"supernode": supernode, "executor": executor}
    stopped = _supervise(procs, watch)
    if stopped is None:
        print(f"site {name!r}: stopped", flush=True)
        return 0
    print(
        f"site {name!r}: {_why(stopped, procs[stopped], logs, offsets, args)}",
        file=sys.stderr,
        flush=True,
    )
    return 1


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _start_executor(runtime_api: str, flwr_home: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """The site's own executor (:mod:`client.executor`) for the SuperNode's Runtime API."""
    import flowerctl

    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "client.executor", "--runtime-api", runtime_api]
    cmd += ["--node-config", str(flwr_home / "node-config.toml"), "--parent-pid", str(os.getpid())]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            env=flowerctl.flower_env(flwr_home),
            cwd=flwr_home,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _supervise(procs: dict[str, subprocess.Popen[bytes]], watch: console.Console) -> str | None:
    """Wait until one process ends (return its name) or we are told to stop (None).

    Whatever happens, every process we started is stopped by its pid, executor first.
    """
    import flowerctl

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            watch.poll()
            for what, proc in procs.items():
                if proc.poll() is not None:
                    watch.poll()  # what it said last, before why it stopped
                    return what
            time.sleep(0.5)
    except KeyboardInterrupt:
        return None
    finally:
        for proc in (procs["executor"], procs["supernode"]):
            flowerctl.stop_process(proc)


def _why(
    what: str,
    proc: subprocess.Popen[bytes],
    logs: dict[str, Path],
    offsets: dict[str, int],
    args: argparse.Namespace,
) -> str:
    """One line: why ``what`` stopped, and what to do."""
    with open(logs[what], "rb") as handle:
        handle.seek(offsets[what])
        text = handle.read().decode(errors="replace")
    fingerprint = _fingerprint(args.dir) if not args.insecure else "none: --insecure"
    key = (fingerprint, SitePaths(args.dir).pub)
    return console.why_stopped(what, int(proc.returncode or 0), text, logs[what], args.ca, key)


def _fingerprint(site_dir: Path) -> str:
    from common import keys

    key = keys.load_private_key(SitePaths(site_dir).key)
    return keys.public_key_fingerprint(key.public_key())


def add_start_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-client start``."""
    p = add_command(sub, "start", _start, "join the federation: run this site's SuperNode")
    p.add_argument("--dir", type=Path, required=True, help="the site's state folder")
    p.add_argument("--server", required=True, help="the coordinator's HOST:PORT")
    p.add_argument("--ca", type=Path, help="the coordinator's CA certificate (ca.pem)")
    p.add_argument("--data", type=Path, required=True, help="this site's patches (Kaggle layout)")
    p.add_argument("--port", type=int, default=None, help="local port of the SuperNode's API")
    p.add_argument(
        "--max-epsilon",
        type=float,
        default=None,
        help="lifetime privacy cap of this site (needs --delta); then DP-SGD rounds only",
    )
    p.add_argument("--delta", type=float, default=None, help="the site's DP delta (< 1/patches)")
    p.add_argument(
        "--max-evaluations",
        type=int,
        default=None,
        help="evaluations of global models this site answers a run (each sends test metrics "
        f"and validation histograms, not DP; default {DEFAULT_MAX_EVALUATIONS})",
    )
    p.add_argument("--small", choices=("pad", "skip"), default="pad")
    p.add_argument("--insecure", action="store_true", help="plain HTTP, no key (testing only)")
