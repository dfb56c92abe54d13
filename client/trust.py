"""The keys a site trusts to check audit logs: its own, and the coordinator's pinned one.

A site verifies the coordinator's audit log with the coordinator key it received at
enrolment, pinned in ``site.json`` (``coordinator-key``, OpenSSH text, and its fingerprint) by
``idc-client init --coordinator-key`` or ``idc-client trust``; never with a ``coordinator.pub``
that travels with the log, which whoever rewrote the log could have replaced. A pinned key is
replaced only on purpose (``--replace``). The site's own log is checked with the public half
of its own signing key (``site.key``), whose fingerprint the coordinator registered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common import keys
from common.fileio import atomic_write
from common.paths import SitePaths

COORDINATOR_KEY = "coordinator-key"
COORDINATOR_FINGERPRINT = "coordinator-fingerprint"


def read_site(state_dir: Path) -> dict[str, Any]:
    """The site's ``site.json``; FileNotFoundError names the folder when it is none."""
    path = SitePaths(Path(state_dir)).info
    if not path.is_file():
        raise FileNotFoundError(f"{state_dir} is not a site folder (run `idc-client init` first)")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def pin_coordinator(state_dir: Path, key_file: Path, replace: bool = False) -> str:
    """Pin the coordinator's public key in ``site.json``; returns its fingerprint.

    Pinning the same key again is a no-op; a different key needs ``replace``.
    """
    public = keys.load_public_key(key_file)
    fingerprint = keys.public_key_fingerprint(public)
    site = read_site(state_dir)
    pinned = site.get(COORDINATOR_FINGERPRINT)
    if pinned not in (None, fingerprint) and not replace:
        raise ValueError(
            f"a different coordinator key is already pinned ({pinned}); check with the "
            f"coordinator that {fingerprint} is its new key, then pass --replace"
        )
    site[COORDINATOR_KEY] = keys.openssh_bytes(public).decode()
    site[COORDINATOR_FINGERPRINT] = fingerprint
    data = (json.dumps(site, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(SitePaths(Path(state_dir)).info, data, mode=0o600)
    return fingerprint


def pinned_coordinator(state_dir: Path) -> keys.PublicKey:
    """The coordinator key pinned at enrolment; ValueError says how to pin one."""
    site = read_site(state_dir)
    text = site.get(COORDINATOR_KEY)
    if not isinstance(text, str):
        raise ValueError(
            f"no coordinator key is pinned in {SitePaths(Path(state_dir)).info}: run `idc-client "
            "trust --dir SITE_DIR --coordinator-key coordinator.pub` with the key the "
            "coordinator gave you at enrolment (compare its fingerprint with theirs)"
        )
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_ssh_public_key(text.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey) or keys.public_key_fingerprint(
        key
    ) != site.get(COORDINATOR_FINGERPRINT):
        raise ValueError(f"the coordinator key pinned in {state_dir} is damaged; pin it again")
    return key


def own_key(state_dir: Path) -> keys.PublicKey:
    """The public half of the site's own signing key."""
    return keys.load_private_key(SitePaths(Path(state_dir)).key).public_key()
