"""The hospital's console, as `idc-client start` prints it, against real Flower processes.

Each failure is one plain line that says what to do (bad address, a second start on the same
folder, an unreachable coordinator, an untrusted certificate, an unregistered key), a real
DP round prints its patches, epsilon and cap, and `idc-client status` / `privacy` show the
site's rounds, full run ids, its cap and what is left. No raw Flower line reaches the console.
"""

from __future__ import annotations

import json
import re

import pytest

from common.config import DEFAULT_MAX_EVALUATIONS
from common.keys import load_public_key, public_key_fingerprint
from common.privacy import PRIVACY_UNIT
from flowerctl import free_port
from simulation.synth import SynthSpec, synthesize
from tests.integration.federation import wait_for

pytestmark = pytest.mark.slow
DP_RUN = [
    "local-epochs=1",
    "batch-size=32",
    'norm="group"',
    "round-timeout=120",
    "min-sites=1",
    "dp.enabled=true",
    "dp.noise-multiplier=1.0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthesize(root, SynthSpec(patients=3, sites=1, patches_per_patient=(20, 25), seed=3))
    return root


def clean(out: str) -> None:
    assert "\x1b[" not in out and "Traceback" not in out and "Exit Code" not in out, out


def exited(fed, name: str) -> str:
    proc = fed.procs[name]
    wait_for(lambda: proc.poll() is not None, 180, f"{name} to exit")
    assert proc.returncode != 0
    out = fed.output(name)
    clean(out)
    return out


def test_bad_address_is_refused_before_anything_starts(fed, data):
    site = fed.add_site("hosp0", register=False)
    res = fed.cli(
        "idc-client",
        "start",
        "--dir",
        str(site),
        "--server",
        "coord.example.org",
        "--ca",
        str(site / "site.pub"),
        "--data",
        str(data),
        check=False,
    )
    assert res.returncode == 2, res
    assert res.stderr.strip().splitlines() == [
        "idc-client start: error: --server 'coord.example.org' has no port: "
        "give HOST:PORT, e.g. coord.example.org:8000"
    ]
    assert not (site / "logs").exists() and not (site / "start.json").exists()


def test_unreachable_coordinator_then_a_second_start_is_refused(fed, data):
    fed.init()
    site = fed.add_site("hosp0", register=False)
    fed.start_site("hosp0", data)  # nothing listens on fed.address yet
    proc = fed.procs["hosp0"]
    out = wait_for(
        lambda: "cannot reach the coordinator" in fed.output("hosp0") and fed.output("hosp0"),
        120,
        "the unreachable line",
        [proc],
    )
    assert f"cannot reach the coordinator at {fed.address} (retrying; last error: " in out
    assert "Connection refused" in out
    clean(out)
    second = fed.cli(
        "idc-client",
        "start",
        "--dir",
        str(site),
        "--server",
        fed.address,
        "--ca",
        str(fed.coord / "tls" / "ca.pem"),
        "--data",
        str(data),
        check=False,
    )
    assert second.returncode == 2
    assert f"is already running, pid {proc.pid}" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    status = fed.cli("idc-client", "status", "--dir", str(site)).stdout
    assert f"start: running, pid {proc.pid} for {fed.address}" in status, status
    assert "privacy cap: none" in status
    assert f"evaluation cap: {DEFAULT_MAX_EVALUATIONS} a run (set by the latest start)" in status


def test_console_of_a_real_dp_round_and_each_failure(fed, data):
    fed.init()
    for name in ("hosp0", "badca"):
        fed.add_site(name)
    stranger = fed.add_site("stranger", register=False)
    other = fed.root / "other-coord"
    fed.cli("idc-server", "init", "--dir", str(other))
    fed.start_server()
    fed.start_site("hosp0", data, "--max-epsilon", "50", "--delta", "1e-3")
    fed.start_site("stranger", data)
    fed.spawn(
        "badca",
        "idc-client",
        "start",
        "--dir",
        str(fed.root / "badca"),
        "--server",
        fed.address,
        "--ca",
        str(other / "tls" / "ca.pem"),
        "--data",
        str(data),
        "--port",
        str(free_port()),
    )

    fingerprint = public_key_fingerprint(load_public_key(stranger / "site.pub"))
    out = exited(fed, "stranger")
    assert f"key is not registered with the coordinator (fingerprint {fingerprint})" in out
    assert "idc-server add-site" in out
    out = exited(fed, "badca")
    assert "the coordinator's certificate is not trusted by --ca" in out
    assert "CERTIFICATE_VERIFY_FAILED" in out

    wait_for(lambda: "connected to the coordinator" in fed.output("hosp0"), 120, "hosp0 admitted")
    assert f"connected to the coordinator at {fed.address} as 'hosp0'" in fed.output("hosp0")
    res = fed.run("--out", str(fed.root / "run"), "--rounds", "1", "--run-config", *DP_RUN)
    assert res.returncode == 0, res.stdout + res.stderr
    run_id = json.loads((fed.root / "run" / "run.json").read_text())["run_id"]
    out = wait_for(
        lambda: "evaluation done" in fed.output("hosp0") and fed.output("hosp0"),
        60,
        "the evaluation line",
        [fed.procs["hosp0"]],
    )
    clean(out)
    trained = re.search(
        rf"run {run_id} round 1: trained on (\d+) patches; epsilon ([\d.]+) this round, "
        r"([\d.]+) total, cap 50 \(([\d.]+) left\); update sent",
        out,
    )
    assert trained, out
    assert float(trained[4]) == pytest.approx(50 - float(trained[3]), abs=0.1)
    assert f"run {run_id} round 1: evaluation done on " in out

    site = fed.root / "hosp0"
    status = fed.cli("idc-client", "status", "--dir", str(site)).stdout
    assert "audit log: " in status and "chain and signatures verified" in status, status
    assert f"run {run_id} round 1: trained on {trained[1]} patches; epsilon" in status
    assert "update sent; evaluated (balanced accuracy" in status
    assert "privacy cap: epsilon 50 at delta 0.001 (set by the latest start)" in status
    assert f"; latest run {run_id}: 1 answered" in status
    privacy = fed.cli("idc-client", "privacy", "--dir", str(site)).stdout
    assert f"\n{run_id} " in privacy, privacy  # the full run id, never cut
    assert "left" in privacy and PRIVACY_UNIT.splitlines()[0] in privacy
