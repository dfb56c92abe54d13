"""The coordinator's folder: TLS material, its signing key, and the registered sites.

A site is its key: the registry maps each site name to one public key (and its fingerprint)
and, when the hospital declared it at enrolment (``add-site --patches N``), to the number of
patches it holds, the bound on the weight (``num-examples``) its updates may claim. The
folder is owner-only (0700): it holds the CA key, the coordinator's key, the SuperLink's
database and the audit log.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import keys
from common.fileio import atomic_write, private_dir

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class CoordPaths:
    """Where everything lives under COORD_DIR."""

    root: Path

    @property
    def tls(self) -> Path:  # noqa: D102
        return self.root / "tls"

    @property
    def sites(self) -> Path:  # noqa: D102
        return self.root / "sites.json"

    @property
    def site_keys(self) -> Path:  # noqa: D102
        return self.root / "site-keys"

    @property
    def key(self) -> Path:  # noqa: D102
        return self.root / "coordinator.key"

    @property
    def pub(self) -> Path:  # noqa: D102
        return self.root / "coordinator.pub"

    @property
    def audit(self) -> Path:  # noqa: D102
        return self.root / "audit" / "coordinator-audit.jsonl"

    @property
    def superlink(self) -> Path:  # noqa: D102
        return self.root / "superlink"

    def require(self) -> CoordPaths:
        """Fail with a clear message when COORD_DIR was never initialised."""
        if not self.sites.is_file() or not self.key.is_file():
            raise FileNotFoundError(
                f"{self.root} is not a coordinator folder (run `idc-server init --dir ...` first)"
            )
        private_dir(self.root)  # tightens a folder made by an older version (was 0755)
        return self


def check_name(name: str) -> str:
    """Site names go into logs and file names: keep them plain.

    A full match: ``re.match`` with ``$`` would accept a name ending in a newline.
    """
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"site name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return name


def load_sites(paths: CoordPaths) -> dict[str, dict[str, Any]]:
    """Registered sites: name -> {public_key (OpenSSH), fingerprint, added[, patches]}."""
    try:
        data = json.loads(paths.sites.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read site registry {paths.sites}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"site registry {paths.sites} is not a JSON object")
    return data


def save_sites(paths: CoordPaths, sites: dict[str, dict[str, Any]]) -> None:
    """Write the registry atomically."""
    atomic_write(paths.sites, json.dumps(sites, indent=2, sort_keys=True).encode(), mode=0o600)


def add_site(
    paths: CoordPaths, name: str, key_file: Path, patches: int | None = None
) -> dict[str, Any]:
    """Register a site's public key under ``name``; a name or key used twice is refused.

    ``patches`` is the number of patches the hospital declared (``idc-client check`` prints
    it); a reply claiming more training examples than that is rejected.
    """
    check_name(name)
    if patches is not None and (isinstance(patches, bool) or patches < 1):
        raise ValueError(f"--patches must be a positive number of patches, got {patches}")
    public = keys.load_public_key(key_file)
    openssh = keys.openssh_bytes(public).decode()
    fingerprint = keys.public_key_fingerprint(public)
    sites = load_sites(paths)
    if name in sites:
        raise ValueError(f"site {name!r} is already registered; remove it first to rotate keys")
    for other, info in sites.items():
        if info["fingerprint"] == fingerprint:
            raise ValueError(f"that key is already registered for site {other!r}")
    paths.site_keys.mkdir(parents=True, exist_ok=True)
    (paths.site_keys / f"{name}.pub").write_text(openssh + "\n")
    sites[name] = {
        "public_key": openssh,
        "fingerprint": fingerprint,
        "added": datetime.now(UTC).isoformat(),
    }
    if patches is not None:
        sites[name]["patches"] = int(patches)
    save_sites(paths, sites)
    return sites[name]


def remove_site(paths: CoordPaths, name: str) -> dict[str, Any]:
    """Remove a registered site; returns what was removed."""
    sites = load_sites(paths)
    if name not in sites:
        raise ValueError(f"site {name!r} is not registered (known: {sorted(sites)})")
    info = sites.pop(name)
    save_sites(paths, sites)
    (paths.site_keys / f"{name}.pub").unlink(missing_ok=True)
    return info


def site_public_keys(paths: CoordPaths) -> dict[str, keys.PublicKey]:
    """Registered sites' keys, for checking the signatures on their updates."""
    return {
        name: keys.load_public_key(paths.site_keys / f"{name}.pub") for name in load_sites(paths)
    }


def declared_patches(paths: CoordPaths) -> dict[str, int]:
    """Each site's declared patch count, for the sites that declared one at enrolment."""
    return {
        name: int(info["patches"])
        for name, info in load_sites(paths).items()
        if isinstance(info.get("patches"), int) and not isinstance(info["patches"], bool)
    }
