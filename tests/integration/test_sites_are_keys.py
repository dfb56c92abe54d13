"""Sites are their keys, with real processes: TLS, node authentication, the real ServerApp.

An outsider registers its own key under a real hospital's name (Flower accepts duplicate
names) and connects a SuperNode with it. The coordinator must never sample that node, for
training or evaluation, and the honest round must be unaffected. The state the running
coordinator and sites leave on disk is owner-only.
"""

from __future__ import annotations

import json
import stat

import pytest

import flowerctl
from common.paths import CoordPaths
from server.runner import connection
from tests.integration.federation import Federation
from tests.integration.test_federated import FAST, rounds, site_data  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


@pytest.fixture
def fed(tmp_path):
    federation = Federation(tmp_path)
    yield federation
    federation.stop()
    for proc in federation.procs.values():
        assert proc.poll() is not None
    assert federation.leftovers() == []


def mode(path) -> int:  # noqa: ANN001
    return stat.S_IMODE(path.stat().st_mode)


def test_a_stranger_registered_under_a_sites_name_is_never_sampled(fed, site_data):  # noqa: F811
    folders, _ = site_data
    fed.init()
    for name in ("hosp0", "hosp1"):
        fed.add_site(name)
    stranger = fed.add_site("stranger", register=False)
    (stranger / "site.json").write_text(json.dumps({"site-name": "hosp0"}))
    fed.start_server()
    # what the outsider did through the Control API: its own key, a real hospital's name
    flowerctl.register_supernode(connection(CoordPaths(fed.coord)), stranger / "site.pub", "hosp0")
    fed.start_site("hosp0", folders[0])
    fed.start_site("hosp1", folders[1])
    fed.start_site("stranger", folders[2])
    fed.wait_sites_online(3)
    res = fed.run("--out", str(fed.root / "run"), "--rounds", "1", "--run-config", *FAST)
    assert res.returncode == 0, res.stdout + res.stderr
    [row] = rounds(fed.root / "run")
    assert sorted(row["sites"]) == ["hosp0", "hosp1"]
    assert sorted(row["evaluations"]) == ["hosp0", "hosp1"]
    assert row["rejected"] == [] and row["failures"] == []
    # the stranger's ClientApp never ran: no message reached it, so it never wrote a log
    assert not (stranger / "audit" / "site-audit.jsonl").exists()
    assert "stranger" not in (fed.coord / "audit" / "coordinator-audit.jsonl").read_text()
    # owner-only state, checked while everything runs
    assert mode(fed.coord) == 0o700 and mode(fed.coord / "superlink") == 0o700
    for path in (
        fed.coord / "superlink" / "superlink.db",
        fed.coord / "superlink.json",
        fed.coord / "audit" / "coordinator-audit.jsonl",
        fed.root / "hosp0" / "audit" / "site-audit.jsonl",
        fed.root / "hosp0" / "flwr-home" / "node-config.toml",
    ):
        assert mode(path) == 0o600, path
    assert mode(fed.root / "hosp0") == 0o700 and mode(fed.root / "hosp0" / "flwr-home") == 0o700
