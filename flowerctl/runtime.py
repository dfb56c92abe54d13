"""A SuperNode's Runtime API from our own long-lived executor (Flower 1.42 only).

With ``flower-supernode --isolation process`` the SuperNode only queues tasks; whoever polls
its Runtime API (HTTP, 127.0.0.1) claims them. Flower's own ``flower-superexec`` then starts a
fresh ``flwr-clientapp`` per message, which installs the run's FAB and imports the code inside
it. :class:`RuntimeTask` is the same conversation done by us, in steps, so that the caller can
look at the run's app *before* anything of it is loaded: acquire a task, pull the run, its
context and the FAB, then (only if the caller accepts) the message, push the reply and the
task's end. It mirrors ``flwr.supernode.runtime.run_clientapp`` of Flower 1.42; the Runtime API
is internal to Flower, so :func:`check_flower_version` refuses any other series.

Unlike Flower's helpers, nothing here signals its own process: a rejected heartbeat or an
expired token ends the task, never the long-lived executor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from flwr.app import Context, Error, Message
from flwr.common.constant import SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullAppMessagesResponse,
    PullTaskInputRequest,
    PushTaskOutputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.version import package_version
from flwr.supernode.runtime.run_clientapp import push_message

from flowerctl.errors import FlowerProcError

log = logging.getLogger(__name__)
FLOWER_SERIES = "1.42."
MESSAGE_WAIT_S = 120.0  # for the SuperNode to store a task's message (seconds normally)
# For a message's objects. Flower's own default is 2 hours: a message the SuperNode dropped
# half-way (its run stopped while the SuperLink was down) would hold the executor that long,
# with the next run's tasks queued behind it.
OBJECTS_WAIT_S = 60.0
PULL_BACKOFF_S = (0.05, 0.5)  # first and longest wait for a message object still in transit
COMPONENT = "flwr-clientapp"  # what the SuperNode's version check expects of a ClientApp
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"  # the one call a SuperExec secret protects


def check_flower_version() -> None:
    """Refuse a Flower other than 1.42.x: the Runtime API used here is internal to Flower."""
    if not package_version.startswith(FLOWER_SERIES):
        raise FlowerProcError(
            f"the site executor speaks Flower {FLOWER_SERIES}x's Runtime API, but Flower "
            f"{package_version} is installed: install flwr~=1.42.0 (see pyproject.toml)"
        )


def _retry(max_time: float) -> RetryInvoker:
    """Retry dropped connections for ``max_time`` seconds; HTTP errors are the caller's."""
    return RetryInvoker(
        lambda: exponential(base_delay=0.2, max_delay=2),
        httpx.TransportError,
        max_tries=None,
        max_time=max_time,
    )


def runtime_client(
    address: str,
    token: str | None = None,
    *,
    component: str = COMPONENT,
    root_certificates: bytes | None = None,
    auth_secret: bytes | None = None,
) -> RuntimeHttpClient:
    """A client of a Runtime API on loopback ``address``, speaking as ``component``.

    The SuperNode's Runtime API is plain HTTP; the SuperLink's is HTTPS when it has TLS: pass
    its CA as ``root_certificates``. With ``auth_secret`` (the file the SuperLink was given as
    ``--superexec-auth-secret-file``) task claims are signed: only its holder can claim.
    """
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if auth_secret is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=auth_secret, protected_methods=[ACQUIRE])
        )
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        interceptors=interceptors,
        retry_invoker=_retry(30.0),
    )


def acquire_task(client: RuntimeHttpClient, task_type: str) -> str | None:
    """Claim the oldest pending task of ``task_type``; return its token, or None if none waits."""
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[task_type]))
    return res.token if res.HasField("task") and res.token else None


def acquire_clientapp_task(client: RuntimeHttpClient) -> str | None:
    """Claim the oldest pending ClientApp task; return its token, or None if none waits."""
    return acquire_task(client, TaskType.CLIENT_APP)


def serve_tasks(
    acquire: Callable[[], str | None],
    handle: Callable[[str], None],
    poll_s: float,
    where: str,
    before_each: Callable[[], None] = lambda: None,
) -> None:
    """Claim tasks with ``acquire`` and ``handle`` each token, until the process is stopped.

    ``poll_s`` is the pause when no task waits. An unreachable Runtime API (``where`` names
    it) is retried every second; one task's failure (a dropped connection, a message whose
    objects never came, an audit write refused) ends that task only: the next is served.
    """
    while True:
        before_each()
        try:
            token = acquire()
        except httpx.HTTPError as exc:
            log.warning("%s: %s", where, exc)
            time.sleep(1.0)
            continue
        if token is None:
            time.sleep(poll_s)
            continue
        try:
            handle(token)
        except Exception as exc:  # noqa: BLE001 - the executor outlives any one task
            log.exception("task failed: %s", exc)


def push_task_output(
    client: RuntimeHttpClient, context: Context | None, sub_status: str, details: str
) -> None:
    """End the task ``client`` holds the token of, with ``context`` saved if given."""
    client.PushTaskOutput(
        PushTaskOutputRequest(
            context=context_to_proto(context) if context is not None else None,
            sub_status=sub_status,
            details=details[:1000],
        )
    )


@dataclass(frozen=True)
class TaskInput:
    """What a claimed task carries before its message: the run, the node's context, the FAB."""

    run: Run
    context: Context
    fab: Fab


class RuntimeTask:
    """One claimed ClientApp task, from its token to its end; a heartbeat runs meanwhile."""

    def __init__(self, address: str, token: str) -> None:
        self.client = runtime_client(address, token)
        self.lost = threading.Event()  # the SuperNode gave up on this task
        self._heartbeat = HeartbeatSender(self._beat)
        self._heartbeat.start()
        self._finished = False

    def _beat(self) -> bool:
        try:
            ok = self.client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
        except httpx.TransportError:
            return False  # retried by the sender
        except httpx.HTTPStatusError as err:
            log.warning("task heartbeat refused (HTTP %s)", err.response.status_code)
            ok = False
        if not ok:
            self.lost.set()
        return True

    def pull_input(self) -> TaskInput:
        """The run, the context and the FAB; nothing of the FAB is unpacked or loaded."""
        res = self.client.PullTaskInput(PullTaskInputRequest())
        return TaskInput(
            run_from_proto(res.run), context_from_proto(res.context), fab_from_proto(res.fab)
        )

    def _pull_head(self) -> PullAppMessagesResponse:
        # The SuperNode queues the task a moment before it stores the message: wait for it.
        deadline, pause = time.monotonic() + MESSAGE_WAIT_S, PULL_BACKOFF_S[0]
        while not (res := self.client.PullMessages(PullAppMessagesRequest())).messages_list:
            if time.monotonic() > deadline or self.lost.is_set():
                raise FlowerProcError(f"no message for the task after {MESSAGE_WAIT_S:.0f} s")
            time.sleep(pause)
            pause = min(2 * pause, PULL_BACKOFF_S[1])
        return res

    def pull_message(self, context: Context) -> Message:
        """The task's message with its content: records of arrays and values, never code."""
        tree = self._pull_head().message_object_trees[0]
        node = Node(node_id=context.node_id)
        pull = make_pull_object_fn_protobuf(self.client.PullObject, node, context.run_id)

        def pull_unless_lost(object_id: str) -> bytes:
            if self.lost.is_set():  # the SuperNode gave up on this task: stop waiting for it
                raise FlowerProcError("the SuperNode dropped the task while its message arrived")
            return pull(object_id)

        message = pull_and_inflate_object_from_tree(
            tree,
            pull_unless_lost,
            make_confirm_message_received_fn_protobuf(
                self.client.ConfirmMessageReceived, node, context.run_id
            ),
            return_type=Message,
            # The message's objects may still be on their way from the SuperLink; Flower's
            # backoff (1 s doubling to 10 s) would idle for seconds on loopback.
            initial_backoff=PULL_BACKOFF_S[0],
            backoff_cap=PULL_BACKOFF_S[1],
            max_time=OBJECTS_WAIT_S,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's ClientApp does
        return message

    def refuse(self, context: Context, code: int, reason: str) -> None:
        """Answer the task's message with an error and end the task as failed.

        The message is pulled first (only data: Flower's records never unpickle), because
        the SuperNode stores it in pieces and a reply must name the whole message.
        """
        message = self.pull_message(context)
        self.reply(Message(Error(code=code, reason=reason), reply_to=message), context)
        self.finish(None, ok=False, details=reason)

    def reply(self, message: Message, context: Context) -> None:
        """Push the reply; the SuperNode sends it to the SuperLink."""
        push_message(self.client, message, context)

    def finish(self, context: Context | None, ok: bool, details: str = "") -> None:
        """End the task (completed or failed), saving ``context`` for the run's next message."""
        self._finished = True
        status = SubStatus.COMPLETED if ok else SubStatus.FAILED
        push_task_output(self.client, context, status, details)

    def close(self) -> None:
        """Stop the heartbeat and the connection; a task never finished is reported failed."""
        try:
            if not self._finished:
                self.finish(None, ok=False, details="the site executor stopped the task")
        except httpx.HTTPError as exc:
            log.warning("could not end the task: %s", exc)
        finally:
            if self._heartbeat.is_running:
                self._heartbeat.stop()
            self.client.close()

    def __enter__(self) -> RuntimeTask:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
