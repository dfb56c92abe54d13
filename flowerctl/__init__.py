"""Flower process control, shared by the coordinator, the sites and the simulation.

One module per concern: :mod:`~flowerctl.tls` (certificates), :mod:`~flowerctl.processes`
(start, wait for and stop SuperLink/SuperNode process trees), :mod:`~flowerctl.cli` (the
``flwr`` command line: connections, node registration, runs), :mod:`~flowerctl.control`
(read-only Control API calls and :func:`follow_run`), :mod:`~flowerctl.gateway` (the
coordinator's public front: the Fleet API only; imported on its own, it pulls in uvicorn).
The names below are the public surface.
"""

from flowerctl.cli import (
    Connection,
    register_supernode,
    run_logs,
    stop_run,
    submit_run,
    unregister_supernode,
    write_cli_config,
)
from flowerctl.control import RunStatus, follow_run, list_nodes, node_statuses, run_status
from flowerctl.errors import FlowerProcError, FlowerTimeout, SuperLinkUnreachable
from flowerctl.processes import (
    FLWR_ENV,
    ConfigValue,
    alive,
    descendants,
    flower_env,
    free_port,
    signal_tree,
    start_sim_superlink,
    start_superlink,
    start_supernode,
    stop_process,
    stop_tree,
    tree_snapshot,
    wait_superlink_ready,
)
from flowerctl.tls import TlsPaths, make_tls, to_openssh_private_key

__all__ = [
    "FLWR_ENV",
    "ConfigValue",
    "Connection",
    "FlowerProcError",
    "FlowerTimeout",
    "RunStatus",
    "SuperLinkUnreachable",
    "TlsPaths",
    "alive",
    "descendants",
    "flower_env",
    "follow_run",
    "free_port",
    "list_nodes",
    "make_tls",
    "node_statuses",
    "register_supernode",
    "run_logs",
    "run_status",
    "signal_tree",
    "start_sim_superlink",
    "start_superlink",
    "start_supernode",
    "stop_process",
    "stop_run",
    "stop_tree",
    "submit_run",
    "to_openssh_private_key",
    "tree_snapshot",
    "unregister_supernode",
    "wait_superlink_ready",
    "write_cli_config",
]
