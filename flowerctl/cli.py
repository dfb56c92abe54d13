"""The ``flwr`` command line as a library: connections, node registration, runs."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli
import tomli_w

from flowerctl.errors import FlowerProcError, FlowerTimeout
from flowerctl.processes import BIN, ConfigValue, flower_env


@dataclass(frozen=True)
class Connection:
    """How the ``flwr`` CLI reaches a SuperLink: ``$FLWR_HOME/config.toml`` entry ``name``."""

    address: str
    ca_cert: Path | None
    home: Path
    name: str = "idc"


def write_cli_config(
    home: Path, address: str, ca_cert: Path | None, name: str = "idc"
) -> Connection:
    """Write ``home/config.toml`` so ``flwr ... <name>`` (with ``FLWR_HOME=home``) reaches it."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    conn: dict[str, ConfigValue] = {"address": address}
    if ca_cert is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(ca_cert).resolve())
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": name, name: conn}}))
    return Connection(address, Path(ca_cert).resolve() if ca_cert else None, home, name)


def _flwr(
    conn: Connection, *args: str, json_out: bool = True, timeout: float = 120.0
) -> dict[str, Any]:
    """Run ``flwr <args> <conn.name>`` and return its JSON answer (raise if it failed)."""
    cmd = [str(BIN / "flwr"), *args, conn.name] + (["--format", "json"] if json_out else [])
    try:
        res = subprocess.run(
            cmd,
            env=flower_env(conn.home),
            cwd=conn.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as err:
        raise FlowerTimeout(f"`flwr {' '.join(args)}` took over {timeout:.0f}s") from err
    if not json_out:
        if res.returncode != 0:
            raise FlowerProcError(f"`flwr {' '.join(args)}` failed: {res.stdout}{res.stderr}")
        return {"output": res.stdout}
    try:  # JSON mode exits 0 even on failure: "success" tells
        answer: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError:
        answer = {"success": False, "error-message": res.stdout + res.stderr}
    if not answer.get("success"):
        raise FlowerProcError(f"`flwr {' '.join(args)}` failed: {answer.get('error-message')}")
    return answer


def register_supernode(conn: Connection, public_key: Path, name: str | None = None) -> int:
    """Register an OpenSSH P-256 public key; return the node id the SuperNode will get."""
    extra = ["--name", name] if name else []
    key = str(Path(public_key).resolve())
    return int(_flwr(conn, "supernode", "register", key, *extra)["node-id"])


def unregister_supernode(conn: Connection, node_id: int) -> None:
    """Unregister a node: an online SuperNode exits; the key can't be registered again."""
    _flwr(conn, "supernode", "unregister", str(node_id))


def submit_run(
    conn: Connection,
    app_dir: Path,
    run_config: Mapping[str, ConfigValue] | None = None,
    federation_config: Mapping[str, ConfigValue] | None = None,
) -> int:
    """Build ``app_dir`` into a FAB and start a run with ``run_config`` overrides; return its id.

    ``federation_config`` is for a SuperLink started with ``--simulation`` (see
    :func:`start_sim_superlink`): the simulation engine's settings, e.g. ``num-supernodes``,
    ``client-resources-num-cpus``, ``init-args-num-cpus`` (``flwr run --federation-config``).
    """
    app = Path(app_dir).resolve()
    pyproject = tomli.loads((app / "pyproject.toml").read_text())
    if "federations" in pyproject.get("tool", {}).get("flwr", {}):
        raise FlowerProcError(
            f"{app}/pyproject.toml has [tool.flwr.federations]: `flwr run` "
            "would rewrite that file (comment it out); remove the section"
        )
    args = ["run", str(app)]
    with tempfile.TemporaryDirectory(dir=conn.home) as tmp:
        if run_config:
            cfg = Path(tmp) / "run-config.toml"
            cfg.write_text(tomli_w.dumps(dict(run_config)))
            args += ["--run-config", str(cfg)]
        for key, value in (federation_config or {}).items():
            args += ["--federation-config", f"{key}={_toml_scalar(value)}"]
        return int(_flwr(conn, *args)["run-id"])


def _toml_scalar(value: ConfigValue) -> str:
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def stop_run(conn: Connection, run_id: int) -> None:
    """Ask the SuperLink to stop run ``run_id`` (it ends as ``finished:stopped``)."""
    _flwr(conn, "stop", str(run_id))


def run_logs(conn: Connection, run_id: int) -> str:
    """Return the ServerApp's log (its stdout/stderr and Flower's log lines) for ``run_id``."""
    return str(_flwr(conn, "log", str(run_id), "--show", json_out=False)["output"])
