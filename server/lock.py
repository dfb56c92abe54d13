"""One ``idc-server start`` per coordinator folder: an ``flock`` on ``COORD/start.lock``.

The lock file holds the owner's pid and public address, so a second start can name them.
The kernel drops the lock when its process dies, however it dies: no stale lock to clean.
"""

from __future__ import annotations

import fcntl
import io
import json
import os

from common.errors import RefusedError
from common.paths import CoordPaths

LOCK_FILE = "start.lock"


class AlreadyRunning(RefusedError):
    """Another ``idc-server start`` serves this coordinator folder."""


class StartLock:
    """Held for as long as one ``idc-server start`` serves ``paths.root``."""

    def __init__(self, paths: CoordPaths, address: str) -> None:
        self.path = paths.root / LOCK_FILE
        self._file: io.FileIO | None = io.FileIO(self.path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._owner()
            self._file.close()
            self._file = None
            raise AlreadyRunning(
                f"the coordinator in {paths.root} is already running, pid "
                f"{owner.get('pid', '?')}, address {owner.get('address', '?')}; stop it "
                "(Ctrl-C in its terminal) before starting it again"
            ) from None
        os.ftruncate(self._file.fileno(), 0)
        os.write(self._file.fileno(), json.dumps({"pid": os.getpid(), "address": address}).encode())

    def _owner(self) -> dict[str, object]:
        try:
            value = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def release(self) -> None:
        """Let the next ``idc-server start`` in (the file stays; only the lock matters)."""
        if self._file is not None:
            self._file.close()
            self._file = None
