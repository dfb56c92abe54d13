"""Each global model crosses the network once a round: the site keeps what it evaluated."""

from __future__ import annotations

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.held import HeldModel, NotHeld
from common import protocol
from common.config import RunConfig
from common.digests import digest_update
from tests.unit.test_validation import EVAL, REF, Federation, flower_task  # noqa: F401


def test_a_disabled_holder_claims_nothing_and_holds_nothing() -> None:
    held = HeldModel()
    assert held.keep("7", REF) is None
    with pytest.raises(NotHeld, match="holds none"):
        held.take("7", digest_update(REF))


def test_the_kept_model_is_given_back_read_only_for_its_run_and_digest_only() -> None:
    held = HeldModel()
    held.enabled = True
    digest = held.keep("7", REF)
    assert digest == digest_update(REF)
    got = held.take("7", digest)
    assert digest_update(got) == digest and not got["a"].flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        got["a"][0, 0] = 1.0
    for run, wanted in (("8", digest), ("7", "0" * 64)):
        with pytest.raises(NotHeld, match="sits this round out"):
            held.take(run, wanted)


@pytest.fixture
def fed(tmp_path):
    federation = Federation(tmp_path, RunConfig(min_sites=2))
    yield federation
    federation.audit.close()


def _evaluate_round_one(fed: Federation, claims: dict[int, str | None]) -> str:
    """Round 1 trained and evaluated; ``claims``: what each node says it holds."""
    sent = fed.trained_then_evaluating()
    replies = []
    for node, claim in claims.items():
        site = ConfigRecord({"site": fed.grid.nodes[node - 1].name})
        if claim is not None:
            site[protocol.HOLDS] = claim
        content = RecordDict({"metrics": MetricRecord(EVAL), "site": site})
        replies.append(Message(content, reply_to=sent[node]))
    fed.strategy.aggregate_evaluate(1, replies)
    return digest_update(REF)


def test_only_a_site_that_holds_the_global_model_gets_its_name_instead(fed) -> None:
    digest = _evaluate_round_one(fed, {1: digest_update(REF), 2: "0" * 64, 3: None})
    record = ArrayRecord({k: Array(v) for k, v in REF.items()})
    sent = {
        m.metadata.dst_node_id: m
        for m in fed.strategy.configure_train(2, record, ConfigRecord(), fed.grid)
    }
    spared = sent[1].content
    assert len(spared.array_records[protocol.ARRAYS]) == 0
    assert dict(spared.config_records[protocol.LAYOUT]) == {protocol.HELD: digest}
    assert protocol.CONFIG in spared  # the round's instructions still go with it
    for node in (2, 3):  # a wrong claim or none: the model goes, packed as ever
        content = sent[node].content
        assert list(content.array_records[protocol.ARRAYS].keys()) == ["packed"]
        assert protocol.HELD not in content.config_records[protocol.LAYOUT]
    [started] = [
        e for e in fed.log() if e["action"] == "round.started" and e["details"]["round"] == 2
    ]
    assert started["details"]["sites_holding_it"] == ["good1"]
    assert started["details"]["global_digest"] == digest


def test_a_claim_serves_one_instruction_and_a_new_model_voids_it(fed) -> None:
    _evaluate_round_one(fed, {1: digest_update(REF), 2: None, 3: None})
    other = {k: v + 1 for k, v in REF.items()}  # not the model that was evaluated
    record = ArrayRecord({k: Array(v) for k, v in other.items()})
    sent = fed.strategy.configure_train(2, record, ConfigRecord(), fed.grid)
    assert all(protocol.HELD not in m.content.config_records[protocol.LAYOUT] for m in sent)
    again = fed.strategy.configure_train(
        3, ArrayRecord({k: Array(v) for k, v in REF.items()}), ConfigRecord(), fed.grid
    )
    assert all(protocol.HELD not in m.content.config_records[protocol.LAYOUT] for m in again)


def test_a_train_instruction_naming_the_held_model_gets_the_sites_own_copy(monkeypatch) -> None:
    from client import app
    from client.held import HELD_MODEL

    monkeypatch.setattr(HELD_MODEL, "enabled", True)  # as in the site's long-lived executor
    monkeypatch.setattr(HELD_MODEL, "_kept", None)
    digest = HELD_MODEL.keep("7", REF)

    def naming(held: object) -> Message:
        layout = ConfigRecord({protocol.HELD: held})  # type: ignore[dict-item]
        content = RecordDict({protocol.ARRAYS: ArrayRecord(), protocol.LAYOUT: layout})
        return Message(content, dst_node_id=1, message_type="train")

    assert digest_update(app._arrays(naming(digest), RunConfig(), "7")) == digest
    with pytest.raises(NotHeld, match="sits this round out"):
        app._arrays(naming("0" * 64), RunConfig(), "7")
    with pytest.raises(ValueError, match="must be text"):
        app._arrays(naming(3), RunConfig(), "7")
