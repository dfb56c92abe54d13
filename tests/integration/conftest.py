"""The federations tests run on: ``fed``, a fresh one per test, and ``two_sites``, one shared.

Either must leave no process behind.
"""

from __future__ import annotations

import pytest

from simulation.synth import SynthSpec
from tests.integration.federation import Federation, synth_sites


def assert_all_stopped(federation: Federation) -> None:
    """Stop ``federation`` and fail naming any process of it that survived."""
    federation.stop()
    for name, proc in federation.procs.items():
        assert proc.poll() is not None, f"{name} (pid {proc.pid}) survived the test"
    assert federation.leftovers() == []


@pytest.fixture
def fed(tmp_path):
    federation = Federation(tmp_path)
    yield federation
    assert_all_stopped(federation)


@pytest.fixture
def one_thread():
    """As idc-sim runs the baselines (--threads 1): more threads only spin on 2 shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def _two_sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-sites")
    spec = SynthSpec(patients=6, sites=2, patches_per_patient=(30, 40), seed=5)
    folders = synth_sites(root / "data", spec)
    federation = Federation(root)
    try:
        federation.start_all({"hosp0": folders[0], "hosp1": folders[1]})
        yield federation
    finally:
        assert_all_stopped(federation)


@pytest.fixture
def two_sites(_two_sites):
    """hosp0 and hosp1 online at one coordinator, started once for every test that only runs
    rounds on it, operates it or attacks it: each start costs a loaded 2-core machine half a
    minute. A test leaves the registry as it found it and names what it spawns uniquely; the
    commands it spawned are stopped after it (the coordinator and sites go on)."""
    before = set(_two_sites.procs)
    yield _two_sites
    _two_sites.stop_procs([name for name in _two_sites.procs if name not in before])
