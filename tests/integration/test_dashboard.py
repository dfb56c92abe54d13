"""The dashboard in a real headless browser (Debian's chromium) while a real federation runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from common.provenance import load_model
from common.rundir import RunDir
from tests.integration.federation import wait_for

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RUN = ["local-epochs=1", "batch-size=32", 'norm="group"', "round-timeout=300", "min-sites=2"]


@pytest.fixture
def chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        why = "chromium is not installed (`make browser` installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must run the browser test")
        pytest.skip(why)
    return CHROMIUM


def rendered(browser: str, url: str, profile: Path) -> str:
    """The page's DOM after its script ran: what a person sees, as chromium built it."""
    res = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=3000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return res.stdout


def by_id(dom: str, element_id: str) -> str:
    """The text inside the element with ``element_id`` (tags stripped)."""
    found = re.search(rf'id="{element_id}"[^>]*>(.*?)</(?:div|tbody)>', dom, re.S)
    return re.sub(r"<[^>]+>", " ", found.group(1)) if found else ""


def test_the_page_shows_sites_round_and_audit_while_a_run_goes_on(two_sites, tmp_path, chromium):
    fed = two_sites
    dash = fed.spawn("dashboard", "idc-server", "dashboard", "--dir", str(fed.coord), "--port", "0")
    url = wait_for(
        lambda: re.search(r"http://127\.0\.0\.1:\d+/", fed.output("dashboard")),
        60,
        "the dashboard's address",
        [dash],
    ).group(0)
    assert "ssh -N -L" in fed.output("dashboard")
    run_dir = tmp_path / "r1"
    run = fed.spawn_run(
        "--out", str(run_dir), "--rounds", "2", "--run-config", *RUN, name="dash-run"
    )
    profile = tmp_path / "chromium"

    def page_during_run() -> str | None:
        dom = rendered(chromium, url, profile)
        return dom if "running" in by_id(dom, "run") and by_id(dom, "round") else None

    dom = wait_for(page_during_run, 600, "the page to show the running run", [run, dash], 1)
    for i in range(2):
        assert f'<td>hosp{i}</td><td class="online">online</td>' in dom
    assert re.search(r"round [12] (in progress|committed): \d of 2 update", by_id(dom, "round"))
    assert "verified:" in by_id(dom, "audit") and 'id="audit" class="ok"' in dom
    assert run.wait(600) == 0, fed.output("dash-run")

    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    dom = rendered(chromium, url, profile)
    assert f"run {run_id}: finished, round 2 of 2 completed" in by_id(dom, "run")
    assert "hosp0" in by_id(dom, "privacy") and "no DP" in by_id(dom, "privacy")
    record = load_model(RunDir(run_dir).final_model)[1] or {}
    assert 0 < record["threshold"] < 1 and "round 2" in record["threshold_source"]
    assert dash.poll() is None  # it served the whole run
