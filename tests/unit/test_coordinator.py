import pytest

from common.audit import AuditError
from common.config import RunConfig
from common.paths import CoordPaths
from common.registry import new_registry
from server.coordinator import Coordinator


def test_an_unwritable_coordinator_audit_log_stops_the_run(tmp_path):
    coord = new_registry(CoordPaths(tmp_path / "coord"))
    (coord.root / "audit").write_text("a file where the audit folder should be")
    run = RunConfig(run_dir=str(tmp_path / "run"), coord_dir=str(coord.root))
    with pytest.raises(AuditError, match="audit"):
        Coordinator(run, tmp_path / "run", "1")


def test_a_run_folder_with_rounds_needs_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text('{"completed_round": 2}')
    with pytest.raises(ValueError, match="--resume"):
        Coordinator(RunConfig(run_dir=str(run_dir)), run_dir, "1")
