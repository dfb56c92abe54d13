"""DP-SGD end to end with real processes: ledgers, the sites' own caps, the server's records."""

from __future__ import annotations

import json

import pytest

from common.accounting import epsilon
from common.ledger import PrivacyLedger, history
from common.paths import SitePaths
from simulation.synth import SynthSpec
from tests.integration.federation import synth_sites

pytestmark = pytest.mark.slow
DP = [
    "min-sites=2",
    "local-epochs=1",
    "learning-rate=0.001",
    "batch-size=32",
    'norm="group"',
    "round-timeout=180",
    "dp.enabled=true",
    "dp.noise-multiplier=1.0",
    "dp.max-grad-norm=1.0",
    "dp.delta=1e-4",
]
PLAIN = [*DP[1:6], "min-sites=1", "dp.enabled=false"]


def test_two_dp_rounds_match_the_site_ledgers_and_a_capped_site_refuses(fed, tmp_path):
    folders = synth_sites(tmp_path, SynthSpec(patients=6, sites=3, patches_per_patient=(40, 50)))
    caps = {
        "hosp0": ["--max-evaluations", "1"],  # answers one evaluation of a global model a run
        "hosp1": ["--max-epsilon", "50", "--delta", "1e-4"],
        "hosp2": ["--max-epsilon", "0.01", "--delta", "1e-4"],  # less than one round
    }
    fed.start_all({f"hosp{i}": folders[i] for i in range(3)}, caps)
    res = fed.run("--out", str(fed.root / "run"), "--rounds", "2", "--run-config", *DP)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(x) for x in (fed.root / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for name in ("hosp0", "hosp1"):
        entries = PrivacyLedger(SitePaths(fed.root / name).ledger).entries()
        assert [(e.round, e.status) for e in entries] == [(1, "spent"), (2, "spent")]
        eps = [r["sites"][name]["epsilon-total"] for r in rows]
        assert eps[0] < eps[1]  # accumulates across rounds
        assert eps[1] == pytest.approx(epsilon(history(entries), 1e-4), rel=1e-9)
        assert "train-loss" not in rows[0]["sites"][name]  # DP replies: no training metrics
        assert rows[0]["sites"][name]["epsilon-round"] == pytest.approx(eps[0], rel=1e-9)
    # hosp2's cap wins over the coordinator: refused, no weights, recorded on both sides
    for row in rows:
        assert "hosp2" not in row["sites"]
        refused = [r for r in row["rejected"] if r["site"] == "hosp2"]
        assert refused and refused[0]["kind"] == "refused" and "cap" in refused[0]["reason"]
    ledger2 = PrivacyLedger(SitePaths(fed.root / "hosp2").ledger)
    assert ledger2.entries() == [] and len(ledger2.refusals()) == 2
    site_log = (fed.root / "hosp2" / "audit" / "site-audit.jsonl").read_text()
    assert '"privacy.refused"' in site_log and '"update.sent"' not in site_log
    coord_log = (fed.coord / "audit" / "coordinator-audit.jsonl").read_text()
    assert coord_log.count('"site.refused"') == 2
    # hosp0's cap on evaluations holds too: it takes round 1's (2 patients a site leave no test
    # patient, so every site's answer is an error) and refuses round 2's by its cap, by name
    cap = "site hosp0 answers at most 1 evaluations a run (its --max-evaluations)"
    reasons = [{f["site"]: f["reason"] for f in row["failures"]} for row in rows]
    assert "zero examples" in reasons[0]["hosp0"] and cap in reasons[1]["hosp0"]
    assert all("zero examples" in reasons[1][name] for name in ("hosp1", "hosp2"))
    site_log0 = (fed.root / "hosp0" / "audit" / "site-audit.jsonl").read_text()
    assert site_log0.count('"action":"evaluate"') == 2  # both asked, on record
    out = fed.cli("idc-client", "privacy", "--dir", str(fed.root / "hosp0")).stdout
    assert "one 50x50 patch" in out and "refused: run" not in out  # hosp0 refused nothing

    # The coordinator switches DP off: the capped sites refuse by name, no weights leave.
    res = fed.run("--out", str(fed.root / "plain"), "--rounds", "1", "--run-config", *PLAIN)
    assert res.returncode == 0, res.stdout + res.stderr
    row = json.loads((fed.root / "plain" / "rounds.jsonl").read_text().splitlines()[0])
    assert list(row["sites"]) == ["hosp0"]  # the site without a cap trained
    refused = {r["site"]: r for r in row["rejected"] if r["kind"] == "refused"}
    assert sorted(refused) == ["hosp1", "hosp2"]
    assert all("dp.enabled=false" in r["reason"] for r in refused.values())
    site_log = (fed.root / "hosp1" / "audit" / "site-audit.jsonl").read_text()
    assert site_log.count('"update.sent"') == 2  # the two DP rounds only
    coord_log = (fed.coord / "audit" / "coordinator-audit.jsonl").read_text()
    assert coord_log.count('"site.refused"') == 4
