"""One accepted run's ServerApp process: the INSTALLED ``server.app:app``, never the run's FAB.

Started by :mod:`server.executor` once it has checked the run's app bundle, with the task's
token and input (the run and its context, already pulled: Flower lets a task start once) on
stdin. It mirrors ``flwr.superlink.runtime.run_serverapp`` of Flower 1.42 (heartbeat, log
upload to the SuperLink so ``flwr log`` works, the task's final status) except that nothing is
unpacked or installed: the run config is the installed ``pyproject.toml``'s defaults with the
run's overrides, and the ServerApp object is imported from the installed package.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import threading
import time
from collections.abc import Iterable
from logging import ERROR, INFO
from pathlib import Path
from queue import Queue

import httpx
from flwr.app import Context, Message
from flwr.common.config import get_fused_config_from_dir
from flwr.common.constant import SubStatus
from flwr.common.serde import context_from_proto, run_from_proto
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    PullTaskInputResponse,
)
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.logger import (
    FLOWER_LOGGER,
    flush_logs,
    mirror_output_to_queue,
    start_log_uploader,
    stop_log_uploader,
)
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType
from flwr.superlink.grid import HttpGrid
from flwr.superlink.grid import http_grid as flower_grid

from flowerctl.runtime import check_flower_version, push_task_output
from flowerctl.supernode import timed_logs

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the installed idc-fl (editable install)
# Flower's HttpGrid looks for replies every 3 s; the SuperLink's Runtime API is on loopback,
# where a look is a cheap local call, and a round waits on its slowest reply twice.
REPLY_POLL_S = 0.1
# Flower pulls a reply's objects with a backoff from 1 s doubling to 10 s: the SuperLink hands
# out a reply before its site has pushed all of its objects, which a short poll sees often.
OBJECT_BACKOFF_S = (0.05, 0.5)


class LoopbackGrid(HttpGrid):
    """Flower's :class:`HttpGrid` with short waits for replies (the SuperLink is local)."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """As Flower 1.42's, polling every :data:`REPLY_POLL_S`; logs how long each leg took."""
        t0 = time.monotonic()
        msg_ids = set(self.push_messages(messages))
        del messages
        pushed, sent, looks = time.monotonic(), len(msg_ids), 0
        end_time = time.time() + (timeout if timeout is not None else 0.0)
        ret: list[Message] = []
        while timeout is None or time.time() < end_time:
            replies = self.pull_messages(msg_ids)
            looks += 1
            ret.extend(replies)
            msg_ids.difference_update({m.metadata.reply_to_message_id for m in replies})
            if not msg_ids:
                break
            time.sleep(REPLY_POLL_S)
        log(
            INFO,
            "grid: %d messages pushed in %.2f s; %d replies in %.2f s (%d looks)",
            sent,
            pushed - t0,
            len(ret),
            time.monotonic() - pushed,
            looks,
        )
        return ret


def shorten_object_backoff() -> None:
    """Pull reply objects still in transit with :data:`OBJECT_BACKOFF_S` (this process only)."""
    check_flower_version()
    first, cap = OBJECT_BACKOFF_S
    pull = functools.partial(flower_grid.pull_objects, initial_backoff=first, backoff_cap=cap)
    flower_grid.pull_objects = pull  # HttpGrid.pull_messages looks it up there


def read_task(stream: bytes) -> tuple[str, PullTaskInputResponse]:
    """Split what the executor wrote: the token line, then the task input (protobuf)."""
    token, _, payload = stream.partition(b"\n")
    if not token:
        raise ValueError("no task token on stdin: this process is started by server.executor")
    return token.decode(), PullTaskInputResponse.FromString(payload)


class ServerAppTask:
    """The task's connection, heartbeat, log upload and final status, as Flower's own."""

    def __init__(self, address: str, certs: bytes | None, token: str) -> None:
        self.grid = LoopbackGrid(
            runtime_api_address=address,
            insecure=certs is None,
            root_certificates=certs,
            token=token,
        )
        self.queue: Queue[str | None] = Queue()
        self.heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(self.grid._runtime_client))
        self.uploader: threading.Thread | None = None
        self.context: Context | None = None
        self.sub_status, self.details = SubStatus.FAILED, "ServerApp stopped before it ran"

    def on_exit(self) -> None:
        """Push the final status (and context), stop the helpers: on any way out."""
        self.grid._retry_invoker.max_tries = 1  # never block the exit on a gone SuperLink
        if self.uploader:
            flush_logs(self.queue)
        try:
            push_task_output(self.grid._runtime_client, self.context, self.sub_status, self.details)
        except httpx.HTTPError as err:
            log(ERROR, "Failed to push task output: %s", err)
        if self.uploader:
            stop_log_uploader(self.queue, self.uploader)
        if self.heartbeat.is_running:
            self.heartbeat.stop()
        self.grid.close()

    def run(self, given: PullTaskInputResponse) -> int:
        """Run the installed ServerApp on the task's run; return the exit code."""
        # The claim expires without a heartbeat: beat before the slow imports (torch).
        self.heartbeat.start()
        try:
            from flwr.server.run_serverapp import run as run_serverapp

            from server.app import app  # the installed ServerApp: torch and the coordinator

            # who is speaking, as Flower's own ServerApp process sets it (messages carry it)
            TaskIdentity.task_id = given.task_id
            TaskIdentity.run_id = given.run.run_id
            TaskIdentity.node_id = given.context.node_id
            run = run_from_proto(given.run)
            self.grid.set_run(run)
            self.uploader = start_log_uploader(
                log_queue=self.queue, node_id=0, run_id=run.run_id, client=self.grid._runtime_client
            )
            context = context_from_proto(given.context)
            context.run_config = get_fused_config_from_dir(PROJECT_ROOT, run.override_config)
            self.context = context
            self.context = run_serverapp(
                grid=self.grid,
                context=context,
                server_app_dir=str(PROJECT_ROOT),
                loaded_server_app=app,
            )
        except Exception as exc:  # noqa: BLE001 - reported to the SuperLink as Flower does
            log(ERROR, "ServerApp raised an exception", exc_info=exc)
            self.details = f"ServerApp failed with exception: {exc}"
            return ExitCode.SERVERAPP_EXCEPTION
        self.sub_status, self.details = SubStatus.COMPLETED, ""
        self.context.state = type(self.context.state)()  # as Flower: no state pushed back
        return ExitCode.SUCCESS


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m server.apprun --runtime-api ADDR [--ca PEM]``, input on stdin."""
    p = argparse.ArgumentParser(prog="idc-server apprun", description=__doc__)
    p.add_argument("--runtime-api", required=True, help="the SuperLink's loopback host:port")
    p.add_argument("--ca", type=Path, default=None, help="the SuperLink's CA (omit: plain HTTP)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process ends")
    args = p.parse_args(argv)
    try:
        token, given = read_task(sys.stdin.buffer.read())
    except ValueError as exc:
        print(f"idc-server apprun: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    shorten_object_backoff()
    # serverapp.log is a file the coordinator's operators read: every line timed, no colours.
    # Flower's lines through its own handler; the coordinator's own (vetting, commits) through
    # a root handler in the same form (without one, Python's last resort prints bare messages).
    # Opacus's import would add a root handler too (logging.basicConfig): this one comes first,
    # and Flower's lines do not propagate to it, else they would appear twice.
    timed_logs()
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(asctime)s: %(name)s: %(message)s", force=True
    )
    FLOWER_LOGGER.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll, 10 a second
    task = ServerAppTask(args.runtime_api, args.ca.read_bytes() if args.ca else None, token)
    mirror_output_to_queue(task.queue)  # the ServerApp's output also goes to `flwr log`
    register_signal_handlers(
        event_type=EventType.FLWR_SERVERAPP_RUN_LEAVE,
        exit_message="Task stopped by user.",
        exit_handlers=[task.on_exit],
    )
    code = task.run(given)
    flwr_exit(code=code, event_type=EventType.FLWR_SERVERAPP_RUN_LEAVE)


if __name__ == "__main__":
    main()
