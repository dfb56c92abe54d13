"""A registered key unregistered behind the coordinator's back: named per site, never fatal.

On main, ``flwr supernode unregister`` from outside made the next ``idc-server start`` die
on "Public key already in use" (Flower never registers an unregistered key again). The
public address now refuses that call, but this host's own Control API still takes it, so the
coordinator must survive it: the site is reported ("key revoked: rotate it"), the others are
served, and a rotated key is admitted by the running SuperLink: the old node unregistered, a
new one under the new key.
"""

from __future__ import annotations

import signal

import pytest

from common.keys import generate_key_pair, load_public_key, public_key_fingerprint
from common.paths import CoordPaths
from flowerctl import list_nodes, unregister_supernode
from server.link import node_key_fingerprint
from server.runner import connection
from tests.integration.federation import Federation

pytestmark = pytest.mark.slow


def live_names(fed: Federation) -> list[str]:
    nodes = list_nodes(connection(CoordPaths(fed.coord)))
    return sorted(n.name for n in nodes if n.status != "unregistered")


def test_a_revoked_key_is_reported_and_the_others_are_served(fed):
    fed.init()
    for name in ("hosp0", "hosp1"):
        fed.add_site(name)
    first = fed.start_server()
    conn = connection(CoordPaths(fed.coord))
    (victim,) = [n.node_id for n in list_nodes(conn) if n.name == "hosp0"]
    unregister_supernode(conn, victim)  # behind the coordinator's back

    # a registry change while it runs: hosp0 is named, the change still applies
    key = fed.add_site("hosp2", register=False) / "site.pub"
    res = fed.cli(
        "idc-server", "add-site", "--dir", str(fed.coord), "--name", "hosp2", "--key", str(key)
    )
    assert "site 'hosp0': key revoked: rotate it" in res.stderr, res
    assert live_names(fed) == ["hosp1", "hosp2"]
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0, fed.output("server")

    second = fed.start_server()  # on main: "Public key already in use", and no coordinator
    out = fed.output("server1")
    assert "site 'hosp0': key revoked: rotate it" in out, out
    assert "registered sites: hosp1, hosp2" in out, out
    assert second.poll() is None and live_names(fed) == ["hosp1", "hosp2"]

    # the site rotates its key; the coordinator swaps it in the registry: admitted again
    site = fed.root / "hosp0"
    for name in ("site.key", "site.pub"):
        (site / name).rename(site / f"retired-{name}")
    generate_key_pair(site / "site.key", site / "site.pub")
    fed.cli("idc-server", "remove-site", "--dir", str(fed.coord), "--name", "hosp0")
    conn = connection(CoordPaths(fed.coord))
    assert all(n.status == "unregistered" for n in list_nodes(conn) if n.name == "hosp0")
    out = fed.cli(
        "idc-server",
        "add-site",
        "--dir",
        str(fed.coord),
        "--name",
        "hosp0",
        "--key",
        str(site / "site.pub"),
    )
    assert "now admits" in out.stdout, out
    assert "key revoked" not in out.stdout + out.stderr, out
    assert live_names(fed) == ["hosp0", "hosp1", "hosp2"]
    (live,) = [n for n in list_nodes(conn) if n.name == "hosp0" and n.status != "unregistered"]
    assert live.node_id != victim
    assert node_key_fingerprint(bytes(live.public_key)) == public_key_fingerprint(
        load_public_key(site / "site.pub")
    )
    # a live site removed: the running SuperLink unregisters its node at once
    fed.cli("idc-server", "remove-site", "--dir", str(fed.coord), "--name", "hosp2")
    assert live_names(fed) == ["hosp0", "hosp1"]
    assert all(n.status == "unregistered" for n in list_nodes(conn) if n.name == "hosp2")
