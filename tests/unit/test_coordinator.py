import json

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


def _coordinator(tmp_path):
    coord = new_registry(CoordPaths(tmp_path / "coord"))
    run = RunConfig(run_dir=str(tmp_path / "run"), coord_dir=str(coord.root))
    return Coordinator(run, tmp_path / "run", "11"), coord


@pytest.mark.parametrize("exc", [SystemExit(0), KeyboardInterrupt()])
def test_a_run_stopped_from_outside_is_audited_as_stopped_not_failed(tmp_path, exc):
    """`flwr stop` reaches the ServerApp as SIGTERM, which Flower turns into SystemExit(0)."""
    coordinator, coord = _coordinator(tmp_path)
    coordinator.fail(exc)
    coordinator.close()
    actions = [json.loads(line) for line in coord.audit.read_text().splitlines()]
    assert [e["action"] for e in actions] == ["run.started", "run.stopped"]
    stopped = actions[-1]
    assert stopped["outcome"] == "stopped" and stopped["object"] == "run 11"
    assert stopped["details"]["by"] == "unknown" and "flwr stop" in stopped["details"]["reason"]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "stopped"


def test_a_real_failure_is_still_audited_as_failed(tmp_path):
    coordinator, coord = _coordinator(tmp_path)
    coordinator.fail(ValueError("bad reply"))
    coordinator.close()
    last = json.loads(coord.audit.read_text().splitlines()[-1])
    assert last["action"] == "run.failed" and "ValueError: bad reply" in last["details"]["error"]


def test_run_submitted_is_written_only_after_the_submission_succeeded(tmp_path, monkeypatch):
    import flowerctl
    from common.errors import EXIT_FEDERATION, EXIT_INTERRUPTED
    from server import cli as server_cli
    from server.link import LIVE_FILE

    coord = tmp_path / "coord"
    assert server_cli.main(["init", "--dir", str(coord)]) == 0
    (coord / LIVE_FILE).write_text(json.dumps({"local_address": "127.0.0.1:1"}))
    paths = CoordPaths(coord)

    def refused(*args, **kwargs):  # the SuperLink is the boundary: it refuses the run
        raise flowerctl.FlowerProcError("run refused")

    monkeypatch.setattr(flowerctl, "submit_run", refused)
    code = server_cli.main(["run", "--dir", str(coord), "--out", str(tmp_path / "r")])
    assert code == EXIT_FEDERATION
    assert "run.submitted" not in paths.audit.read_text()

    def accepted(*args, **kwargs):
        return 4242

    def finished(*args, **kwargs):
        raise KeyboardInterrupt  # stop following: the submission is what is checked here

    monkeypatch.setattr(flowerctl, "submit_run", accepted)
    monkeypatch.setattr(flowerctl, "follow_run", finished)
    code = server_cli.main(["run", "--dir", str(coord), "--out", str(tmp_path / "r")])
    assert code == EXIT_INTERRUPTED
    last = json.loads(paths.audit.read_text().splitlines()[-1])
    assert last["action"] == "run.submitted" and last["object"] == "run 4242"
    assert last["details"]["run_id"] == "4242"
