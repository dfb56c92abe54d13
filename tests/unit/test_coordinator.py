import pytest

from common import keys
from common.audit import AuditError
from common.config import RunConfig
from server.coordinator import Coordinator
from server.registry import CoordPaths, save_sites


def test_an_unwritable_coordinator_audit_log_stops_the_run(tmp_path):
    coord = CoordPaths(tmp_path / "coord")
    coord.root.mkdir()
    keys.generate_key_pair(coord.key, coord.pub)
    save_sites(coord, {})
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
