import errno
import json
import math
import threading
from datetime import UTC, datetime

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from common import keys
from common.audit import AuditError, AuditLog, LogHead
from common.audit_format import GENESIS, canonical_json, entry_hash, signing_bytes
from common.audit_verify import (
    cross_check,
    format_cross_check,
    format_verify_report,
    verify_log,
)
from common.digests import digest_arrays, digest_bytes


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def key():
    return new_key()


def write_log(path, key, n, actor="site-a", **kwargs):
    with AuditLog(path, key, actor, **kwargs) as log:
        for i in range(n):
            log.append("train.round", f"run-1/{i}", "ok", {"round": i, "loss": 0.5 / (i + 1)})
    return path


def lines(path):
    return path.read_bytes().splitlines(keepends=True)


def resign(entries, key):
    """Rebuild a valid chain from entries with ``key``: what a key holder could write."""
    out, prev = [], GENESIS
    for entry in entries:
        entry = {k: v for k, v in entry.items() if k != "sig"} | {"prev": prev}
        entry["sig"] = keys.sign(key, signing_bytes(entry))
        prev = entry_hash(entry)
        out.append(canonical_json(entry) + b"\n")
    return b"".join(out)


def assert_bad(report, first_bad, path, *words):
    assert not report.ok
    assert report.first_bad == first_bad
    assert report.file == path
    text = format_verify_report(report)
    assert f"entry {first_bad}" in text and str(path) in text
    for word in words:
        assert word in report.reason


# -- writing and a clean log ---------------------------------------------------------------


def test_clean_log_verifies_and_entries_have_every_field(tmp_path, key):
    path = tmp_path / "audit" / "site.jsonl"
    with AuditLog(path, key, "site-a") as log:
        first = log.append("run.start", "run-1", "ok")
        second = log.append("update.sent", "run-1", "ok", {"run_id": "run-1", "round": 1})
        head = log.head
    assert first["seq"] == 0 and first["prev"] == GENESIS and "details" not in first
    assert second["seq"] == 1 and second["prev"] == entry_hash(first)
    assert second["time"].endswith("Z") and second["actor"] == "site-a"
    assert [json.loads(line) for line in lines(path)] == [first, second]
    report = verify_log(path, key.public_key())
    assert report.ok and report.entries == 2 and report.first_bad is None
    assert report.head == head == LogHead(1, entry_hash(second))
    assert format_verify_report(report).startswith("OK: 2 entries")


def test_details_must_be_plain_json_and_nothing_is_written_otherwise(tmp_path, key):
    path = tmp_path / "a.jsonl"
    with AuditLog(path, key, "site-a") as log:
        with pytest.raises(TypeError, match="eval"):
            log.append("eval", "run-1", "ok", {"acc": np.float32(0.5)})
        with pytest.raises(ValueError, match="eval"):
            log.append("eval", "run-1", "ok", {"loss": math.nan})
        with pytest.raises(ValueError, match="outcome"):
            log.append("eval", "run-1", "")
        entry = log.append("eval", "run-1", "ok", {"shape": (2, 3)})
    assert entry["details"] == {"shape": [2, 3]}
    assert verify_log(path, key.public_key()).entries == 1


def test_clock_stepping_back_does_not_make_time_decrease(tmp_path, key, monkeypatch):
    import common.audit as audit

    times = iter([datetime(2030, 1, 1, tzinfo=UTC), datetime(2029, 1, 1, tzinfo=UTC)])

    class SteppingClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return next(times)

    monkeypatch.setattr(audit, "datetime", SteppingClock)
    path = write_log(tmp_path / "a.jsonl", key, 2)
    assert [json.loads(line)["time"] for line in lines(path)] == ["2030-01-01T00:00:00.000000Z"] * 2
    assert verify_log(path, key.public_key()).ok


def test_restart_continues_seq_and_chain(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 3)
    with AuditLog(path, key, "site-a") as log:
        assert log.head.seq == 2
        entry = log.append("run.resume", "run-1", "ok")
    assert entry["seq"] == 3 and entry["prev"] == entry_hash(json.loads(lines(path)[2]))
    report = verify_log(path, key.public_key())
    assert report.ok and report.entries == 4


def test_restart_refuses_a_torn_tail(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 3)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(AuditError, match=r"a\.jsonl line 3 is damaged"):
        AuditLog(path, key, "site-a")


def test_restart_refuses_a_tail_signed_by_another_key(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 2)
    with pytest.raises(AuditError, match="line 2.*signature"):
        AuditLog(path, new_key(), "site-a")


def test_second_writer_on_the_same_log_is_refused(tmp_path, key):
    path = tmp_path / "a.jsonl"
    with AuditLog(path, key, "site-a"):
        with pytest.raises(AuditError, match="already open"):
            AuditLog(path, key, "site-a")
    AuditLog(path, key, "site-a").close()  # free again once the first is closed


def test_concurrent_appends_keep_one_chain(tmp_path, key):
    path = tmp_path / "a.jsonl"
    with AuditLog(path, key, "server") as log:

        def work(t):
            for i in range(25):
                log.append("tick", f"thread-{t}", "ok", {"i": i})

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    report = verify_log(path, key.public_key())
    assert report.ok and report.entries == 200


# -- failing closed ------------------------------------------------------------------------


def test_unwritable_location_fails_at_construction(tmp_path, key):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where the log folder should be")
    with pytest.raises(AuditError, match="not-a-dir"):
        AuditLog(blocker / "logs" / "a.jsonl", key, "site-a")


def test_disk_full_on_append_raises_and_the_log_stays_closed(tmp_path, key, monkeypatch):
    path = write_log(tmp_path / "a.jsonl", key, 2)
    log = AuditLog(path, key, "site-a")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(AuditError, match=r"a\.jsonl.*No space left"):
        log.append("update.sent", "run-1", "ok")
    monkeypatch.undo()
    with pytest.raises(AuditError, match="unusable"):
        log.append("update.sent", "run-1", "ok")
    log.close()
    # The half-written entry was cut off, so the file is still a whole, valid chain.
    assert verify_log(path, key.public_key()).entries == 2


# -- rotation ------------------------------------------------------------------------------


def test_rotation_keeps_one_chain_across_files(tmp_path, key):
    path = tmp_path / "a.jsonl"
    write_log(path, key, 12, max_bytes=1200)
    rotated = sorted(tmp_path.glob("a.jsonl.*[0-9]"))
    assert len(rotated) >= 2
    assert all(p.stat().st_size <= 1200 for p in [*rotated, path])
    last_rotated = json.loads(lines(tmp_path / f"a.jsonl.{len(rotated)}")[-1])
    first_live = json.loads(lines(path)[0])
    assert first_live["prev"] == entry_hash(last_rotated)
    assert first_live["seq"] == last_rotated["seq"] + 1
    write_log(path, key, 3, max_bytes=1200)  # a restart after rotation continues too
    report = verify_log(path, key.public_key())
    assert report.ok and report.entries == 15


def test_deleting_a_rotated_middle_file_is_detected(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 12, max_bytes=1200)
    first_file_entries = len(lines(tmp_path / "a.jsonl.1"))
    (tmp_path / "a.jsonl.2").unlink()
    report = verify_log(path, key.public_key())
    assert_bad(report, first_file_entries + 1, tmp_path / "a.jsonl.3", "seq", "a.jsonl.2")


# -- tampering, one test each --------------------------------------------------------------


def test_edited_field_is_detected(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 5)
    data = lines(path)
    data[2] = data[2].replace(b'"outcome":"ok"', b'"outcome":"no"')
    path.write_bytes(b"".join(data))
    assert_bad(verify_log(path, key.public_key()), 3, path, "signature")


def test_deleted_line_is_detected(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 5)
    data = lines(path)
    path.write_bytes(b"".join(data[:2] + data[3:]))
    assert_bad(verify_log(path, key.public_key()), 3, path, "seq is 3")


def test_swapped_lines_are_detected(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 5)
    data = lines(path)
    data[1], data[2] = data[2], data[1]
    path.write_bytes(b"".join(data))
    assert_bad(verify_log(path, key.public_key()), 2, path, "seq is 2")


def test_torn_last_line_is_detected(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 5)
    path.write_bytes(path.read_bytes()[:-30])
    assert_bad(verify_log(path, key.public_key()), 5, path, "partial line")


def test_clean_truncation_needs_a_head_recorded_elsewhere(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 5)
    recorded = verify_log(path, key.public_key()).head
    path.write_bytes(b"".join(lines(path)[:3]))
    # The documented limit: a shorter chain is still a valid chain on its own.
    assert verify_log(path, key.public_key()).ok
    report = verify_log(path, key.public_key(), expect_head=recorded)
    assert_bad(report, 4, path, "cut off the end")


def test_rewritten_log_does_not_match_a_recorded_head(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 3)
    recorded = verify_log(path, key.public_key()).head
    entries = [json.loads(line) for line in lines(path)]
    entries[1]["outcome"] = "failed"
    path.write_bytes(resign(entries, key))  # the key holder rewrote history
    assert verify_log(path, key.public_key()).ok
    report = verify_log(path, key.public_key(), expect_head=recorded)
    assert_bad(report, 3, path, "log rewritten")


def test_forged_appended_line_is_detected(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 4)
    last = json.loads(lines(path)[-1])
    forged = {k: v for k, v in last.items() if k != "sig"}
    forged |= {"seq": 4, "prev": entry_hash(last), "action": "update.sent"}
    forged["sig"] = keys.sign(new_key(), signing_bytes(forged))
    with path.open("ab") as handle:
        handle.write(canonical_json(forged) + b"\n")
    assert_bad(verify_log(path, key.public_key()), 5, path, "signature")


def test_log_resigned_with_another_key_fails_at_the_first_entry(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 4)
    path.write_bytes(resign([json.loads(line) for line in lines(path)], new_key()))
    assert_bad(verify_log(path, key.public_key()), 1, path, "signature")


def test_non_canonical_line_is_detected(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 3)
    data = lines(path)
    data[1] = data[1].replace(b'{"action"', b'{"action":"evil","action"', 1)
    path.write_bytes(b"".join(data))
    assert_bad(verify_log(path, key.public_key()), 2, path, "canonical")


def test_time_going_backwards_is_detected(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 3)
    entries = [json.loads(line) for line in lines(path)]
    entries[2]["time"] = "2000-01-01T00:00:00.000000Z"
    path.write_bytes(resign(entries, key))
    assert_bad(verify_log(path, key.public_key()), 3, path, "earlier")


def test_missing_log_is_reported(tmp_path, key):
    report = verify_log(tmp_path / "none.jsonl", key.public_key())
    assert not report.ok and "no audit log" in report.reason


# -- digests -------------------------------------------------------------------------------


def test_digest_bytes_known_answer():
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert digest_bytes(b"abc") == expected


def test_digest_arrays_depends_on_order_names_dtype_shape_and_values():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)
    base = digest_arrays({"a": a, "b": b})
    assert digest_arrays({"a": a.copy(), "b": b.copy()}) == base
    variants = [
        {"b": b, "a": a},
        {"x": a, "b": b},
        {"a": a.astype(np.float64), "b": b},
        {"a": a.reshape(3, 2), "b": b},
        {"a": a.reshape(6), "b": b},
        {"a": a + 1, "b": b},
        {"a": a},
        {"ab": a.reshape(6)[:1], "": np.concatenate([a.reshape(6)[1:], b])},
    ]
    assert len({digest_arrays(v) for v in variants} | {base}) == len(variants) + 1
    assert digest_arrays({"s": np.array(1.0)}) != digest_arrays({"s": np.array([1.0])})


def test_digest_arrays_ignores_memory_layout_and_byte_order():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    base = digest_arrays({"a": a})
    assert digest_arrays({"a": np.asfortranarray(a)}) == base
    assert digest_arrays({"a": a.astype(">i4")}) == base
    strided = np.arange(24, dtype=np.int32).reshape(3, 8)[:, ::2]
    assert not strided.flags.c_contiguous
    assert digest_arrays({"a": strided}) == digest_arrays({"a": strided.copy()})


def test_digest_arrays_refuses_non_numeric():
    with pytest.raises(TypeError, match="'o'"):
        digest_arrays({"o": np.array([object()])})
    with pytest.raises(TypeError, match="'l'"):
        digest_arrays({"l": [1.0, 2.0]})


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(hnp.floating_dtypes() | hnp.integer_dtypes(), hnp.array_shapes(min_dims=0)))
def test_digest_arrays_matches_any_copy_of_the_same_values(array):
    assert digest_arrays({"w": array}) == digest_arrays({"w": np.array(array, order="F")})
    swapped = array.astype(array.dtype.newbyteorder("S"))
    assert digest_arrays({"w": array}) == digest_arrays({"w": swapped})


# -- cross-check between a site and the coordinator ----------------------------------------


def sent(log, run, rnd, digest):
    log.append("update.sent", run, "ok", {"run_id": run, "round": rnd, "digest": digest})


def received(log, site, run, rnd, digest):
    details = {
        "run_id": run,
        "round": rnd,
        "digest": digest,
        "signature_valid": True,
        "accepted": True,
    }
    log.append("update.received", site, "accepted", details)


@pytest.fixture
def two_logs(tmp_path):
    server_key, site_key = new_key(), new_key()
    server = AuditLog(tmp_path / "server.jsonl", server_key, "coordinator")
    site = AuditLog(tmp_path / "site.jsonl", site_key, "site-a")
    yield server, site
    server.close()
    site.close()


def check(server, site):
    return cross_check(server.path, server.public_key, site.path, site.public_key, "site-a")


def test_cross_check_passes_on_matching_logs(two_logs):
    server, site = two_logs
    for rnd in (1, 2):
        sent(site, "run-1", rnd, f"d{rnd}")
        received(server, "site-a", "run-1", rnd, f"d{rnd}")
    received(server, "site-b", "run-1", 1, "other")  # another site's update is not ours
    report = check(server, site)
    assert report.ok and report.matched == 2 and report.problems == []
    assert format_cross_check(report) == "OK: 2 update(s) match in both logs"


def test_cross_check_reports_a_digest_mismatch(two_logs):
    server, site = two_logs
    sent(site, "run-1", 1, "aaaa")
    received(server, "site-a", "run-1", 1, "bbbb")
    report = check(server, site)
    assert not report.ok and report.matched == 0
    [problem] = report.problems
    assert "run run-1 round 1" in problem and "aaaa" in problem and "bbbb" in problem
    assert problem in format_cross_check(report)


def test_cross_check_reports_a_missing_receive(two_logs):
    server, site = two_logs
    sent(site, "run-1", 1, "d1")
    sent(site, "run-1", 2, "d2")
    received(server, "site-a", "run-1", 1, "d1")
    report = check(server, site)
    assert report.matched == 1
    assert report.problems == [
        "run run-1 round 2: site site-a sent digest d2 but the coordinator log has no "
        "update.received for it"
    ]


def test_cross_check_reports_a_receive_never_sent(two_logs):
    server, site = two_logs
    site.append("site.started", "site-a", "ok")  # an empty log would fail verification first
    received(server, "site-a", "run-1", 3, "d3")
    [problem] = check(server, site).problems
    assert "run run-1 round 3" in problem and "d3" in problem and "no update.sent" in problem


def test_cross_check_requires_both_logs_to_verify(two_logs):
    server, site = two_logs
    sent(site, "run-1", 1, "d1")
    received(server, "site-a", "run-1", 1, "d1")
    report = cross_check(server.path, server.public_key, site.path, server.public_key, "site-a")
    assert not report.ok
    assert report.problems[0].startswith("site log does not verify: FAILED at entry 1")


# -- pinned keys, empty logs, owner-only files -----------------------------------------------


def test_an_empty_log_is_a_failure_not_zero_entries_ok(tmp_path, key):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"")
    report = verify_log(path, key.public_key())
    assert not report.ok and "no entries" in report.reason


def test_the_report_names_the_key_it_was_checked_with(tmp_path, key):
    path = write_log(tmp_path / "a.jsonl", key, 2)
    report = verify_log(path, key.public_key())
    text = format_verify_report(report, key.public_key())
    assert f"[key {keys.public_key_fingerprint(key.public_key())}]" in text
    assert f"head 1:{report.last_hash}" in text


def test_log_files_are_owner_only(tmp_path, key):
    import stat

    path = write_log(tmp_path / "audit" / "a.jsonl", key, 1)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
    assert modes == {"a.jsonl": 0o600, "a.jsonl.lock": 0o600}
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_second_writer_waits_for_the_first_to_close_when_asked(tmp_path, key):
    path = tmp_path / "a.jsonl"
    first = AuditLog(path, key, "coordinator")
    first.append("run.submitted", "run 1", "ok")
    with pytest.raises(AuditError, match="already open"):
        AuditLog(path, key, "coordinator")
    threading.Timer(0.2, first.close).start()
    with AuditLog(path, key, "coordinator", lock_wait=60) as second:
        assert second.append("run.started", "run 1", "ok")["seq"] == 1
