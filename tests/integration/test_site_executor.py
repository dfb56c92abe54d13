"""The site's own executor against real processes: TLS, node auth, the installed commands.

An attacker who owns the coordinator runs a foreign Flower app's ServerApp on the SuperLink the
sites are connected to: the sites must refuse it without running it, record
the refusal, and answer with an error, while an honest `idc-server run` still completes. A site
whose key the coordinator drops, or whose executor dies, stops with one clear line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode
from flwr.supercore.constant import TaskType

import flowerctl
from common.audit_verify import verify_log
from common.keys import load_public_key, public_key_fingerprint
from common.paths import CoordPaths
from flowerctl.fab import fab_hash
from flowerctl.runtime import acquire_task, runtime_client
from server.runner import connection
from simulation.synth import SynthSpec
from tests.integration.federation import BIN, Federation, synth_sites, wait_for

pytestmark = pytest.mark.slow
FOREIGN = Path(__file__).parent / "foreign_app"
FAST = ["local-epochs=1", "batch-size=32", 'norm="group"', "round-timeout=120", "min-sites=2"]


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return synth_sites(root, SynthSpec(patients=6, sites=2, patches_per_patient=(40, 50), seed=3))


def entries(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line]


def run_as_compromised_coordinator(fed: Federation, app: Path, config: dict, tag: str) -> int:
    """Submit the foreign app and run its ServerApp with Flower's own ``flwr-serverapp``.

    The coordinator's executor refuses foreign apps (test_coordinator_executor.py); to reach
    the sites anyway, the attacker here owns the coordinator: pauses its executor, claims the
    run's ServerApp task with the coordinator's secret, and runs the FAB's code itself.
    """
    conn = connection(CoordPaths(fed.coord))
    live = json.loads((fed.coord / "superlink.json").read_text())
    ca = fed.coord / "tls" / "ca.pem"
    claim = runtime_client(
        conn.address,
        component="flwr-serverapp",
        root_certificates=ca.read_bytes(),
        auth_secret=(fed.coord / "superlink" / "superexec.secret").read_bytes(),
    )
    os.kill(live["executor_pid"], signal.SIGSTOP)
    try:
        run_id = flowerctl.submit_run(conn, app, config)
        token = wait_for(lambda: acquire_task(claim, TaskType.SERVER_APP), 60, "the task")
    finally:
        os.kill(live["executor_pid"], signal.SIGCONT)
        claim.close()
    cmd = [str(BIN / "flwr-serverapp"), "--runtime-api-address", conn.address, "--token", token]
    log = open(fed.root / f"foreign-serverapp-{tag}.out", "ab")  # noqa: SIM115 - as Federation
    fed.procs[f"foreign-serverapp-{tag}"] = subprocess.Popen(  # stopped by pid in fed.stop()
        [*cmd, "--root-certificates", str(ca)],
        env={**fed.env, "FLWR_HOME": str(fed.root / "attacker-home")},
        cwd=fed.root,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return run_id


def submit_foreign(fed: Federation, tag: str) -> tuple[dict, Path, str]:
    """`flwr run` the foreign app at the coordinator's SuperLink; return the sites' replies."""
    app = fed.root / f"foreignapp-{tag}"
    shutil.copytree(FOREIGN, app, ignore=shutil.ignore_patterns("__pycache__"))
    marker, out = fed.root / f"marker-{tag}.json", fed.root / f"replies-{tag}.json"
    conn = connection(CoordPaths(fed.coord))
    config = {"marker": str(marker), "out": str(out)}
    run_id = run_as_compromised_coordinator(fed, app, config, tag)
    status = wait_for(
        lambda: (s := flowerctl.run_status(conn, run_id)).finished and s, 300, "the foreign run"
    )
    assert out.is_file(), (status, flowerctl.run_logs(conn, run_id))
    return json.loads(out.read_text()), marker, fab_hash(build_fab_from_disk(app))


def executor_pid(fed: Federation, name: str) -> int:
    text = wait_for(lambda: "executor started" in fed.output(name) and fed.output(name), 60, name)
    pid = int(text.split("executor started (pid ")[1].split(",")[0])
    fed.flower_pids.add(pid)
    return pid


def test_foreign_app_is_refused_by_the_sites_and_the_honest_run_completes(two_sites, tmp_path):
    fed = two_sites
    answer, marker, digest = submit_foreign(fed, "a")
    assert not marker.exists()  # the foreign ClientApp never ran at any site
    assert len(answer["replies"]) == 2, answer
    for reply in answer["replies"]:
        assert reply["error_code"] == ErrorCode.INVALID_FAB, reply
        assert f"refused app {digest}" in reply["error"]
    for i in range(2):
        site = fed.root / f"hosp{i}"
        log = site / "audit" / "site-audit.jsonl"
        refused = [e for e in entries(log) if e["action"] == "app.refused"]
        assert len(refused) == 1, refused
        details = refused[0]["details"]
        assert details["app_hash"] == digest and details["publisher"] == "mallory"
        assert details["app"] == "mallory/foreignapp" and details["run_id"] == refused[0]["object"]
        assert verify_log(log, load_public_key(site / "site.pub")).ok
        assert not [p for p in (site / "flwr-home").rglob("*") if "foreignapp" in p.name]

    # hosp0 approves that app: the site then runs ITS installed ClientApp for it, which cannot
    # read the foreign message (an error reply), while hosp1 still refuses it
    fed.cli("idc-client", "approve", "--dir", str(fed.root / "hosp0"), digest, "--note", "t")
    answer, marker, _ = submit_foreign(fed, "b")
    assert not marker.exists()
    codes = sorted(r["error_code"] for r in answer["replies"])
    assert codes == sorted([ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.INVALID_FAB]), answer
    accepted = [  # the runs before on this shared federation ran the installed app
        e
        for e in entries(fed.root / "hosp0" / "audit" / "site-audit.jsonl")
        if e["action"] == "app.accepted" and e["details"]["app_hash"] == digest
    ]
    assert [e["details"]["accepted_as"] for e in accepted] == ["approved"]

    res = fed.run("--out", str(tmp_path / "run"), "--rounds", "1", "--run-config", *FAST)
    assert res.returncode == 0, res.stdout + res.stderr
    row = json.loads((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()[0])
    assert sorted(row["sites"]) == ["hosp0", "hosp1"], row
    for i in range(2):
        log = entries(fed.root / f"hosp{i}" / "audit" / "site-audit.jsonl")
        assert [e["details"]["accepted_as"] for e in log if e["action"] == "app.accepted"][
            -1
        ] == "installed"
        assert any(e["action"] == "update.sent" for e in log)


def expect_clear_exit(fed: Federation, name: str, needle: str) -> str:
    proc = fed.procs[name]
    wait_for(lambda: proc.poll() is not None, 120, f"{name} to exit")
    out = fed.output(name)
    assert proc.returncode != 0, out
    assert needle in out and "Traceback" not in out, out
    return out


def test_a_site_whose_executor_dies_or_whose_key_is_unregistered_stops_and_says_why(fed, site_data):
    """One federation, two ways a site stops: hosp1's executor killed; hosp0's key removed
    by the coordinator, and a stranger's never registered. Each exits non-zero, one line."""
    fed.init()
    for name in ("hosp0", "hosp1"):
        fed.add_site(name)
    fed.add_site("stranger", register=False)
    fed.start_server()
    fed.start_site("hosp0", site_data[0])
    fed.start_site("hosp1", site_data[1])
    fed.start_site("stranger", site_data[1])
    fed.wait_sites_online(2)

    supernode = fed.supernode_pid("hosp1")
    os.kill(executor_pid(fed, "hosp1"), signal.SIGKILL)
    expect_clear_exit(fed, "hosp1", "the executor stopped (exit -9)")
    wait_for(lambda: not flowerctl.alive(supernode), 30, "the SuperNode to be stopped")

    pids = [fed.supernode_pid("hosp0"), executor_pid(fed, "hosp0")]
    fed.cli("idc-server", "remove-site", "--dir", str(fed.coord), "--name", "hosp0")
    for name in ("hosp0", "stranger"):
        out = expect_clear_exit(fed, name, "key is not registered with the coordinator")
        fingerprint = public_key_fingerprint(load_public_key(fed.root / name / "site.pub"))
        assert f"(fingerprint {fingerprint})" in out
    assert not any(flowerctl.alive(p) for p in pids)
