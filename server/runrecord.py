"""A run folder's ``run.json`` and ``status.json``, kept current at every state change.

``run.json`` is the run's record (id, config, status); ``status.json`` says where the run
stands now: submitted, running, finished, failed or stopped (with ``error`` when failed).
``idc-server run`` writes "submitted", the ServerApp "running" and then "finished" or
"failed", ``idc-server stop`` "stopped". The coordinator folder's ``runs.json`` names the
latest run, for ``idc-server status``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common.fileio import atomic_write, read_json
from common.metrics import json_safe
from common.paths import CoordPaths

STATES = ("submitted", "running", "finished", "failed", "stopped")
RUNS_FILE = "runs.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write(path: Path, value: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(json_safe(value), indent=2).encode())


def read_record(run_dir: Path, name: str = "run.json") -> dict[str, Any]:
    """``run.json`` (or ``status.json``) of ``run_dir`` as a dict; empty when absent or damaged."""
    path = Path(run_dir) / name
    try:
        value = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def set_state(run_dir: Path, state: str, **details: Any) -> None:
    """Record ``state`` in ``run.json`` (merged) and ``status.json`` (replaced)."""
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {**read_record(run_dir), "status": state, "updated": _now()}
    for key in ("run_id", "config", "config_hash", "resumed_from"):
        if key in details:
            record[key] = details[key]
    _write(run_dir / "run.json", record)
    status = {"status": state, "run_id": record.get("run_id"), "updated": record["updated"]}
    status.update({k: v for k, v in details.items() if k not in ("config",)})
    _write(run_dir / "status.json", status)


def run_id_of(run_dir: Path) -> int:
    """The Flower run id recorded in ``run_dir/run.json`` (a clear error when there is none)."""
    value = read_record(run_dir).get("run_id")
    if value is None or not str(value).isdigit():
        raise FileNotFoundError(
            f"{run_dir} holds no submitted run (no run id in run.json); "
            "give the run folder that `idc-server run --out` wrote"
        )
    return int(value)


def note_latest(paths: CoordPaths, run_dir: Path, run_id: int) -> None:
    """Remember the run just submitted, for ``idc-server status``."""
    _write(paths.root / RUNS_FILE, {"latest": {"run_dir": str(run_dir), "run_id": run_id}})


def latest(paths: CoordPaths) -> tuple[Path, int] | None:
    """The run folder and id ``idc-server run`` submitted last, or None."""
    value = read_record(paths.root, RUNS_FILE).get("latest")
    if not isinstance(value, dict) or "run_dir" not in value:
        return None
    return Path(value["run_dir"]), int(value.get("run_id", 0))
