"""The decision threshold chosen on summed validation histograms, and how it travels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import protocol
from common.metrics import patient_weights
from common.protocol import EvalMetrics, RoundRow
from common.threshold import (
    BINS,
    VALIDATION_BAC,
    best_edge,
    best_exact,
    choose,
    choose_exact,
    histograms,
    resolves,
)
from server.coordinator import decision_threshold


def pooled_bacc(labels: np.ndarray, probs: np.ndarray, t: float) -> float:
    """Balanced accuracy of ``p >= t`` straight from the patches (the oracle)."""
    pred = probs >= t
    return float((pred[labels == 1].mean() + (~pred[labels == 0]).mean()) / 2)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), sites=st.integers(1, 4))
def test_summed_histograms_choose_the_best_edge_of_the_pooled_patches(
    seed: int, sites: int
) -> None:
    rng = np.random.default_rng(seed)
    labels, probs = [], []
    pos, neg = np.zeros(BINS, int), np.zeros(BINS, int)
    for _ in range(sites):  # unequal sites, each shifted differently
        n = int(rng.integers(5, 80))
        y = rng.integers(0, 2, n)
        p = np.clip(rng.normal(0.3 + 0.3 * y + rng.normal(0, 0.1), 0.2), 0, 1)
        a, b = histograms(y, p)
        pos, neg = pos + a, neg + b
        labels.append(y)
        probs.append(p)
    y, p = np.concatenate(labels), np.concatenate(probs)
    found = best_edge(pos.tolist(), neg.tolist())
    if y.min() == y.max():
        assert found is None
        return
    assert found is not None
    edge, bacc = found
    assert bacc == pytest.approx(pooled_bacc(y, p, edge))
    for k in range(1, BINS):
        assert pooled_bacc(y, p, k / BINS) <= bacc + 1e-9


def test_known_answer_and_ties_go_to_the_default() -> None:
    pos, neg = [0] * BINS, [0] * BINS
    pos[40], neg[10] = 3, 7  # separable: every edge from 11/50 to 40/50 is perfect
    edge, bacc = best_edge(pos, neg) or (0.0, 0.0)
    assert bacc == 1.0 and edge == 0.5
    pos[30] = 1  # one positive at 0.6-0.62: now only edges up to 30/50 are perfect
    pos[29] = 0
    neg[35] = 1  # one negative at 0.70: edges 36/50..40/50 would miss it, 11..30 keep it
    assert best_edge(pos, neg) == (0.5, pytest.approx((1 + 7 / 8) / 2))


def test_one_class_or_no_histograms_keep_the_default_and_say_why() -> None:
    one = choose([0] * BINS, [1] * BINS, 2, 3)
    assert one.threshold == 0.5 and "one class" in one.source and "round 3" in one.source
    old = choose(None, None, 0, 3)
    assert old.threshold == 0.5 and "older idc-fl" in old.source
    # seen on real patches (DP-SGD, paper network): all 2,101 validation patches in bin 0
    pos, neg = [0] * BINS, [0] * BINS
    pos[0], neg[0] = 700, 1401
    blind = choose(pos, neg, 5, 2)
    assert blind.threshold == 0.5 and blind.balanced_accuracy is None
    assert "every patch in one bin" in blind.source and not blind.source.startswith("validation")


def test_source_names_patches_sites_and_round() -> None:
    pos, neg = [0] * BINS, [0] * BINS
    pos[45], neg[5] = 4, 6
    choice = choose(pos, neg, 2, 7)
    assert choice.source == "validation: 10 patches, 2 sites, round 7"
    assert choice.record() == {
        "threshold": choice.threshold,
        "threshold_source": choice.source,
        VALIDATION_BAC: 1.0,  # what the threshold gives on those validation patches
    }


def _eval(pos: list[int] | None, neg: list[int] | None) -> EvalMetrics:
    hist = {} if pos is None else {"val_positives": tuple(pos), "val_negatives": tuple(neg or [])}
    return EvalMetrics(10, 0.5, 0.8, 0.75, 0.7, math.nan, **hist)


def test_histograms_travel_and_are_strict() -> None:
    sent = _eval([1] * BINS, [2] * BINS)
    record = sent.to_record()
    assert record[protocol.VAL_POSITIVES] == [1] * BINS
    assert EvalMetrics.from_record(record) == sent
    assert protocol.VAL_POSITIVES not in sent.scalars()
    bad = [
        ({**record, protocol.VAL_POSITIVES: [1] * (BINS - 1)}, "50 counts"),
        ({**record, protocol.VAL_NEGATIVES: [-1] + [0] * (BINS - 1)}, "whole counts"),
        ({**record, protocol.VAL_NEGATIVES: [0.5] * BINS}, "whole counts"),
        ({**record, protocol.VAL_NEGATIVES: 3.0}, "must be a list"),
        ({k: v for k, v in record.items() if k != protocol.VAL_NEGATIVES}, "without its pair"),
    ]
    for rec, why in bad:
        with pytest.raises(ValueError, match=why):
            EvalMetrics.from_record(rec)


def test_an_old_site_without_histograms_is_read_and_gives_the_default() -> None:
    old = EvalMetrics.from_record(_eval(None, None).to_record())
    assert old.val_positives is None
    row = RoundRow(2)
    row.add_validation("old-site", old)
    assert decision_threshold([row.to_row()], 2).source.startswith("default 0.5")


def test_the_final_round_sums_its_sites() -> None:
    row = RoundRow(2)
    a, b = [0] * BINS, [0] * BINS
    a[40], b[10] = 3, 5
    row.add_validation("st-mary", _eval(a, b))
    row.add_validation("st-john", _eval(a, b))
    earlier = RoundRow(1)
    choice = decision_threshold([earlier.to_row(), row.to_row()], 2)
    assert choice.source == "validation: 16 patches, 2 sites, round 2"
    assert 10 / BINS < choice.threshold <= 40 / BINS


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 60))
def test_the_exact_choice_is_the_best_threshold_on_the_patches(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.round(rng.random(n), 2)  # rounded: ties between patches happen
    found = best_exact(y, p)
    if y.min() == y.max():
        assert found is None
        return
    assert found is not None
    t, bacc = found
    assert bacc == pytest.approx(pooled_bacc(y, p, t))  # exactly what t gives
    for cand in np.linspace(0, 1, 201):  # no threshold, on the grid or between, does better
        assert pooled_bacc(y, p, cand) <= bacc + 1e-9


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 40))
def test_a_weight_of_k_counts_as_k_copies_of_the_patch(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 2, n), np.round(rng.random(n), 1)
    k = rng.integers(1, 5, n)
    assert best_exact(y, p, k.astype(float)) == best_exact(np.repeat(y, k), np.repeat(p, k))


def test_patient_weights_keep_one_large_patient_from_choosing() -> None:
    # one patient of 90 non-IDC patches scored high, against ten patients of one each
    y = np.array([0] * 90 + [0] * 5 + [1] * 5)
    p = np.array([0.7] * 90 + [0.1, 0.2, 0.2, 0.3, 0.3] + [0.6, 0.6, 0.8, 0.9, 0.9])
    patients = np.array(["big"] * 90 + [f"p{i}" for i in range(10)])
    by_patch = best_exact(y, p)
    by_patient = best_exact(y, p, patient_weights(patients))
    assert by_patch is not None and by_patient is not None
    assert by_patch == (0.8, pytest.approx((3 / 5 + 1) / 2))  # set by the large patient
    assert by_patient == (0.6, pytest.approx((1 + 5 / 6) / 2))  # finds every IDC patient


def nearly_constant(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """P(IDC) of a short DP run: all near the prior 0.29, ranked well (AUC about 0.8)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.29).astype(np.int64)
    return y, 0.2901 + 0.0008 * np.clip(rng.normal(0.4 + 0.3 * y, 0.2), 0, 1)


def test_nearly_constant_probabilities_defeat_the_histograms_not_the_exact_choice() -> None:
    y, p = nearly_constant()
    pos, neg = histograms(y, p)
    assert np.count_nonzero(np.add(pos, neg)) == 1 and not resolves(pos, neg)
    edge, hist_bacc = best_edge(pos, neg) or (0.0, 0.0)
    assert (edge, hist_bacc) == (0.5, 0.5)  # every patch called negative: chance
    choice = choose_exact(y, p, "site-a's validation")
    assert 0.29 < choice.threshold < 0.291 and choice.balanced_accuracy is not None
    assert choice.balanced_accuracy > 0.7 and pooled_bacc(y, p, choice.threshold) > 0.7
    assert choice.source == "validation, exact: 400 patches, site-a's validation"


def test_resolves_needs_both_classes_and_two_bins() -> None:
    pos, neg = [0] * BINS, [0] * BINS
    pos[14], neg[14] = 5, 9
    assert not resolves(pos, neg)
    neg[13] = 1
    assert resolves(pos, neg)
    assert not resolves([0] * BINS, neg)


def test_one_class_exact_keeps_the_default_and_says_why() -> None:
    choice = choose_exact(np.ones(5, np.int64), np.linspace(0.1, 0.9, 5), "site-a")
    assert choice.threshold == 0.5 and "one class" in choice.source and "site-a" in choice.source
