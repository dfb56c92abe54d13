"""Virtual sites on disk, and Flower's simulation engine running the real ServerApp/ClientApp.

Layout under an output folder::

    sites/site-NNN/data/    the site's patients, symlinked from the source (never copied)
    sites/site-NNN/cache/   decoded patches, shared by every run on these sites
    <run>/sites/site-NNN/   what the ClientApp sees (``sim-sites-dir``): ``data`` -> the shared
                            data, ``state/`` with a fresh key pair, audit log and privacy ledger,
                            ``state/cache`` -> the shared cache
    <run>/coord/            a coordinator folder with every virtual site's key registered
    <run>/run/              the ServerApp's run folder (rounds.jsonl, checkpoints, final model)

A fresh ``state/`` per run keeps each run's privacy ledger to that run (a sweep's runs are
alternatives, not a sequence), while the decoded cache is shared: its key is the data
folder's resolved path, the same through either link.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import flowerctl
from common import keys
from common.config import RunConfig, SiteConfig, sim_site_dir
from common.data import LoadOptions, PatchRecord, load_patches, resolve_root
from common.errors import FederationError
from common.paths import CoordPaths, SitePaths
from common.protocol import RoundRow
from common.registry import add_site, new_registry
from common.rundir import RunDir

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MARKER = ".idc-sim-output"
POLL_SECONDS = 1.0


def fresh_output(path: Path) -> Path:
    """Create ``path``, or empty it when an earlier idc-sim run made it; refuse anything else."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise ValueError(f"--out {path} is not empty and not an earlier idc-sim output")
        for child in path.iterdir():  # keep the folder itself (it may be a mount point)
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)  # never follows the links to the source data
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("written by idc-sim; the next run with this --out replaces it\n")
    return path


def build_sites(
    source: Path, records: Sequence[PatchRecord], parts: Sequence[np.ndarray], out: Path
) -> Path:
    """Symlink each site's patients from ``source`` into ``out/site-NNN/data``; never copy.

    ``records`` are the source's scanned patch files (``common.data.scan``). Symlinks, not
    hard links: a hard link would change the shared files' inodes (link count, ctime) and a
    write through it would change the original; nothing is written next to the source.
    """
    root = resolve_root(source).resolve()
    by_patient: dict[str, list[PatchRecord]] = {}
    for rec in records:
        by_patient.setdefault(rec.patient, []).append(rec)
    for k, part in enumerate(parts):
        data = sim_site_dir(out, k) / "data"
        for patient in np.asarray(part).tolist():
            for rec in by_patient[patient]:
                dst = data / rec.path
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(root / rec.path, dst)
        (sim_site_dir(out, k) / "cache").mkdir(exist_ok=True)
    log.info("linked %d patients into %d sites", sum(len(p) for p in parts), len(parts))
    return out


def site_config(sites: Path, k: int) -> SiteConfig:
    """The shared data and cache of virtual site ``k``, as the baselines read them."""
    folder = sim_site_dir(sites, k)
    return SiteConfig(
        site_name=folder.name,
        data_dir=folder / "data",
        state_dir=folder / "state",
        cache_dir=folder / "cache",
    )


def decode_sites(sites: Path, count: int, workers: int = 2) -> None:
    """Decode every site's patches into its cache now, so no ClientApp has to."""
    for k in range(count):
        cfg = site_config(sites, k)
        load_patches(
            cfg.data_dir,
            cache_dir=cfg.cache_dir,
            options=LoadOptions(small=cfg.small_policy),
            workers=workers,
        )


def make_run_sites(sites: Path, count: int, run_root: Path) -> tuple[Path, Path]:
    """Per-run virtual site folders and a coordinator folder with their keys registered."""
    virtual = run_root / "sites"
    coord = new_registry(CoordPaths(run_root / "coord"))
    for k in range(count):
        shared, folder = sim_site_dir(sites, k), sim_site_dir(virtual, k)
        state = SitePaths(folder / "state")
        state.root.mkdir(parents=True)
        (folder / "data").symlink_to((shared / "data").resolve(), target_is_directory=True)
        state.cache.symlink_to((shared / "cache").resolve(), target_is_directory=True)
        keys.generate_key_pair(state.key, state.pub)
        add_site(coord, folder.name, state.pub)  # names as SiteConfig gives them
    return virtual, coord.root


def visible_gpus() -> int:
    """GPUs torch sees on this machine (what a ClientApp here would train on)."""
    import torch

    return torch.cuda.device_count()


def auto_gpus_per_site(sites: int, ray_address: str = "") -> float:
    """The default share: none without a local GPU (or on a cluster: say it), else all at once.

    With ``g`` GPUs here, each of ``sites`` virtual sites gets ``min(1, g / sites)``, so every
    site can train at the same time when CPUs allow.
    """
    gpus = 0 if ray_address else visible_gpus()
    return min(1.0, gpus / max(sites, 1)) if gpus else 0.0


def check_ray_address(address: str, wait: float = 5.0) -> None:
    """Raise ValueError unless ``address`` is HOST:PORT and something listens there.

    Checked before any work: Ray's own failure would surface only after the sites are
    decoded, as the simulated run's error.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in host:
        raise ValueError(
            f"--ray-address {address!r} is not HOST:PORT: give the head node's address as "
            "`ray start --head --port PORT` printed it"
        )
    try:
        socket.create_connection((host, int(port)), timeout=wait).close()
    except OSError as exc:
        raise ValueError(
            f"--ray-address {address}: nothing answers there ({exc.strerror or exc}); start "
            "the cluster (`ray start --head --port PORT`) or fix the address"
        ) from exc


@dataclass(frozen=True)
class Resources:
    """Ray's share: ``cpus_per_site`` CPUs and ``gpus_per_site`` of a GPU per ClientApp.

    ``total_cpus`` bounds a Ray instance started here; with ``ray_address`` the run joins that
    existing Ray cluster instead (its size is the cluster's), through ``RAY_ADDRESS``, which
    Flower's Ray backend passes on to ``ray.init``.
    """

    cpus_per_site: int = 1
    total_cpus: int = max(os.cpu_count() or 1, 1)
    gpus_per_site: float = 0.0
    ray_address: str = ""

    def __post_init__(self) -> None:
        # On a cluster the cluster's CPUs bound it (Ray says so), not this machine's.
        most = math.inf if self.ray_address else self.total_cpus
        if not 1 <= self.cpus_per_site <= most:
            raise ValueError(
                f"--cpus-per-site must be in [1, {self.total_cpus}] (this machine's CPUs), got "
                f"{self.cpus_per_site}"
            )
        gpus = self.gpus_per_site
        if not (0 <= gpus <= 1 and math.isfinite(gpus)):
            raise ValueError(f"--gpus-per-site must be in [0, 1] (a fraction), got {gpus}")
        if self.ray_address:
            check_ray_address(self.ray_address)
        elif gpus > 0 and visible_gpus() == 0:
            raise ValueError(
                f"--gpus-per-site {gpus:g} needs a GPU, but none is visible on this machine "
                "(torch sees 0 CUDA devices); use --gpus-per-site 0 on a CPU-only machine"
            )

    def federation_config(self, sites: int) -> dict[str, flowerctl.ConfigValue]:
        """``flwr run --federation-config`` entries for ``sites`` virtual SuperNodes."""
        config: dict[str, flowerctl.ConfigValue] = {
            "num-supernodes": sites,
            "client-resources-num-cpus": self.cpus_per_site,
            "client-resources-num-gpus": float(self.gpus_per_site),
            "init-args-logging-level": "WARNING",
        }
        if not self.ray_address:  # Ray refuses a size when it joins an existing cluster
            config["init-args-num-cpus"] = self.total_cpus
        return config

    def engine_env(self) -> dict[str, str]:
        """The SuperLink's extra environment: which Ray to use (empty: start a private one).

        Set either way, so a ``RAY_ADDRESS`` in the caller's environment is never joined by
        accident (Ray ignores an empty one).
        """
        return {"RAY_ADDRESS": self.ray_address}


class RunFailed(FederationError, RuntimeError):
    """A simulated run did not complete; the message carries the ServerApp's error."""


class SimEngine:
    """A private SuperLink in simulation mode; every process it starts is stopped on exit."""

    def __init__(self, work: Path, resources: Resources | None = None) -> None:
        self.work = Path(work)
        self.resources = resources or Resources()
        self.seen: dict[int, str] = {}  # every descendant seen: pid -> its start time
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: flowerctl.Connection | None = None

    def __enter__(self) -> SimEngine:
        port = flowerctl.free_port()
        self.proc = flowerctl.start_sim_superlink(
            self.work / "superlink",
            port,
            self.work / "logs" / "superlink.log",
            env=self.resources.engine_env(),
        )
        try:
            flowerctl.wait_superlink_ready(f"127.0.0.1:{port}", None, 60, self.proc)
        except BaseException:
            self.close()
            raise
        self.conn = flowerctl.write_cli_config(self.work / "flwr-cli", f"127.0.0.1:{port}", None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the SuperLink and every process below it (simulation engine, Ray), by pid."""
        if self.proc is not None:
            flowerctl.stop_tree(self.proc, self.seen)
            self.proc = None

    def run(
        self,
        run: RunConfig,
        sites: int,
        timeout: float,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Run the project's ServerApp and ClientApp on ``sites`` virtual sites; return rounds.

        ``on_round`` gets each rounds.jsonl row as soon as the ServerApp commits it.
        """
        if self.conn is None or self.proc is None:
            raise RuntimeError("SimEngine.run outside its `with` block")
        run.check()
        run_id = flowerctl.submit_run(
            self.conn, PROJECT_ROOT, run.to_run_config(), self.resources.federation_config(sites)
        )
        run_dir, shown = RunDir(Path(run.run_dir)), 0

        def poll() -> None:
            nonlocal shown
            assert self.proc is not None
            self.seen.update(flowerctl.tree_snapshot(self.proc.pid))
            rows = run_dir.read_rounds()
            for row in rows[shown:]:
                if on_round is not None:
                    on_round(row)
            shown = len(rows)

        try:
            status = flowerctl.follow_run(
                self.conn, run_id, timeout, on_poll=poll, poll=POLL_SECONDS
            )
        except flowerctl.FlowerTimeout as exc:
            raise RunFailed(f"simulated run: {exc}") from exc
        poll()
        if status.sub_status != "completed":
            raise RunFailed(f"simulated run {status.text}: {self._why(run_dir, run_id, status)}")
        return run_dir.read_rounds()

    def _why(self, run_dir: RunDir, run_id: int, status: flowerctl.RunStatus) -> str:
        failure = run_dir.root / "status.json"
        if failure.is_file():
            return str(json.loads(failure.read_text()).get("error"))
        assert self.conn is not None
        try:
            return status.details or flowerctl.run_logs(self.conn, run_id)[-3000:]
        except flowerctl.FlowerProcError as exc:
            return f"{status.details} (logs unavailable: {exc})"


def epsilon_by_site(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each site's total epsilon after the last round it trained in (0 when DP was off)."""
    out: dict[str, float] = {}
    for row in rows:
        out.update(RoundRow.from_row(row).epsilon_by_site())
    return out
