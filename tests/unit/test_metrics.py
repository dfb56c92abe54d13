import math

import numpy as np
import pytest

from common import metrics as M


def test_metrics_against_hand_computed_values():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 0])
    p = np.array([0.1, 0.6, 0.2, 0.3, 0.9, 0.4, 0.8, 0.7, 0.55, 0.05])
    m = M.classification_metrics(y, p)
    # predictions: 0 1 0 0 1 0 1 1 1 0 -> tn=4, fp=2, fn=1, tp=3
    assert m[M.CONFUSION] == [[4, 2], [1, 3]]
    assert m[M.ACCURACY] == pytest.approx(0.7)
    assert m[M.BALANCED_ACCURACY] == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert m[M.PRECISION] == pytest.approx(3 / 5)
    assert m[M.RECALL] == pytest.approx(3 / 4)
    assert m[M.F1] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    # AUC by counting pairs: positive scores 0.9,0.4,0.8,0.55 vs 6 negatives
    neg = p[y == 0]
    pairs = sum((s > n) + 0.5 * (s == n) for s in p[y == 1] for n in neg)
    assert m[M.AUC] == pytest.approx(pairs / 24)


def test_auc_counts_ties_half():
    assert M.roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert M.roc_auc(np.array([0, 0, 1]), np.array([0.2, 0.5, 0.5])) == pytest.approx(0.75)


def test_single_class_edge_case():
    m = M.classification_metrics(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.7]))
    assert m[M.CONFUSION] == [[0, 0], [1, 2]]
    assert m[M.BALANCED_ACCURACY] == pytest.approx(2 / 3)
    assert m[M.PRECISION] == 1.0
    assert math.isnan(m[M.AUC])
    assert M.json_safe(m)[M.AUC] is None
    neg = M.classification_metrics(np.array([0, 0]), np.array([0.1, 0.2]))
    assert neg[M.PRECISION] == 0.0 and neg[M.F1] == 0.0 and neg[M.ACCURACY] == 1.0


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match="zero"):
        M.classification_metrics(np.array([]), np.array([]))
