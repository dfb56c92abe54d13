"""The audit log's line format: canonical JSON, the chain hash, what a signature covers.

One canonical JSON object per line (sorted keys, no spaces, UTF-8, NaN and infinity
refused) with ``seq``, ``time`` (UTC ISO-8601 ``Z``), ``actor``, ``action``, ``object``,
``outcome``, optional ``details``, ``prev`` and ``sig``. ``sig`` covers the canonical entry
without ``sig`` (:func:`signing_bytes`); ``prev`` is :func:`entry_hash` of the whole previous
entry, or :data:`GENESIS` for the first. The writer is :class:`common.audit.AuditLog`, the
checker :mod:`common.audit_verify`; both read and write lines only through this module.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
_TEXT_FIELDS = ("time", "actor", "action", "object", "outcome", "prev", "sig")
_FIELDS = frozenset({"seq", "details", *_TEXT_FIELDS})


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """Return the canonical UTF-8 JSON bytes of a mapping (sorted keys, no spaces)."""
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def signing_bytes(entry: Mapping[str, Any]) -> bytes:
    """Return the bytes an entry's ``sig`` covers: the canonical entry without ``sig``."""
    return canonical_json({k: v for k, v in entry.items() if k != "sig"})


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Return the chain hash of an entry: SHA-256 hex of its canonical bytes, ``sig`` included."""
    return hashlib.sha256(canonical_json(entry)).hexdigest()


def format_time(moment: datetime) -> str:
    """Format an aware datetime as UTC ISO-8601 with microseconds and a ``Z`` suffix."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: object) -> datetime:
    """Parse an entry's ``time``; raise ValueError unless it is ISO-8601 UTC ending in ``Z``."""
    if not isinstance(value, str) or not value.endswith("Z"):
        raise ValueError(f"time {value!r} is not UTC ISO-8601 ending in Z")
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"time {value!r} is not UTC ISO-8601 ending in Z") from exc


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def parse_entry(line: bytes) -> dict[str, Any]:
    """Parse one raw log line and check its shape, not its chain link or signature.

    Raises
    ------
    ValueError
        If the line is cut short, is not canonical JSON, or has missing, unknown or
        wrongly typed fields. The message says which.
    """
    if not line.endswith(b"\n"):
        raise ValueError("partial line without a trailing newline (truncated write?)")
    try:
        entry = json.loads(line, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    missing = _FIELDS - {"details"} - entry.keys()
    unknown = entry.keys() - _FIELDS
    if missing or unknown:
        raise ValueError(f"missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
    seq = entry["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError(f"seq {seq!r} is not a non-negative integer")
    for name in _TEXT_FIELDS:
        if not isinstance(entry[name], str):
            raise ValueError(f"{name} {entry[name]!r} is not a string")
    if not isinstance(entry.get("details", {}), dict):
        raise ValueError(f"details {entry['details']!r} is not an object")
    parse_time(entry["time"])
    # Duplicate keys, extra spaces or escapes would let a line read differently from what was
    # signed; the writer only ever writes the canonical form, so demand exactly that.
    if canonical_json(entry) + b"\n" != line:
        raise ValueError("line is not in canonical JSON form")
    return entry


def rotated_files(path: Path) -> list[tuple[int, Path]]:
    """Return the rotated files ``<name>.<N>`` next to ``path`` as ``(N, file)``, oldest first."""
    pattern = re.compile(re.escape(path.name) + r"\.([1-9][0-9]*)")
    if not path.parent.is_dir():
        return []
    matches = (pattern.fullmatch(p.name) for p in path.parent.iterdir())
    return sorted((int(m.group(1)), path.parent / m.group(0)) for m in matches if m)


def clean_details(details: Mapping[str, Any] | None, action: str) -> dict[str, Any] | None:
    """``details`` as a reader of the file will see them; TypeError or ValueError if not JSON."""
    # Round-tripping turns tuples into lists and fails early on values JSON cannot hold, so
    # the returned entry is exactly what a reader of the file will see.
    if details is None:
        return None
    if not isinstance(details, Mapping):
        raise TypeError(f"details for {action!r} must be a mapping, got {type(details)}")
    try:
        return dict(json.loads(canonical_json(details)))
    except TypeError as exc:
        raise TypeError(f"details for {action!r} hold a non-JSON value: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"details for {action!r} hold a non-JSON value: {exc}") from exc
