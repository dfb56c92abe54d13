"""The coordinator's ServerApp executor: checks each run's app, then runs the INSTALLED ServerApp.

``idc-server start`` runs the SuperLink with ``--isolation process``: it only queues a
ServerApp task per submitted run, and this long-lived process beside it claims those tasks
from the SuperLink's Runtime API on loopback (:mod:`flowerctl.runtime`, Flower 1.42). For each:

* the run's app bundle (FAB) must be the installed idc-fl, file for file
  (:class:`flowerctl.fab.InstalledApp`, the same check the sites make); the coordinator has no
  approvals: it runs its own app and nothing else;
* anything else is refused without being unpacked, installed or imported: ``app.refused``
  (run id, app hash, publisher, why) goes into the coordinator's audit log, the task ends
  ``failed`` with the reason (what ``flwr ls`` and ``idc-server`` show), and one line goes to
  ``idc-server start``'s console;
* an accepted task runs ``server.app:app`` from the installed package in a fresh process of
  its own (:mod:`server.apprun`), handed the task's token and input; FAB code never runs.

Claiming a task takes the secret that ``idc-server start`` writes owner-only for each start
(:func:`secret_file`, Flower's SuperExec authentication): another local user who reaches the
loopback Runtime API cannot take the coordinator's run away from it.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from flwr.common.constant import SubStatus
from flwr.common.serde import fab_from_proto, run_from_proto
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    PullTaskInputRequest,
    PullTaskInputResponse,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.runtime import RuntimeHttpClient

from common.audit import APP_REFUSED, AuditError
from common.fileio import private_dir, write_private
from common.paths import CoordPaths
from flowerctl.errors import FlowerProcError
from flowerctl.fab import InstalledApp, app_details, fab_hash
from flowerctl.processes import flower_env
from flowerctl.runtime import (
    acquire_task,
    check_flower_version,
    push_task_output,
    runtime_client,
    serve_tasks,
)

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the installed idc-fl (editable install)
POLL_S = 0.5  # between AcquireTask calls when no run waits (a loopback call, cheap)
COMPONENT = "flwr-serverapp"  # what the SuperLink's version check expects of a ServerApp
SERVERAPP_LOG = "serverapp.log"  # under COORD/logs: the accepted runs' ServerApp output
READY = "coordinator executor ready"


def task_bytes(token: str, res: PullTaskInputResponse) -> bytes:
    """What a ServerApp process is handed (:func:`server.apprun.read_task`): without the FAB."""
    given = PullTaskInputResponse()
    given.CopyFrom(res)
    given.ClearField("fab")  # checked already; the ServerApp runs the installed files
    return token.encode() + b"\n" + given.SerializeToString()


class ServerExecutor:
    """Claims the SuperLink's ServerApp tasks one at a time; refuses or hands each on."""

    def __init__(self, address: str, ca: Path | None, paths: CoordPaths, app: InstalledApp):
        self.address, self.ca, self.paths, self.installed = address, ca, paths, app
        self.certs = ca.read_bytes() if ca is not None else None
        self.secret = secret_file(paths).read_bytes()
        self.running: dict[int, subprocess.Popen[bytes]] = {}  # run id -> its ServerApp

    def client(self, token: str | None = None) -> RuntimeHttpClient:
        """A Runtime API client of the SuperLink, with a task's token if given."""
        return runtime_client(
            self.address, token, component=COMPONENT, root_certificates=self.certs
        )

    def serve(self) -> None:
        """Poll for ServerApp tasks until stopped (SIGTERM, SIGINT or the parent's exit)."""
        idle = runtime_client(
            self.address, component=COMPONENT, root_certificates=self.certs, auth_secret=self.secret
        )
        serve_tasks(
            lambda: acquire_task(idle, TaskType.SERVER_APP),
            self.handle,
            POLL_S,
            f"SuperLink Runtime API at {self.address}",
            before_each=self._reap,
        )

    def handle(self, token: str) -> None:
        """One task: pull its input (the run, the context, the FAB), refuse it or run ours."""
        client = self.client(token)
        try:
            res: PullTaskInputResponse = client.PullTaskInput(PullTaskInputRequest())
            content = fab_from_proto(res.fab).content
            digest, why = fab_hash(content), self.installed.mismatch(content)
            if why is not None:
                self.refuse(client, res, digest, why)
                return
        finally:
            client.close()
        self.running[res.run.run_id] = self.spawn(token, res)
        log.info("run %d: %s accepted, ServerApp started", res.run.run_id, self.installed.label)

    def refuse(
        self, client: RuntimeHttpClient, res: PullTaskInputResponse, digest: str, why: str
    ) -> None:
        """Record the refusal, end the task failed with the reason, say so on the console."""
        run = run_from_proto(res.run)
        reason = (
            f"the coordinator refused app {digest} ({run.fab_id} {run.fab_version}): it is not "
            f"the {self.installed.label} that `idc-server start` runs (it {why}); if idc-fl "
            "was updated since, restart `idc-server start`"
        )
        details = {**app_details(run, digest), "reason": why[:500]}
        try:
            from server.ops import open_audit

            with open_audit(self.paths) as audit:
                audit.append(APP_REFUSED, str(run.run_id), "refused", details)
        except (AuditError, OSError, ValueError) as exc:  # refused all the same
            log.error("could not record the refusal of app %s: %s", digest, exc)
        push_task_output(client, None, SubStatus.FAILED, reason)
        log.warning("run %d: %s", run.run_id, reason)

    def spawn(self, token: str, res: PullTaskInputResponse) -> subprocess.Popen[bytes]:
        """Run the installed ServerApp for this task in a process of its own (same group)."""
        cmd = [sys.executable, "-m", "server.apprun", "--runtime-api", self.address]
        cmd += ["--ca", str(self.ca)] if self.ca is not None else []
        cmd += ["--parent-pid", str(os.getpid())]
        # The token and the input travel over a pipe: never on a command line others can read.
        read, write = os.pipe()
        out = os.open(
            self.paths.logs / SERVERAPP_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        try:
            proc = subprocess.Popen(cmd, stdin=read, stdout=out, stderr=out)
        finally:
            os.close(out)
            os.close(read)
        with open(write, "wb") as pipe:
            pipe.write(task_bytes(token, res))
        return proc

    def _reap(self) -> None:
        for run_id, proc in list(self.running.items()):
            if proc.poll() is not None:
                log.info("run %d: ServerApp exited with %d", run_id, proc.returncode)
                del self.running[run_id]


def secret_file(paths: CoordPaths) -> Path:
    """The SuperLink's SuperExec secret: only its holder may claim ServerApp tasks."""
    return paths.superlink / "superexec.secret"


def write_secret(paths: CoordPaths) -> Path:
    """A fresh secret for this start (owner-only); return its file for the SuperLink's flag."""
    private_dir(paths.superlink)
    path = secret_file(paths)
    write_private(path, secrets.token_bytes(32))
    return path


def start_executor(paths: CoordPaths, runtime_api: str, ca: Path | None) -> subprocess.Popen[bytes]:
    """Start the executor for ``paths``'s SuperLink at ``runtime_api`` (its own session).

    Its console lines (refusals, errors) go to this process's stderr, i.e. ``idc-server
    start``'s console; the rest to ``logs/executor.log``. Its ServerApps share its process
    group, so stopping it by pid (:func:`flowerctl.stop_process`) stops them too.
    """
    cmd = [sys.executable, "-m", "server.executor", "--runtime-api", runtime_api]
    cmd += ["--dir", str(paths.root), "--parent-pid", str(os.getpid())]
    cmd += ["--ca", str(ca)] if ca is not None else []
    home = paths.superlink / "flwr-home"
    return subprocess.Popen(
        cmd,
        env=flower_env(home, {"PYTHONUNBUFFERED": "1"}),
        cwd=paths.superlink,  # where Flower's own ServerApps ran: the same for ours
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        umask=0o077,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m server.executor --runtime-api ADDR --dir COORD [--ca PEM]``."""
    p = argparse.ArgumentParser(prog="idc-server executor", description=__doc__)
    p.add_argument("--runtime-api", required=True, help="the SuperLink's loopback host:port")
    p.add_argument("--dir", type=Path, required=True, help="the coordinator folder")
    p.add_argument("--ca", type=Path, default=None, help="the SuperLink's CA (omit: plain HTTP)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process ends")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        paths = CoordPaths(args.dir).require()
        _setup_logging(paths.logs / "executor.log")
        check_flower_version()
        executor = ServerExecutor(
            args.runtime_api, args.ca, paths, InstalledApp.snapshot(PROJECT_ROOT)
        )
        if args.parent_pid is not None:
            from flwr.supercore.app_utils import start_parent_process_monitor

            start_parent_process_monitor(args.parent_pid)  # SIGINT here when it is gone
        log.info("%s: runs only %s", READY, executor.installed.label)
        executor.serve()
    except KeyboardInterrupt:
        return 0
    except (ValueError, FileNotFoundError, FlowerProcError) as exc:
        print(f"idc-server executor: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _setup_logging(path: Path) -> None:
    """Everything to ``logs/executor.log``; refusals and errors also to the console."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("idc-server executor: %(message)s"))
    logfile = logging.FileHandler(path)
    logfile.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[console, logfile], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
