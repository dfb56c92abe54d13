"""`idc-client approve` and the executor's gate: installed app, approved hashes, nothing else."""

from __future__ import annotations

import json

import pytest

from client.approvals import load_approved
from client.cli import main
from client.executor import Gate
from common.audit_verify import verify_log
from common.keys import load_public_key
from common.paths import SitePaths
from flowerctl.fab import InstalledApp, fab_hash
from tests.unit.test_fab import build, make_app


@pytest.fixture
def site(tmp_path):
    site_dir = tmp_path / "site"
    assert main(["init", "--dir", str(site_dir), "--name", "st-mary"]) == 0
    return site_dir


@pytest.fixture
def gate(tmp_path, site):
    return Gate(InstalledApp.snapshot(make_app(tmp_path / "installed")), site)


def test_installed_app_is_accepted_anything_else_refused(tmp_path, gate):
    ours = build(make_app(tmp_path / "ours"))
    assert gate.check(ours) == (fab_hash(ours), "installed", None)
    other = build(make_app(tmp_path / "other", version="9.9.9"))
    digest, how, reason = gate.check(other)
    assert digest == fab_hash(other) and how == ""
    assert "not the installed tinyapp 1.0.0" in reason and "idc-client approve" in reason


def test_the_installed_verdict_is_reached_once_per_bundle(tmp_path, gate, monkeypatch):
    # Each message of a run carries the same bundle: compared file by file once, then by hash.
    ours = build(make_app(tmp_path / "ours"))
    compared = []
    real = gate.installed.mismatch
    monkeypatch.setattr(
        type(gate.installed), "mismatch", lambda self, c: compared.append(c) or real(c)
    )
    for _ in range(3):
        assert gate.check(ours) == (fab_hash(ours), "installed", None)
    other = build(make_app(tmp_path / "other", version="9.9.9"))
    for _ in range(2):
        assert gate.check(other)[2] is not None  # a refusal is never remembered as accepted
    assert compared == [ours, other, other]


def test_an_approved_hash_is_accepted_and_the_approval_audited(tmp_path, site, gate, capsys):
    other = build(make_app(tmp_path / "other", version="9.9.9"))
    digest = fab_hash(other)
    assert main(["approve", "--dir", str(site), digest.upper(), "--note", "v9 pilot"]) == 0
    assert "approved" in capsys.readouterr().out
    assert gate.check(other) == (digest, "approved", None)
    assert load_approved(site)[digest]["note"] == "v9 pilot"
    log = site / "audit" / "site-audit.jsonl"
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["action"] == "app.approved" and entry["details"]["app_hash"] == digest
    assert verify_log(log, load_public_key(site / "site.pub")).ok


def test_approve_refuses_a_non_hash_in_one_line(site, capsys):
    assert main(["approve", "--dir", str(site), "abc123"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("idc-client approve: error: HASH 'abc123' is not an app hash")
    assert "\n" not in err and not (SitePaths(site).approvals).exists()


def test_approve_needs_a_site_folder(tmp_path, capsys):
    assert main(["approve", "--dir", str(tmp_path / "nowhere"), "a" * 64]) == 2
    assert "is not a site folder" in capsys.readouterr().err


def test_a_damaged_approvals_file_approves_nothing(tmp_path, site, gate, capsys):
    other = build(make_app(tmp_path / "other", version="9.9.9"))
    assert main(["approve", "--dir", str(site), fab_hash(other)]) == 0
    (SitePaths(site).approvals).write_text("{not json")
    _, how, reason = gate.check(other)
    assert how == "" and f"{SitePaths(site).approvals} is damaged" in reason
    assert main(["approve", "--dir", str(site), "b" * 64]) == 2  # never silently overwritten
    assert "is damaged" in capsys.readouterr().err
