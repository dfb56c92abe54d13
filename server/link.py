"""Where the coordinator's own commands find its running SuperLink (the loopback listener).

``idc-server start`` writes ``superlink.json`` (addresses and pids) while it serves; every
other coordinator command reads it here to reach the SuperLink on 127.0.0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import flowerctl
from common.paths import CoordPaths

LIVE_FILE = "superlink.json"


def tls_paths(paths: CoordPaths) -> flowerctl.TlsPaths:
    """The coordinator's CA and server certificate files."""
    t = paths.tls
    return flowerctl.TlsPaths(t / "ca.pem", t / "ca.key", t / "server.pem", t / "server.key")


def connection(paths: CoordPaths) -> flowerctl.Connection:
    """How this coordinator's own CLI reaches its running SuperLink."""
    live = paths.root / LIVE_FILE
    if not live.is_file():
        raise flowerctl.SuperLinkUnreachable(
            f"no SuperLink is running for {paths.root} (start one with `idc-server start`)"
        )
    info = json.loads(live.read_text())
    ca = Path(info["ca"]) if info.get("ca") else None
    return flowerctl.write_cli_config(paths.root / "flwr-cli", info["local_address"], ca)


def require_superlink(paths: CoordPaths, run_dir: Path) -> None:
    """Fail when the SuperLink this run was submitted to is gone (follow_run would wait on)."""
    live = paths.root / LIVE_FILE
    pid = json.loads(live.read_text())["pid"] if live.is_file() else None
    if pid is None or not flowerctl.alive(int(pid)):
        raise flowerctl.SuperLinkUnreachable(
            f"the SuperLink of {paths.root} is unreachable: it stopped during the run; start it "
            f"again (`idc-server start --dir {paths.root}`), then continue with "
            f"`idc-server run --dir {paths.root} --resume {run_dir}`"
        )


def node_key_fingerprint(public_key: bytes) -> str:
    """Fingerprint of a node's public key as the SuperLink lists it (OpenSSH or PEM)."""
    from cryptography.hazmat.primitives import serialization

    from common import keys

    key = (
        serialization.load_ssh_public_key(public_key)
        if public_key.startswith(b"ecdsa-")
        else serialization.load_pem_public_key(public_key)
    )
    return keys.public_key_fingerprint(key)  # type: ignore[arg-type]
