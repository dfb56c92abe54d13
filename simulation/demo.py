"""idc-sim demo: the README's main job on built-in (synthetic) data."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``idc-sim demo``."""
    p = sub.add_parser("demo", help="synthesize 3 hospitals and run the main job on them")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where results go")
    p.add_argument("--epochs", type=int, default=3)
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Synthesize a small data set and train the centralized baseline on it."""
    from simulation.centralized import BaselineConfig, results_table, run_centralized
    from simulation.synth import SynthSpec, synthesize

    start = time.monotonic()
    data = args.out / "data"
    if not (data / "synth.json").is_file():
        print(f"[demo] synthesizing 3 hospitals of patches into {data} ...", flush=True)
        synthesize(data, SynthSpec(patients=15, sites=3, site_shift=0.5, seed=0), workers=2)
    print(f"[demo] centralized baseline, {args.epochs} epochs ...", flush=True)
    config = BaselineConfig(epochs=args.epochs, patience=None, progress=True)
    summary = run_centralized(data, args.out / "centralized", config, args.cache_dir)
    print(results_table({"centralized (patient split)": summary["test"]}))  # type: ignore[dict-item]
    print(f"[demo] done in {time.monotonic() - start:.0f} s; report in {args.out}")
    return 0
