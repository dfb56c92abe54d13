"""Read-only Control API calls in-process, and following a run to its end."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest
from flwr.supercore.control import ControlHttpClient

from flowerctl.cli import Connection
from flowerctl.errors import FlowerProcError, FlowerTimeout, SuperLinkUnreachable


@dataclass(frozen=True)
class RunStatus:
    """Status of a run: ``status`` is pending/starting/running/finished."""

    status: str
    sub_status: str  # completed, failed, stopped, or "" while not finished
    details: str

    @property
    def finished(self) -> bool:
        """Whether the run has ended, in any way."""
        return self.status == "finished"

    @property
    def text(self) -> str:
        """The ``flwr ls`` form, e.g. ``finished:completed``."""
        return f"{self.status}:{self.sub_status}" if self.sub_status else self.status


def _control(conn: Connection, method: str, request: Any) -> Any:
    """Call one read-only Control API method in-process (cheaper than a ``flwr`` subprocess)."""
    client = ControlHttpClient.from_server_address(
        server_address=conn.address,
        insecure=conn.ca_cert is None,
        interceptors=[],
        root_certificates=conn.ca_cert.read_bytes() if conn.ca_cert else None,
    )
    try:
        return getattr(client, method)(request)
    except httpx.HTTPStatusError as err:
        raise FlowerProcError(f"SuperLink {conn.address} {method}: {err.response.text}") from err
    except httpx.HTTPError as err:
        raise SuperLinkUnreachable(f"SuperLink {conn.address} {method}: {err!r}") from err
    finally:
        client.close()


def list_nodes(conn: Connection) -> list[Any]:
    """Every node the SuperLink knows: ``node_id``, ``name``, ``status``, ``public_key``."""
    return list(_control(conn, "ListNodes", ListNodesRequest()).nodes_info)


def node_statuses(conn: Connection) -> dict[int, tuple[str, str]]:
    """Return ``{node_id: (status, name)}``; status is registered/online/offline/unregistered."""
    nodes = _control(conn, "ListNodes", ListNodesRequest()).nodes_info
    return {n.node_id: (n.status, n.name) for n in nodes}


def run_status(conn: Connection, run_id: int) -> RunStatus:
    """Return the current status of run ``run_id`` (FlowerProcError if the run is unknown)."""
    st = _control(conn, "ListRuns", ListRunsRequest(run_id=run_id)).run_dict[run_id].status
    return RunStatus(st.status, st.sub_status, st.details)


def follow_run(
    conn: Connection,
    run_id: int,
    timeout: float,
    on_poll: Callable[[], None] | None = None,
    poll: float = 1.0,
    unreachable_for: float = 60.0,
) -> RunStatus:
    """Wait until run ``run_id`` has finished (in any way) and return its status.

    ``on_poll`` runs before every status check (show progress, note processes). A SuperLink
    that is briefly unreachable or busy is retried; one unreachable for ``unreachable_for``
    seconds in a row is gone, and :class:`SuperLinkUnreachable` says so (the run cannot
    finish without it). At the deadline the run is stopped and :class:`FlowerTimeout` names
    the last status seen.
    """
    from flowerctl.cli import stop_run

    deadline, last = time.monotonic() + timeout, "no answer yet"
    unreachable_since: float | None = None
    while True:
        if on_poll is not None:
            on_poll()
        try:
            status = run_status(conn, run_id)
            if status.finished:
                return status
            last, unreachable_since = status.text, None
        except SuperLinkUnreachable as err:
            last = str(err)
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since >= unreachable_for:
                raise SuperLinkUnreachable(
                    f"run {run_id}: the SuperLink has been unreachable for "
                    f"{unreachable_for:.0f} s ({err}); resume the run once it is back"
                ) from err
        if time.monotonic() >= deadline:
            try:
                stop_run(conn, run_id)
            except FlowerProcError as err:
                last += f"; stopping it failed too: {err}"
            raise FlowerTimeout(
                f"run {run_id} did not finish within {timeout:.0f} s; "
                f"asked to stop it (last status: {last})"
            )
        time.sleep(poll)
