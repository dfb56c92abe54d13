"""The dashboard's routes on a real coordinator folder: read-only, loopback hosts, honest data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from common.audit import AuditLog
from common.keys import generate_key_pair, load_private_key
from common.paths import CoordPaths
from common.protocol import RoundRow
from common.rundir import RunDir
from server.cli import main as server_main
from server.dashboard import bind, make_app
from server.dashboard_view import curves_svg, privacy_rows, round_progress
from server.runrecord import note_latest, set_state

RUN_ID = 2430552125801590235  # 64-bit, as Flower makes them


def _site_row(r: int, eps: float, cap: float) -> dict[str, float]:
    return {
        "num-examples": 20.0,
        "dp": 1.0,
        "epsilon-total": eps,
        "epsilon-cap": cap,
        "train-loss": 0.7 - 0.1 * r,
    }


@pytest.fixture
def coord(tmp_path: Path) -> Path:
    """A coordinator with two sites and a run two rounds in, its audit entries included."""
    root = tmp_path / "coord"
    assert server_main(["init", "--dir", str(root)]) == 0
    for name in ("st-mary", "st-john"):
        generate_key_pair(tmp_path / f"{name}.key", tmp_path / f"{name}.pub")
        args = [
            "add-site",
            "--dir",
            str(root),
            "--name",
            name,
            "--key",
            str(tmp_path / f"{name}.pub"),
        ]
        assert server_main(args) == 0
    run_dir = RunDir(tmp_path / "r1").create()
    for r in (1, 2):
        row = RoundRow(r, evaluate={"balanced-accuracy": 0.6 + 0.1 * r})
        row.sites = {"st-mary": _site_row(r, 1.0 * r, 8.0), "st-john": _site_row(r, 0.5 * r, -1)}
        row.evaluations = {n: {"balanced-accuracy": 0.55 + 0.1 * r} for n in row.sites}
        run_dir.commit_round(r, row.to_row(), {"w": np.zeros(2, np.float32)}, {})
    set_state(run_dir.root, "running", run_id=RUN_ID, config={"num-server-rounds": 3})
    paths = CoordPaths(root)
    note_latest(paths, run_dir.root, RUN_ID)
    with AuditLog(paths.audit, load_private_key(paths.key), "coordinator", shared=True) as log:
        details = {"run_id": RUN_ID, "round": 3, "sites_selected": ["st-john", "st-mary"]}
        log.append("round.started", "round 3", "ok", details)
        details = {"run_id": RUN_ID, "round": 3, "accepted": True}
        log.append("update.received", "st-mary", "accepted", details)
    return root


def test_the_state_names_sites_run_round_privacy_and_audit(coord: Path) -> None:
    client = TestClient(make_app(coord), base_url="http://127.0.0.1")
    state = client.get("/api/state").json()
    assert [s["site"] for s in state["sites"]] == ["st-john", "st-mary"]
    assert state["sites"][0]["status"] == "unknown"  # no SuperLink: said so, not guessed
    assert "not running" in state["superlink"]
    run = state["run"]
    assert (run["id"], run["status"], run["completed"], run["rounds"]) == (
        str(RUN_ID),
        "running",
        2,
        3,
    )  # a string: JavaScript numbers would round a 64-bit id
    assert run["progress"] == {
        "round": 3,
        "selected": ["st-john", "st-mary"],
        "received": ["st-mary"],
        "rejected": [],
        "committed": False,
    }
    mary = next(p for p in state["privacy"] if p["site"] == "st-mary")
    assert (mary["epsilon"], mary["cap"], mary["left"]) == (2.0, 8.0, 6.0)
    john = next(p for p in state["privacy"] if p["site"] == "st-john")
    assert john["cap"] is None and john["left"] is None
    assert state["audit"]["ok"] and state["audit"]["entries"] >= 5


def test_a_tampered_audit_log_shows_as_failed(coord: Path) -> None:
    client = TestClient(make_app(coord), base_url="http://127.0.0.1")
    assert client.get("/api/state").json()["audit"]["ok"]
    log = CoordPaths(coord).audit
    lines = log.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace("st-mary", "st-evil")
    log.write_text("".join(lines))
    audit = client.get("/api/state").json()["audit"]
    assert not audit["ok"] and audit["entries"] == 1  # the entry before the edit verifies


def test_the_page_and_the_figure(coord: Path) -> None:
    client = TestClient(make_app(coord), base_url="http://127.0.0.1")
    page = client.get("/")
    assert page.status_code == 200 and "/api/state" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched elsewhere
    svg = client.get("/curves.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml")
    for text in ("evaluation: balanced accuracy", "training: loss", "st-mary", "round"):
        assert text in svg.text


@pytest.mark.parametrize("damaged", ["rounds.jsonl", "state.json"])
def test_a_damaged_run_file_is_named_on_the_page_not_a_server_traceback(
    coord: Path, damaged: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Once: the exception left the route, and uvicorn printed its traceback on the console.
    path = coord.parent / "r1" / damaged
    path.write_text(path.read_text()[:-9] + "\n")  # a write cut short
    client = TestClient(make_app(coord), base_url="http://127.0.0.1")  # raises what escapes
    for route in ("/api/state", "/curves.svg") if damaged == "rounds.jsonl" else ("/api/state",):
        res = client.get(route)
        assert res.status_code == 503, route
        assert str(path) in res.json()["error"] and "backup" in res.json()["error"]
    (record,) = {r.getMessage() for r in caplog.records if r.name == "server.dashboard"}
    assert str(path) in record and record.count("\n") == 0


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_every_other_method_is_405(coord: Path, method: str) -> None:
    client = TestClient(make_app(coord), base_url="http://127.0.0.1")
    for path in ("/", "/api/state", "/curves.svg", "/elsewhere"):
        res = client.request(method, path)
        assert res.status_code == 405 and res.headers["allow"] == "GET"


def test_only_loopback_host_names_are_served(coord: Path) -> None:
    # A page on attacker.example rebound to 127.0.0.1 still sends its own Host header.
    client = TestClient(make_app(coord), base_url="http://attacker.example")
    assert client.get("/api/state").status_code == 400
    assert TestClient(make_app(coord), base_url="http://localhost:8765").get("/").status_code == 200


def test_it_listens_on_loopback_only() -> None:
    sock = bind(0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def test_no_rows_and_no_audit_entries_for_the_run() -> None:
    assert privacy_rows([]) == []
    row = RoundRow(1, sites={"a": {"num-examples": 3.0, "dp": 0.0, "epsilon-total": 0.0}})
    assert privacy_rows([row.to_row()]) == [
        {"site": "a", "epsilon": None, "cap": None, "left": None}
    ]


def test_round_progress_of_another_run_is_not_shown(coord: Path) -> None:
    assert round_progress(CoordPaths(coord), 1) is None
    assert json.loads(json.dumps(round_progress(CoordPaths(coord), RUN_ID)))["round"] == 3


def test_dp_rounds_without_training_loss_say_so_in_the_figure() -> None:
    row = RoundRow(1, sites={"a": {"num-examples": 3.0, "dp": 1.0}}, evaluate={})
    svg = curves_svg([row.to_row()], "run 1")
    assert "not reported (DP rounds send none)" in svg and "chance (0.5)" in svg
