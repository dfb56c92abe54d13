"""``idc-sim federated --ray-address``: the simulation runs on an existing multi-process Ray cluster.

The cluster (GCS, raylet, workers: separate processes) is started and stopped by the test,
inside a user and network namespace of its own (``unshare -rn``) so that it listens on
loopback only. Skipped where such a namespace cannot be made; under CI (``$CI`` set) that
fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.rundir import RunDir
from simulation.synth import SynthSpec, synthesize
from tests.integration.test_simulation import ProcessWatcher

pytestmark = pytest.mark.slow


def _namespaces_or_skip() -> None:
    try:
        probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=30)
        why = probe.stderr.decode().strip()
        ok = probe.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, why = False, str(exc)
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"cannot start a private Ray cluster under CI: unshare -rn: {why}")
        pytest.skip(f"a private Ray cluster needs `unshare -rn` (user namespaces): {why}")


def test_a_simulation_runs_on_an_existing_ray_cluster(tmp_path):
    _namespaces_or_skip()
    data, out = tmp_path / "data", tmp_path / "out"
    synthesize(data, SynthSpec(patients=6, patches_per_patient=(12, 16), seed=3))
    temp = Path(os.environ.get("TMPDIR", "/tmp")) / f"ray-{os.getpid()}"  # Ray's socket paths
    temp.mkdir()  # must stay short: a tmp_path would overflow them
    args = ["federated", "--data", str(data), "--sites", "2", "--rounds", "1"]
    args += ["--batch-size", "16", "--out", str(out), "--timeout", "600"]
    cmd = ["unshare", "-rn", sys.executable, "-m", "tests.integration.ray_cluster", str(temp)]
    try:
        with ProcessWatcher() as watcher:
            done = subprocess.run(
                [*cmd, "--", *args], capture_output=True, text=True, timeout=900, check=False
            )
        assert watcher.survivors() == []  # the head stopped everything it started
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["idc_sim"] == 0, done.stdout[-3000:]
        assert watcher.saw("gcs_server") and watcher.saw("flwr-simulation")

        rows = RunDir(out / "fedavg" / "run").read_rounds()
        assert [r["round"] for r in rows] == [1] and sorted(rows[0]["sites"]) == [
            "site-000",
            "site-001",
        ]
        # The ClientApps ran as actors of the simulation's job in this cluster's workers.
        logs = next(temp.glob("session_*/logs"))
        actors = [
            p for p in logs.glob("worker-*.out") if ":actor_name:ClientAppActor" in p.read_text()
        ]
        assert actors, sorted(p.name for p in logs.iterdir())
        assert (out / "report.md").is_file()
    finally:
        subprocess.run(["rm", "-rf", str(temp)], check=False)
