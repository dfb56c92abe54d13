import math

import numpy as np
import pytest

from common.metrics import AUC, json_safe, patient_weights, roc_auc, score


def test_metrics_against_hand_computed_values():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 0])
    p = np.array([0.1, 0.6, 0.2, 0.3, 0.9, 0.4, 0.8, 0.7, 0.55, 0.05])
    m = score(y, p, loss=0.25)
    # predictions: 0 1 0 0 1 0 1 1 1 0 -> tn=4, fp=2, fn=1, tp=3
    assert m.confusion == [[4, 2], [1, 3]]
    assert m.examples == 10 and m.loss == 0.25
    assert m.accuracy == pytest.approx(0.7)
    assert m.balanced_accuracy == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert m.precision == pytest.approx(3 / 5)
    assert m.recall == pytest.approx(3 / 4)
    assert m.f1 == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    # AUC by counting pairs: positive scores 0.9,0.4,0.8,0.55 vs 6 negatives
    neg = p[y == 0]
    pairs = sum((s > n) + 0.5 * (s == n) for s in p[y == 1] for n in neg)
    assert m.auc == pytest.approx(pairs / 24)


def test_auc_counts_ties_half():
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([0, 0, 1]), np.array([0.2, 0.5, 0.5])) == pytest.approx(0.75)


def test_weighted_auc_counts_a_weight_of_k_as_k_copies():
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 2, 40), np.round(rng.random(40), 1)  # ties across classes
    k = rng.integers(1, 6, 40)
    weighted = roc_auc(y, p, k.astype(float))
    assert weighted == pytest.approx(roc_auc(np.repeat(y, k), np.repeat(p, k)))
    assert weighted != pytest.approx(roc_auc(y, p))  # the weights did something


def test_patient_weights_make_every_patient_weigh_one():
    patients = np.array(["a"] * 6 + ["b"] * 2 + ["c"])
    w = patient_weights(patients)
    assert w.tolist() == pytest.approx([1 / 6] * 6 + [0.5] * 2 + [1.0])
    # a large patient ranked wrongly decides the plain AUC but not the patient-weighted one
    y = np.array([0] * 6 + [1] * 2 + [0])
    p = np.array([0.9] * 6 + [0.8, 0.8] + [0.1])
    assert roc_auc(y, p) == pytest.approx(1 / 7)
    assert roc_auc(y, p, w) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="weights"):
        roc_auc(y, p, w[:3])


def test_single_class_edge_case():
    m = score(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.7]), loss=0.0)
    assert m.confusion == [[0, 0], [1, 2]]
    assert m.balanced_accuracy == pytest.approx(2 / 3)
    assert m.precision == 1.0
    assert math.isnan(m.auc)
    assert json_safe(m.as_dict())[AUC] is None
    neg = score(np.array([0, 0]), np.array([0.1, 0.2]), loss=0.0)
    assert neg.precision == 0.0 and neg.f1 == 0.0 and neg.accuracy == 1.0


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match="zero"):
        score(np.array([]), np.array([]), loss=0.0)
