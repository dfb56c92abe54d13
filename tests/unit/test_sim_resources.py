"""What idc-sim asks of Flower's simulation engine: CPU and GPU shares, and which Ray to use."""

from __future__ import annotations

import socket

import pytest

from simulation import sim_runtime
from simulation.cli import main as sim_main
from simulation.sim_runtime import Resources, auto_gpus_per_site


@pytest.fixture
def no_gpu(monkeypatch):
    """The CUDA driver is the boundary: stand in for a machine without a GPU."""
    monkeypatch.setattr(sim_runtime, "visible_gpus", lambda: 0)


@pytest.fixture
def listener():
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_a_private_ray_is_sized_here_and_shares_no_gpu_by_default():
    cfg = Resources(cpus_per_site=1, total_cpus=2).federation_config(3)
    assert cfg["num-supernodes"] == 3 and cfg["init-args-num-cpus"] == 2
    assert cfg["client-resources-num-cpus"] == 1 and cfg["client-resources-num-gpus"] == 0.0
    assert Resources(total_cpus=2).engine_env() == {"RAY_ADDRESS": ""}  # never a stray cluster


def test_a_gpu_fraction_goes_to_flowers_client_resources(monkeypatch):
    monkeypatch.setattr(sim_runtime, "visible_gpus", lambda: 1)
    cfg = Resources(total_cpus=2, gpus_per_site=0.25).federation_config(4)
    assert cfg["client-resources-num-gpus"] == 0.25


def test_joining_a_cluster_sets_ray_address_and_leaves_its_size_to_the_cluster(listener):
    res = Resources(total_cpus=2, gpus_per_site=0.5, ray_address=listener)
    assert res.engine_env() == {"RAY_ADDRESS": listener}
    cfg = res.federation_config(2)
    assert "init-args-num-cpus" not in cfg  # Ray refuses a size when it joins a cluster
    assert cfg["client-resources-num-gpus"] == 0.5


def test_on_a_cluster_a_site_may_take_more_cpus_than_this_machine_has(listener):
    # once: refused against this machine's CPUs, which a cluster's sites never use
    res = Resources(cpus_per_site=8, total_cpus=2, ray_address=listener)
    assert res.federation_config(2)["client-resources-num-cpus"] == 8


def test_the_default_share_fills_the_gpus_here_and_none_elsewhere(monkeypatch):
    monkeypatch.setattr(sim_runtime, "visible_gpus", lambda: 1)
    assert auto_gpus_per_site(4) == 0.25 and auto_gpus_per_site(1) == 1.0
    assert auto_gpus_per_site(4, ray_address="10.0.0.1:6379") == 0.0
    monkeypatch.setattr(sim_runtime, "visible_gpus", lambda: 0)
    assert auto_gpus_per_site(4) == 0.0


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--gpus-per-site", "0.25"], "needs a GPU, but none is visible"),
        (["--gpus-per-site", "1.5"], "must be in [0, 1]"),
        (["--cpus-per-site", "999"], "--cpus-per-site must be in [1, "),
        (["--ray-address", "ray://head"], "is not HOST:PORT"),
        (["--ray-address", "127.0.0.1:1"], "nothing answers there"),
        (["--strategy", "fedprox", "--dp", "3"], "proximal term would be dropped"),
        (["--strategy", "fedavgm", "--server-momentum", "1"], "'server-momentum'"),
    ],
)
def test_bad_simulation_flags_are_one_line_before_any_work(no_gpu, tmp_path, capsys, flags, words):
    out = tmp_path / "out"
    base = ["federated", "--data", str(tmp_path), "--sites", "2", "--rounds", "1"]
    code = sim_main([*base, "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not out.exists()
