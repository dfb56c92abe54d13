"""A real federation on 127.0.0.1 for tests: the installed commands as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from flowerctl import FLWR_ENV as FLOWER_ENV
from flowerctl import alive, descendants, free_port, signal_tree
from simulation.synth import SynthSpec, synthesize

BIN = Path(sys.executable).parent
# One command's deadline: each starts by importing torch and Flower, and at a load of 24 on
# 2 cores `idc-server add-site` was seen to pass 120 s; a hung command still ends the test.
CLI_TIMEOUT = 300


def split_synth_by_site(src: Path, dst: Path) -> dict[int, Path]:
    """Move a synth output's patients into one folder per site (its synth.json says which)."""
    info = json.loads((src / "synth.json").read_text())
    folders: dict[int, Path] = {}
    for pid, site in info["site_of"].items():
        folder = folders.setdefault(int(site), dst / f"site{site}-data")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / pid, folder / pid)
    return folders


def synth_sites(root: Path, spec: SynthSpec) -> dict[int, Path]:
    """Synthesize ``spec``'s patients under ``root`` and give each site its own folder."""
    synthesize(root / "all", spec)
    return split_synth_by_site(root / "all", root)


def wait_for(predicate, timeout: float, what: str, watch=(), poll: float = 0.5):  # noqa: ANN001
    """Poll ``predicate`` until it returns something truthy, or fail naming ``what``.

    ``watch`` holds the processes without which ``what`` can no longer happen: the wait
    stops as soon as one of them has exited, instead of running to the deadline.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc in watch:
            if proc.poll() is not None:
                raise AssertionError(
                    f"gave up waiting for {what}: {proc.args!r} exited with {proc.returncode}"
                )
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _as_from_a_terminal() -> None:
    """Ctrl-C (SIGINT) acts as it does for a command typed at a terminal.

    A test suite started in the background by a non-interactive shell inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt: `idc-server run` could not be
    detached by the SIGINT the tests send (seen: it followed its run for 17 more
    rounds).
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Federation:
    """A coordinator and sites in ``root``; every process it starts is stopped by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.coord = root / "coord"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.flower_pids: set[int] = set()  # SuperLink/SuperNode groups, stopped last
        self.env = {
            **os.environ,
            **FLOWER_ENV,
            "IDC_CACHE_DIR": str(root / "cache"),
            "PYTHONUNBUFFERED": "1",
        }

    def cli(
        self, *args: str, timeout: float = CLI_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:  # noqa: E501
        """Run one command to completion."""
        res = subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"{args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start a long-running command in its own session, output to ``<name>.out``."""
        out = open(self.root / f"{name}.out", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env=self.env,
            cwd=self.root,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_as_from_a_terminal,
        )
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:  # noqa: D102
        return (self.root / f"{name}.out").read_text(errors="replace")

    def init(self) -> None:  # noqa: D102
        self.cli("idc-server", "init", "--dir", str(self.coord))

    def add_site(self, name: str, register: bool = True) -> Path:
        """``idc-client init`` a site and (by default) register its key."""
        site_dir = self.root / name
        self.cli("idc-client", "init", "--dir", str(site_dir), "--name", name)
        if register:
            self.cli(
                "idc-server",
                "add-site",
                "--dir",
                str(self.coord),
                "--name",
                name,
                "--key",
                str(site_dir / "site.pub"),
            )
        return site_dir

    def start_server(self) -> subprocess.Popen[bytes]:
        """``idc-server start`` and wait until it says it is ready (each start its own log)."""
        name = f"server{sum(n.startswith('server') for n in self.procs) or ''}"
        proc = self.spawn(
            name, "idc-server", "start", "--dir", str(self.coord), "--address", self.address
        )
        try:
            wait_for(lambda: "SuperLink ready" in self.output(name), 90, "the SuperLink", [proc])
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.output(name)}") from None
        live = json.loads((self.coord / "superlink.json").read_text())
        self.flower_pids |= {live["pid"], live["gateway_pid"], live["executor_pid"]}
        return proc

    def start_all(
        self, data: Mapping[str, Path], extra: Mapping[str, Sequence[str]] | None = None
    ) -> subprocess.Popen[bytes]:
        """A fresh coordinator with every site of ``data`` registered, started and online.

        ``data`` maps a site's name to its patch folder, ``extra`` a name to more
        ``idc-client start`` flags. Returns the ``idc-server start`` process.
        """
        self.init()
        for name in data:
            self.add_site(name)
        server = self.start_server()
        for name, folder in data.items():
            self.start_site(name, folder, *(extra or {}).get(name, ()))
        self.wait_sites_online(len(data))
        return server

    def superlink_pid(self) -> int:
        """The flower-superlink process of the running ``idc-server start``."""
        return int(json.loads((self.coord / "superlink.json").read_text())["pid"])

    def start_site(self, name: str, data: Path, *extra: str) -> None:
        """``idc-client start`` for a site made with :meth:`add_site`."""
        self.spawn(
            name,
            "idc-client",
            "start",
            "--dir",
            str(self.root / name),
            "--server",
            self.address,
            "--ca",
            str(self.coord / "tls" / "ca.pem"),
            "--data",
            str(data),
            *extra,
        )

    def supernode_pid(self, name: str) -> int:
        """The SuperNode process that ``idc-client start`` launched for ``name``."""
        text = wait_for(
            lambda: "SuperNode started" in self.output(name) and self.output(name),
            60,
            f"{name}'s SuperNode",
            [self.procs[name]],
        )
        pid = int(text.split("(pid ")[1].split(",")[0])
        self.flower_pids.add(pid)
        return pid

    def wait_sites_online(self, n: int, timeout: float = 90) -> None:
        """Poll the SuperLink until ``n`` nodes are online."""
        from flowerctl import node_statuses

        conn = self.connection()
        servers = [p for name, p in self.procs.items() if name.startswith("server")]
        wait_for(
            lambda: sum(s == "online" for s, _ in node_statuses(conn).values()) >= n,
            timeout,
            f"{n} sites online",
            servers[-1:],
        )

    def connection(self):  # noqa: ANN201
        """The coordinator's own connection to its running SuperLink."""
        from common.paths import CoordPaths
        from server.runner import connection

        return connection(CoordPaths(self.coord))

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """``idc-server run`` to completion."""
        return self.cli(
            "idc-server", "run", "--dir", str(self.coord), *args, timeout=timeout, check=False
        )

    def spawn_run(self, *args: str, name: str = "run") -> subprocess.Popen[bytes]:
        """``idc-server run`` in the background, output to ``<name>.out``."""
        return self.spawn(name, "idc-server", "run", "--dir", str(self.coord), *args)

    def kill_group(self, pid: int) -> None:
        """SIGKILL a process we started, its group and every process below it (a crash)."""
        tree = descendants(pid)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        signal_tree(tree, signal.SIGKILL)
        wait_for(lambda: not any(alive(p) for p in [pid, *tree]), 60, f"process tree {pid}")

    def stop(self) -> None:
        """Stop every command we started: SIGTERM (they stop their children), then SIGKILL."""
        trees = {pid: descendants(pid) for pid in self.flower_pids}
        self.stop_procs(list(self.procs))
        for pid, tree in trees.items():  # normally gone already; never leave one behind
            signal_tree([p for p in [pid, *tree] if alive(p)], signal.SIGKILL)

    def stop_procs(self, names: Sequence[str]) -> None:
        """SIGTERM the named commands' groups, then SIGKILL what has not exited in 20 s."""
        procs = [self.procs[name] for name in names]
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill_group(proc.pid)
                proc.wait(5)

    def leftovers(self) -> list[int]:
        """Processes of ours still alive (should be none after :meth:`stop`)."""
        return [p for p in self.flower_pids if alive(p)]
