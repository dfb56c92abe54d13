"""Federated round overhead and audit cost, from a real 3-site TLS run on loopback.

Round wall time is divided by the slowest site's own local train + evaluate time (goal <=
1.10); the rest is split into where it goes, read from the audit logs' timestamps: the wait
before a site starts a message (SuperNode polling and the message's transfer, then the site's
executor), transfer and aggregation. The audit cost (hashing, signing, fsync) is measured in
this process and scaled by the entries and digests each round really wrote.

Run: .venv/bin/python benchmarks/fl_round_overhead.py [--patients 9] [--rounds 2]
     [--data $IDC_REAL_DATA]  (real patches, dealt to the 3 sites by patient, iid)

The synthetic default is a small site (3 patients of 150 patches each): the overhead per round
is nearly fixed, so the ratio shows it at its worst. ``--data`` measures the same federation
with hospitals of realistic size.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' process harness

from common import keys
from common.audit import AuditLog
from common.cli_util import run_script
from common.config import RunConfig
from common.digests import digest_update
from server.coordinator import initial_arrays
from simulation.partitioners import iid
from simulation.synth import SynthSpec, synthesize
from tests.integration.federation import Federation, split_synth_by_site


def entries(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def ts(entry: dict) -> float:
    return datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()


def audit_costs(where: Path) -> tuple[float, float]:
    """Seconds per audit append (hash + sign + fsync) and per model digest.

    Measured in a fresh folder under ``where`` (same disk as the run), so that re-reading an
    earlier run with ``--from-dir`` measures again instead of tripping on its key files.
    """
    tmp = Path(tempfile.mkdtemp(prefix="audit-cost-", dir=where))
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


def first(entries_: list[dict], action: str, r: int) -> float:
    """Time of the first ``action`` entry of round ``r``."""
    return min(when(entries_, action, r))


def when(entries_: list[dict], action: str, r: int) -> list[float]:
    """Times of every ``action`` entry of round ``r``."""
    return [
        ts(e)
        for e in entries_
        if e["action"] == action and e["details"] and e["details"].get("round") == r
    ]


EXECUTOR_LINE = re.compile(
    r"run \d+ (?P<kind>\w+): .*; wait\+pull (?P<pull>[\d.]+) s, ClientApp [\d.]+ s, "
    r"reply (?P<reply>[\d.]+) s"
)


def executor_times(log: Path) -> dict[str, list[tuple[float, float]]]:
    """Per message type, in order: (seconds pulling from the SuperNode, pushing the reply)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        if m := EXECUTOR_LINE.search(line):
            out.setdefault(m["kind"], []).append((float(m["pull"]), float(m["reply"])))
    return out


SUPERNODE_LINE = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):\s+"
    r"(?:(?P<verb>Receiving|Sending): (?P<kind>\w+) message|(?P<done>Received|Sent) successfully)"
)


def supernode_times(log: Path) -> dict[str, list[float]]:
    """Seconds each message spent moving between the SuperLink and this SuperNode.

    Keys ``receive train``, ``send evaluate`` etc.: from Flower's "Receiving: ..." line to its
    "Received successfully" (the message and its objects pulled through the gateway), and
    likewise for sending. Needs the launcher's timestamped log lines.
    """
    out: dict[str, list[float]] = {}
    started: tuple[str, float] | None = None
    for line in log.read_text().splitlines() if log.exists() else []:
        if not (m := SUPERNODE_LINE.search(line)):
            continue
        t = datetime.strptime(m["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if m["verb"]:
            started = (f"{'receive' if m['verb'] == 'Receiving' else 'send'} {m['kind']}", t)
        elif started is not None:
            out.setdefault(started[0], []).append(t - started[1])
            started = None
    return out


AFTER_THE_ROUNDS = {"threshold.refined", "histograms.sent"}  # server.refine, once per run


def round_entries(path: Path) -> list[dict]:
    """The audit entries of the rounds themselves (the threshold's refinement left out)."""
    return [
        e
        for e in entries(path)
        if e["action"] not in AFTER_THE_ROUNDS and (e["details"] or {}).get("action") != "refine"
    ]


def per_round(fed: Federation, sites: list[str], rounds: int) -> list[dict]:
    """Each round's wall time, slowest site's own work, and the legs in between (seconds)."""
    coord = round_entries(fed.coord / "audit" / "coordinator-audit.jsonl")
    logs = {s: round_entries(fed.root / s / "audit" / "site-audit.jsonl") for s in sites}
    execs = {s: executor_times(fed.root / s / "logs" / "executor.log") for s in sites}
    moves: dict[str, list[float]] = {}
    for s in sites:
        for key, times in supernode_times(fed.root / s / "logs" / "supernode.log").items():
            moves.setdefault(key, []).extend(times)
    transfer = {k: float(np.mean(v)) for k, v in sorted(moves.items())}
    out = []
    for r in range(1, rounds + 1):
        start = first(coord, "round.started", r)
        end = first(coord, "checkpoint.written", r)
        agg = first(coord, "aggregate.computed", r)
        rx_train = when(coord, "update.received", r)
        local, legs = (
            {},
            {
                k: []
                for k in ("rx_train", "rx_eval", "sent", "metrics", "train_local", "eval_local")
            },
        )
        for s, log in logs.items():
            rx = sorted(when(log, "message.received", r))
            sent, done = first(log, "update.sent", r), first(log, "metrics.sent", r)
            local[s] = (sent - rx[0]) + (done - rx[1])
            legs["rx_train"].append(rx[0])
            legs["rx_eval"].append(rx[1])
            legs["sent"].append(sent)
            legs["metrics"].append(done)
            legs["train_local"].append(sent - rx[0])
            legs["eval_local"].append(done - rx[1])
        pulls = [t for x in execs.values() for k in ("train", "evaluate") for t in x.get(k, [])]
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
                "train_dispatch": float(np.mean(legs["rx_train"])) - start,
                "train_local": max(legs["train_local"]),
                "train_return": min(rx_train) - max(legs["sent"]),
                "aggregation": agg - min(rx_train),
                "eval_dispatch": float(np.mean(legs["rx_eval"])) - agg,
                "eval_local": max(legs["eval_local"]),
                "eval_return": end - max(legs["metrics"]),
                "executor_pull": float(np.mean([p for p, _ in pulls])) if pulls else float("nan"),
                "executor_reply": float(np.mean([q for _, q in pulls])) if pulls else float("nan"),
                "audit_entries": n_entries,
                "transfer": transfer,
            }
        )
    return out


def report(row: dict, append: float, digest: float) -> None:
    """Print one round: the ratio, then where the rest of the wall time went."""
    ratio = row["wall"] / row["slowest_local"]
    # every update is digested twice (site and coordinator) plus global, aggregate, checkpoint
    audit_s = row["audit_entries"] * append + (2 * 3 + 3) * digest
    overhead = row["wall"] - row["slowest_local"]
    print(
        f"round {row['round']}: wall {row['wall']:.1f} s, slowest site local "
        f"{row['slowest_local']:.1f} s, ratio {ratio:.2f} (goal <= 1.10); "
        f"overhead {overhead:.1f} s"
    )
    print(
        f"  train:    dispatch {row['train_dispatch']:.2f} s (round.started -> sites' "
        f"message.received, mean) | slowest local {row['train_local']:.2f} s | return "
        f"{row['train_return']:.2f} s (last update.sent -> update.received) | vet+aggregate "
        f"{row['aggregation']:.2f} s"
    )
    print(
        f"  evaluate: dispatch {row['eval_dispatch']:.2f} s (aggregate.computed -> "
        f"message.received, mean) | slowest local {row['eval_local']:.2f} s | return+commit "
        f"{row['eval_return']:.2f} s (last metrics.sent -> checkpoint.written)"
    )
    print(
        f"  site executor, mean per message over the run: claim+pull from its SuperNode "
        f"{row['executor_pull']:.2f} s, reply push {row['executor_reply']:.2f} s; audit "
        f"{audit_s * 1000:.0f} ms ({100 * audit_s / row['wall']:.2f}% of the round, goal < 1%)"
    )
    if row["transfer"]:
        moves = ", ".join(f"{k} {v:.2f} s" for k, v in row["transfer"].items())
        print(f"  SuperNode <-> SuperLink, mean per message over the run: {moves}")


def real_sites(data: Path, dst: Path) -> dict[int, Path]:
    """Copy ``data``'s patients (Kaggle layout) into 3 site folders, dealt iid by patient.

    Copied, not linked: a site's data scan does not follow links. The copies live in the
    benchmark's temporary folder, never next to the data.
    """
    patients = sorted(p.name for p in data.iterdir() if p.is_dir())
    folders: dict[int, Path] = {}
    for k, part in enumerate(iid(patients, 3, seed=0)):
        folders[k] = dst / f"site{k}-data"
        for pid in part:
            shutil.copytree(data / pid, folders[k] / pid)
    return folders


def federate(tmp: Path, sites: list[str], args: argparse.Namespace) -> list[dict]:
    """Make the sites' data, run the federation over TLS, return its rounds' timings."""
    if args.data is not None:
        folders = real_sites(args.data, tmp)
    else:
        synthesize(
            tmp / "all",
            SynthSpec(
                patients=args.patients, sites=3, patches_per_patient=(args.patches, args.patches)
            ),
        )
        folders = split_synth_by_site(tmp / "all", tmp)
    fed = Federation(tmp / "fed")
    fed.root.mkdir()
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
        return per_round(fed, sites, args.rounds)
    finally:
        fed.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=9)
    ap.add_argument("--patches", type=int, default=150, help="patches per patient")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="real patches (Kaggle layout, e.g. $IDC_REAL_DATA) instead of synthetic ones",
    )
    ap.add_argument(
        "--from-dir",
        type=Path,
        default=None,
        help="only print the breakdown of an earlier run's folder (idc-fl-bench-*)",
    )
    args = ap.parse_args()
    sites = [f"hosp{i}" for i in range(3)]
    if args.from_dir is not None:
        tmp = args.from_dir
        rows = per_round(Federation(tmp / "fed"), sites, args.rounds)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="idc-fl-bench-"))
        print(f"run folder (audit and process logs): {tmp}")
        rows = federate(tmp, sites, args)
    append, digest = audit_costs(tmp)
    if args.data is not None:
        print(f"the real patches of {args.data}, dealt to 3 sites by patient, 1 local epoch")
    else:
        print(f"{args.patients} patients x {args.patches} patches over 3 sites, 1 local epoch")
    for row in rows:
        report(row, append, digest)
    print(f"audit append {append * 1e6:.0f} us, model digest {digest * 1000:.1f} ms")


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks/fl_round_overhead.py"))
