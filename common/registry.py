"""The coordinator's site registry (``sites.json`` and ``site-keys/``): who may join, by key.

A site is its key: the registry maps each site name to one public key (and its fingerprint)
and, when the hospital declared it at enrolment (``add-site --patches N``), to the number of
patches it holds, the bound on the weight (``num-examples``) its updates may claim.

Written by ``idc-server add-site``/``remove-site`` and by the simulation for its virtual
sites; read by the ServerApp to check every reply's signature.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import keys
from common.fileio import atomic_write, private_dir
from common.paths import CoordPaths, check_name


def load_sites(paths: CoordPaths) -> dict[str, dict[str, Any]]:
    """Registered sites: name -> {public_key (OpenSSH), fingerprint, added}."""
    try:
        data = json.loads(paths.sites.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read site registry {paths.sites}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"site registry {paths.sites} is not a JSON object")
    return data


def new_registry(paths: CoordPaths) -> CoordPaths:
    """Make the coordinator's signing key pair and an empty registry in ``paths.root``."""
    private_dir(paths.root)
    keys.generate_key_pair(paths.key, paths.pub)
    save_sites(paths, {})
    return paths


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
    atomic_write(paths.site_key(name), (openssh + "\n").encode())
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
    paths.site_key(name).unlink(missing_ok=True)
    return info


def site_public_keys(paths: CoordPaths) -> dict[str, keys.PublicKey]:
    """Registered sites' keys, for checking the signatures on their updates."""
    return {name: keys.load_public_key(paths.site_key(name)) for name in load_sites(paths)}


def declared_patches(paths: CoordPaths) -> dict[str, int]:
    """Each site's declared patch count, for the sites that declared one at enrolment."""
    return {
        name: int(info["patches"])
        for name, info in load_sites(paths).items()
        if isinstance(info.get("patches"), int) and not isinstance(info["patches"], bool)
    }
