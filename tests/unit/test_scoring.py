"""Test scores at 0.5 and at the threshold chosen on validation patients, never on the test's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.metrics import (
    AUC_PER_PATIENT,
    BAC_PER_PATIENT,
    BALANCED_ACCURACY,
    PER_PATIENT,
    score,
)
from common.patch_types import PatchSet
from common.threshold import BINS, VALIDATION_BAC, best_edge, best_exact, histograms
from simulation.scoring import (
    AT_CHOSEN,
    both,
    federated_choice,
    metrics,
    on_validation,
    probabilities,
)

# Grey patches whose brightness is the model's evidence: validation separates at 115,
# the test's negatives sit at 117-120, above the validation's cut.
VAL_NEG, VAL_POS = (80, 90, 100), (115, 125, 135)
TEST_NEG, TEST_POS = (117, 120), (140, 150)


class Brightness(torch.nn.Module):
    """P(IDC) rises with a patch's mean brightness: a real module, known probabilities."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 20 * (x.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(z), z], 1)


def grey_patches() -> tuple[PatchSet, np.ndarray, np.ndarray]:
    """The patches, validation indices, test indices."""
    values = [*VAL_NEG, *VAL_POS, *TEST_NEG, *TEST_POS]
    labels = [0] * 3 + [1] * 3 + [0] * 2 + [1] * 2
    images = np.stack([np.full((50, 50, 3), v, np.uint8) for v in values])
    n = len(values)
    patches = PatchSet(
        images=images,
        labels=np.array(labels, np.int64),
        patients=np.array([f"p{i}" for i in range(n)]),
        xs=np.zeros(n, np.int64),
        ys=np.zeros(n, np.int64),
        files=[f"p{i}.png" for i in range(n)],
        report=None,  # no folder behind these patches
        fingerprint="grey",
    )
    return patches, np.arange(6), np.arange(6, n)


def test_the_threshold_comes_from_validation_not_from_the_test() -> None:
    patches, val, test = grey_patches()
    model = Brightness()
    choice = on_validation(model, patches, val, "the grey validation")
    labels, probs, _ = probabilities(model, patches, val)
    assert choice.threshold == pytest.approx(probs[3])  # the dimmest validation positive
    assert choice.balanced_accuracy == 1.0 and "6 patches, the grey validation" in choice.source

    res = metrics(model, patches, test, choice)
    at = res[AT_CHOSEN]
    t_labels, t_probs, _ = probabilities(model, patches, test)
    on_test = best_exact(t_labels, t_probs)
    assert on_test is not None and on_test[1] == 1.0  # choosing on the test would claim 1.0
    assert at["threshold"] == choice.threshold != on_test[0]
    assert at[BALANCED_ACCURACY] == 0.5  # every test negative is above the validation's cut
    assert res[BALANCED_ACCURACY] == 1.0  # and 0.5 happens to separate the test
    assert at["threshold_source"] == choice.source


def test_both_keeps_the_numbers_at_half_and_adds_the_chosen_ones() -> None:
    labels = np.array([0, 0, 1, 1, 0])
    probs = np.array([0.1, 0.3, 0.35, 0.9, 0.4])
    patches, val, _ = grey_patches()
    choice = on_validation(Brightness(), patches, val, "v")
    out = both((labels, probs, 0.25), choice)
    assert {k: v for k, v in out.items() if k != AT_CHOSEN} == score(labels, probs, 0.25).as_dict()
    at_t = score(labels, probs, 0.25, choice.threshold).as_dict()
    assert out[AT_CHOSEN][BALANCED_ACCURACY] == at_t[BALANCED_ACCURACY]
    assert out[AT_CHOSEN]["confusion"] == at_t["confusion"]
    assert AT_CHOSEN not in both((labels, probs, 0.25), None)


def test_per_patient_metrics_weigh_every_patient_the_same() -> None:
    # patient "big": 6 non-IDC patches scored high (wrong at 0.5); "a", "b": right
    labels = np.array([0] * 6 + [1, 1, 0])
    probs = np.array([0.9] * 6 + [0.8, 0.7, 0.1])
    patients = np.array(["big"] * 6 + ["a", "a", "b"])
    patches, val, _ = grey_patches()
    choice = on_validation(Brightness(), patches, val, "v")
    out = both((labels, probs, 0.25), choice, patients)
    assert out[BALANCED_ACCURACY] == pytest.approx((1 / 7 + 1) / 2)  # per patch
    assert out[BAC_PER_PATIENT] == pytest.approx((1 / 2 + 1) / 2)  # "big" is one of 2 negatives
    assert out[AUC_PER_PATIENT] == pytest.approx(0.5)
    at = score(labels, probs, 0.25, choice.threshold)
    assert out[AT_CHOSEN][BALANCED_ACCURACY] == at.balanced_accuracy
    assert set(PER_PATIENT) <= set(out[AT_CHOSEN])
    assert not set(PER_PATIENT) & set(both((labels, probs, 0.25), choice))  # needs patients


def _rounds(pos: list[int], neg: list[int]) -> list[dict]:
    return [{"round": 1}, {"round": 2, "validation": {"positives": pos, "negatives": neg}}]


def test_a_federated_run_uses_the_coordinators_threshold_when_its_histograms_resolve() -> None:
    patches, val, _ = grey_patches()
    labels, probs, _ = probabilities(Brightness(), patches, val)
    pos, neg = histograms(labels, probs)
    record = {"threshold": 0.3, "threshold_source": "validation: 6 patches, 2 sites, round 2"}
    choice = federated_choice(record, _rounds(pos, neg), Brightness(), patches, val)
    assert choice.threshold == 0.3 and choice.balanced_accuracy is None  # not the best edge
    edge, bacc = best_edge(pos, neg) or (0.0, 0.0)
    record = {**record, "threshold": edge}
    assert (
        federated_choice(record, _rounds(pos, neg), Brightness(), patches, val).balanced_accuracy
        == bacc
    )
    assert choice.source == (
        "coordinator, summed validation histograms: validation: 6 patches, 2 sites, round 2"
    )


@pytest.mark.parametrize("record", [{"threshold": 0.5, "threshold_source": "x"}, None, {}])
def test_unresolved_or_missing_coordinator_choice_falls_back_to_exact_validation(
    record: dict | None,
) -> None:
    patches, val, _ = grey_patches()
    one_bin = [0] * BINS
    one_bin[14] = 6  # every validation patch in one bin: the histograms see one value
    choice = federated_choice(record, _rounds(one_bin, one_bin), Brightness(), patches, val)
    labels, probs, _ = probabilities(Brightness(), patches, val)
    assert choice.threshold == pytest.approx(probs[3]) and choice.balanced_accuracy == 1.0
    assert "pooled validation" in choice.source and "could not resolve" in choice.source


def test_no_validation_patches_keep_the_default_and_say_so() -> None:
    patches, _, _ = grey_patches()
    choice = on_validation(Brightness(), patches, np.arange(0), "site-b")
    assert choice.threshold == 0.5 and "no validation patches" in choice.source


def test_a_threshold_the_coordinator_refined_counts_though_the_last_round_could_not_resolve():
    patches, val, _ = grey_patches()
    one_bin = [0] * BINS
    one_bin[14] = 6  # the last round saw one bin; the refinement zoomed into it and chose
    record = {
        "threshold": 0.2913,
        "threshold_source": "validation: 12 patches, 2 sites, round 2, refined on [0.28, 0.3]",
        VALIDATION_BAC: 0.75,
    }
    choice = federated_choice(record, _rounds(one_bin, one_bin), Brightness(), patches, val)
    assert (choice.threshold, choice.balanced_accuracy) == (0.2913, 0.75)
    assert choice.source.endswith("refined on [0.28, 0.3]")
