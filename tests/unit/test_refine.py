"""After the last round the threshold is chosen finer, on the range the validation patches fill.

Both ends with real parts: the coordinator's refinement through the strategy (real Messages,
keys, audit log; the Grid faked, it is the boundary to the SuperLink), and the site's
ClientApp query handler on a real site folder (real model, data, audit log).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from common import protocol
from common.config import RunConfig
from common.packing import pack
from common.threshold import (
    BINS,
    best_edge,
    check_span,
    choose_refined,
    histograms,
    zoom_range,
)
from server.refine import THRESHOLD_REFINED, refine
from tests.conftest import node_config_of
from tests.unit.test_site_privacy import _audit, _site_dir
from tests.unit.test_threshold import pooled_bacc as _bacc
from tests.unit.test_validation import EVAL, FakeGrid, Federation, flower_task  # noqa: F401

# -- the histograms on a range -------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_every_interior_edge_of_a_range_is_exact_even_for_patches_outside_it(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(0.45 + 0.04 * labels + rng.normal(0, 0.05, 300), 0, 1)
    span = (0.4, 0.52)  # some patches fall below or above it
    pos, neg = histograms(labels, probs, span)
    assert sum(pos) == labels.sum() and sum(neg) == (labels == 0).sum()
    edge, bacc = best_edge(pos, neg, span)
    assert span[0] < edge < span[1]
    assert bacc == pytest.approx(_bacc(labels, probs, edge))  # what the patches give there
    edges = span[0] + np.arange(1, BINS) * (span[1] - span[0]) / BINS
    assert bacc == pytest.approx(max(_bacc(labels, probs, e) for e in edges))


def test_a_narrow_band_is_resolved_finer_after_zooming() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    probs = 0.60 + 0.01 * labels + rng.normal(0, 0.006, 400)  # all within about 0.58-0.63
    coarse = histograms(labels, probs)
    span = zoom_range(*coarse)
    assert span is not None and span[1] - span[0] <= 0.1
    before = best_edge(*coarse)
    after = choose_refined(*histograms(labels, probs, span), span, 3, 4)
    assert before is not None and after is not None
    assert after.balanced_accuracy > before[1] + 0.05  # the coarse edges cut the band badly
    assert "refined on" in after.source and "round 4" in after.source


def test_the_zoom_is_around_the_best_edge_where_the_patches_are() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 600)
    # spread over all of [0, 1], yet most crowded where the classes meet (about 0.691)
    crowd = 0.691 + 0.006 * (labels - 0.5) + rng.normal(0, 0.004, 600)
    probs = np.where(rng.random(600) < 0.3, rng.random(600), crowd)
    coarse = histograms(labels, probs)
    edge = best_edge(*coarse)
    span = zoom_range(*coarse)
    assert edge is not None and span is not None
    assert span[0] < edge[0] < span[1] and span[1] - span[0] <= 0.2 + 1e-9
    finer = choose_refined(*histograms(labels, probs, span), span, 5, 4)
    assert finer is not None and finer.balanced_accuracy > edge[1] + 0.1  # 0.52 -> 0.72
    assert zoom_range(*histograms(np.ones(100, int), np.full(100, 0.3))) is None  # one class
    one_bin = zoom_range(*histograms(labels[:100], np.full(100, 0.305)))
    assert one_bin == pytest.approx((0.3, 0.32))  # the narrowest range a site answers


@pytest.mark.parametrize(
    "span",
    [
        None,
        "0.1,0.2",
        [0.1],
        [0.2, 0.1],
        [-0.1, 0.5],
        [0.5, 1.5],
        [0.5, 0.505],
        [True, 0.5],
        [float("nan"), 0.5],
    ],
)
def test_a_site_refuses_a_range_it_should_not_bin_on(span: object) -> None:
    with pytest.raises(ValueError, match="histogram range"):
        check_span(span)


def test_the_reply_counts_are_strict() -> None:
    good = protocol.Histograms((1,) * BINS, (2,) * BINS)
    assert protocol.Histograms.from_record(good.to_record()) == good
    for bad in (
        {protocol.VAL_POSITIVES: [1] * BINS},
        {**good.to_record(), protocol.VAL_NEGATIVES: [0.5] * BINS},
    ):
        with pytest.raises(ValueError, match="val-"):
            protocol.Histograms.from_record(bad)


# -- the coordinator asks, vets and chooses ------------------------------------------------


class AnsweringGrid(FakeGrid):
    """Connected nodes, and each query answered by ``answer(node, message)``."""

    def __init__(self, answer: Callable[[int, Message], Message | None]) -> None:
        super().__init__()
        self.answer = answer
        self.asked: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001
        self.asked = list(messages)
        return [r for m in self.asked if (r := self.answer(m.metadata.dst_node_id, m)) is not None]


BAND = np.linspace(0.42, 0.49, 60)  # each site's validation P(IDC), all in a few bins


def _site_counts(node: int, span: tuple[float, float] = (0.0, 1.0)) -> tuple[list[int], list[int]]:
    labels = (np.arange(60) % 3 == node % 3).astype(int)
    probs = BAND + 0.01 * labels
    return histograms(labels, probs, span)


def _evaluated(fed: Federation) -> dict:
    """Round 1 trained and evaluated, each site sending its coarse histograms; its row."""
    sent = fed.trained_then_evaluating()
    replies = []
    for node in (1, 2, 3):
        pos, neg = _site_counts(node)
        metrics = MetricRecord({**EVAL, protocol.VAL_POSITIVES: pos, protocol.VAL_NEGATIVES: neg})
        site = ConfigRecord({"site": fed.grid.nodes[node - 1].name})
        replies.append(Message(RecordDict({"metrics": metrics, "site": site}), reply_to=sent[node]))
    fed.strategy.aggregate_evaluate(1, replies)
    return fed.strategy.run_dir.read_rounds()[-1]


def _honest(fed: Federation) -> Callable[[int, Message], Message]:
    def answer(node: int, msg: Message) -> Message:
        span = tuple(msg.content.config_records[protocol.CONFIG][protocol.VAL_RANGE])
        pos, neg = _site_counts(node, span)  # type: ignore[arg-type]
        metrics = MetricRecord(protocol.Histograms(tuple(pos), tuple(neg)).to_record())  # type: ignore[arg-type]
        site = ConfigRecord({"site": fed.grid.nodes[node - 1].name})
        return Message(RecordDict({"metrics": metrics, "site": site}), reply_to=msg)

    return answer


@pytest.fixture
def fed(tmp_path):
    federation = Federation(tmp_path, RunConfig(min_sites=2))
    yield federation
    federation.audit.close()


def _refined(fed: Federation) -> list[dict]:
    return [e for e in fed.log() if e["action"] == THRESHOLD_REFINED]


def test_the_sites_are_asked_once_more_on_the_band_and_the_choice_is_finer(fed) -> None:
    row = _evaluated(fed)
    grid = AnsweringGrid(_honest(fed))
    grid.nodes = fed.grid.nodes
    choice = refine(fed.strategy, grid, 1, row, timeout=5)
    assert [m.metadata.message_type for m in grid.asked] == ["query"] * 3
    span = list(grid.asked[0].content.config_records[protocol.CONFIG][protocol.VAL_RANGE])
    assert span == pytest.approx([0.42, 0.52])  # the bins the sites filled, 0.50 included
    coarse = best_edge(row["validation"]["positives"], row["validation"]["negatives"])
    assert choice is not None and coarse is not None
    assert choice.balanced_accuracy > coarse[1] and "refined on [0.42, 0.52]" in choice.source
    [entry] = _refined(fed)
    assert entry["outcome"] == "ok" and entry["details"]["threshold"] == choice.threshold


@pytest.mark.parametrize("odd", ["counts", "name", "error", "silent"])
def test_one_odd_or_missing_answer_keeps_the_coarse_choice_and_says_why(fed, odd) -> None:
    row = _evaluated(fed)
    honest = _honest(fed)

    def answer(node: int, msg: Message) -> Message | None:
        reply = honest(node, msg)
        if node != 3:
            return reply
        if odd == "counts":  # one more patch than it evaluated on
            counts = reply.content.metric_records["metrics"]
            counts[protocol.VAL_POSITIVES] = [*counts[protocol.VAL_POSITIVES][:-1], 99]
        elif odd == "name":
            reply.content.config_records["site"]["site"] = "good1"
        elif odd == "error":
            from flwr.app import Error

            return Message(Error(code=0, reason="boom"), reply_to=msg)
        else:
            return None
        return reply

    grid = AnsweringGrid(answer)
    grid.nodes = fed.grid.nodes
    assert refine(fed.strategy, grid, 1, row, timeout=5) is None
    [entry] = _refined(fed)
    assert entry["outcome"] == "failed"
    why = {
        "counts": "differ from round 1",
        "name": "claims to be",
        "error": "boom",
        "silent": "no answer from ['odd']",
    }[odd]
    assert why in entry["details"]["reason"]


def test_a_site_gone_since_the_last_round_is_not_asked(fed) -> None:
    row = _evaluated(fed)
    grid = AnsweringGrid(_honest(fed))
    grid.nodes = fed.grid.nodes[:2]
    assert refine(fed.strategy, grid, 1, row, timeout=5) is None and grid.asked == []
    assert "no longer connected" in _refined(fed)[0]["details"]["reason"]


def test_a_holder_is_sent_the_models_name_only(fed) -> None:
    row = _evaluated(fed)
    fed.strategy.holding = {1: fed.strategy.global_digest}
    grid = AnsweringGrid(_honest(fed))
    grid.nodes = fed.grid.nodes
    refine(fed.strategy, grid, 1, row, timeout=5)
    sent = {m.metadata.dst_node_id: m.content for m in grid.asked}
    assert dict(sent[1].config_records[protocol.LAYOUT]) == {
        protocol.HELD: fed.strategy.global_digest
    }
    assert list(sent[2].array_records[protocol.ARRAYS].keys()) == [protocol.PACKED]


# -- the site answers with counts only -----------------------------------------------------


@pytest.fixture
def cfg(tmp_path):
    """A small site folder (keys, patches in the Kaggle layout), nothing trained."""
    from simulation.synth import SynthSpec, synthesize

    synthesize(tmp_path / "synth", SynthSpec(patients=6, patches_per_patient=(6, 8), seed=3))
    (tmp_path / "synth" / "synth.json").unlink()
    return _site_dir(tmp_path / "site", tmp_path / "synth")


def _query(arrays: dict, span: object, run_id: int = 7) -> Message:
    packed, layout = pack(arrays)
    config = ConfigRecord({protocol.SERVER_ROUND: 3, protocol.VAL_RANGE: span})  # type: ignore[dict-item]
    content = RecordDict(
        {protocol.ARRAYS: packed, protocol.LAYOUT: layout, protocol.CONFIG: config}
    )
    meta = Metadata(run_id, "m1", 0, 1, "", "", time.time(), 600.0, "query", 1, 2)
    return Message(content, metadata=meta)


def _site_context(cfg) -> tuple[RunConfig, dict, Context]:  # noqa: ANN001
    """A run config, a model's arrays (seed 5) and the Context the site's handlers get."""
    from common.model import build_model
    from common.site_data import model_arrays

    run = RunConfig()
    node = node_config_of(cfg)
    arrays = model_arrays(build_model(run.norm, seed=5, kind=run.model))
    return run, arrays, Context(7, 1, node, RecordDict(), run.to_run_config())


def test_the_site_bins_its_validation_patches_on_the_range_and_records_it(cfg) -> None:
    from client.app import HISTOGRAMS_SENT
    from client.app import refine as refine_handler
    from client.site import run_accel
    from common.model import build_model
    from common.site_data import Site, set_weights
    from common.training import predict

    run, arrays, context = _site_context(cfg)
    reply = refine_handler(_query(arrays, [0.3, 0.7]), context)
    got = protocol.Histograms.from_record(reply.content.metric_records[protocol.METRICS])
    # the same counts as binning the site's own validation patches here
    site = Site.open(cfg, run.seed)
    model = build_model(run.norm, seed=5, kind=run.model)
    set_weights(model, arrays)
    accel = run_accel(run)
    labels, probs, _ = predict(
        model, site.eval_batches("val", run.seed, accel), accel.device, accel
    )
    assert (list(got.positives), list(got.negatives)) == histograms(labels, probs, (0.3, 0.7))
    assert sum(got.positives) + sum(got.negatives) == len(site.split.val) > 0
    [sent] = _audit(cfg, HISTOGRAMS_SENT)
    assert sent["details"]["round"] == 3 and sent["details"][protocol.VAL_POSITIVES] == list(
        got.positives
    )
    # a range it should not bin on is refused before anything is recorded or computed
    with pytest.raises(ValueError, match="histogram range"):
        refine_handler(_query(arrays, [0.3, 0.301]), context)
    received = [e["details"] for e in _audit(cfg, "message.received")]
    assert [d for d in received if d["action"] == "refine"] == [
        {"round": 3, "action": "refine", "range": [0.3, 0.7]}
    ]


def test_a_site_answers_one_refinement_a_run_and_refuses_the_next(cfg) -> None:
    """A coordinator narrowing in on single patches with query after query gets one answer."""
    from client.app import HISTOGRAMS_SENT
    from client.app import refine as refine_handler
    from common.paths import SitePaths

    _, arrays, context = _site_context(cfg)
    refine_handler(_query(arrays, [0.3, 0.7]), context)
    with pytest.raises(ValueError, match="one threshold refinement a run and answered run 7"):
        refine_handler(_query(arrays, [0.4, 0.42]), context)
    # the second query is on record as received, and nothing more left the site
    asked = [e["details"]["range"] for e in _audit(cfg, "message.received")]
    assert asked == [[0.3, 0.7], [0.4, 0.42]]
    assert len(_audit(cfg, HISTOGRAMS_SENT)) == 1
    # another run gets its own answer
    refine_handler(_query(arrays, [0.4, 0.42], run_id=8), context)
    assert len(_audit(cfg, HISTOGRAMS_SENT)) == 2
    assert sorted(json.loads(SitePaths(cfg.state_dir).refinements.read_text())) == ["7", "8"]
    # a record the site cannot read refuses (fail closed)
    SitePaths(cfg.state_dir).refinements.write_text("[")
    with pytest.raises(ValueError, match="refinements.json is not valid JSON"):
        refine_handler(_query(arrays, [0.3, 0.7], run_id=9), context)
    SitePaths(cfg.state_dir).refinements.write_text('{"7": null}')  # no longer says run 7 asked
    with pytest.raises(ValueError, match="refinements.json is not a record of refinements"):
        refine_handler(_query(arrays, [0.3, 0.7], run_id=7), context)
    assert len(_audit(cfg, HISTOGRAMS_SENT)) == 2


def _evaluation(arrays: dict, run_id: int = 7) -> Message:
    packed, layout = pack(arrays)
    config = ConfigRecord({protocol.SERVER_ROUND: 1})
    content = RecordDict(
        {protocol.ARRAYS: packed, protocol.LAYOUT: layout, protocol.CONFIG: config}
    )
    meta = Metadata(run_id, "m1", 0, 1, "", "", time.time(), 600.0, "evaluate", 1, 2)
    return Message(content, metadata=meta)


def test_a_site_answers_at_most_its_cap_of_evaluations_a_run(cfg) -> None:
    """Crafted model after crafted model gets the site's cap of answers, whatever the run asks."""
    from client.app import evaluate as evaluate_handler
    from common.paths import SitePaths

    run, arrays, _ = _site_context(cfg)
    node = node_config_of(cfg, **{"max-evaluations": 2})
    context = Context(7, 1, node, RecordDict(), run.to_run_config())
    for _ in range(2):
        reply = evaluate_handler(_evaluation(arrays), context)
        assert reply.content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES] > 0
    with pytest.raises(ValueError, match="at most 2 evaluations a run .* answered 2 of run 7"):
        evaluate_handler(_evaluation(arrays), context)
    # the third is on record as received, and nothing more left the site
    received = [e for e in _audit(cfg, "message.received") if e["details"]["action"] == "evaluate"]
    assert len(received) == 3 and len(_audit(cfg, "metrics.sent")) == 2
    # another run gets its own count
    evaluate_handler(_evaluation(arrays, run_id=8), context)
    assert json.loads(SitePaths(cfg.state_dir).evaluations.read_text()) == {"7": 2, "8": 1}
    # a record the site cannot read refuses (fail closed)
    SitePaths(cfg.state_dir).evaluations.write_text('{"9": "many"}')
    with pytest.raises(ValueError, match="evaluations.json is not a record of evaluations"):
        evaluate_handler(_evaluation(arrays, run_id=9), context)
    assert len(_audit(cfg, "metrics.sent")) == 3
