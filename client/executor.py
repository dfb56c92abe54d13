"""The site's own executor: checks each run's app, then runs the INSTALLED ClientApp, warm.

``idc-client start`` runs the SuperNode with ``--isolation process`` (it only queues tasks) and
this process beside it, which claims the tasks from the SuperNode's Runtime API on loopback
(:mod:`flowerctl.runtime`, Flower 1.42). For every task, before its message is even pulled:

* the run's app bundle (FAB) must be the installed idc-fl, file for file, or a hash the site
  approved with ``idc-client approve`` (:mod:`client.approvals`);
* anything else is refused without being unpacked, installed or imported: the refusal (run
  id, app hash, publisher, why) goes into the site's audit log and the coordinator receives an
  error reply (Flower's ``INVALID_FAB``);
* an accepted task runs ``client.app:app``, the ClientApp imported from the installed package,
  never code from the FAB. Its first task of each run is recorded as ``app.accepted``.

One process serves every message: torch, Opacus and the handlers are imported once, both model
variants have run a forward pass, and the site's decoded patches are memory-mapped from the
cache, instead of a fresh Python process per message. Nothing that matters for privacy or
audit lives in it between messages: each message re-reads its run config and the site's node
config, re-scans the data folder (a changed file gives a new fingerprint and cache entry),
opens the audit log and the privacy ledger from disk, and starts from torch's initial seed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

import tomli
import torch
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from client import events
from client.approvals import ApprovalsError, load_approved
from common.audit import APP_ACCEPTED, APP_REFUSED, AuditError
from common.cli_util import setup_logging
from common.config import SiteConfig
from common.data import LoadOptions, PatchSet, load_patches
from flowerctl.errors import FlowerProcError
from flowerctl.fab import InstalledApp, app_details, fab_hash
from flowerctl.runtime import (
    RuntimeTask,
    TaskInput,
    acquire_clientapp_task,
    check_flower_version,
    runtime_client,
    serve_tasks,
)

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the installed idc-fl (editable install)
POLL_S = 0.2  # between AcquireTask calls when no task waits (a loopback call, cheap)
READY = "site executor ready"


class Gate:
    """Decide whether a run's app may use this site's data (see :mod:`client.approvals`)."""

    def __init__(self, installed: InstalledApp, site_dir: Path) -> None:
        self.installed = installed
        self.site_dir = site_dir
        # Bundle hashes found to be the installed app: the snapshot never changes in this
        # process, so each run's bundle is compared file by file once, not once a message.
        # Approvals are re-read every time (the site may withdraw one while it runs).
        self.installed_hashes: set[str] = set()

    def check(self, content: bytes) -> tuple[str, str, str | None]:
        """``(app hash, how accepted, None)``, or ``(app hash, "", why refused)``."""
        digest = fab_hash(content)
        if digest in self.installed_hashes:
            return digest, "installed", None
        mismatch = self.installed.mismatch(content)
        if mismatch is None:
            self.installed_hashes.add(digest)
            return digest, "installed", None
        try:
            approved = load_approved(self.site_dir)
        except ApprovalsError as exc:
            return digest, "", f"not the installed {self.installed.label}: it {mismatch}; {exc}"
        if digest in approved:
            return digest, "approved", None
        return (
            digest,
            "",
            (
                f"not the installed {self.installed.label} (it {mismatch}) and not approved "
                "with `idc-client approve`"
            ),
        )


class SiteExecutor:
    """Claims the SuperNode's ClientApp tasks one at a time and answers each."""

    def __init__(self, address: str, site: SiteConfig, gate: Gate) -> None:
        from client.app import app  # the installed ClientApp (torch and handlers, once)
        from client.held import HELD_MODEL

        HELD_MODEL.enabled = True  # this process outlives messages: it keeps the model

        self.address, self.site, self.gate, self.app = address, site, gate, app
        self.accepted_runs: set[int] = set()  # only to log `app.accepted` once per run
        self.torch_seed = torch.initial_seed()

    def serve(self) -> None:
        """Poll for tasks until stopped (SIGTERM, SIGINT or the parent's exit)."""
        idle = runtime_client(self.address)
        where = f"SuperNode Runtime API at {self.address}"
        serve_tasks(lambda: acquire_clientapp_task(idle), self.handle, POLL_S, where)

    def handle(self, token: str) -> None:
        """One task: check the app, then refuse it or run the installed ClientApp."""
        t0 = time.perf_counter()
        with RuntimeTask(self.address, token) as task:
            given = task.pull_input()
            digest, how, refused = self.gate.check(given.fab.content)
            if refused is not None:
                self._audit_refusal(given, digest, refused)
                reason = f"site {self.site.site_name} refused app {digest}: {refused}"
                task.refuse(given.context, ErrorCode.INVALID_FAB, reason)
                log.warning("run %s: %s", given.run.run_id, reason)
                refusal = {"event": "app-refused", "run": str(given.run.run_id), "app": digest}
                events.emit(self.site.state_dir, {**refusal, "reason": refused})
                return
            if given.run.run_id not in self.accepted_runs:
                self._audit(APP_ACCEPTED, given, digest, "ok", {"accepted_as": how})
                self.accepted_runs.add(given.run.run_id)
            message = task.pull_message(given.context)
            t1 = time.perf_counter()
            reply, ok, details = self._run_installed(message, given.context)
            t2 = time.perf_counter()
            task.reply(reply, given.context)
            task.finish(given.context, ok, details)
        events.emit_reply(self.site.state_dir, given.run.run_id, message, reply, ok, details)
        log.info(
            "run %s %s: %s; wait+pull %.2f s, ClientApp %.2f s, reply %.2f s",
            given.run.run_id,
            message.metadata.message_type,
            "ok" if ok else details,
            t1 - t0,
            t2 - t1,
            time.perf_counter() - t2,
        )

    def _run_installed(self, message: Message, context: Context) -> tuple[Message, bool, str]:
        torch.manual_seed(self.torch_seed)  # as a fresh process would start
        try:
            return self.app(message=message, context=context), True, ""
        except Exception as exc:  # the coordinator gets the error, the site keeps serving
            log.exception("ClientApp raised")
            reason = f"{type(exc).__name__}: {exc}"[:500]
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
            return Message(error, reply_to=message), False, reason

    def _audit_refusal(self, given: TaskInput, digest: str, reason: str) -> None:
        try:
            self._audit(APP_REFUSED, given, digest, "refused", {"reason": reason[:500]})
        except (AuditError, OSError, ValueError) as exc:  # refused all the same
            log.error("could not record the refusal of app %s: %s", digest, exc)

    def _audit(self, action: str, given: TaskInput, digest: str, outcome: str, extra: dict) -> None:
        from client.site import open_audit

        details = {**app_details(given.run, digest), **extra}
        with open_audit(self.site) as audit:
            audit.append(action, str(given.run.run_id), outcome, details)


def warm_up(site: SiteConfig) -> PatchSet:
    """Import, decode and build what every message needs; return the patches to keep mapped."""
    import client.private  # noqa: F401 - Opacus and the privacy path, imported once
    from common.model import build_model

    patches = load_patches(
        site.data_dir, cache_dir=site.cache_dir, options=LoadOptions(small=site.small_policy)
    )
    with torch.no_grad():
        for norm in ("batch", "group"):
            build_model(norm).eval()(torch.zeros(2, 3, 50, 50))
    return patches


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m client.executor --runtime-api ADDR --node-config TOML``."""
    p = argparse.ArgumentParser(prog="idc-client executor", description=__doc__)
    p.add_argument("--runtime-api", required=True, help="the SuperNode's Runtime API host:port")
    p.add_argument("--node-config", type=Path, required=True, help="the site's node-config.toml")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process ends")
    args = p.parse_args(argv)
    setup_logging()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        check_flower_version()
        site = SiteConfig.from_node_config(tomli.loads(args.node_config.read_text()))
        gate = Gate(InstalledApp.snapshot(PROJECT_ROOT), site.state_dir)
        if args.parent_pid is not None:
            from flwr.supercore.app_utils import start_parent_process_monitor

            start_parent_process_monitor(args.parent_pid)  # SIGINT here when it is gone
        patches = warm_up(site)
        executor = SiteExecutor(args.runtime_api, site, gate)
        log.info("%s: %s, %d patches mapped", READY, gate.installed.label, len(patches))
        events.emit(site.state_dir, {"event": "ready", "patches": len(patches)})
        executor.serve()
    except KeyboardInterrupt:
        return 0
    except (ValueError, FileNotFoundError, FlowerProcError) as exc:
        print(f"idc-client executor: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
