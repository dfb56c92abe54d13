"""Audit verification with pinned keys, as the parties run it: one tamper per test.

A coordinator and a site enrol as they do for real (``idc-server init``, ``idc-client init
--coordinator-key``, ``idc-server add-site``); then someone rewrites a log and puts a matching
key beside it. The party that verifies uses the key it pinned and sees the forgery.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from client import cli as client_cli
from common import keys
from common.audit import AuditLog
from server import cli as server_cli
from tests.unit.test_audit import resign


class Enrolled:
    """A coordinator with one registered site, each with a few audit entries."""

    def __init__(self, root: Path) -> None:
        self.coord, self.site = root / "coord", root / "hosp1"
        assert server_cli.main(["init", "--dir", str(self.coord)]) == 0
        pub = self.coord / "coordinator.pub"
        args = ["init", "--dir", str(self.site), "--name", "hosp1", "--coordinator-key", str(pub)]
        assert client_cli.main(args) == 0
        register = ["add-site", "--dir", str(self.coord), "--name", "hosp1"]
        assert server_cli.main([*register, "--key", str(self.site / "site.pub")]) == 0
        self.coord_log = self.coord / "audit" / "coordinator-audit.jsonl"
        self.site_log = self.site / "audit" / "site-audit.jsonl"
        details = {"run_id": "1", "round": 1, "digest": "d1"}
        with AuditLog(self.site_log, keys.load_private_key(self.site / "site.key"), "hosp1") as a:
            a.append("update.sent", "1", "ok", details)
        with AuditLog(
            self.coord_log, keys.load_private_key(self.coord / "coordinator.key"), "coordinator"
        ) as a:
            a.append("update.received", "hosp1", "accepted", {**details, "accepted": True})

    def fingerprint(self, pub: Path) -> str:
        return keys.public_key_fingerprint(keys.load_public_key(pub))


def forge(log: Path, pub_beside: Path) -> None:
    """Rewrite ``log`` (one entry's outcome changed) under a new key; put its .pub beside."""
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    entries[-1]["outcome"] = "forged"
    other = ec.generate_private_key(ec.SECP256R1())
    log.write_bytes(resign(entries, other))
    pub_beside.write_bytes(keys.openssh_bytes(other.public_key()) + b"\n")


def run(main, args: list[str], capsys) -> tuple[int, str]:  # noqa: ANN001
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def fed(tmp_path):
    return Enrolled(tmp_path)


def test_every_log_verifies_with_its_pinned_key_and_the_result_names_it(fed, capsys):
    code, out = run(
        server_cli.main, ["audit", "verify", str(fed.coord_log), "--dir", str(fed.coord)], capsys
    )
    assert code == 0 and "OK: " in out
    assert fed.fingerprint(fed.coord / "coordinator.pub") in out
    args = ["audit", "verify", str(fed.site_log), "--dir", str(fed.coord), "--site", "hosp1"]
    code, out = run(server_cli.main, args, capsys)
    assert code == 0 and fed.fingerprint(fed.site / "site.pub") in out and "registered" in out
    args = ["audit", "verify", str(fed.coord_log), "--dir", str(fed.site), "--coordinator"]
    code, out = run(client_cli.main, args, capsys)
    assert code == 0 and fed.fingerprint(fed.coord / "coordinator.pub") in out and "pinned" in out


def test_a_rewritten_coordinator_log_with_its_pub_replaced_fails_at_the_site(fed, capsys):
    pinned = fed.fingerprint(fed.coord / "coordinator.pub")
    forge(fed.coord_log, fed.coord / "coordinator.pub")
    args = ["audit", "verify", str(fed.coord_log), "--dir", str(fed.site), "--coordinator"]
    code, out = run(client_cli.main, args, capsys)
    assert code == 1 and "FAILED at entry 1" in out and "signature" in out and pinned in out


def test_a_rewritten_site_log_with_its_pub_replaced_fails_at_the_coordinator(fed, capsys):
    forge(fed.site_log, fed.site / "site.pub")
    args = ["audit", "verify", str(fed.site_log), "--dir", str(fed.coord), "--site", "hosp1"]
    code, out = run(server_cli.main, args, capsys)
    assert code == 1 and "FAILED at entry 1" in out


def test_cross_check_uses_the_registered_site_key_not_the_one_beside_the_log(fed, capsys):
    forge(fed.site_log, fed.site / "site.pub")
    args = ["audit", "cross-check", str(fed.coord_log), str(fed.site_log)]
    code, out = run(server_cli.main, [*args, "--dir", str(fed.coord), "--site", "hosp1"], capsys)
    assert code == 1 and "site log does not verify" in out


def test_the_site_cross_checks_with_the_pinned_coordinator_key(fed, capsys):
    args = ["audit", "cross-check", str(fed.coord_log), str(fed.site_log), "--dir", str(fed.site)]
    code, out = run(client_cli.main, args, capsys)
    assert code == 0 and "OK: 1 update(s) match" in out
    forge(fed.coord_log, fed.coord / "coordinator.pub")
    code, out = run(client_cli.main, args, capsys)
    assert code == 1 and "coordinator log does not verify" in out


def test_an_emptied_log_is_a_failure(fed, capsys):
    fed.site_log.write_bytes(b"")
    args = ["audit", "verify", str(fed.site_log), "--dir", str(fed.site)]
    code, out = run(client_cli.main, args, capsys)
    assert code == 1 and "no entries" in out


def test_expect_head_detects_lines_cut_off_the_end(fed, capsys):
    args = ["audit", "verify", str(fed.coord_log), "--dir", str(fed.coord)]
    code, out = run(server_cli.main, args, capsys)
    head = re.search(r"head (\d+:[0-9a-f]{64})", out).group(1)
    assert run(server_cli.main, [*args, "--expect-head", head], capsys)[0] == 0
    text = fed.coord_log.read_text().splitlines(keepends=True)
    fed.coord_log.write_text("".join(text[:-1]))  # a whole line cut: the chain alone is fine
    assert run(server_cli.main, args, capsys)[0] == 0
    code, out = run(server_cli.main, [*args, "--expect-head", head], capsys)
    assert code == 1 and "cut off the end" in out


@pytest.mark.parametrize("head", ["3", "x:abc", "1:" + "g" * 64])
def test_a_malformed_expected_head_is_one_clear_error(fed, capsys, head):
    args = ["audit", "verify", str(fed.coord_log), "--dir", str(fed.coord), "--expect-head", head]
    code, out = run(server_cli.main, args, capsys)
    assert code == 2 and "--expect-head must be SEQ:HASH" in out and "Traceback" not in out


def test_a_site_without_a_pinned_coordinator_key_is_told_how_to_pin_it(tmp_path, capsys):
    site = tmp_path / "site"
    assert client_cli.main(["init", "--dir", str(site), "--name", "h"]) == 0
    log = tmp_path / "coordinator-audit.jsonl"
    code, out = run(
        client_cli.main, ["audit", "verify", str(log), "--dir", str(site), "--coordinator"], capsys
    )
    assert code == 2 and "idc-client trust" in out


def test_a_different_coordinator_key_replaces_the_pinned_one_only_on_purpose(fed, tmp_path, capsys):
    other = tmp_path / "other.pub"
    keys.generate_key_pair(tmp_path / "other.key", other)
    args = ["trust", "--dir", str(fed.site), "--coordinator-key", str(other)]
    code, out = run(client_cli.main, args, capsys)
    assert code == 2 and "--replace" in out
    assert run(client_cli.main, [*args, "--replace"], capsys)[0] == 0
    site = json.loads((fed.site / "site.json").read_text())
    assert site["coordinator-fingerprint"] == fed.fingerprint(other)


def test_an_unknown_site_name_is_one_clear_error(fed, capsys):
    args = ["audit", "verify", str(fed.site_log), "--dir", str(fed.coord), "--site", "nobody"]
    code, out = run(server_cli.main, args, capsys)
    assert code == 2 and "'nobody' is not registered" in out
