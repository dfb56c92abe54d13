"""The site console's pieces: address check, the one-start lock, settings, events and lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from client import console, events
from client.sitestate import AlreadyRunning, StartLock, StartSettings, parse_server, running_pid
from common import protocol
from common.protocol import EvalMetrics, Histograms, TrainMetrics
from common.threshold import BINS


@pytest.mark.parametrize(
    ("text", "expected"),
    [("coord.example.org:8000", ("coord.example.org", 8000)), ("[::1]:9", ("::1", 9))],
)
def test_server_address_parses(text, expected):
    assert parse_server(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("coord.example.org", "has no port"),
        ("[::1]", "has no port"),
        ("coord:http", "must be 1-65535"),
        ("coord:0", "must be 1-65535"),
        ("coord:70000", "must be 1-65535"),
        (":8000", "has no port"),
        ("https://coord:8000", "is not a host name"),
    ],
)
def test_bad_server_address_names_the_input_and_the_fix(text, says):
    with pytest.raises(ValueError, match=says) as info:
        parse_server(text)
    assert f"--server {text!r}" in str(info.value) and "HOST:PORT" in str(info.value)


def test_lock_refuses_a_second_holder_and_names_its_pid(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert running_pid(tmp_path) == holder.pid
        with pytest.raises(AlreadyRunning, match=f"already running, pid {holder.pid}"):
            StartLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert running_pid(tmp_path) is None  # the kernel dropped it with the process
    lock = StartLock(tmp_path)
    lock.acquire()
    lock.release()


HOLD = """
import sys, time
from pathlib import Path
from client.sitestate import StartLock
lock = StartLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_settings_round_trip_and_a_broken_file_is_named(tmp_path):
    assert StartSettings.read(tmp_path) is None
    StartSettings.now("c:1", 8.0, 1e-6, 12).write(tmp_path)
    read = StartSettings.read(tmp_path)
    assert read is not None
    assert (read.cap, read.delta, read.server, read.max_evaluations) == (8.0, 1e-6, "c:1", 12)
    StartSettings.now("c:1", None, None, 100).write(tmp_path)
    assert StartSettings.read(tmp_path).cap == float("inf")  # type: ignore[union-attr]
    # a start.json written before the evaluation cap was recorded still reads
    raw = json.loads((tmp_path / "start.json").read_text())
    del raw["max_evaluations"]
    (tmp_path / "start.json").write_text(json.dumps(raw))
    assert StartSettings.read(tmp_path).max_evaluations is None  # type: ignore[union-attr]
    (tmp_path / "start.json").write_text("{")
    with pytest.raises(ValueError, match="start.json is not readable"):
        StartSettings.read(tmp_path)


def test_tail_returns_whole_lines_only(tmp_path):
    path = tmp_path / "e.jsonl"
    tail = events.Tail(path)
    assert tail.events() == []
    path.write_text('{"event": "ready", "patches": 3}\n{"event": "tr')
    assert tail.events() == [{"event": "ready", "patches": 3}]
    with open(path, "a") as handle:
        handle.write('ain"}\nnot json\n')
    assert tail.events() == [{"event": "train"}]


def test_round_lines_say_patches_epsilon_cap_and_what_was_sent():
    sent = {"event": "train", "run": "7", "round": 2, "status": "ok", "patches": 40, "dp": True}
    eps = {"epsilon_round": 0.5, "epsilon_total": 1.5, "epsilon_cap": 8.0}
    assert events.describe({**sent, **eps}) == (
        "run 7 round 2: trained on 40 patches; epsilon 0.5 this round, 1.5 total, "
        "cap 8 (6.5 left); update sent"
    )
    assert events.describe({**sent, "dp": False}).endswith("40 patches; no DP; update sent")
    refused = {**sent, **eps, "status": "refused", "reason": "budget spent", "epsilon_round": 0}
    assert events.describe(refused).startswith(
        "run 7 round 2: update refused, no weights sent: budget spent (epsilon 0 this round"
    )


def test_connection_lines_from_the_supernode_log(tmp_path, capsys):
    log, ev = tmp_path / "supernode.log", tmp_path / "events.jsonl"
    watch = console.Console("st-mary", ("127.0.0.1", 9), events.Tail(log), events.Tail(ev))
    log.write_text("\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 1 s\n")
    watch.poll()
    out = capsys.readouterr().out
    assert "cannot reach the coordinator at 127.0.0.1:9 (retrying; last error: " in out
    assert "\x1b[" not in out
    with open(log, "a") as handle:
        handle.write("INFO :      Connection successful after 3 s and 2 tries.\n")
        handle.write("INFO :      SuperNode ID: 123\n")
    watch.poll()
    assert capsys.readouterr().out.count("connected to the coordinator at 127.0.0.1:9") == 1


def test_why_stopped_names_each_failure_and_what_to_do():
    key = ("ab12", Path("/s/site.pub"))
    ca = Path("/ca.pem")
    text = "\x1b[91mERROR\x1b[0m : Exit Code: 305\n[code: 2004] Failed to activate SuperNode.\n"
    line = console.why_stopped("supernode", 1, text, Path("l"), ca, key)
    assert "not registered" in line and "(fingerprint ab12)" in line and "/s/site.pub" in line
    text = "ERROR : SSL/TLS handshake error detected.\n[SSL: CERTIFICATE_VERIFY_FAILED] no\n"
    line = console.why_stopped("supernode", 1, text, Path("l"), ca, key)
    assert line.startswith("the coordinator's certificate is not trusted by --ca /ca.pem")
    line = console.why_stopped("executor", -9, "boom\n", Path("x.log"), ca, key)
    assert line == "the executor stopped (exit -9): boom (log x.log)"
    assert json.dumps(line)  # plain text


def _sent(kind: str) -> Message:
    config = ConfigRecord({protocol.SERVER_ROUND: 3})
    return Message(RecordDict({protocol.CONFIG: config}), dst_node_id=1, message_type=kind)


@pytest.fixture
def task_identity(monkeypatch):
    """Flower builds Messages only inside a task; pretend to be one."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.mark.usefixtures("task_identity")
def test_events_from_real_replies_carry_round_patches_epsilon_and_status():
    sent = _sent(MessageType.TRAIN)
    metrics = TrainMetrics(40, dp=1.0, epsilon_round=0.5, epsilon_total=1.5, epsilon_cap=8.0)
    site = ConfigRecord({protocol.SITE_NAME: "a", protocol.STATUS: "ok", protocol.REASON: ""})
    content = RecordDict(
        {protocol.METRICS: MetricRecord(metrics.to_record()), protocol.SITE: site}  # type: ignore[arg-type]
    )
    event = events.from_reply(7, sent, Message(content, reply_to=sent), True, "")
    assert event["event"] == "train" and event["round"] == 3 and event["patches"] == 40
    assert (event["epsilon_total"], event["epsilon_cap"], event["status"]) == (1.5, 8.0, "ok")
    failed = Message(Error(code=0, reason="boom"), reply_to=sent)
    assert events.from_reply(7, sent, failed, False, "boom")["event"] == "failed"
    garbled = Message(RecordDict(), reply_to=sent)
    assert events.from_reply(7, sent, garbled, True, "")["event"] == "answered"
    evaluate = _sent(MessageType.EVALUATE)
    result = EvalMetrics(24, 0.7, 0.6, 0.55, 0.5, 0.6).to_record()
    reply = Message(RecordDict({protocol.METRICS: MetricRecord(result)}), reply_to=evaluate)  # type: ignore[arg-type]
    line = events.describe(events.from_reply(7, evaluate, reply, True, ""))
    assert line == "run 7 round 3: evaluation done on 24 test patches (balanced accuracy 0.550)"
    query = _sent(MessageType.QUERY)
    query.content.config_records[protocol.CONFIG][protocol.VAL_RANGE] = [0.25, 0.5]
    counts = Histograms((1,) + (0,) * (BINS - 1), (0,) * (BINS - 2) + (2, 3)).to_record()
    reply = Message(RecordDict({protocol.METRICS: MetricRecord(counts)}), reply_to=query)  # type: ignore[arg-type]
    line = events.describe(events.from_reply(7, query, reply, True, ""))
    assert line == (
        "run 7 round 3: sent histograms of P(IDC) on 6 validation patches, binned on "
        "[0.25, 0.5], for the decision threshold (counts only)"
    )
