"""The outsider's view of the coordinator, as tests: only the Fleet API answers from outside.

The outsider holds the coordinator's public ``ca.pem`` and reaches the address the sites
dial; nothing else. Each attack is first reproduced against a SuperLink started the way
``idc-server start`` used to start it (one port for every API, TLS and node authentication:
``bare``), where it works, then made against the real ``idc-server start`` (``coord``),
where it is refused and logged; the honest sites stay registered and online, and the last
test trains a round with them while the outsider tries to stop and hijack it.
"""

from __future__ import annotations

import http.client
import json
import ssl
import textwrap
from pathlib import Path

import httpx
import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.runtime.runtime_http_client import RuntimeHttpClient

from common.audit_verify import cross_check
from common.keys import generate_key_pair, load_public_key
from common.paths import CoordPaths
from flowerctl import (
    FlowerProcError,
    list_nodes,
    make_tls,
    node_statuses,
    register_supernode,
    run_status,
    start_superlink,
    stop_process,
    stop_run,
    submit_run,
    unregister_supernode,
    wait_superlink_ready,
    write_cli_config,
)
from flowerctl.processes import free_port
from server.runner import connection
from tests.integration.federation import Federation, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SITES = ("hosp0", "hosp1")  # two_sites's
RUN = "boundary-run"  # the name of this file's `idc-server run` on the shared federation
FAST = ["local-epochs=1", "batch-size=32", 'norm="group"', "round-timeout=120", "min-sites=2"]
# What the Control API, the Runtime API and the API docs answer on, and tricks to reach them.
PROBES = [
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/control/list-nodes"),
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/runtime/acquire-task"),
    ("POST", "/v1/runtime/get-nodes"),
    ("POST", "/v1/fleet/../control/list-nodes"),
    ("POST", "/v1/fleet/%2e%2e/control/list-nodes"),
    ("POST", "//v1/control/list-nodes"),
    ("POST", "/v1/fleet/get-run?next=/v1/control/list-nodes"),
    ("GET", "/v1/fleet/get-run"),
]


def request(address: str, ca: Path, method: str, path: str) -> tuple[int, bytes]:
    """One HTTPS request with the path sent exactly as written (no client normalisation)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(
        host, int(port), context=ssl.create_default_context(cafile=str(ca)), timeout=30
    )
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Outsider:
    """Someone with the public CA certificate, an address, and a key pair of their own."""

    def __init__(self, home: Path, address: str, ca: Path) -> None:
        self.address, self.ca = address, ca
        self.conn = write_cli_config(home, address, ca, name="target")
        generate_key_pair(home / "own.key", home / "own.pub")
        self.key = home / "own.pub"

    def acquire_task(self) -> object:
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=False,
            root_certificates=self.ca.read_bytes(),
            interceptors=[],
        )
        try:
            return client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP.value])
            )
        finally:
            client.close()


def foreign_app(root: Path) -> Path:
    """A Flower app of the outsider's: its ServerApp would list the coordinator's folder."""
    app = root / "foreign-app"
    (app / "foreign").mkdir(parents=True)
    (app / "foreign" / "__init__.py").write_text("")
    (app / "foreign" / "apps.py").write_text(
        textwrap.dedent(
            """
            import os
            from flwr.app import Context
            from flwr.clientapp import ClientApp
            from flwr.serverapp import Grid, ServerApp

            server = ServerApp()
            client = ClientApp()

            @server.main()
            def main(grid: Grid, context: Context) -> None:
                print("FOREIGN CODE RAN AT", os.getcwd(), os.listdir(".."))
            """
        )
    )
    (app / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"

            [project]
            name = "foreign"
            version = "1.0.0"
            dependencies = ["flwr>=1.42"]

            [tool.hatch.build.targets.wheel]
            packages = ["foreign"]

            [tool.flwr.app]
            publisher = "stranger"

            [tool.flwr.app.components]
            serverapp = "foreign.apps:server"
            clientapp = "foreign.apps:client"

            [tool.flwr.app.config]
            rounds = 1
            """
        )
    )
    return app


class Bare:
    """The old start path: one SuperLink port for every API, with TLS and node authentication."""

    def __init__(self, root: Path) -> None:
        self.tls = make_tls(root / "tls")
        self.address = f"127.0.0.1:{free_port()}"
        # `--isolation process`: no SuperExec claims the ServerApp tasks, so the outsider's
        # claim of one is certain rather than a race it usually wins on a loaded machine
        self.proc = start_superlink(
            root / "state",
            int(self.address.rsplit(":", 1)[1]),
            self.tls,
            root / "superlink.log",
            args=["--isolation", "process"],
        )
        wait_superlink_ready(self.address, self.tls.ca_cert, 90, self.proc)
        self.admin = write_cli_config(root / "admin", self.address, self.tls.ca_cert)
        self.nodes = {}
        for name in SITES:
            generate_key_pair(root / f"{name}.key", root / f"{name}.pub")
            self.nodes[name] = register_supernode(self.admin, root / f"{name}.pub", name)


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    old = Bare(tmp_path_factory.mktemp("bare"))
    yield old
    stop_process(old.proc)


@pytest.fixture
def coord(two_sites):
    """The real ``idc-server start`` with hosp0 and hosp1 online (shared: conftest.py)."""
    return two_sites


def loopback(fed: Federation):
    return connection(CoordPaths(fed.coord))


def outsider(fed: Federation, tmp_path: Path) -> Outsider:
    return Outsider(tmp_path / "outsider", fed.address, fed.coord / "tls" / "ca.pem")


def refusals(fed: Federation) -> list[str]:
    log = fed.coord / "logs" / "gateway-refused.log"
    return log.read_text().splitlines() if log.is_file() else []


def sent(fed: Federation, name: str) -> int:
    """How many updates site ``name`` has recorded as sent, over every run so far."""
    log = fed.root / name / "audit" / "site-audit.jsonl"
    return log.read_text().count('"update.sent"') if log.is_file() else 0


def assert_honest_sites_intact(fed: Federation) -> None:
    """Exactly the registered hospitals are known to the SuperLink, all online."""
    nodes = node_statuses(loopback(fed))
    live = sorted((name, status) for status, name in nodes.values() if status != "unregistered")
    assert live == [(name, "online") for name in SITES], nodes


def test_only_fleet_and_health_answer_on_the_public_address(coord, bare):
    ca_bare = bare.tls.ca_cert
    status, body = request(bare.address, ca_bare, "GET", "/openapi.json")
    assert status == 200
    paths = json.loads(body)["paths"]
    assert any(p.startswith("/v1/control/") for p in paths), sorted(paths)
    assert any(p.startswith("/v1/runtime/") for p in paths), sorted(paths)
    assert request(bare.address, ca_bare, "GET", "/docs")[0] == 200
    outsider_on_bare = write_cli_config(bare.admin.home.parent / "peek", bare.address, ca_bare)
    assert sorted(n.name for n in list_nodes(outsider_on_bare)) == sorted(SITES)

    ca = coord.coord / "tls" / "ca.pem"
    before = len(refusals(coord))
    for method, path in PROBES:
        assert request(coord.address, ca, method, path) == (403, b"forbidden\n"), (method, path)
    lines = refusals(coord)[before:]
    assert len(lines) == len(PROBES), lines
    for (method, path), line in zip(PROBES, lines, strict=True):
        assert f"{method} {path!r} from 127.0.0.1:" in line, line
    # what a SuperNode needs still passes: the health check, and the Fleet routes (the
    # SuperLink itself answers this empty, unsigned call, so it is not a 403 of the gateway)
    assert request(coord.address, ca, "GET", "/health")[0] == 200
    assert request(coord.address, ca, "POST", "/v1/fleet/get-run")[0] not in (200, 403)
    assert len(refusals(coord)) == before + len(PROBES)
    assert_honest_sites_intact(coord)


def test_a_stranger_key_cannot_be_registered(coord, bare, tmp_path):
    on_bare = Outsider(tmp_path / "old", bare.address, bare.tls.ca_cert)
    register_supernode(on_bare.conn, on_bare.key, "hosp0")  # under a real hospital's name
    assert [n.name for n in list_nodes(bare.admin)].count("hosp0") == 2

    attacker = outsider(coord, tmp_path)
    with pytest.raises(FlowerProcError):
        register_supernode(attacker.conn, attacker.key, "hosp0")
    assert any("/v1/control/register-node" in line for line in refusals(coord))
    assert_honest_sites_intact(coord)


def test_a_foreign_app_cannot_be_submitted(coord, bare, tmp_path):
    app = foreign_app(tmp_path)
    on_bare = Outsider(tmp_path / "old", bare.address, bare.tls.ca_cert)
    run_id = submit_run(on_bare.conn, app)
    assert run_status(bare.admin, run_id).status in ("pending", "starting", "running")

    attacker = outsider(coord, tmp_path)
    with pytest.raises(FlowerProcError):
        submit_run(attacker.conn, app)
    assert any("/v1/control/start-run" in line for line in refusals(coord))
    assert "FOREIGN CODE" not in (coord.coord / "logs" / "superlink.log").read_text()
    assert_honest_sites_intact(coord)


def test_no_unregister_stop_or_task_claim_and_the_honest_round_completes(coord, bare, tmp_path):
    # the old path: the outsider unregisters a hospital, claims a run's ServerApp task with
    # its token, and stops the run
    on_bare = Outsider(tmp_path / "old", bare.address, bare.tls.ca_cert)
    run_id = submit_run(bare.admin, foreign_app(tmp_path / "app"))
    unregister_supernode(on_bare.conn, bare.nodes["hosp0"])
    assert node_statuses(bare.admin)[bare.nodes["hosp0"]][0] == "unregistered"
    claimed = wait_for(lambda: on_bare.acquire_task().token, 60, "the outsider's claim")
    assert claimed
    stop_run(on_bare.conn, run_id)
    wait_for(lambda: run_status(bare.admin, run_id).finished, 60, "the stopped run")
    assert run_status(bare.admin, run_id).sub_status == "stopped"

    # the coordinator: a real run, attacked while it trains; even given the ids, all refused
    run_dir = tmp_path / "run"
    sent_before = {name: sent(coord, name) for name in SITES}
    proc = coord.spawn_run("--out", str(run_dir), "--rounds", "1", "--run-config", *FAST, name=RUN)
    text = wait_for(
        lambda: "submitted" in coord.output(RUN) and coord.output(RUN), 120, "the run id"
    )
    coord_run = int(text.split("run ")[1].split()[0])
    attacker = outsider(coord, tmp_path)
    victim = next(i for i, (_, n) in node_statuses(loopback(coord)).items() if n == "hosp0")
    for attack in (
        lambda: unregister_supernode(attacker.conn, victim),
        lambda: stop_run(attacker.conn, coord_run),
    ):
        with pytest.raises(FlowerProcError):
            attack()
    with pytest.raises(httpx.HTTPStatusError) as refused:
        attacker.acquire_task()
    assert refused.value.response.status_code == 403
    for route in ("control/unregister-node", "control/stop-run", "runtime/acquire-task"):
        assert any(route in line for line in refusals(coord)), route

    assert proc.wait(600) == 0, coord.output(RUN)
    rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [sorted(r["sites"]) for r in rows] == [sorted(SITES)]
    coord_log = coord.coord / "audit" / "coordinator-audit.jsonl"
    coord_key = load_public_key(coord.coord / "coordinator.pub")
    for name in SITES:
        site = coord.root / name
        report = cross_check(
            coord_log,
            coord_key,
            site / "audit" / "site-audit.jsonl",
            load_public_key(site / "site.pub"),
            name,
        )
        # every update a site ever sent on this federation arrived; this run's one among them
        assert report.ok and report.matched == sent(coord, name), report.problems
        assert sent(coord, name) == sent_before[name] + 1
    assert_honest_sites_intact(coord)
