"""The CLI error contract: every bad input is one line naming it, the table's exit code, no trace.

Each case was first reproduced against the old code, where it printed a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client import cli as client_cli
from common.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_REFUSED
from common.model import build_model
from common.paths import SitePaths
from common.provenance import save_model
from common.site_data import model_arrays
from server import cli as server_cli
from simulation import cli as sim_cli
from tests.conftest import write_patch


def one_error_line(capsys: pytest.CaptureFixture[str], *names: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def site(tmp_path):
    site_dir = tmp_path / "site"
    assert client_cli.main(["init", "--dir", str(site_dir), "--name", "st-mary"]) == 0
    return site_dir


def test_privacy_on_a_corrupt_ledger_says_restore_from_backup(site, capsys):
    ledger = SitePaths(site).ledger
    ledger.write_text("{not json")
    capsys.readouterr()
    assert client_cli.main(["privacy", "--dir", str(site)]) == EXIT_REFUSED
    assert "backup" in one_error_line(capsys, str(ledger))


def test_init_twice_names_the_folder_and_keeps_the_key(site, capsys):
    key = SitePaths(site).key.read_bytes()
    capsys.readouterr()
    assert client_cli.main(["init", "--dir", str(site), "--name", "other"]) == EXIT_BAD_INPUT
    assert "already a site folder" in one_error_line(capsys, str(site))
    assert SitePaths(site).key.read_bytes() == key


@pytest.mark.parametrize("main", [client_cli.main, server_cli.main])
@pytest.mark.parametrize("cwd", ["tmp", "/"])
def test_audit_verify_on_a_bare_file_name_asks_for_the_pinned_keys_folder(
    main, cwd, tmp_path, monkeypatch, capsys
):
    # "/" once reproduced an IndexError (the key was looked for beside the log); keys are
    # pinned now, so the folder that pins them is required and named
    monkeypatch.chdir(tmp_path if cwd == "tmp" else "/")
    with pytest.raises(SystemExit) as exc:
        main(["audit", "verify", "log.jsonl"])
    assert exc.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--dir" in err and "Traceback" not in err


def test_predict_refuses_weights_of_the_wrong_shape(tmp_path, capsys):
    arrays = model_arrays(build_model("group", seed=0))
    name = next(k for k, v in arrays.items() if v.ndim == 4)
    arrays[name] = np.zeros((1, 1, 1, 1), np.float32)  # a record consistent with wrong weights
    model = save_model(tmp_path / "model.idc", arrays, {"run_id": "x", "rounds": 0})
    write_patch(tmp_path / "data", "10", 0, 0, 1)
    argv = ["predict", "--model", str(model), "--data", str(tmp_path / "data")]
    assert client_cli.main([*argv, "--out", str(tmp_path / "out")]) == EXIT_REFUSED
    one_error_line(capsys, str(model), name)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("run_json", "says"),
    [
        ("{not json", "not valid JSON"),
        ('{"status": "running"}', "'config'"),
        ('{"config": {"bogus-key": 1}}', "bogus-key"),
        ('{"config": {"local-epochs": "two"}}', "local-epochs"),
    ],
)
def test_resume_of_a_malformed_run_names_run_json(run_json, says, tmp_path, capsys):
    coord = tmp_path / "coord"
    assert server_cli.main(["init", "--dir", str(coord)]) == 0
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(run_json)
    capsys.readouterr()
    code = server_cli.main(["run", "--dir", str(coord), "--resume", str(run_dir)])
    assert code == EXIT_BAD_INPUT
    one_error_line(capsys, str(run_dir / "run.json"), says)


def test_unknown_and_bad_overrides_are_named(tmp_path, capsys):
    coord = tmp_path / "coord"
    assert server_cli.main(["init", "--dir", str(coord)]) == 0
    capsys.readouterr()
    run = ["run", "--dir", str(coord), "--out", str(tmp_path / "run"), "--run-config"]
    assert server_cli.main([*run, "local-epoch=2"]) == EXIT_BAD_INPUT
    one_error_line(capsys, "'local-epoch'", "local-epochs")
    assert server_cli.main([*run, "min-sites=0"]) == EXIT_BAD_INPUT
    one_error_line(capsys, "'min-sites'", ">= 1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("local-epochs=3", "not a recipe key"),  # the simulation's own flag, not the recipe's
        ("modle=gap", "'modle'"),
        ("model=gapp", "'model'"),
        ("ema=2", "'ema'"),
        ("model", "key=value"),
    ],
)
def test_a_bad_recipe_is_one_line_before_any_work(tmp_path, capsys, entry, says):
    out = tmp_path / "out"
    argv = ["federated", "--data", str(tmp_path), "--sites", "2", "--rounds", "1"]
    assert sim_cli.main([*argv, "--out", str(out), "--recipe", entry]) == EXIT_BAD_INPUT
    one_error_line(capsys, "--recipe", says)
    assert not out.exists()


def test_a_bug_is_one_line_too_and_minus_v_shows_the_trace(monkeypatch, capsys):
    def broken(args: argparse.Namespace) -> int:
        raise KeyError("surprise")

    parser = sim_cli.build_parser()
    args = parser.parse_args(["budget", "--noise", "1", "--sample-rate", "0.1", "--steps", "1"])
    args.func = broken
    assert sim_cli.dispatch(args, "idc-sim") == 70
    assert "rerun with -v" in one_error_line(capsys, "KeyError", "surprise")
    args.verbose = True
    assert sim_cli.dispatch(args, "idc-sim") == 70
    assert "Traceback" in capsys.readouterr().err


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from leaves(child, (*path, name))


@pytest.mark.parametrize("tool", [client_cli, server_cli, sim_cli])
def test_every_subcommand_is_registered_with_its_function(tool):
    found = list(leaves(tool.build_parser()))
    assert len(found) >= 4
    for path, parser in found:
        assert callable(parser.get_default("func")), path
        assert parser.description, path  # add_command gives every subcommand its help


def test_the_exit_code_table_is_in_the_readme():
    from pathlib import Path

    from common import errors

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    for code in codes:
        assert f"| {code} |" in readme, code
    assert json.dumps(sorted(codes)) == "[0, 1, 2, 3, 4, 70, 130]"


@pytest.fixture
def nine_patients(tmp_path):
    from simulation.synth import SynthSpec, synthesize

    synthesize(tmp_path / "data", SynthSpec(patients=9, patches_per_patient=(4, 6), seed=3))
    (tmp_path / "data" / "synth.json").unlink()  # its facts: the scan would log them as ignored
    return tmp_path / "data"


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        # once: the cohort was decoded, then rows 3 and 4 failed with a logged traceback
        (["--quick", "--patients", "4", "--rows", "fedavg,dp"], ["--patients 4", "30"]),
        (["--quick", "--rows", "paper,dp"], ["9 patients", "15"]),  # the data has 9
        (["--quick", "--seeds", ""], ["--seeds", "''"]),  # once: the default seeds, silently
    ],
)
def test_reproduce_refuses_what_its_rows_cannot_run_on(
    nine_patients, flags, names, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = ["reproduce", "--data", str(nine_patients), "--out", str(out), *flags]
    assert sim_cli.main(argv) == EXIT_BAD_INPUT
    one_error_line(capsys, *names)
    assert not (out / "cohort").exists()  # nothing decoded


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_dashboard_on_a_port_out_of_range_names_it(port, tmp_path, capsys):
    coord = tmp_path / "coord"
    assert server_cli.main(["init", "--dir", str(coord)]) == 0
    capsys.readouterr()
    code = server_cli.main(["dashboard", "--dir", str(coord), "--port", port])
    assert code == EXIT_BAD_INPUT  # once: internal error (OverflowError), exit 70
    one_error_line(capsys, f"--port {port}", "--port 0")


@pytest.mark.parametrize(
    ("items", "key"),
    [
        # once: submitted, then every site's split refused the seed (numpy), or Flower's
        # central-DP wrapper refused its settings in the ServerApp; nan passed Flower's checks
        (["seed=-1"], "'seed'"),
        (['central-dp.mode="server-fixed"', "central-dp.noise=-1"], "'central-dp.noise'"),
        (['central-dp.mode="client-fixed"', "central-dp.noise=nan"], "'central-dp.noise'"),
        (['central-dp.mode="server-fixed"', "central-dp.clip=0"], "'central-dp.clip'"),
    ],
)
def test_settings_that_fail_only_after_submission_are_named_before_it(items, key, tmp_path, capsys):
    coord = tmp_path / "coord"
    assert server_cli.main(["init", "--dir", str(coord)]) == 0
    capsys.readouterr()
    argv = ["run", "--dir", str(coord), "--out", str(tmp_path / "run"), "--run-config", *items]
    assert server_cli.main(argv) == EXIT_BAD_INPUT
    one_error_line(capsys, key)
    assert not (tmp_path / "run").exists()


def test_reproduce_on_patches_of_one_class_says_so_before_any_row(tmp_path, capsys):
    data = tmp_path / "data"
    for patient in ("10", "11", "12"):
        for x in range(3):
            write_patch(data, patient, 50 * x, 0, 0)  # no IDC(+) patch anywhere
    out = tmp_path / "out"
    argv = ["reproduce", "--data", str(data), "--out", str(out), "--quick", "--rows", "paper"]
    assert sim_cli.main(argv) == EXIT_BAD_INPUT  # once: the row failed, its traceback logged
    one_error_line(capsys, str(data), "no IDC(+) patch")
    assert not (out / "cohort").exists()


SCRIPT = """
import subprocess, sys, time
from pathlib import Path
from common.cli_util import run_script

def main():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(sys.argv[1]).write_text(str(child.pid))
    try:
        time.sleep(600)
    finally:
        child.kill()
        child.wait()
        Path(sys.argv[2]).write_text("stopped")

raise SystemExit(run_script(main, "bench.py"))
"""


def test_a_killed_script_stops_what_it_started_on_the_way_out(tmp_path):
    """``kill PID`` on a benchmark (run_script) unwinds its ``finally``: no process is left.

    Before run_script, Python's default SIGTERM ended a benchmark at once and left the
    SuperLink and Ray processes it had started running.
    """
    pid_file, done = tmp_path / "child.pid", tmp_path / "done"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(pid_file), str(done)],
        cwd=root,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
        time.sleep(0.05)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.strip() == "bench.py: interrupted" and done.read_text() == "stopped"
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
