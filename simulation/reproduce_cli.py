"""``idc-sim reproduce``: its flags, and the one line it prints per step."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

from common.cli_util import add_command
from common.data import resolve_root
from common.errors import EXIT_OK

EXIT_ROW_FAILED = 1


def _say(message: str) -> None:
    print(message, flush=True)


def _seeds(text: str) -> tuple[int, ...]:
    from simulation.sweep import parse_seeds

    return tuple(parse_seeds(text))


def run(args: argparse.Namespace) -> int:
    """Check the flags, run the matrix, print where the report is."""
    from simulation.reproduce import FULL, QUICK, Request, reproduce

    data = Path(args.data)
    if not data.is_dir():
        raise ValueError(f"--data {data} is not a folder; give the folder of patient folders")
    resolve_root(data)
    schedule = QUICK if args.quick else FULL
    seeds = _seeds(args.seeds) if args.seeds is not None else ((0,) if args.quick else (0, 1, 2))
    if args.patients is not None:
        if args.patients < 3:
            raise ValueError(f"--patients must be >= 3, got {args.patients}")
        schedule = replace(schedule, patients=args.patients)
    req = Request(
        data=data,
        out=Path(args.out),
        schedule=schedule,
        seeds=seeds,
        rows=tuple(r.strip() for r in args.rows.split(",")),
        max_minutes=args.max_minutes,
    )
    if not args.quick:
        import torch

        if not torch.cuda.is_available():
            _say(
                "note: the full schedule is meant for a GPU and none is visible; on this CPU "
                "it takes many hours (--quick is the CPU schedule; --max-minutes bounds it)"
            )
    results = reproduce(req, say=_say)
    _say(f"report: {req.out / 'report.md'} (numbers: results.json, figures: figures/)")
    failed = [name for name, row in results["rows"].items() if "error" in row]
    if failed:
        print(
            f"idc-sim reproduce: rows failed: {', '.join(failed)} (see report.md)", file=sys.stderr
        )
        return EXIT_ROW_FAILED
    return EXIT_OK


def add_reproduce(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``idc-sim reproduce``; returns its parser."""
    from simulation.reproduce import ROWS

    p = add_command(
        sub, "reproduce", run, "the issue's whole matrix on the same patients, with a report"
    )
    p.add_argument("--data", type=Path, required=True, help="patches in the Kaggle layout")
    p.add_argument("--out", type=Path, required=True, help="report folder (replaced if ours)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="reduced schedule for a small CPU (fewer patients, epochs, rows; 1 seed), "
        "labelled QUICK in the report",
    )
    p.add_argument("--seeds", default=None, help="e.g. 0,1,2 (default: 0,1,2; --quick: 0)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, of {','.join(ROWS)}")
    p.add_argument("--patients", type=int, default=None, help="use a seeded subsample of patients")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=math.inf,
        help="start no row, and no run inside a row, after this many minutes; the report "
        "names what was skipped",
    )
    return p
