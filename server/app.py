"""The ServerApp: glue only (Flower's Context -> RunConfig -> one Coordinator run)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.coordinator import Coordinator

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federated training described by the run config."""
    run = RunConfig.from_run_config(context.run_config)
    if not run.run_dir:
        raise ValueError("run config key 'run-dir' is missing: submit runs with idc-server run")
    coordinator = Coordinator(run, Path(run.run_dir), str(context.run_id))
    try:
        coordinator.run(grid)
    except BaseException as exc:
        coordinator.fail(exc)
        raise
    finally:
        coordinator.close()
