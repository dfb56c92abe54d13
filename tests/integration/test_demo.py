"""The README's main command, as a new user runs it: from a fresh folder, default --out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowerctl import FLWR_ENV

BIN = Path(sys.executable).parent


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_runs_from_a_fresh_folder_with_the_default_relative_out(tmp_path: Path) -> None:
    # The ServerApp runs in the SuperLink's folder: a relative --out once reached it as is
    # and the run failed ("... is not a coordinator folder"). Smallest demo that still runs
    # the centralized, FedAvg and FedAvg + DP code paths end to end.
    env = {**os.environ, **FLWR_ENV, "IDC_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run(
        [str(BIN / "idc-sim"), "demo", "--patients", "9", "--rounds", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = tmp_path / "runs" / "demo" / "results" / "report.md"
    assert report.is_file(), res.stdout[-2000:]
    assert "federated + DP" in res.stdout
    # each row also at the threshold chosen on validation patients (a number, or n/a)
    dp_row = next(ln for ln in res.stdout.splitlines() if ln.startswith("| federated + DP"))
    assert len(dp_row.strip("|").split("|")) == 6, dp_row
    assert "| balanced accuracy at the validation-chosen threshold |" in res.stdout
    assert f"report: {report}" in res.stdout
