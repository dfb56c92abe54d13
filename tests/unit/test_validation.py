import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common import keys
from common.audit import AuditLog, digest_update
from common.config import RunConfig
from common.protocol import RoundRow
from common.rundir import RunDir
from server.strategy import CoordinatorStrategy, TooFewSites, fedavg
from server.validation import validate_update

REF = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}


@pytest.fixture(autouse=True)
def flower_task(monkeypatch):
    """Messages are built inside a Flower task; stand in for the run's identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def test_a_good_update_passes():
    assert validate_update(REF, {"a": np.full((2, 3), 0.5, np.float32), "b": REF["b"]}) is None


@pytest.mark.parametrize(
    "update, words",
    [
        ({"a": REF["a"]}, "names"),
        ({**REF, "c": REF["b"]}, "names"),
        ({"a": np.zeros((3, 2), np.float32), "b": REF["b"]}, "shape"),
        ({"a": np.zeros((2, 3), np.float64), "b": REF["b"]}, "dtype"),
        ({"a": REF["a"], "b": np.array([1, np.nan, 1, 1], np.float32)}, "NaN"),
        ({"a": REF["a"], "b": np.array([1, np.inf, 1, 1], np.float32)}, "infinity"),
    ],
)
def test_bad_updates_are_named(update, words):
    reason = validate_update(REF, update)
    assert reason is not None and words in reason


def _reply(node, arrays, site, key, round_=1):
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    digest = digest_update(arrays)
    meta = ConfigRecord(
        {
            "site": site,
            "status": "ok",
            "reason": "",
            "digest": digest,
            "signature": keys.sign_update(key, "7", round_, digest),
        }
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 10.0}),
            "site": meta,
        }
    )
    return Message(content, reply_to=sent)


def test_strategy_rejects_nan_and_wrong_shape_records_them_and_averages_the_rest(tmp_path):
    site_keys = {}
    for name in ("good1", "good2", "nan", "shape"):
        site_keys[name] = keys.generate_key_pair(tmp_path / f"{name}.key", tmp_path / f"{name}.pub")
    coord = keys.generate_key_pair(tmp_path / "c.key", tmp_path / "c.pub")
    audit = AuditLog(tmp_path / "audit.jsonl", coord, "coordinator")
    run = RunConfig(min_sites=2)
    strategy = CoordinatorStrategy(
        fedavg(run),
        run,
        RunDir(tmp_path / "run").create(),
        "7",
        0,
        {k: v.public_key() for k, v in site_keys.items()},
        audit,
    )
    strategy.current, strategy.global_arrays = RoundRow(1), REF
    replies = [
        _reply(
            1, {"a": np.full((2, 3), 1.0, np.float32), "b": REF["b"]}, "good1", site_keys["good1"]
        ),
        _reply(
            2, {"a": np.full((2, 3), 3.0, np.float32), "b": REF["b"]}, "good2", site_keys["good2"]
        ),
        _reply(3, {"a": REF["a"], "b": np.full(4, np.nan, np.float32)}, "nan", site_keys["nan"]),
        _reply(4, {"a": np.zeros((3, 2), np.float32), "b": REF["b"]}, "shape", site_keys["shape"]),
        # signed by good1's key but claiming to be "shape"'s sibling: bad signature
        _reply(5, {"a": REF["a"], "b": REF["b"]}, "good2", site_keys["good1"]),
    ]
    agg, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(agg["a"].numpy(), 2.0)  # the mean of the two good updates only
    reasons = {r["site"]: r["reason"] for r in strategy.current.rejected}
    assert "NaN" in reasons["nan"] and "shape" in reasons["shape"]
    assert any("signature" in r["reason"] for r in strategy.current.rejected)
    assert sorted(strategy.current.sites) == ["good1", "good2"]
    log = (tmp_path / "audit.jsonl").read_text()
    assert log.count('"update.received"') == 5 and log.count('"outcome":"rejected"') == 3


def test_strategy_stops_the_round_below_the_minimum(tmp_path):
    key = keys.generate_key_pair(tmp_path / "s.key", tmp_path / "s.pub")
    run = RunConfig(min_sites=2)
    strategy = CoordinatorStrategy(
        fedavg(run), run, RunDir(tmp_path / "run").create(), "7", 0, {"s": key.public_key()}, None
    )
    strategy.current, strategy.global_arrays = RoundRow(1), REF
    with pytest.raises(TooFewSites, match="1 usable update"):
        strategy.aggregate_train(1, [_reply(1, dict(REF), "s", key)])
