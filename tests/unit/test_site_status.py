"""`idc-client status` and `privacy` read a real site folder: audit log, ledger, start settings."""

from __future__ import annotations

from client import cli
from client.sitestate import StartSettings
from client.status import last_rounds
from common import keys
from common.audit import AuditLog
from common.ledger import LedgerEntry, PrivacyLedger
from common.paths import SitePaths


def _site(tmp_path):
    site = tmp_path / "site"
    assert cli.main(["init", "--dir", str(site), "--name", "st-mary"]) == 0
    return site, SitePaths(site)


def _round(audit, run, rnd, *extra):
    audit.append("message.received", run, "ok", {"round": rnd, "action": "train"})
    audit.append("data.read", run, "ok", {"round": rnd, "train_patches": 40})
    for action, details in extra:
        audit.append(action, run, "ok", {"round": rnd, **details})


def test_status_shows_rounds_cap_left_and_not_running(tmp_path, capsys):
    site, paths = _site(tmp_path)
    with AuditLog(paths.audit, keys.load_private_key(paths.key), "st-mary") as audit:
        for rnd in (1, 2, 3):
            _round(audit, "12345678901234567890", rnd, ("update.sent", {"digest": "d"}))
        _round(audit, "12345678901234567890", 4, ("privacy.refused", {"reason": "cap spent"}))
    rounds = last_rounds(paths.audit, 2)
    assert [(r.run, r.round) for r in rounds] == [("12345678901234567890", 3)] + [
        ("12345678901234567890", 4)
    ]
    assert rounds[1].facts == ["trained on 40 patches", "refused: cap spent"]
    PrivacyLedger(paths.ledger).record(LedgerEntry("12345678901234567890", 1, 1.0, 0.1, 10, 1e-3))
    StartSettings("c:1", 8.0, 1e-3, "2026-11-30T06:00:00+00:00", 1, 40).write(site)
    paths.evaluations.write_text('{"7": 2, "12345678901234567890": 3}')
    capsys.readouterr()
    assert cli.main(["status", "--dir", str(site), "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "start: not running (last started 2026-11-30T06:00:00+00:00 for c:1)" in out
    assert "audit log: 12 entries, chain and signatures verified" in out
    assert "run 12345678901234567890 round 4: trained on 40 patches; refused: cap spent" in out
    assert "privacy cap: epsilon 8 at delta 0.001 (set by the latest start);" in out
    assert (
        "evaluation cap: 40 a run (set by the latest start); "
        "latest run 12345678901234567890: 3 answered"
    ) in out
    paths.evaluations.write_text("{")  # damaged: the site refuses every evaluation
    assert cli.main(["status", "--dir", str(site)]) == 0
    assert "evaluations.json is not valid JSON" in capsys.readouterr().out
    paths.evaluations.write_text('{"7": "many"}')  # JSON, but the site refuses it as well
    assert cli.main(["status", "--dir", str(site)]) == 0
    out = capsys.readouterr().out
    assert "evaluations.json is not a record of evaluations" in out and "refused" in out
    assert cli.main(["privacy", "--dir", str(site)]) == 0
    out = capsys.readouterr().out
    assert "\n12345678901234567890 " in out and " left" in out


def test_status_of_a_tampered_audit_log_says_so_and_exits_1(tmp_path, capsys):
    site, paths = _site(tmp_path)
    with AuditLog(paths.audit, keys.load_private_key(paths.key), "st-mary") as audit:
        _round(audit, "9", 1)
    paths.audit.write_text(
        paths.audit.read_text().replace('"train_patches":40', '"train_patches":41')
    )
    assert cli.main(["status", "--dir", str(site)]) == 1
    out = capsys.readouterr().out
    assert "start: never started" in out and "privacy cap: unknown" in out
    assert "evaluation cap: unknown" in out
    assert "audit log: 1 entries, BAD" in out
