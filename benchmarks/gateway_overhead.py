"""The public gateway's cost: the same requests to the SuperLink directly and through it.

A real SuperLink (TLS, node authentication) on loopback and the gateway in front of it, as
``idc-server start`` runs them. Two request kinds, each over one keep-alive connection, as a
SuperNode's httpx client makes them: ``GET /health`` (latency) and a 10 MB ``POST`` to
``/v1/fleet/push-object`` (a model's size, as protobuf; the SuperLink reads and parses it
all, then answers 401: the body is not signed). Printed as ratios (through the gateway /
direct) of the median time.

    .venv/bin/python benchmarks/gateway_overhead.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE

from common.cli_util import run_script
from flowerctl import free_port, make_tls, start_superlink, stop_process, wait_superlink_ready
from flowerctl.gateway import start_gateway

# A model-sized object as a SuperNode pushes it (unsigned: the SuperLink parses it, then 401s)
BODY = PushObjectRequest(
    node=Node(node_id=1), run_id=1, object_id="0" * 64, object_content=bytes(10 * 1024 * 1024)
).SerializeToString()
HEADERS = {"content-type": PROTOBUF_MEDIA_TYPE}


def timed(client: httpx.Client, method: str, path: str, repeats: int) -> float:
    """Median seconds of ``repeats`` requests (after one warm-up)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        post = method == "POST"
        resp = client.request(
            method, path, content=BODY if post else None, headers=HEADERS if post else None
        )
        resp.read()
        if resp.status_code not in (200, 401):
            raise RuntimeError(f"{method} {path}: unexpected {resp.status_code} {resp.text[:200]}")
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tls = make_tls(root / "tls")
        direct, front = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        link = start_superlink(root / "sl", int(direct.split(":")[1]), tls, root / "sl.log")
        gate = None
        try:
            wait_superlink_ready(direct, tls.ca_cert, 90, link)
            gate = start_gateway(front, direct, tls, root / "gw.log", root / "refused.log")
            wait_superlink_ready(front, tls.ca_cert, 90, gate)
            rows = []
            for method, path in (("GET", "/health"), ("POST", "/v1/fleet/push-object")):
                medians = []
                for address in (direct, front):
                    ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
                    url = f"https://{address}"
                    with httpx.Client(base_url=url, verify=ctx, timeout=60) as client:
                        medians.append(timed(client, method, path, args.repeats))
                rows.append((f"{method} {path}", *medians))
        finally:
            if gate is not None:
                stop_process(gate)
            stop_process(link)
    print(f"{'request':32} {'direct ms':>10} {'gateway ms':>11} {'ratio':>6}")
    for name, d, g in rows:
        print(f"{name:32} {d * 1e3:10.2f} {g * 1e3:11.2f} {g / d:6.2f}")


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks/gateway_overhead.py"))
