"""Run inside a fresh network namespace: a Ray head on loopback, then ``idc-sim federated`` on it.

``python -m tests.integration.ray_cluster TEMP_DIR -- IDC_SIM_ARGS...`` under ``unshare -rn``:
the namespace holds only a loopback interface, so Ray (whose GCS listens on every interface
and never on loopback alone) is reachable from nowhere else. Starts ``ray start --head
--block`` (its own process; SIGTERM stops everything it started), waits for its GCS port,
runs ``idc-sim federated ... --ray-address 127.0.0.1:PORT``, stops the head by its pid and
prints one JSON line: the port, idc-sim's exit code and the head's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
READY_WITHIN = 180.0  # seconds; a loaded 2-core machine starts Ray slowly


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def start_head(temp: Path, port: int) -> subprocess.Popen[bytes]:
    """``ray start --head --block`` on 127.0.0.1:``port`` with 2 CPUs; wait until it listens."""
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port)]
    cmd += ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0"]
    cmd += ["--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp)]
    cmd += ["--object-store-memory", str(100 * 2**20)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(temp / "head.log", "ab")  # the child writes to it; closed with this process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + READY_WITHIN
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"ray head did not start (see {temp / 'head.log'})")
        time.sleep(0.5)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM the head (it stops its GCS, raylet and workers), then wait for it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main(argv: list[str]) -> int:  # noqa: D103
    temp, sim_args = Path(argv[0]), argv[argv.index("--") + 1 :]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    port = 36379
    head = start_head(temp, port)
    try:
        sim = subprocess.run(
            [str(BIN / "idc-sim"), *sim_args, "--ray-address", f"127.0.0.1:{port}"], check=False
        )
    finally:
        head_rc = stop(head)
    print(json.dumps({"port": port, "idc_sim": sim.returncode, "head": head_rc}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
