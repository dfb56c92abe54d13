"""The ServerApp: parse the run config once, resume or start, run FedAvg, write the results."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig

log = logging.getLogger(__name__)
app = ServerApp()


def config_hash(run: RunConfig) -> str:
    """A digest of the run's settings, for the audit log and resume checks."""
    settings = {k: v for k, v in vars(run).items() if k not in ("resume", "run_dir")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federated training described by the run config."""
    run = RunConfig.from_run_config(context.run_config)
    if not run.run_dir:
        raise ValueError("run config key 'run-dir' is missing: submit runs with idc-server run")
    from server.coordinator import Coordinator

    coordinator = Coordinator(run, Path(run.run_dir), str(context.run_id))
    try:
        coordinator.run(grid)
    except BaseException as exc:
        coordinator.fail(exc)
        raise
    finally:
        coordinator.close()


def start_strategy(
    coordinator: object, grid: Grid, initial: ArrayRecord, rounds: int, timeout: float
) -> object:
    """Call FedAvg's own start loop (kept apart for readability)."""
    strategy = coordinator.strategy  # type: ignore[attr-defined]
    t0 = time.time()
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=rounds,
        timeout=timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    log.info("strategy finished in %.1f s", time.time() - t0)
    return result
