"""Start, drive and stop Flower 1.42 SuperLink/SuperNode processes and runs."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest
from flwr.supercore.control import ControlHttpClient

from common.procs import alive, descendants, signal_tree

ConfigValue = bool | int | float | str
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
_BIN = Path(sys.executable).parent  # flower-superexec etc. must be on PATH for children


class FlowerProcError(RuntimeError):
    """A Flower process or CLI call failed; the message says which and why."""


class FlowerTimeout(FlowerProcError, TimeoutError):
    """A wait ran past its deadline; the message names what it waited for."""


class SuperLinkUnreachable(FlowerProcError, ConnectionError):
    """No connection to the SuperLink's Control API (not started, gone, or TLS refused)."""


@dataclass(frozen=True)
class TlsPaths:
    """PEM files of a CA and of the server certificate it signed."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class Connection:
    """How the ``flwr`` CLI reaches a SuperLink: ``$FLWR_HOME/config.toml`` entry ``name``."""

    address: str
    ca_cert: Path | None
    home: Path
    name: str = "idc"


@dataclass(frozen=True)
class RunStatus:
    """Status of a run: ``status`` is pending/starting/running/finished."""

    status: str
    sub_status: str  # completed, failed, stopped, or "" while not finished
    details: str

    @property
    def finished(self) -> bool:
        """Whether the run has ended, in any way."""
        return self.status == "finished"

    @property
    def text(self) -> str:
        """The ``flwr ls`` form, e.g. ``finished:completed``."""
        return f"{self.status}:{self.sub_status}" if self.sub_status else self.status


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment for a Flower process whose ``FLWR_HOME`` is ``home``."""
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(Path(home).resolve())}
    env["PATH"] = f"{_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_tls(
    out_dir: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost"), days: int = 365
) -> TlsPaths:
    """Write a fresh CA and a server certificate for ``hosts`` (IPs and DNS names as SANs).

    Returns
    -------
    TlsPaths
        ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key`` in ``out_dir`` (keys 0o600).
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    hosts = list(hosts)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key, srv_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idc-fl federation CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = TlsPaths(out / "ca.pem", out / "ca.key", out / "server.pem", out / "server.key")
    paths.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.ca_key, _pem_key(ca_key))
    _write_private(paths.server_key, _pem_key(srv_key))
    return paths


def to_openssh_private_key(src: Path, dst: Path) -> Path:
    """Copy an EC private key (PEM or OpenSSH) to ``dst`` in the OpenSSH format SuperNodes read."""
    data = Path(src).read_bytes()
    key: object = (serialization.load_ssh_private_key(data, None) if b"OPENSSH" in data
                   else serialization.load_pem_private_key(data, None))
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{src} is not an EC private key")
    fmt = serialization.PrivateFormat.OpenSSH
    pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    _write_private(Path(dst), pem)
    return Path(dst)


def _popen(
    cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def start_superlink(state_dir: Path, port: int, tls: TlsPaths | None, log_path: Path, *,
                    host: str = "127.0.0.1", persist: bool = True, args: Iterable[str] = (),
                    env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``flower-superlink`` (Fleet, Control and Runtime APIs all on ``host:port``).

    With ``tls`` it serves HTTPS and only admits SuperNodes whose public key was registered;
    ``tls=None`` means plain HTTP and no SuperNode authentication. ``state_dir`` is its cwd
    (hence the ServerApp's), its ``FLWR_HOME`` (``state_dir/flwr-home``, where FABs unpack) and,
    with ``persist``, holds ``superlink.db`` (registered nodes and runs survive a restart).
    ``args`` are extra flags; ``env`` extra variables (the ServerApp inherits them).
    """
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    cmd = [str(_BIN / "flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(Path(tls.ca_cert).resolve()),
                "--ssl-certfile", str(Path(tls.server_cert).resolve()),
                "--ssl-keyfile", str(Path(tls.server_key).resolve()), "--enable-supernode-auth"]
    if persist:
        cmd += ["--database", str(state / "superlink.db")]
    cmd += list(args)
    return _popen(cmd, flower_env(state / "flwr-home", env), state, log_path)


def _exited(procs: Iterable[subprocess.Popen[bytes]], what: str) -> None:
    for proc in procs:
        if proc.poll() is not None:
            name = Path(str(proc.args[0] if isinstance(proc.args, list) else proc.args)).name
            raise FlowerProcError(f"{what}: {name} (pid {proc.pid}) exited with {proc.returncode}")


def wait_superlink_ready(address: str, ca_cert: Path | None, timeout: float = 60.0,
                         proc: subprocess.Popen[bytes] | None = None) -> None:
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
    cmd = [str(_BIN / "flwr"), *args, conn.name] + (["--format", "json"] if json_out else [])
    try:
        res = subprocess.run(cmd, env=flower_env(conn.home), cwd=conn.home, capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
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


def _control(conn: Connection, method: str, request: Any) -> Any:
    """Call one read-only Control API method in-process (cheaper than a ``flwr`` subprocess)."""
    client = ControlHttpClient.from_server_address(
        server_address=conn.address, insecure=conn.ca_cert is None, interceptors=[],
        root_certificates=conn.ca_cert.read_bytes() if conn.ca_cert else None)
    try:
        return getattr(client, method)(request)
    except httpx.HTTPStatusError as err:
        raise FlowerProcError(f"SuperLink {conn.address} {method}: {err.response.text}") from err
    except httpx.HTTPError as err:
        raise SuperLinkUnreachable(f"SuperLink {conn.address} {method}: {err!r}") from err
    finally:
        client.close()


def list_nodes(conn: Connection) -> list[Any]:
    """Every node the SuperLink knows: ``node_id``, ``name``, ``status``, ``public_key``."""
    return list(_control(conn, "ListNodes", ListNodesRequest()).nodes_info)


def node_statuses(conn: Connection) -> dict[int, tuple[str, str]]:
    """Return ``{node_id: (status, name)}``; status is registered/online/offline/unregistered."""
    nodes = _control(conn, "ListNodes", ListNodesRequest()).nodes_info
    return {n.node_id: (n.status, n.name) for n in nodes}


def wait_nodes_online(conn: Connection, node_ids: Iterable[int], timeout: float = 60.0,
                      procs: Iterable[subprocess.Popen[bytes]] = ()) -> None:
    """Wait until the SuperLink lists every node in ``node_ids`` as online.

    Fails early if one of ``procs`` (their SuperNodes) exits. Right after a SuperLink restart
    with a database, nodes may still read "online" from before until their heartbeat expires.
    """
    wanted, procs = set(node_ids), list(procs)
    deadline, missing = time.monotonic() + timeout, set(wanted)
    while time.monotonic() < deadline:
        _exited(procs, f"SuperNodes {sorted(missing)} never came online")
        try:
            statuses = node_statuses(conn)
        except SuperLinkUnreachable:
            statuses = {}
        missing = {n for n in wanted if statuses.get(n, ("",))[0] != "online"}
        if not missing:
            return
        time.sleep(0.5)
    raise FlowerTimeout(f"SuperNodes {sorted(missing)} not online after {timeout:.0f}s")


def start_supernode(superlink: str, ca_cert: Path | None, private_key: Path | None,
                    node_config: Mapping[str, ConfigValue], port: int, log_path: Path, *,
                    home: Path, cwd: Path | None = None, args: Iterable[str] = (),
                    env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``flower-supernode`` against ``superlink`` (``host:port``).

    Its own Runtime API listens on 127.0.0.1:``port``; ``home`` is its ``FLWR_HOME`` and holds
    ``node-config.toml`` (read by ClientApps as ``context.node_config``); ``cwd`` (default
    ``home``) is the ClientApp's working directory. ``private_key`` must be OpenSSH format.
    ``args`` are extra flags (e.g. ``--max-wait-time 60``); ClientApps inherit ``env``.
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    node_toml = home / "node-config.toml"
    node_toml.write_text(tomli_w.dumps(dict(node_config)))
    cmd = [str(_BIN / "flower-supernode"), "--superlink", superlink, "--host", "127.0.0.1",
           "--port", str(port), "--node-config", str(node_toml)]
    cmd += ["--root-certificates", str(Path(ca_cert).resolve())] if ca_cert else ["--insecure"]
    if private_key is not None:
        if b"OPENSSH PRIVATE KEY" not in Path(private_key).read_bytes()[:64]:
            raise ValueError(f"{private_key} is not OpenSSH format: see to_openssh_private_key")
        cmd += ["--auth-supernode-private-key", str(Path(private_key).resolve())]
    cmd += list(args)
    return _popen(cmd, flower_env(home, env), Path(cwd).resolve() if cwd else home, log_path)


def submit_run(
    conn: Connection, app_dir: Path, run_config: Mapping[str, ConfigValue] | None = None,
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
        raise FlowerProcError(f"{app}/pyproject.toml has [tool.flwr.federations]: `flwr run` "
                              "would rewrite that file (comment it out); remove the section")
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


def run_status(conn: Connection, run_id: int) -> RunStatus:
    """Return the current status of run ``run_id`` (FlowerProcError if the run is unknown)."""
    st = _control(conn, "ListRuns", ListRunsRequest(run_id=run_id)).run_dict[run_id].status
    return RunStatus(st.status, st.sub_status, st.details)


def wait_run(conn: Connection, run_id: int, timeout: float, poll: float = 1.0) -> RunStatus:
    """Wait until run ``run_id`` is finished (completed, failed or stopped); return its status.

    A SuperLink that is briefly unreachable is retried until the deadline.
    """
    deadline, last = time.monotonic() + timeout, "no answer"
    while True:
        try:
            status = run_status(conn, run_id)
            if status.finished:
                return status
            last = status.text
        except SuperLinkUnreachable as err:
            last = str(err)
        if time.monotonic() >= deadline:
            raise FlowerTimeout(f"run {run_id} not finished after {timeout:.0f}s (last: {last})")
        time.sleep(poll)


def stop_run(conn: Connection, run_id: int) -> None:
    """Ask the SuperLink to stop run ``run_id`` (it ends as ``finished:stopped``)."""
    _flwr(conn, "stop", str(run_id))


def run_logs(conn: Connection, run_id: int) -> str:
    """Return the ServerApp's log (its stdout/stderr and Flower's log lines) for ``run_id``."""
    return str(_flwr(conn, "log", str(run_id), "--show", json_out=False)["output"])


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


def start_sim_superlink(state_dir: Path, port: int, log_path: Path,
                        env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``flower-superlink --simulation`` on 127.0.0.1:``port`` (plain HTTP, no database).

    Runs submitted to it (:func:`submit_run` with a ``federation_config``) execute the
    ServerApp and ClientApps in Flower's simulation engine (``flwr-simulation``, Ray backend)
    instead of waiting for SuperNodes. Stop it with :func:`stop_tree`: the engine's processes
    live in their own process groups.
    """
    return start_superlink(state_dir, port, None, log_path, persist=False,
                           args=["--simulation"], env=env)  # fmt: skip


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid apart); None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def tree_snapshot(pid: int) -> dict[int, str]:
    """The live descendants of ``pid`` as ``{pid: start time}``, to stop them later."""
    return {p: t for p in descendants(pid) if (t := _start_time(p)) is not None}


def stop_tree(proc: subprocess.Popen[bytes], seen: Mapping[int, str] | None = None,
              timeout: float = 10.0) -> int:
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
