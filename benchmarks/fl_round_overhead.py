"""Federated round overhead and audit cost, from a real 3-site TLS run on loopback.

Round wall time is divided by the slowest site's own local train + evaluate time (goal <=
1.10); the rest is split into where it goes, read from the audit logs' timestamps: the wait
before a site starts a message (SuperNode polling and the message's transfer, then the site's
executor), transfer and aggregation. The audit cost (hashing, signing, fsync) is measured in
this process and scaled by the entries and digests each round really wrote.

Run: .venv/bin/python benchmarks/fl_round_overhead.py [--patients 9] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' process harness

from common import keys
from common.audit import AuditLog, digest_update
from common.config import RunConfig
from server.coordinator import initial_arrays
from simulation.synth import SynthSpec, synthesize
from tests.integration.federation import Federation, split_synth_by_site


def entries(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def ts(entry: dict) -> float:
    return datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()


def audit_costs(tmp: Path) -> tuple[float, float]:
    """Seconds per audit append (hash + sign + fsync) and per model digest."""
    key = keys.generate_key_pair(tmp / "k.key", tmp / "k.pub")
    with AuditLog(tmp / "bench.jsonl", key, "bench") as log:
        t0 = time.perf_counter()
        for i in range(200):
            log.append("bench", "x", "ok", {"round": i, "digest": "0" * 64})
        append = (time.perf_counter() - t0) / 200
    arrays = initial_arrays(RunConfig())
    t0 = time.perf_counter()
    for _ in range(5):
        digest_update(arrays)
    return append, (time.perf_counter() - t0) / 5


def per_round(fed: Federation, sites: list[str], rounds: int) -> list[dict]:
    coord = entries(fed.coord / "audit" / "coordinator-audit.jsonl")
    logs = {s: entries(fed.root / s / "audit" / "site-audit.jsonl") for s in sites}
    out = []
    for r in range(1, rounds + 1):
        start = next(
            ts(e) for e in coord if e["action"] == "round.started" and e["details"]["round"] == r
        )
        end = next(
            ts(e)
            for e in coord
            if e["action"] == "checkpoint.written" and e["details"]["round"] == r
        )
        agg = next(
            ts(e)
            for e in coord
            if e["action"] == "aggregate.computed" and e["details"]["round"] == r
        )
        last_rx = max(
            ts(e) for e in coord if e["action"] == "update.received" and e["details"]["round"] == r
        )
        local, waits = {}, []
        for s, log in logs.items():
            got = [e for e in log if e["details"] and e["details"].get("round") == r]
            rx = [ts(e) for e in got if e["action"] == "message.received"]
            sent = next(ts(e) for e in got if e["action"] == "update.sent")
            done = next(ts(e) for e in got if e["action"] == "metrics.sent")
            local[s] = (sent - rx[0]) + (done - rx[1])
            waits.append(rx[0] - start)
        n_entries = sum(1 for e in coord if e["details"] and e["details"].get("round") == r)
        n_entries += sum(
            1
            for log in logs.values()
            for e in log
            if e["details"] and e["details"].get("round") == r
        )
        out.append(
            {
                "round": r,
                "wall": end - start,
                "slowest_local": max(local.values()),
                "wait_before_train": float(np.mean(waits)),
                "aggregation": agg - last_rx,
                "audit_entries": n_entries,
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=9)
    ap.add_argument("--patches", type=int, default=150, help="patches per patient")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="idc-fl-bench-"))
    synthesize(
        tmp / "all",
        SynthSpec(
            patients=args.patients, sites=3, patches_per_patient=(args.patches, args.patches)
        ),
    )
    folders = split_synth_by_site(tmp / "all", tmp)
    fed = Federation(tmp / "fed")
    fed.root.mkdir()
    sites = [f"hosp{i}" for i in range(3)]
    try:
        fed.init()
        for s in sites:
            fed.add_site(s)
        fed.start_server()
        for i, s in enumerate(sites):
            fed.start_site(s, folders[i])
        fed.wait_sites_online(3)
        res = fed.run(
            "--out",
            str(tmp / "run"),
            "--rounds",
            str(args.rounds),
            "--run-config",
            "local-epochs=1",
            "min-sites=3",
            "batch-size=64",
        )
        if res.returncode:
            raise SystemExit(res.stdout + res.stderr)
        rows = per_round(fed, sites, args.rounds)
    finally:
        fed.stop()
    append, digest = audit_costs(tmp)
    print(f"{args.patients} patients x {args.patches} patches over 3 sites, 1 local epoch")
    for row in rows:
        ratio = row["wall"] / row["slowest_local"]
        # every update is digested twice (site and coordinator) plus global, aggregate, checkpoint
        audit_s = row["audit_entries"] * append + (2 * 3 + 3) * digest
        print(
            f"round {row['round']}: wall {row['wall']:.1f} s, slowest site local "
            f"{row['slowest_local']:.1f} s, ratio {ratio:.2f} (goal <= 1.10); mean wait before "
            f"a site starts training {row['wait_before_train']:.1f} s; aggregation "
            f"{row['aggregation']:.2f} s; audit {audit_s * 1000:.0f} ms "
            f"({100 * audit_s / row['wall']:.2f}% of the round, goal < 1%)"
        )
    print(f"audit append {append * 1e6:.0f} us, model digest {digest * 1000:.1f} ms")


if __name__ == "__main__":
    main()
