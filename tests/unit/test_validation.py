"""The coordinator's vetting, driven through the strategy's public methods with real Messages.

Each test is one odd reply among honest ones: the run goes on with the honest sites, and the
round's row and the audit log name the odd one. The Grid is faked (it is the boundary to the
SuperLink); everything else is real: Flower's FedAvg, Messages, keys, signatures, audit log.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid

from common import keys
from common.audit import AuditLog
from common.config import RunConfig
from common.digests import digest_update
from common.packing import pack
from common.rundir import RunDir
from server.strategy import CoordinatorStrategy, TooFewSites, fedavg

REF = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
EVAL = {"num-examples": 5.0, "loss": 0.5, "accuracy": 0.8}
EVAL |= {"balanced-accuracy": 0.75, "f1": 0.7, "auc": 0.8}


@pytest.fixture(autouse=True)
def flower_task(monkeypatch):
    """Messages are built inside a Flower task; stand in for the run's identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class FakeGrid(Grid):
    """The SuperLink's view of connected nodes: id, registered name and authenticated key."""

    def __init__(self) -> None:
        self.nodes: list[NodeInfo] = []

    def connect(self, node_id: int, name: str, private: keys.PrivateKey) -> None:
        pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.nodes.append(NodeInfo(node_id=node_id, name=name, public_key=pem))

    def get_nodes(self) -> Iterable[NodeInfo]:
        return list(self.nodes)

    def get_node_ids(self) -> Iterable[int]:
        return [n.node_id for n in self.nodes]

    def set_run(self, run):  # noqa: ANN001
        raise NotImplementedError

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # noqa: ANN002, ANN003
        raise NotImplementedError

    def push_messages(self, messages):  # noqa: ANN001
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: ANN001
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001
        raise NotImplementedError


class Federation:
    """Three registered sites on nodes 1-3 (a stranger may join), a strategy and its audit."""

    def __init__(self, tmp_path, run: RunConfig, declared: dict[str, int] | None = None) -> None:
        self.tmp = tmp_path
        self.keys = {
            name: keys.generate_key_pair(tmp_path / f"{name}.key", tmp_path / f"{name}.pub")
            for name in ("good1", "good2", "odd")
        }
        self.grid = FakeGrid()
        for node, name in enumerate(self.keys, 1):
            self.grid.connect(node, name, self.keys[name])
        coord = keys.generate_key_pair(tmp_path / "c.key", tmp_path / "c.pub")
        self.audit_path = tmp_path / "audit.jsonl"
        self.audit = AuditLog(self.audit_path, coord, "coordinator")
        extra = (declared,) if declared is not None else ()
        self.strategy = CoordinatorStrategy(
            fedavg(run),
            run,
            RunDir(tmp_path / "run").create(),
            "7",
            0,
            {k: v.public_key() for k, v in self.keys.items()},
            self.audit,
            *extra,
        )
        self.sent: dict[int, Message] = {}

    def configure_train(self) -> dict[int, Message]:
        record = ArrayRecord({k: Array(v) for k, v in REF.items()})
        msgs = self.strategy.configure_train(1, record, ConfigRecord(), self.grid)
        self.sent = {m.metadata.dst_node_id: m for m in msgs}
        return self.sent

    def reply(
        self,
        node: int,
        value: float,
        *,
        site: str | None = None,
        n: float = 10.0,
        signer: str | None = None,
        **change: object,
    ) -> Message:
        """A signed training reply from ``node``; ``change`` swaps or adds records."""
        site = site or self.grid.nodes[node - 1].name
        arrays = {"a": np.full((2, 3), value, np.float32), "b": REF["b"]}
        digest = digest_update(arrays)
        sig = keys.sign_update(self.keys[signer or site], "7", 1, digest)
        packed, layout = pack(arrays)
        content = RecordDict(
            {
                "arrays": packed,
                "layout": layout,
                "metrics": MetricRecord({"num-examples": n}),
                "site": ConfigRecord(
                    {"site": site, "status": "ok", "digest": digest, "signature": sig}
                ),
            }
        )
        for name, record in change.items():
            content[name.replace("_", "-")] = record
        return Message(content, reply_to=self.sent[node])

    def honest(self) -> list[Message]:
        return [self.reply(1, 1.0), self.reply(2, 3.0)]

    def trained_then_evaluating(self) -> dict[int, Message]:
        """Round 1 trained by all three; the evaluation instructions sent, by node."""
        self.configure_train()
        self.strategy.aggregate_train(1, [*self.honest(), self.reply(3, 2.0)])
        record = ArrayRecord({k: Array(v) for k, v in REF.items()})
        evaluating = self.strategy.configure_evaluate(1, record, ConfigRecord(), self.grid)
        return {m.metadata.dst_node_id: m for m in evaluating}

    def log(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def received(self, site: str) -> list[dict]:
        return [e for e in self.log() if e["action"] == "update.received" and e["object"] == site]


@pytest.fixture
def fed(tmp_path):
    federation = Federation(tmp_path, RunConfig(min_sites=2))
    yield federation
    federation.audit.close()


def assert_run_goes_on_without_odd(fed: Federation, odd: Message, *words: str) -> None:
    fed.configure_train()
    agg, _ = fed.strategy.aggregate_train(1, [*fed.honest(), odd])
    assert np.allclose(agg["a"].numpy(), 2.0)  # the honest sites' mean, the odd one left out
    row = fed.strategy.current
    assert sorted(row.sites) == ["good1", "good2"]
    [rejected] = row.rejected
    assert rejected["site"] == "odd" and rejected["kind"] == "invalid"
    for word in words:
        assert word in rejected["reason"]
    [entry] = fed.received("odd")
    assert entry["outcome"] == "rejected" and entry["details"]["reason"] == rejected["reason"]
    assert [e["outcome"] for e in fed.received("good1")] == ["accepted"]


# -- the model travels packed ------------------------------------------------------------


def test_the_instructions_carry_the_model_packed_and_it_unpacks_to_the_global_model(fed):
    from common.packing import unpack

    sent = fed.configure_train()
    for msg in sent.values():
        assert list(msg.content.array_records["arrays"].keys()) == ["packed"]
        got = unpack(msg.content["arrays"], msg.content["layout"], REF)
        assert digest_update(got) == digest_update(REF)


# -- 13.4: one odd training reply never ends the run ----------------------------------------


def _layout(msg: Message) -> list:
    return json.loads(msg.content["layout"]["entries"])


def _set_layout(msg: Message, entries: list) -> None:
    msg.content["layout"] = ConfigRecord({"entries": json.dumps(entries)})


def test_a_string_typed_array_is_rejected(fed):
    fed.configure_train()
    odd = fed.reply(3, 1.0)
    entries = _layout(odd)
    entries[0][1] = "<U1"  # the attacker's layout says 'a' is text
    _set_layout(odd, entries)
    assert_run_goes_on_without_odd(fed, odd, "'a'", "<U1")


def test_garbage_bytes_instead_of_the_packed_model_are_rejected(fed):
    fed.configure_train()
    odd = fed.reply(3, 1.0)
    garbage = b"not the model"
    odd.content["arrays"] = ArrayRecord(
        {"packed": Array("uint8", (len(garbage),), "idc-fl.raw-le", garbage)}
    )
    assert_run_goes_on_without_odd(fed, odd, "does not decode")


def test_a_garbage_layout_is_rejected(fed):
    fed.configure_train()
    odd = fed.reply(3, 1.0)
    odd.content["layout"] = ConfigRecord({"entries": "\x00garbage"})
    assert_run_goes_on_without_odd(fed, odd, "layout does not decode")


def test_a_huge_declared_shape_is_rejected_before_decoding(fed):
    fed.configure_train()
    odd = fed.reply(3, 1.0)
    entries = _layout(odd)
    entries[0][2] = [10**6, 10**6]
    _set_layout(odd, entries)
    assert_run_goes_on_without_odd(fed, odd, "declares")


def test_nan_weights_in_a_validly_signed_reply_are_rejected(fed):
    fed.configure_train()
    odd = fed.reply(3, math.nan)
    assert_run_goes_on_without_odd(fed, odd, "'a'", "NaN")


def test_named_arrays_in_the_old_form_are_rejected(fed):
    fed.configure_train()
    odd = fed.reply(3, 1.0)
    named = {"a": np.full((2, 3), 1.0, np.float32), "b": REF["b"]}
    odd.content["arrays"] = ArrayRecord({k: Array(v) for k, v in named.items()})
    assert_run_goes_on_without_odd(fed, odd, "one packed array")


def test_a_reply_without_its_layout_is_rejected(fed):
    fed.configure_train()
    odd = fed.reply(3, 1.0)
    del odd.content["layout"]
    assert_run_goes_on_without_odd(fed, odd, "missing ['layout']")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_epsilon_in_a_validly_signed_reply_is_rejected(fed, value):
    fed.configure_train()
    odd = fed.reply(3, 1.0, metrics=MetricRecord({"num-examples": 10.0, "epsilon-total": value}))
    assert_run_goes_on_without_odd(fed, odd, "epsilon-total", "finite")


def test_a_second_metric_record_is_rejected(fed):
    fed.configure_train()
    odd = fed.reply(3, 1.0, more=MetricRecord({"num-examples": 10.0}))
    assert_run_goes_on_without_odd(fed, odd, "unexpected ['more']")


def test_a_second_array_record_is_rejected(fed):
    fed.configure_train()
    odd = fed.reply(3, 1.0, more=ArrayRecord({k: Array(v) for k, v in REF.items()}))
    assert_run_goes_on_without_odd(fed, odd, "unexpected ['more']")


def test_a_reply_without_metrics_is_rejected(fed):
    fed.configure_train()
    odd = fed.reply(3, 1.0)
    del odd.content["metrics"]
    assert_run_goes_on_without_odd(fed, odd, "missing ['metrics']")


def test_a_site_name_that_is_not_text_is_rejected(fed):
    fed.configure_train()
    odd = fed.reply(3, 1.0)
    odd.content["site"]["site"] = 3
    assert_run_goes_on_without_odd(fed, odd, "'site'", "text")


def test_an_extra_metric_key_is_dropped_and_the_reply_counts(fed):
    fed.configure_train()
    extra = fed.reply(3, 2.0, metrics=MetricRecord({"num-examples": 10.0, "steal": 1.0}))
    agg, metrics = fed.strategy.aggregate_train(1, [*fed.honest(), extra])
    assert np.allclose(agg["a"].numpy(), 2.0) and "steal" not in metrics
    assert sorted(fed.strategy.current.sites) == ["good1", "good2", "odd"]
    assert "steal" not in fed.strategy.current.sites["odd"]


def test_sites_sending_different_optional_metrics_still_average(fed):
    fed.configure_train()
    loss = MetricRecord({"num-examples": 10.0, "train-loss": 0.3})
    replies = [fed.reply(1, 1.0, metrics=loss), fed.reply(2, 3.0)]
    agg, metrics = fed.strategy.aggregate_train(1, replies)
    assert np.allclose(agg["a"].numpy(), 2.0) and "train-loss" not in metrics


def test_a_bad_signature_is_rejected(fed):
    fed.configure_train()
    assert_run_goes_on_without_odd(fed, fed.reply(3, 1.0, signer="good1"), "signature")


def test_the_round_stops_below_the_minimum(fed):
    fed.configure_train()
    with pytest.raises(TooFewSites, match="1 usable update"):
        fed.strategy.aggregate_train(1, [fed.reply(1, 1.0)])


# -- 13.5: the weight a site claims is bounded ---------------------------------------------


def test_a_negative_example_count_cannot_blow_up_the_average(fed):
    """The issue's attack: 1.0 and 3.0 honest, 1.01 with num-examples -19.999 gave 19801.0."""
    fed.configure_train()
    assert_run_goes_on_without_odd(fed, fed.reply(3, 1.01, n=-19.999), "num-examples", "positive")


def test_more_examples_than_declared_at_enrolment_is_rejected(tmp_path):
    fed = Federation(tmp_path, RunConfig(min_sites=2), declared={"odd": 500})
    fed.configure_train()
    odd = fed.reply(3, 100.0, n=1e12)
    assert_run_goes_on_without_odd(fed, odd, "1000000000000", "500 patches it declared")


def test_an_undeclared_site_is_bounded_by_the_run_option(tmp_path):
    fed = Federation(tmp_path, RunConfig(min_sites=2, max_examples_per_site=1000))
    fed.configure_train()
    odd = fed.reply(3, 100.0, n=1001)
    assert_run_goes_on_without_odd(fed, odd, "max-examples-per-site")


def test_a_fractional_example_count_is_rejected(fed):
    fed.configure_train()
    assert_run_goes_on_without_odd(fed, fed.reply(3, 1.0, n=0.5), "whole number")


def test_a_site_cannot_raise_its_uniform_weight(fed):
    fed.configure_train()
    heavy = MetricRecord({"num-examples": 10.0, "uniform-weight": 1e12})
    assert_run_goes_on_without_odd(fed, fed.reply(3, 1.0, metrics=heavy), "uniform-weight")


def test_an_update_far_from_the_global_model_is_rejected_under_a_norm_bound(tmp_path):
    fed = Federation(tmp_path, RunConfig(min_sites=2, max_update_norm=10.0))
    fed.configure_train()
    # honest updates are sqrt(6) and sqrt(54) from the zero model; this one sqrt(6) * 100
    odd = fed.reply(3, 100.0)
    assert_run_goes_on_without_odd(fed, odd, "max-update-norm 10")


# -- 12.3: sites are their keys -------------------------------------------------------------


def test_a_stranger_under_a_registered_name_is_never_sampled(fed, tmp_path):
    stranger = keys.generate_key_pair(tmp_path / "x.key", tmp_path / "x.pub")
    fed.grid.connect(99, "good1", stranger)
    assert sorted(fed.configure_train()) == [1, 2, 3]
    record = ArrayRecord({k: Array(v) for k, v in REF.items()})
    evaluated = fed.strategy.configure_evaluate(1, record, ConfigRecord(), fed.grid)
    assert sorted(m.metadata.dst_node_id for m in evaluated) == [1, 2, 3]
    round_started = [e for e in fed.log() if e["action"] == "round.started"][-1]
    assert round_started["details"]["sites_selected"] == ["good1", "good2", "odd"]


def test_names_come_from_keys_not_from_the_registered_node_name(fed):
    fed.grid.nodes[0].name = "odd"  # Flower's name for node 1 is wrong; its key is good1's
    fed.configure_train()
    assert fed.strategy.node_names[1] == "good1"


def test_a_node_claiming_another_sites_name_is_rejected(fed):
    fed.configure_train()
    odd = fed.reply(3, 1.0, site="good1", signer="good1")  # good1's name and even its key
    assert_run_goes_on_without_odd(fed, odd, "claims to be 'good1'")


def test_too_few_registered_sites_names_the_ignored_strangers(tmp_path):
    fed = Federation(tmp_path, RunConfig(min_sites=3, round_timeout=0.1))
    fed.grid.nodes.pop()
    fed.grid.connect(99, "odd", keys.generate_key_pair(tmp_path / "x.key", tmp_path / "x.pub"))
    with pytest.raises(TooFewSites, match=r"2 registered site\(s\).*1 connected node.*'odd'"):
        fed.configure_train()


# -- evaluation replies are vetted like training replies ------------------------------------


def _evaluate(fed: Federation, odd_metrics: MetricRecord | None, **records) -> object:
    sent = fed.trained_then_evaluating()

    def reply(node: int, metrics: MetricRecord) -> Message:
        site = ConfigRecord({"site": fed.grid.nodes[node - 1].name})
        content = RecordDict({"metrics": metrics, "site": site})
        return Message(content, reply_to=sent[node])

    good = [reply(1, MetricRecord(EVAL)), reply(2, MetricRecord({**EVAL, "loss": 1.5}))]
    odd = reply(3, odd_metrics or MetricRecord(EVAL))
    for name, rec in records.items():
        odd.content[name] = rec
    return fed.strategy.aggregate_evaluate(1, [*good, odd])


@pytest.mark.parametrize(
    "metrics, records, words",
    [
        (MetricRecord({**EVAL, "loss": math.nan}), {}, "loss"),
        (MetricRecord({**EVAL, "num-examples": -4.0}), {}, "num-examples"),
        (None, {"more": MetricRecord(EVAL)}, "unexpected ['more']"),
        (MetricRecord({k: v for k, v in EVAL.items() if k != "f1"}), {}, "f1"),
    ],
)
def test_an_odd_evaluation_is_left_out_of_the_average(fed, metrics, records, words):
    result = _evaluate(fed, metrics, **records)
    assert result["loss"] == pytest.approx(1.0)  # the two honest evaluations only
    row = fed.strategy.current
    assert sorted(row.evaluations) == ["good1", "good2"]
    [rejected] = row.rejected
    assert rejected["site"] == "odd" and rejected["phase"] == "evaluate"
    assert words in rejected["reason"]
    [entry] = [e for e in fed.log() if e["action"] == "evaluation.rejected"]
    assert entry["object"] == "odd" and words in entry["details"]["reason"]
    committed = json.loads((fed.tmp / "run" / "rounds.jsonl").read_text())
    assert committed["round"] == 1 and sorted(committed["evaluations"]) == ["good1", "good2"]


def test_the_average_does_not_depend_on_the_order_replies_arrive_in(fed):
    """Float sums do not commute: 1e8, 1, -1e8 in float32 average to 0 or 1/3 by order."""
    averages = []
    for order in ((1, 2, 3), (3, 1, 2), (2, 3, 1)):
        fed.configure_train()
        values = {1: 1e8, 2: 1.0, 3: -1e8}
        agg, _ = fed.strategy.aggregate_train(1, [fed.reply(n, values[n]) for n in order])
        averages.append(agg["a"].numpy().copy())
    assert all(np.array_equal(averages[0], a) for a in averages[1:]), averages
