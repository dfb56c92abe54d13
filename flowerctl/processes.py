"""Flower's processes: start SuperLink and SuperNodes, wait until ready, stop whole trees.

Flower starts its helpers (SuperExec, ServerApp, ClientApps, the simulation engine) in
sessions of their own, so process groups miss them: trees are read from /proc and stopped
by pid, and a pid is only signalled while its start time still matches.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

import tomli_w

from common.fileio import private_dir, write_private
from flowerctl.errors import FlowerProcError, FlowerTimeout
from flowerctl.tls import TlsPaths

ConfigValue = bool | int | float | str
# Every Flower process we start gets these: Flower never phones home, never checks for
# updates, and never installs an app's dependencies at run time (it would pull a CUDA torch).
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
BIN = Path(sys.executable).parent  # flower-superexec etc. must be on PATH for children


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment for a Flower process whose ``FLWR_HOME`` is ``home``."""
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(Path(home).resolve())}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def _popen(
    cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    Path(log_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with open(fd, "ab") as log:
        # umask 077: what Flower writes (superlink.db, FABs, its own config) is owner-only.
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=0o077,
        )


def start_superlink(
    state_dir: Path,
    port: int,
    tls: TlsPaths | None,
    log_path: Path,
    *,
    host: str = "127.0.0.1",
    persist: bool = True,
    args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``flower-superlink`` (Fleet, Control and Runtime APIs all on ``host:port``).

    With ``tls`` it serves HTTPS and only admits SuperNodes whose public key was registered;
    ``tls=None`` means plain HTTP and no SuperNode authentication. ``state_dir`` is its cwd
    (hence the ServerApp's), its ``FLWR_HOME`` (``state_dir/flwr-home``, where FABs unpack) and,
    with ``persist``, holds ``superlink.db`` (registered nodes and runs survive a restart).
    ``args`` are extra flags; ``env`` extra variables (the ServerApp inherits them).
    """
    state = private_dir(Path(state_dir).resolve())  # superlink.db: nodes' keys, runs
    cmd = [
        str(BIN / "flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(Path(tls.ca_cert).resolve()),
            "--ssl-certfile",
            str(Path(tls.server_cert).resolve()),
            "--ssl-keyfile",
            str(Path(tls.server_key).resolve()),
            "--enable-supernode-auth",
        ]
    if persist:
        cmd += ["--database", str(state / "superlink.db")]
    cmd += list(args)
    return _popen(cmd, flower_env(state / "flwr-home", env), state, log_path)


def _exited(procs: Iterable[subprocess.Popen[bytes]], what: str) -> None:
    for proc in procs:
        if proc.poll() is not None:
            name = Path(str(proc.args[0] if isinstance(proc.args, list) else proc.args)).name
            raise FlowerProcError(f"{what}: {name} (pid {proc.pid}) exited with {proc.returncode}")


def wait_superlink_ready(
    address: str,
    ca_cert: Path | None,
    timeout: float = 60.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll ``GET /health`` on ``address`` over HTTPS (HTTP if ``ca_cert`` is None) until 200."""
    ctx = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    url = f"{'https' if ca_cert else 'http'}://{address}/health"
    deadline, last = time.monotonic() + timeout, "no attempt"
    while time.monotonic() < deadline:
        _exited([proc] if proc else [], f"SuperLink at {address} never became ready")
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except OSError as err:
            last = str(err)
        time.sleep(0.2)
    raise FlowerTimeout(f"SuperLink health {url} not ready after {timeout:.0f}s (last: {last})")


def start_supernode(
    superlink: str,
    ca_cert: Path | None,
    private_key: Path | None,
    node_config: Mapping[str, ConfigValue],
    port: int,
    log_path: Path,
    *,
    home: Path,
    cwd: Path | None = None,
    args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``flower-supernode`` against ``superlink`` (``host:port``), idle waits shortened.

    It runs through :mod:`flowerctl.supernode` (Flower's own entry point, with the main
    loop's fixed 3 s idle sleep and reply waits shortened; Flower 1.42.0 only).

    Its own Runtime API listens on 127.0.0.1:``port``; ``home`` is its ``FLWR_HOME`` and holds
    ``node-config.toml`` (read by ClientApps as ``context.node_config``); ``cwd`` (default
    ``home``) is the ClientApp's working directory. ``private_key`` must be OpenSSH format.
    ``args`` are extra flags (e.g. ``--max-wait-time 60``); ClientApps inherit ``env``.
    """
    home = private_dir(Path(home).resolve())
    node_toml = home / "node-config.toml"  # the site's data folder and cap: owner-only
    write_private(node_toml, tomli_w.dumps(dict(node_config)).encode())
    cmd = [
        sys.executable,
        "-m",
        "flowerctl.supernode",
        "--superlink",
        superlink,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        str(node_toml),
    ]
    cmd += ["--root-certificates", str(Path(ca_cert).resolve())] if ca_cert else ["--insecure"]
    if private_key is not None:
        if b"OPENSSH PRIVATE KEY" not in Path(private_key).read_bytes()[:64]:
            raise ValueError(f"{private_key} is not OpenSSH format: see to_openssh_private_key")
        cmd += ["--auth-supernode-private-key", str(Path(private_key).resolve())]
    cmd += list(args)
    return _popen(cmd, flower_env(home, env), Path(cwd).resolve() if cwd else home, log_path)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM the process group of ``proc`` (started here), then SIGKILL after ``timeout``.

    Flower starts its helpers (SuperExec, ServerApp, ClientApps) in sessions of their own, so
    the whole process tree is collected first and anything of it still alive at the end is
    killed too: nothing we started outlives us.
    """
    tree = descendants(proc.pid)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    if proc.poll() is None:
        raise FlowerProcError(f"process {proc.pid} survived SIGKILL")
    _reap(tree)
    return proc.returncode


def _reap(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM what is left of a collected tree, then SIGKILL it after ``timeout``."""
    signal_tree([p for p in pids if alive(p)], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_tree([p for p in pids if alive(p)], signal.SIGKILL)


# -- simulation: a SuperLink with Flower's simulation engine, and its whole process tree ------


def start_sim_superlink(
    state_dir: Path, port: int, log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``flower-superlink --simulation`` on 127.0.0.1:``port`` (plain HTTP, no database).

    Runs submitted to it (:func:`submit_run` with a ``federation_config``) execute the
    ServerApp and ClientApps in Flower's simulation engine (``flwr-simulation``, Ray backend)
    instead of waiting for SuperNodes. Stop it with :func:`stop_tree`: the engine's processes
    live in their own process groups.
    """
    return start_superlink(
        state_dir, port, None, log_path, persist=False, args=["--simulation"], env=env
    )


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid apart); None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def tree_snapshot(pid: int) -> dict[int, str]:
    """The live descendants of ``pid`` as ``{pid: start time}``, to stop them later."""
    return {p: t for p in descendants(pid) if (t := _start_time(p)) is not None}


def stop_tree(
    proc: subprocess.Popen[bytes], seen: Mapping[int, str] | None = None, timeout: float = 10.0
) -> int:
    """:func:`stop_process`, then also what ``seen`` recorded (see :func:`tree_snapshot`).

    The simulation engine's processes (``flwr-simulation``, Ray's daemons and workers) can
    be re-parented away from the SuperLink once their parent exits, so a tree listed only at
    the end may miss them. A pid is signalled only while its start time still matches, so a
    pid reused by someone else's process is left alone.
    """
    code = stop_process(proc, timeout)
    ours = [p for p, t in (seen or {}).items() if alive(p) and _start_time(p) == t]
    _reap(ours, timeout)
    left = [p for p, t in (seen or {}).items() if alive(p) and _start_time(p) == t]
    if left:
        raise FlowerProcError(f"processes {left} of SuperLink {proc.pid} survived SIGKILL")
    return code


# -- process trees from /proc --------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # the command name may hold spaces and parentheses: ppid follows the last ")"
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first found, then theirs)."""
    tree = _children_map()
    out, todo = [], list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(tree.get(child, []))
    return out


def signal_tree(pids: list[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each pid, ignoring those already gone."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (zombies count as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
