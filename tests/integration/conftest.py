"""The one ``fed`` fixture: a federation under tmp_path that must leave no process behind."""

from __future__ import annotations

import pytest

from tests.integration.federation import Federation


@pytest.fixture
def fed(tmp_path):
    federation = Federation(tmp_path)
    yield federation
    federation.stop()
    for name, proc in federation.procs.items():
        assert proc.poll() is not None, f"{name} (pid {proc.pid}) survived the test"
    assert federation.leftovers() == []
