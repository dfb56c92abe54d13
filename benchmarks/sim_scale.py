"""Seconds per FedAvg round and peak memory of the simulation against the number of sites.

Run: ``.venv/bin/python benchmarks/sim_scale.py [--sites 10,30,100] [--rounds 2]``.

Each point synthesizes tiny data (3 patients of 8-12 patches per site, so the work per site
stays the same), partitions it iid and runs the project's ServerApp and ClientApp through
Flower's simulation engine exactly as ``idc-sim federated`` does (one Ray CPU per ClientApp,
so at most ``os.cpu_count()`` sites train at once). Memory is the resident set of this
process and every process below it (SuperLink, ``flwr-simulation``, Ray's daemons and
workers), summed from ``/proc`` every 0.5 s; the peak is reported. Rounds after the first
are averaged: the first also pays for starting Ray's workers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common.cli_util import run_script
from flowerctl import descendants
from simulation.federated import prepare, run_fedavg
from simulation.plan import SimPlan
from simulation.synth import SynthSpec, synthesize

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss() -> int:
    """Bytes resident in this process and all its descendants."""
    total = 0
    for pid in [os.getpid(), *descendants(os.getpid())]:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


class PeakRss:
    """Samples :func:`tree_rss` in a thread while the block runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, tree_rss())

    def __enter__(self) -> PeakRss:
        self.peak = tree_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_point(sites: int, rounds: int, work: Path) -> dict[str, float]:
    data = work / f"data-{sites}"
    synthesize(data, SynthSpec(patients=3 * sites, patches_per_patient=(8, 12), seed=0), workers=2)
    plan = SimPlan(
        data=data, sites=sites, rounds=rounds, lr=1e-3, batch_size=16, norm="group", timeout=3600
    )
    out = work / f"run-{sites}"
    prep = prepare(plan, out, say=lambda _: None)
    with PeakRss() as mem:
        start = time.monotonic()
        rows = run_fedavg(plan, prep, out / "fedavg", None, say=lambda _: None)
        wall = time.monotonic() - start
    later = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
    return {
        "sites": sites,
        "first_round_s": rows[0]["seconds"],
        "round_s": statistics.mean(later),
        "wall_s": wall,
        "peak_rss_gib": mem.peak / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="10,30,100")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for key, value in {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }.items():
        os.environ.setdefault(key, value)
    points = []
    with tempfile.TemporaryDirectory(prefix="sim-scale-") as tmp:
        for k in (int(s) for s in args.sites.split(",")):
            points.append(one_point(k, args.rounds, Path(tmp)))
            p = points[-1]
            print(
                f"{k:>4} sites: {p['round_s']:6.1f} s/round (first {p['first_round_s']:.1f} s),"
                f" {p['wall_s']:6.1f} s wall, peak RSS {p['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
    base = points[0]
    print(f"\n{'sites':>6} {'s/round':>9} {'per site':>9} {'x first':>8} {'peak GiB':>9}")
    for p in points:
        print(
            f"{p['sites']:>6} {p['round_s']:>9.1f} {p['round_s'] / p['sites']:>9.2f} "
            f"{p['round_s'] / base['round_s']:>8.2f} {p['peak_rss_gib']:>9.2f}"
        )


if __name__ == "__main__":
    raise SystemExit(run_script(main, "benchmarks/sim_scale.py"))
