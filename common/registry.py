"""The coordinator's site registry (``sites.json`` and ``site-keys/``): who may join, by key.

Written by ``idc-server add-site``/``remove-site`` and by the simulation for its virtual
sites; read by the ServerApp to check every reply's signature.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from common import keys
from common.fileio import atomic_write
from common.paths import CoordPaths, check_name


def load_sites(paths: CoordPaths) -> dict[str, dict[str, str]]:
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
    paths.root.mkdir(parents=True, exist_ok=True)
    keys.generate_key_pair(paths.key, paths.pub)
    save_sites(paths, {})
    return paths


def save_sites(paths: CoordPaths, sites: dict[str, dict[str, str]]) -> None:
    """Write the registry atomically."""
    atomic_write(paths.sites, json.dumps(sites, indent=2, sort_keys=True).encode(), mode=0o600)


def add_site(paths: CoordPaths, name: str, key_file: Path) -> dict[str, str]:
    """Register a site's public key under ``name``; a name or key used twice is refused."""
    check_name(name)
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
    save_sites(paths, sites)
    return sites[name]


def remove_site(paths: CoordPaths, name: str) -> dict[str, str]:
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
