"""The coordinator runs only its own ServerApp: a foreign app is refused there, unopened.

Whoever reaches the coordinator's loopback Control API (any local user) can ``flwr run`` an
app of their own. The attack is first reproduced against a SuperLink started the way
``idc-server start`` used to start it (Flower's default isolation: its SuperExec installs and
runs the ServerApp of whatever was submitted), where the foreign ServerApp runs at the
coordinator; then against the real ``idc-server start``, whose executor refuses it: no marker,
``app.refused`` in the coordinator's audit log, the run failed with the reason in Flower and
on ``idc-server start``'s console. Nor can a local user claim the run's ServerApp task: only
the executor holds the secret the SuperLink asks for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.runtime import RuntimeHttpClient

import flowerctl
from common.audit_verify import verify_log
from common.keys import load_public_key
from flowerctl.fab import fab_hash
from tests.integration.federation import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
FOREIGN = Path(__file__).parent / "foreign_app"


def foreign(root: Path) -> tuple[Path, dict[str, str], Path]:
    """A copy of the outsider's app, its run config, and where its ServerApp leaves a marker."""
    app = root / "foreignapp"
    shutil.copytree(FOREIGN, app, ignore=shutil.ignore_patterns("__pycache__"))
    marker = root / "server-marker"
    config = {"server-marker": str(marker), "marker": str(root / "m"), "out": str(root / "o")}
    return app, config, marker


def local_claim(conn: flowerctl.Connection) -> str:
    """What any local user can try: claim a ServerApp task on the loopback Runtime API."""
    client = RuntimeHttpClient.from_server_address(
        server_address=conn.address,
        insecure=False,
        root_certificates=conn.ca_cert.read_bytes() if conn.ca_cert else None,
        interceptors=[],
    )
    try:
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
        return res.token
    finally:
        client.close()


def test_the_old_superlink_runs_a_foreign_serverapp(tmp_path):
    tls = flowerctl.make_tls(tmp_path / "tls")
    port = flowerctl.free_port()
    proc = flowerctl.start_superlink(tmp_path / "state", port, tls, tmp_path / "superlink.log")
    try:
        address = f"127.0.0.1:{port}"
        flowerctl.wait_superlink_ready(address, tls.ca_cert, 90, proc)
        conn = flowerctl.write_cli_config(tmp_path / "local-user", address, tls.ca_cert)
        app, config, marker = foreign(tmp_path)
        flowerctl.submit_run(conn, app, config)
        wait_for(marker.is_file, 300, "the foreign ServerApp's marker", [proc])
        assert Path(marker.read_text()) == (tmp_path / "state").resolve()  # the coordinator's
    finally:
        flowerctl.stop_process(proc)


def test_the_coordinator_refuses_a_foreign_app_without_running_it(two_sites, tmp_path):
    fed, server = two_sites, two_sites.procs["server"]
    conn = fed.connection()
    app, config, marker = foreign(tmp_path)
    digest = fab_hash(build_fab_from_disk(app))
    run_id = flowerctl.submit_run(conn, app, config)
    # another local user cannot claim the run's ServerApp task (nor the coordinator's own)
    with pytest.raises(httpx.HTTPStatusError):
        local_claim(conn)
    status = wait_for(
        lambda: (s := flowerctl.run_status(conn, run_id)).finished and s,
        300,
        "the foreign run to end",
        [server],
    )
    assert status.sub_status == "failed", status
    assert f"the coordinator refused app {digest}" in status.details, status
    assert not marker.exists()
    wait_for(lambda: f"refused app {digest}" in fed.output("server"), 30, "the console line")
    assert f"run {run_id}: the coordinator refused app {digest}" in fed.output("server")

    log = fed.coord / "audit" / "coordinator-audit.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines() if x]
    refused = [e for e in lines if e["action"] == "app.refused" and e["object"] == str(run_id)]
    assert len(refused) == 1, lines
    details = refused[0]["details"]
    assert details["app_hash"] == digest and details["publisher"] == "mallory"
    assert details["run_id"] == str(run_id)
    assert verify_log(log, load_public_key(fed.coord / "coordinator.pub")).ok
    unpacked = [p for p in (fed.coord / "superlink").rglob("*") if "foreign" in p.name]
    assert unpacked == []
    assert server.poll() is None  # the coordinator goes on serving
