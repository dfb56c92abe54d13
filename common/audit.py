"""Append-only, hash-chained, signed JSON Lines audit log written by the coordinator and sites.

Format (:mod:`common.audit_format`): one canonical JSON object per line with ``seq`` (0, 1, 2,
... across rotated files), ``time`` (UTC ISO-8601 ``Z``, clamped so it never decreases),
``actor``, ``action``, ``object``, ``outcome``, optional ``details`` (JSON values; NaN and
infinity refused), ``prev`` and ``sig``. ``sig`` is the owner's ECDSA-SHA256 signature
(:mod:`common.keys`) over the canonical entry without ``sig``; ``prev`` is the SHA-256 hex of
the whole previous canonical entry, ``sig`` included, or :data:`GENESIS` for the first.

A live file past ``max_bytes`` is renamed ``<name>.<N>`` (oldest lowest) and the chain goes
on in a fresh file. Reopening continues from the last entry, which must parse and carry this
key's signature (only the tail is checked; :mod:`common.audit_verify` checks all). Each
append is fsync-ed; any ``OSError`` becomes :class:`AuditError` and the log refuses further
appends, so an audited run stops (fail closed). A thread lock serialises appends and a
``flock`` on ``<name>.lock`` refuses a second writer. A log opened with ``shared=True`` holds
that ``flock`` only while it appends (waiting up to ``lock_wait`` seconds for it) and first
re-reads the tail another process may have added, so several short-lived processes (the
coordinator's ServerApp and its ``add-site``) extend one chain; an exclusive writer still
shuts every other writer out (after waiting up to ``lock_wait``, 0 by default). Files are
owner-only (0600), a folder the log creates 0700.

Limits: the chain proves order and completeness only up to the last entry present. Lines
cut cleanly off the end leave a shorter valid chain, and the key holder can rewrite the whole
log. Only evidence kept outside the log catches that: a head (:attr:`AuditLog.head`, or a
report's ``last_seq``/``last_hash``) recorded where the owner cannot edit it and passed to
``verify_log(..., expect_head=...)``, or the other party's log via ``cross_check``. Entries
after the last head recorded elsewhere can still vanish unnoticed.

Update events, the convention ``cross_check`` relies on: a site (``actor`` = its site name)
appends ``update.sent`` (object: the run id) with details ``{"run_id": str, "round": int,
"digest": str}`` when it hands an update to Flower; the coordinator appends
``update.received`` (object: the site name) with details ``{"run_id", "round", "digest",
"signature_valid": bool, "accepted": bool, ...}`` for every update that arrives, accepted or
not. Digests come from :func:`common.digests.digest_update`.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from common import keys
from common.audit_format import (
    GENESIS,
    canonical_json,
    clean_details,
    entry_hash,
    format_time,
    parse_entry,
    parse_time,
    rotated_files,
    signing_bytes,
)
from common.errors import RefusedError

logger = logging.getLogger(__name__)

UPDATE_SENT = "update.sent"
UPDATE_RECEIVED = "update.received"
# A run's app checked by an executor (the site's, the coordinator's) before any of it runs.
APP_ACCEPTED = "app.accepted"
APP_REFUSED = "app.refused"


class AuditError(RefusedError, RuntimeError):
    """The audit log cannot be opened, continued or written; the run must stop."""


class LogHead(NamedTuple):
    """The last entry of a log: its ``seq`` and chain hash."""

    seq: int
    hash: str


class AuditLog:
    """One owner's audit log; see the module docstring for the format and guarantees.

    Parameters
    ----------
    path : Path
        The live log file; rotated files sit beside it. Parent folders are created.
    private_key : keys.PrivateKey
        The owner's P-256 key; every entry is signed with it.
    actor : str
        Written into every entry (a site's name, or the coordinator's).
    max_bytes : int
        Size past which the live file is rotated.
    shared : bool
        Take the writer lock per append (other shared writers may append in between) instead
        of for the log's lifetime.
    lock_wait : float or None
        Seconds to wait for the writer lock before :class:`AuditError` (default: 30 for a
        shared writer, 0, refuse at once, for an exclusive one). The ServerApp waits for
        ``idc-server run``, which holds the log while it submits the run.

    Raises
    ------
    AuditError
        If the log cannot be created or written, another writer holds it, or its last
        entry is damaged or not signed by ``private_key``.
    """

    def __init__(
        self,
        path: Path,
        private_key: keys.PrivateKey,
        actor: str,
        max_bytes: int = 50_000_000,
        *,
        shared: bool = False,
        lock_wait: float | None = None,
    ) -> None:
        if not isinstance(actor, str) or not actor:
            raise ValueError(f"actor must be a non-empty string, got {actor!r}")
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        if not isinstance(private_key, keys.PrivateKey):
            raise TypeError(f"private_key must be an EC private key, got {type(private_key)}")
        self.path = Path(path)
        self.actor = actor
        self.max_bytes = max_bytes
        self._key = private_key
        self._lock = threading.Lock()
        self._file: io.FileIO | None = None
        self._lock_file: io.FileIO | None = None
        self._failure: str | None = None
        self._size = 0
        self._shared = shared
        self._lock_wait = (30.0 if shared else 0.0) if lock_wait is None else lock_wait
        try:
            # Owner-only: the log names sites, runs and digests (0700 folder, 0600 files).
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_file = self._take_writer_lock()
            self._head, self._last_time = self._read_tail()
            self._open_live()
            if shared:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
        except OSError as exc:
            self.close()
            raise AuditError(f"cannot open audit log {self.path}: {exc}") from exc
        except AuditError:
            self.close()
            raise

    @property
    def head(self) -> LogHead | None:
        """The last entry written (``seq`` and chain hash), or None for an empty log."""
        return self._head

    @property
    def public_key(self) -> keys.PublicKey:
        """The public key that verifies this log."""
        return self._key.public_key()

    def _take_writer_lock(self) -> io.FileIO:
        lock_file = io.FileIO(self.path.with_name(self.path.name + ".lock"), "a", opener=_private)
        try:
            self._flock(lock_file)
        except AuditError:
            lock_file.close()
            raise
        return lock_file

    def _flock(self, lock_file: io.FileIO) -> None:
        """Take the writer lock now, or within ``lock_wait`` seconds for a shared writer."""
        deadline = time.monotonic() + self._lock_wait
        while True:
            try:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AuditError(
                        f"audit log {self.path} is already open for writing (by this or "
                        "another process); two writers would fork the chain"
                    ) from None
                time.sleep(0.05)

    def _catch_up(self) -> io.FileIO:
        """Shared writer, lock held: continue from whatever another writer appended."""
        assert self._file is not None and self._lock_file is not None
        mine = os.fstat(self._file.fileno())
        try:
            live = os.stat(self.path)
        except FileNotFoundError:
            live = None
        if live is not None and (live.st_ino, live.st_size) == (mine.st_ino, self._size):
            return self._file
        head, last_time = self._read_tail()
        self._head = head
        if last_time is not None and (self._last_time is None or last_time > self._last_time):
            self._last_time = last_time
        if live is None or live.st_ino != mine.st_ino:  # rotated by another writer
            self._file.close()
            self._file = None
            return self._open_live()
        self._size = live.st_size
        return self._file

    def _read_tail(self) -> tuple[LogHead | None, datetime | None]:
        source = self.path
        if not source.exists() or source.stat().st_size == 0:
            rotated = rotated_files(self.path)
            if not rotated:
                return None, None
            source = rotated[-1][1]
        line_no, last = 0, b""
        with source.open("rb") as handle:
            for line in handle:
                line_no, last = line_no + 1, line
        try:
            entry = parse_entry(last)
            if not keys.verify(self.public_key, signing_bytes(entry), entry["sig"]):
                raise ValueError("signature does not verify with this log's key")
        except ValueError as exc:
            raise AuditError(
                f"audit log {source} line {line_no} is damaged ({exc}); refusing to append "
                "to it. Check it with the audit verifier before starting a new log."
            ) from None
        return LogHead(entry["seq"], entry_hash(entry)), parse_time(entry["time"])

    def _open_live(self) -> io.FileIO:
        self._file = handle = io.FileIO(self.path, "a", opener=_private)
        os.fchmod(handle.fileno(), 0o600)  # also tightens a log written by an older version
        self._size = os.fstat(handle.fileno()).st_size
        # A new or renamed file is only durable once its directory entry is.
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return handle

    def append(
        self, action: str, object: str, outcome: str, details: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Sign, chain, write and fsync one entry; return it as written.

        Raises
        ------
        ValueError, TypeError
            If a field is empty or ``details`` is not a mapping of JSON values; nothing is
            written then.
        AuditError
            If the entry could not be made durable, or an earlier append failed.
        """
        for name, value in (("action", action), ("object", object), ("outcome", outcome)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"audit {name} must be a non-empty string, got {value!r}")
        clean = clean_details(details, action)
        with self._lock:
            if self._failure is not None or self._file is None:
                raise AuditError(f"audit log {self.path} is unusable ({self._failure or 'closed'})")
            if not self._shared:
                return self._append_locked(action, object, outcome, clean)
            assert self._lock_file is not None
            self._flock(self._lock_file)
            try:
                try:
                    self._catch_up()
                except OSError as exc:
                    raise AuditError(f"cannot read audit log {self.path}: {exc}") from exc
                return self._append_locked(action, object, outcome, clean)
            finally:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)

    def _append_locked(
        self, action: str, object: str, outcome: str, clean: dict[str, Any] | None
    ) -> dict[str, Any]:
        assert self._file is not None
        entry = self._next_entry(action, object, outcome, clean)
        line = canonical_json(entry) + b"\n"
        try:
            handle = self._file
            if self._size and self._size + len(line) > self.max_bytes:
                handle = self._rotate(handle)
            self._write(handle, line)
        except OSError as exc:
            self._failure = f"write failed: {exc}"
            raise AuditError(f"cannot write audit log {self.path}: {exc}") from exc
        self._head = LogHead(entry["seq"], entry_hash(entry))
        self._size += len(line)
        return entry

    def _next_entry(
        self, action: str, object: str, outcome: str, details: dict[str, Any] | None
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        if self._last_time is not None and now < self._last_time:
            now = self._last_time  # keeps time non-decreasing if the clock steps back
        self._last_time = now
        entry: dict[str, Any] = {
            "seq": 0 if self._head is None else self._head.seq + 1,
            "time": format_time(now),
            "actor": self.actor,
            "action": action,
            "object": object,
            "outcome": outcome,
            "prev": GENESIS if self._head is None else self._head.hash,
        }
        if details is not None:
            entry["details"] = details
        entry["sig"] = keys.sign(self._key, signing_bytes(entry))
        return entry

    def _write(self, handle: io.FileIO, line: bytes) -> None:
        start = self._size
        try:
            view = memoryview(line)
            while view:
                written = handle.write(view)
                view = view[written or 0 :]
            os.fsync(handle.fileno())
        except OSError:
            # Cut a half-written line off so the file still ends on a whole entry.
            with contextlib.suppress(OSError):
                os.ftruncate(handle.fileno(), start)
            raise

    def _rotate(self, handle: io.FileIO) -> io.FileIO:
        handle.close()
        self._file = None
        rotated = rotated_files(self.path)
        number = rotated[-1][0] + 1 if rotated else 1
        target = self.path.with_name(f"{self.path.name}.{number}")
        os.rename(self.path, target)
        logger.info("audit log %s rotated to %s", self.path, target)
        return self._open_live()

    def close(self) -> None:
        """Close the log and release the writer lock; later appends raise AuditError."""
        with self._lock:
            for handle in (self._file, self._lock_file):
                if handle is not None:
                    handle.close()
            self._file = self._lock_file = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)
