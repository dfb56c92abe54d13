"""Shared audit writers: several processes extend one chain (the coordinator's CLI and run)."""

import multiprocessing

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from common.audit import AuditError, AuditLog
from common.audit_verify import verify_log


@pytest.fixture
def key():
    return ec.generate_private_key(ec.SECP256R1())


def test_two_shared_writers_interleave_into_one_valid_chain(tmp_path, key):
    path = tmp_path / "a.jsonl"
    with AuditLog(path, key, "coordinator", shared=True) as run:
        run.append("run.started", "run 1", "ok")
        with AuditLog(path, key, "coordinator", shared=True) as cli:
            cli.append("site.registered", "site-a", "ok")
        run.append("round.started", "run 1", "ok")  # must chain onto the CLI's entry
    report = verify_log(path, key.public_key())
    assert report.ok, format(report)
    assert report.entries == 3


def test_an_exclusive_writer_still_shuts_a_shared_one_out(tmp_path, key):
    path = tmp_path / "a.jsonl"
    with AuditLog(path, key, "site-a"):
        with pytest.raises(AuditError, match="already open"):
            AuditLog(path, key, "site-a", shared=True, lock_wait=0.2)


def test_a_shared_writer_follows_a_rotation_made_by_another(tmp_path, key):
    path = tmp_path / "a.jsonl"
    with (
        AuditLog(path, key, "coordinator", shared=True, max_bytes=600) as one,
        AuditLog(path, key, "coordinator", shared=True, max_bytes=600) as two,
    ):
        for i in range(6):
            (one if i % 2 else two).append("tick", f"n{i}", "ok", {"i": i})
    assert (tmp_path / "a.jsonl.1").exists()
    report = verify_log(path, key.public_key())
    assert report.ok and report.entries == 6


def _append_many(path, pem, n, start):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, None)
    with AuditLog(path, key, "coordinator", shared=True) as log:
        start.wait()
        for i in range(n):
            log.append("tick", "p", "ok", {"i": i})


def test_processes_appending_at_once_keep_one_chain(tmp_path, key):
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "a.jsonl"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_append_many, args=(path, pem, 20, start)) for _ in range(3)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0
    report = verify_log(path, key.public_key())
    assert report.ok and report.entries == 60
