"""The console of ``idc-client start``: one plain line for each thing that happens at the site.

Two sources, both tailed from this start's offset: the SuperNode's log for the connection
(admitted, cannot reach, reconnected) and the executor's events (:mod:`client.events`) for
each round. Raw Flower lines (ANSI colours, exit-code banners) stay in the log files; when a
process stops, :func:`why_stopped` turns its log into one line that says what to do.
"""

from __future__ import annotations

import math
import re
import socket
import time
from datetime import datetime
from pathlib import Path

from client.events import Tail, describe

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ADMITTED = "SuperNode ID:"  # logged once the SuperLink activated this node
RETRYING = "Connection attempt failed"
RECONNECTED = "Connection successful after"
NOT_ADMITTED = "Failed to activate SuperNode"  # the SuperLink's answer to an unknown key
TLS_FAILED = ("SSL/TLS handshake error", "CERTIFICATE_VERIFY_FAILED", "SSL:")
REPEAT_S = 60.0  # "cannot reach" again at most this often while it lasts


def say(text: str) -> None:
    """Print one console line, stamped with the local time."""
    print(f"{datetime.now():%H:%M:%S} {text}", flush=True)


def probe(host: str, port: int, timeout: float = 3.0) -> str:
    """Why a TCP connection to the coordinator fails now (Flower's retries do not say)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "the port answers, but the coordinator's Flower service did not"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


class Console:
    """Turns new SuperNode log lines and executor events into console lines."""

    def __init__(
        self, name: str, server: tuple[str, int], supernode_log: Tail, events: Tail
    ) -> None:
        self.name, self.server = name, server
        self.address = f"{server[0]}:{server[1]}"
        self.supernode_log, self.events = supernode_log, events
        self.connected = False
        self.unreachable_since: float | None = None
        self.last_report = -math.inf

    def poll(self) -> None:
        """Print whatever happened since the last call."""
        for line in self.supernode_log.lines():
            self._connection(ANSI.sub("", line))
        for event in self.events.events():
            say(describe(event))

    def _connection(self, line: str) -> None:
        if ADMITTED in line or (
            RECONNECTED in line and self.connected and self.unreachable_since is not None
        ):
            again = "re" if self.connected else ""
            say(f"{again}connected to the coordinator at {self.address} as {self.name!r}")
            self.connected, self.unreachable_since = True, None
            self.last_report = -math.inf  # a later outage is reported at once
        elif RETRYING in line:
            now = time.monotonic()
            if self.unreachable_since is None:
                self.unreachable_since = now
            if now - self.last_report >= REPEAT_S:
                self.last_report = now
                say(
                    f"cannot reach the coordinator at {self.address} "
                    f"(retrying; last error: {probe(*self.server)})"
                )


def why_stopped(
    what: str, returncode: int, text: str, log: Path, ca: Path | None, key: tuple[str, Path]
) -> str:
    """One line: why the SuperNode or the executor stopped, and what to do.

    ``key`` is the site's public key: its fingerprint and its file.
    """
    plain = ANSI.sub("", text)
    # Flower's SuperNode exits 0 ("terminated gracefully") when the SuperLink answers 401 to
    # a node it no longer knows, and 1 with "Failed to activate" when it never knew the key.
    if what == "supernode" and (
        NOT_ADMITTED in plain or (returncode == 0 and "terminated gracefully" in plain)
    ):
        return (
            f"this site's key is not registered with the coordinator (fingerprint {key[0]}): "
            "keep this key (do not run `idc-client init` again) and ask the coordinator to "
            f"register {key[1]} with `idc-server add-site`"
        )
    lines = [ln.strip() for ln in plain.splitlines() if ln.strip()]
    if what == "supernode" and any(mark in plain for mark in TLS_FAILED):
        detail = next((ln for ln in lines if "SSL:" in ln), "TLS handshake failed")
        return (
            f"the coordinator's certificate is not trusted by --ca {ca} ({detail}): get the "
            "coordinator's own ca.pem and pass it as --ca"
        )
    banner = next((lines[i + 1] for i, ln in enumerate(lines[:-1]) if "Exit Code:" in ln), None)
    last = banner or (lines[-1] if lines else "no output")
    return f"the {what} stopped (exit {returncode}): {last} (log {log})"
