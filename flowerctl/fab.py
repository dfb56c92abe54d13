"""Is a run's app bundle (Flower's FAB) the app installed here? Decided without running it.

A FAB is a zip of an app's files (``pyproject.toml`` re-serialised, the sources, and a
``.info/CONTENT`` manifest) that ``flwr run`` builds from the submitter's project folder; its
hash is the SHA-256 of its bytes. :class:`InstalledApp` snapshots the digests of the installed
project's files once, so the answer describes the code that the calling process imported, even
if the files on disk change later.

A FAB matches when its ``pyproject.toml`` says what the installed one says (the ``flwr run``
copy drops ``[tool.flwr.federations]``) and every other file it carries is byte-identical to
the installed file at the same path. It may carry fewer files than are installed (a
coordinator's image without tests); it may not carry one file more. The zip is only read,
never extracted; names that leave the project folder, and bundles that would inflate past
:data:`MAX_UNPACKED`, are refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pathspec
import tomli
from flwr.supercore.run import Run

PYPROJECT = "pyproject.toml"
MANIFEST = ".info/CONTENT"
# The kinds of files `flwr build` puts in a FAB (flwr.common.constant.FAB_INCLUDE_PATTERNS).
FAB_SUFFIXES = frozenset({".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl"})
FAB_NAMES = frozenset({"LICENSE"})
# Flower caps a FAB at 10 MB compressed; this bounds what a crafted zip could inflate to.
MAX_UNPACKED = 64 * 1024 * 1024


def fab_hash(content: bytes) -> str:
    """Flower's FAB hash: the SHA-256 of the bundle's bytes, as hex."""
    return hashlib.sha256(content).hexdigest()


def app_details(run: Run, digest: str) -> dict[str, str]:
    """What an audit entry says of a run's app (``app.accepted``, ``app.refused``)."""
    publisher = run.fab_id.split("/", 1)[0] if "/" in run.fab_id else run.fab_id
    return {
        "run_id": str(run.run_id),
        "app_hash": digest,
        "publisher": publisher,
        "app": run.fab_id,
        "version": run.fab_version,
    }


def _flwr_config(pyproject: Mapping[str, Any]) -> dict[str, Any]:
    """The pyproject as ``flwr run`` ships it: without ``[tool.flwr.federations]``."""
    config = {k: v for k, v in pyproject.items()}
    tool = dict(config.get("tool", {}))
    flwr = {k: v for k, v in tool.get("flwr", {}).items() if k != "federations"}
    if "tool" in config:
        config["tool"] = {**tool, "flwr": flwr} if "flwr" in tool else tool
    return config


def _ignored(root: Path) -> pathspec.GitIgnoreSpec:
    """``root/.gitignore`` as ``flwr build`` applies it: what no FAB of ``root`` carries."""
    gitignore = root / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8").splitlines() if gitignore.is_file() else []
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _app_files(root: Path) -> dict[str, str]:
    """Digest of every file of ``root`` a FAB could carry.

    Hidden folders, caches and what ``.gitignore`` names (a demo's ``runs/``, thousands of
    JSON files) are never walked: ``flwr build`` leaves them out of every FAB.
    """
    ignored = _ignored(root)
    out: dict[str, str] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        rel = Path(folder).relative_to(root)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".")
            and d != "__pycache__"
            and not ignored.match_file(f"{(rel / d).as_posix()}/")
        )
        for name in files:
            path = Path(folder) / name
            key = (rel / name).as_posix()
            if path.is_symlink() or not (path.suffix in FAB_SUFFIXES or name in FAB_NAMES):
                continue
            if not ignored.match_file(key):
                out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass(frozen=True)
class InstalledApp:
    """The installed project: its parsed ``pyproject.toml`` and its files' digests."""

    root: Path
    config: dict[str, Any]
    files: Mapping[str, str]

    @classmethod
    def snapshot(cls, root: Path) -> InstalledApp:
        """Read ``root`` (the folder holding ``pyproject.toml``) once."""
        root = Path(root).resolve()
        pyproject = root / PYPROJECT
        if not pyproject.is_file():
            raise FileNotFoundError(f"{root} holds no {PYPROJECT}: not an installed Flower app")
        config = _flwr_config(tomli.loads(pyproject.read_text(encoding="utf-8")))
        return cls(root, config, _app_files(root))

    @property
    def label(self) -> str:
        """``name version`` from the project table, for messages."""
        project = self.config.get("project", {})
        return f"{project.get('name', '?')} {project.get('version', '?')}"

    def mismatch(self, content: bytes) -> str | None:
        """Why the FAB ``content`` is not this app, or None when it is."""
        try:
            with zipfile.ZipFile(io.BytesIO(content)) as fab:
                infos = fab.infolist()
                if sum(i.file_size for i in infos) > MAX_UNPACKED:
                    return f"unpacks to more than {MAX_UNPACKED} bytes"
                names = [i.filename for i in infos if not i.is_dir()]
                if PYPROJECT not in names:
                    return f"carries no {PYPROJECT}"
                for name in names:
                    if (reason := self._file_mismatch(name, fab.read(name))) is not None:
                        return reason
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
            return f"is not a readable app bundle ({exc})"
        return None

    def _file_mismatch(self, name: str, data: bytes) -> str | None:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or "\\" in name:
            return f"holds a path outside the app folder: {name!r}"
        if name == MANIFEST:  # Flower's digest list of the other files, checked one by one
            return None
        if name == PYPROJECT:
            try:
                config = _flwr_config(tomli.loads(data.decode("utf-8")))
            except (UnicodeDecodeError, tomli.TOMLDecodeError) as exc:
                return f"has an unreadable {PYPROJECT} ({exc})"
            if config != self.config:
                project = config.get("project", {})
                label = f"{project.get('name', '?')} {project.get('version', '?')}"
                return f"{PYPROJECT} differs from the installed one ({label} vs {self.label})"
            return None
        expected = self.files.get(name)
        if expected is None:
            return f"carries a file the installed app does not have: {name}"
        if hashlib.sha256(data).hexdigest() != expected:
            return f"carries a file that differs from the installed one: {name}"
        return None
