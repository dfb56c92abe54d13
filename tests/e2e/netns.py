"""Linux network namespaces as separate hosts on one private bridge, removed after use.

A :class:`NetnsLab` makes a "switch" namespace holding a bridge and one namespace per host,
each joined to the bridge by a veth pair whose ends live only inside those namespaces: the
test never adds a link or an address to the namespace it runs in, and deleting the
namespaces deletes every link with them. Names carry the creating process's id so two runs
never collide; the addresses come from a private range that only these namespaces use.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence

SUBNET = "10.77.0"  # a /24 that exists only on the lab's bridge
IP_TIMEOUT = 15.0  # seconds for one `ip` call


class NetnsUnavailable(RuntimeError):
    """This machine cannot make network namespaces (not root, no iproute2, or not allowed)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, stdin=subprocess.DEVNULL
    )
    if check and res.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def check_available() -> None:
    """Raise :class:`NetnsUnavailable` naming why namespaces can't be made here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (run as root, as CI does)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("`ip` not found: install iproute2 (apt-get install -y iproute2)")
    probe = f"idcprobe{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        res = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NetnsUnavailable(f"`ip netns add` did not run: {err}") from err
    if res.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` failed: {res.stderr.strip()}")
    _ip("netns", "delete", probe, check=False)


class NetnsLab:
    """Namespaced hosts on one bridge; :meth:`close` removes all of them (safe to repeat)."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"idc{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, str] = {}  # namespace -> address
        self._made: list[str] = []
        try:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")  # SuperNodes serve their own API on loopback

    def add_host(self, short: str, host_id: int) -> tuple[str, str]:
        """Make namespace ``<tag>-<short>`` with address ``10.77.0.<host_id>``; return both."""
        if not 1 <= host_id <= 254:
            raise ValueError(f"host_id must be in 1..254, got {host_id}")
        ns, address = f"{self.tag}-{short}", f"{SUBNET}.{host_id}"
        self._add_ns(ns)
        port = f"p{host_id}"  # the switch's end; the host's end is eth0 in its own namespace
        _ip(
            "-n",
            self.switch,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.hosts[ns] = address
        return ns, address

    @staticmethod
    def wrap(ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *argv]

    def close(self) -> list[str]:
        """Delete every namespace made here (their links go with them); return any left."""
        for name in reversed(self._made):
            _ip("netns", "delete", name, check=False)
        listed = _ip("netns", "list", check=False).stdout
        left = [
            n for n in self._made if any(line.split()[:1] == [n] for line in listed.splitlines())
        ]
        self._made = left
        return left
