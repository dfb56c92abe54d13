"""The wire contract: what a site sends is what the coordinator reads, and odd replies fail."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import protocol
from common.protocol import EvalMetrics, RoundRow, TrainMetrics

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@given(n=st.floats(min_value=1, max_value=1e6), loss=finite, eps=finite)
def test_train_metrics_round_trip(n: float, loss: float, eps: float) -> None:
    sent = TrainMetrics(num_examples=n, train_loss=loss, dp=1.0, epsilon_total=eps)
    assert TrainMetrics.from_record(sent.to_record()) == sent


def test_wire_names_are_the_named_constants() -> None:
    record = TrainMetrics(num_examples=3, epsilon_round=0.5, epsilon_total=1.5).to_record()
    assert record[protocol.NUM_EXAMPLES] == 3
    assert record[protocol.EPSILON_ROUND] == 0.5
    assert record[protocol.EPSILON_TOTAL] == 1.5
    assert record[protocol.UNIFORM_WEIGHT] == 1.0
    assert "train-loss" not in record  # absent values are left out, not sent as 0


def test_unexpected_keys_are_dropped() -> None:
    record = {**TrainMetrics(num_examples=2).to_record(), "steal": 1.0}
    assert "steal" not in TrainMetrics.from_record(record).to_record()


@pytest.mark.parametrize(
    ("record", "key"),
    [
        ({}, "num-examples"),
        ({"num-examples": "12"}, "num-examples"),
        ({"num-examples": 5.0, "epsilon-total": math.nan}, "epsilon-total"),
        ({"num-examples": 5.0, "train-loss": math.inf}, "train-loss"),
        ({"num-examples": True}, "num-examples"),
    ],
)
def test_bad_train_records_name_the_key(record: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        TrainMetrics.from_record(record)


def test_eval_metrics_allow_an_undefined_auc_only() -> None:
    good = EvalMetrics(10, 0.5, 0.8, 0.75, 0.7, math.nan)
    back = EvalMetrics.from_record(good.to_record())
    assert math.isnan(back.auc) and back.f1 == 0.7
    with pytest.raises(ValueError, match="f1"):
        EvalMetrics.from_record({**good.to_record(), "f1": math.nan})
    with pytest.raises(ValueError, match="loss"):
        EvalMetrics.from_record({k: v for k, v in good.to_record().items() if k != "loss"})


def test_round_row_round_trip_and_epsilon_by_site() -> None:
    row = RoundRow(3, sites={"a": {protocol.EPSILON_TOTAL: 2.5}, "b": {}}, seconds=1.5)
    back = RoundRow.from_row({**row.to_row(), "from-a-newer-version": 1})
    assert back == row
    assert back.epsilon_by_site() == {"a": 2.5, "b": 0.0}
