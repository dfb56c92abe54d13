"""Operating a real federation: status by name, one start per folder, detach, attach, stop."""

from __future__ import annotations

import json
import os
import signal

import pytest

from common.audit_verify import verify_log
from common.keys import generate_key_pair, load_public_key
from flowerctl import run_status
from simulation.synth import SynthSpec
from tests.integration.federation import synth_sites, wait_for

pytestmark = pytest.mark.slow
SLOW_RUN = ["local-epochs=1", "batch-size=32", 'norm="group"', "round-timeout=300", "min-sites=2"]


def test_status_detach_attach_and_stop_a_live_run(fed, tmp_path):
    folders = synth_sites(tmp_path, SynthSpec(patients=8, sites=2, patches_per_patient=(30, 40)))
    server = fed.start_all({"hosp0": folders[0], "hosp1": folders[1]})

    # A second start on the same folder is refused and leaves the first one's files alone.
    live = (fed.coord / "superlink.json").read_text()
    second = fed.cli(
        "idc-server", "start", "--dir", str(fed.coord), "--address", "127.0.0.1:1", check=False
    )
    assert second.returncode == 3, second.stdout + second.stderr
    assert "already running, pid" in second.stderr
    assert f"address {fed.address}" in second.stderr and "Traceback" not in second.stderr
    assert (fed.coord / "superlink.json").read_text() == live and server.poll() is None

    status = fed.cli("idc-server", "status", "--dir", str(fed.coord)).stdout
    assert "SuperLink: running" in status
    for i in range(2):
        assert [line for line in status.splitlines() if f"hosp{i} " in line and "online" in line]

    # Ctrl-C on run: asks nothing, no traceback, the run goes on, the way back is printed.
    run_dir = fed.root / "r1"
    run = fed.spawn_run("--out", str(run_dir), "--rounds", "50", "--run-config", *SLOW_RUN)
    wait_for(lambda: (run_dir / "rounds.jsonl").is_file(), 600, "round 1 committed", [run])
    os.kill(run.pid, signal.SIGINT)
    assert run.wait(120) == 130
    out = fed.output("run")
    assert "Traceback" not in out and "detached from run" in out
    assert "sites online: hosp0, hosp1\n" in out
    assert f"idc-server attach --dir {fed.coord} {run_dir}" in out
    assert f"idc-server stop --dir {fed.coord} {run_dir}" in out
    run_id = int(json.loads((run_dir / "run.json").read_text())["run_id"])
    assert not run_status(fed.connection(), run_id).finished

    # The registry changes during the run, its entry in the same chain the run writes.
    generate_key_pair(tmp_path / "c.key", tmp_path / "c.pub")
    fed.cli(
        "idc-server",
        "add-site",
        "--dir",
        str(fed.coord),
        "--name",
        "hosp9",
        "--key",
        str(tmp_path / "c.pub"),
    )
    status = fed.cli("idc-server", "status", "--dir", str(fed.coord)).stdout
    assert f"run {run_id}: running" in status and "hosp9" in status

    attach = fed.spawn("attach", "idc-server", "attach", "--dir", str(fed.coord), str(run_dir))
    wait_for(lambda: "round 1:" in fed.output("attach"), 120, "attach to replay", [attach])
    stop = fed.cli("idc-server", "stop", "--dir", str(fed.coord), str(run_dir))
    assert f"run {run_id} stopped" in stop.stdout and "--resume" in stop.stdout
    assert attach.wait(300) == 4, fed.output("attach")
    assert "finished:stopped" in fed.output("attach")
    assert "sites online: hosp0, hosp1; offline: hosp9" in fed.output("attach")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "stopped"

    log = fed.coord / "audit" / "coordinator-audit.jsonl"
    assert verify_log(log, load_public_key(fed.coord / "coordinator.pub")).ok
    actions = [json.loads(line)["action"] for line in log.read_text().splitlines()]
    assert "run.started" in actions and "site.registered" in actions and "run.stopped" in actions
    assert "run.failed" not in actions  # the ServerApp knew it was stopped
    assert "failed 0" in fed.output("attach")  # every site evaluated

    # A resume makes status.json current again; stop by run id finds the folder itself.
    resumed = fed.spawn(
        "resume", "idc-server", "run", "--dir", str(fed.coord), "--resume", str(run_dir)
    )
    wait_for(
        lambda: json.loads((run_dir / "status.json").read_text())["status"] == "running",
        300,
        "the resumed run to start",
        [resumed],
    )
    new_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert new_id != str(run_id)
    fed.cli("idc-server", "stop", "--dir", str(fed.coord), new_id)
    assert resumed.wait(300) == 4, fed.output("resume")
    assert f"--resume {run_dir}" in fed.output("resume")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "stopped"
