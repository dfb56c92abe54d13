"""What a site folder says about its ``idc-client start``: the one-start lock and its settings.

``SITE_DIR/start.lock`` is held (``fcntl.flock``) by the one ``idc-client start`` serving the
folder and holds its pid; the kernel drops the lock when that process ends however it ends,
so a stale file never blocks a new start. ``SITE_DIR/start.json`` keeps the settings the
latest start was given (coordinator address, privacy cap and delta, time, pid) so that
``idc-client status`` and ``idc-client privacy`` can show the cap later: the cap is a start
flag, never stored by the coordinator.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from common.errors import IdcError
from common.fileio import atomic_write

LOCK_NAME = "start.lock"
SETTINGS_NAME = "start.json"


class AlreadyRunning(IdcError):
    """Another ``idc-client start`` holds this site folder."""


def parse_server(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) of the coordinator; ValueError says what to give."""
    host, sep, port = text.rpartition(":")
    hint = "give HOST:PORT, e.g. coord.example.org:8000"
    if not sep or not host or "]" in port:
        raise ValueError(f"--server {text!r} has no port: {hint}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--server {text!r}: port {port!r} must be 1-65535; {hint}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"--server {text!r}: {host!r} is not a host name or address; {hint}")
    return host, int(port)


class StartLock:
    """The lock a running ``idc-client start`` holds on its site folder."""

    def __init__(self, site_dir: Path) -> None:
        self.path = Path(site_dir) / LOCK_NAME
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`AlreadyRunning` naming the holder's pid."""
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            pid = running_pid(self.path.parent)
            raise AlreadyRunning(
                f"site folder {self.path.parent} is already running, pid {pid}: stop that "
                "`idc-client start` first (Ctrl-C in its terminal), or give another --dir"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Drop the lock (also done by the kernel when the process ends)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def running_pid(site_dir: Path) -> int | None:
    """The pid of the ``idc-client start`` holding ``site_dir``, or None when none does."""
    path = Path(site_dir) / LOCK_NAME
    if not path.is_file():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


@dataclass(frozen=True)
class StartSettings:
    """The flags of the latest ``idc-client start`` that matter later (JSON has no inf)."""

    server: str
    max_epsilon: float | None
    delta: float | None
    started: str
    pid: int
    max_evaluations: int | None = None  # None: a start before the cap was recorded

    @property
    def cap(self) -> float:
        """The site's privacy cap, ``inf`` when it set none."""
        return self.max_epsilon if self.max_epsilon is not None else math.inf

    def write(self, site_dir: Path) -> None:
        """Replace ``SITE_DIR/start.json`` atomically."""
        data = json.dumps(asdict(self), indent=1) + "\n"
        atomic_write(Path(site_dir) / SETTINGS_NAME, data.encode())

    @classmethod
    def now(
        cls, server: str, max_epsilon: float | None, delta: float | None, max_evaluations: int
    ) -> StartSettings:
        """Settings of the running process, stamped with the current time."""
        started = datetime.now(UTC).isoformat(timespec="seconds")
        return cls(server, max_epsilon, delta, started, os.getpid(), max_evaluations)

    @classmethod
    def read(cls, site_dir: Path) -> StartSettings | None:
        """The latest start's settings, or None when the site never started."""
        path = Path(site_dir) / SETTINGS_NAME
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            return cls(
                str(raw["server"]),
                None if raw["max_epsilon"] is None else float(raw["max_epsilon"]),
                None if raw["delta"] is None else float(raw["delta"]),
                str(raw["started"]),
                int(raw["pid"]),
                None if raw.get("max_evaluations") is None else int(raw["max_evaluations"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path} is not readable ({exc}); the next `idc-client start` rewrites it"
            ) from None
