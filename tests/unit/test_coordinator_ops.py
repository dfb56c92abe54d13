"""The coordinator's operating commands without a SuperLink: lock, records, refusals, status."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common import keys
from common.audit import AuditLog
from common.audit_verify import verify_log
from common.config import RunConfig
from common.paths import CoordPaths
from common.registry import load_sites
from server.cli import main
from server.lock import AlreadyRunning, StartLock
from server.runrecord import read_record, set_state


@pytest.fixture
def coord(tmp_path):
    root = tmp_path / "coord"
    assert main(["init", "--dir", str(root)]) == 0
    return CoordPaths(root)


def site_key(tmp_path, name):
    pub = tmp_path / f"{name}.pub"
    keys.generate_key_pair(tmp_path / f"{name}.key", pub)
    return pub


def test_a_second_start_lock_names_the_first_and_is_free_once_released(coord):
    first = StartLock(coord, "0.0.0.0:8000")
    with pytest.raises(AlreadyRunning, match=r"already running, pid \d+, address 0\.0\.0\.0:8000"):
        StartLock(coord, "0.0.0.0:9000")
    first.release()
    StartLock(coord, "0.0.0.0:9000").release()


def test_the_start_lock_dies_with_its_process(coord):
    code = (
        "import sys; from pathlib import Path; from common.paths import CoordPaths;"
        "from server.lock import StartLock;"
        "lock = StartLock(CoordPaths(Path(sys.argv[1])), 'a:1'); print('held', flush=True);"
        "sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(coord.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyRunning, match=f"pid {proc.pid}, address a:1"):
            StartLock(coord, "b:2")
    finally:
        proc.kill()
        proc.wait(60)
    StartLock(coord, "b:2").release()


def test_second_start_is_refused_and_leaves_the_first_ones_files(coord, capsys):
    live = coord.root / "superlink.json"
    live.write_text('{"pid": 1}')
    held = StartLock(coord, "127.0.0.1:8000")
    try:
        code = main(["start", "--dir", str(coord.root), "--address", "127.0.0.1:8001"])
    finally:
        held.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "already running, pid" in err[0]
    assert live.read_text() == '{"pid": 1}'


def test_add_site_during_a_run_extends_the_runs_chain(coord, tmp_path):
    key = keys.load_private_key(coord.key)
    with AuditLog(coord.audit, key, "coordinator", shared=True) as run_log:  # the ServerApp's
        run_log.append("run.started", "run 1", "ok")
        assert (
            main(
                [
                    "add-site",
                    "--dir",
                    str(coord.root),
                    "--name",
                    "a",
                    "--key",
                    str(site_key(tmp_path, "a")),
                ]
            )
            == 0
        )
        run_log.append("round.started", "run 1", "ok")
    assert "a" in load_sites(coord)
    report = verify_log(coord.audit, key.public_key())
    assert report.ok and report.entries == 4  # initialised, started, registered, round


def test_add_site_whose_audit_entry_fails_leaves_the_registry_as_it_was(
    coord, tmp_path, capsys, monkeypatch
):
    before = coord.sites.read_bytes()
    monkeypatch.setattr("common.audit.AuditLog._flock", _busy)
    code = main(
        ["add-site", "--dir", str(coord.root), "--name", "a", "--key", str(site_key(tmp_path, "a"))]
    )
    assert code == 3 and "already open" in capsys.readouterr().err
    assert coord.sites.read_bytes() == before
    assert not coord.site_key("a").exists()


def _busy(self, lock_file):
    from common.audit import AuditError

    raise AuditError(f"audit log {self.path} is already open for writing")


def test_remove_site_whose_audit_entry_fails_keeps_the_site(coord, tmp_path, monkeypatch):
    assert (
        main(
            [
                "add-site",
                "--dir",
                str(coord.root),
                "--name",
                "a",
                "--key",
                str(site_key(tmp_path, "a")),
            ]
        )
        == 0
    )
    monkeypatch.setattr("common.audit.AuditLog.append", _fail_append)
    assert main(["remove-site", "--dir", str(coord.root), "--name", "a"]) == 3
    assert "a" in load_sites(coord) and coord.site_key("a").is_file()


def _fail_append(self, *args, **kwargs):
    from common.audit import AuditError

    raise AuditError("disk full")


def test_run_into_an_existing_run_folder_says_resume_before_submitting(coord, tmp_path, capsys):
    run_dir = tmp_path / "r1"
    set_state(run_dir, "finished", run_id="7", config={})
    code = main(["run", "--dir", str(coord.root), "--out", str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"--resume {run_dir}" in err[0]
    assert "run.submitted" not in coord.audit.read_text()  # nothing submitted


def test_dp_with_batch_norm_is_one_line_before_submitting(coord, tmp_path, capsys):
    code = main(
        [
            "run",
            "--dir",
            str(coord.root),
            "--out",
            str(tmp_path / "r"),
            "--run-config",
            "dp.enabled=true",
            "dp.epsilon-per-round=8",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and 'norm="group"' in err[0] and "Opacus" in err[0]
    assert "run.submitted" not in coord.audit.read_text()


def test_run_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for key in RunConfig().to_run_config():
        if key not in ("run-dir", "coord-dir", "resume", "sim-sites-dir"):
            assert f"  {key} = " in out, key
    assert '  norm = "batch"' in out and "  dp.enabled = false" in out


def test_states_keep_run_json_and_status_json_current(tmp_path):
    run_dir = tmp_path / "r"
    set_state(run_dir, "submitted", run_id="5", config={"num-server-rounds": 3})
    set_state(run_dir, "failed", run_id="5", error="boom")
    set_state(run_dir, "running", run_id="5", resumed_from=1)  # a resume
    assert read_record(run_dir)["status"] == "running"
    assert read_record(run_dir)["config"] == {"num-server-rounds": 3}
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "running" and "error" not in status


def test_status_without_a_superlink_says_so_and_shows_the_registry(coord, tmp_path, capsys):
    assert (
        main(
            [
                "add-site",
                "--dir",
                str(coord.root),
                "--name",
                "st-mary",
                "--key",
                str(site_key(tmp_path, "m")),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["status", "--dir", str(coord.root)]) == 0
    out = capsys.readouterr().out
    assert "SuperLink: not running" in out and "idc-server start" in out
    fingerprint = load_sites(coord)["st-mary"]["fingerprint"][:16]
    assert "st-mary" in out and fingerprint in out
    assert "run: none submitted yet" in out


def test_status_of_a_run_whose_superlink_is_gone_says_how_to_continue(coord, tmp_path, capsys):
    from server.runrecord import note_latest

    run_dir = tmp_path / "r1"
    set_state(run_dir, "running", run_id="12", config={"num-server-rounds": 5})
    note_latest(coord, run_dir, 12)
    assert main(["status", "--dir", str(coord.root)]) == 0
    out = capsys.readouterr().out
    assert f"run 12: running, 0 of 5 round(s) completed, in {run_dir}" in out
    assert f"--resume {run_dir}" in out
