"""Durable file writes: the one atomic write of the project, and private (0600) files.

``atomic_write`` writes a temporary file beside the target, fsyncs it, renames it over the
target and fsyncs the folder, so after a crash the target holds the old bytes or the new
ones, never a mix, and the rename itself survives a power cut. ``write_private`` creates or
truncates a file readable by its owner only (keys, certificates' private halves);
``private_dir`` makes a state folder (coordinator, site, audit, SuperLink) owner-only (0700),
so nothing inside it is readable by other users whatever the file's own mode. ``read_json``
reads a JSON file the project wrote, naming the file when it is missing or bad.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(folder: Path) -> None:
    """Make renames and creations inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes | Callable[[BinaryIO], object], *, mode: int = 0o644
) -> Path:
    """Replace ``path`` with ``data`` (bytes, or a function writing to a binary file) durably.

    The file gets permission ``mode`` (use 0o600 for anything private).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Create or truncate ``path`` with owner-only permissions (0o600) and write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    """The JSON value in ``path``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        Naming ``path`` when it is not valid JSON (a damaged or hand-edited file).
    """
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore it or start afresh") from exc


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it owner-only (0o700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
