import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.partition import balance, split_by_patient, split_random

patients_st = st.lists(st.integers(0, 40), min_size=3, max_size=400).map(
    lambda xs: np.array([str(x) for x in xs])
)


def _labels(patients: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, len(patients))


def _cohort(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Patients as the real ones come: 10-400 patches, 40% without IDC, the rest 5-95% IDC."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(4.0, 0.8, 200).astype(int), 10, 400)
    share = np.where(rng.random(200) < 0.4, 0.0, rng.uniform(0.05, 0.95, 200))
    patients = np.repeat([f"p{i}" for i in range(200)], sizes)
    labels = (rng.random(len(patients)) < np.repeat(share, sizes)).astype(np.int64)
    return patients, labels


@settings(max_examples=60, deadline=None)
@given(patients=patients_st, seed=st.integers(0, 2**16))
def test_patient_split_never_shares_a_patient_and_covers_everything(patients, seed):
    s = split_by_patient(patients, _labels(patients, seed), (0.6, 0.1, 0.3), seed)
    parts = [set(patients[idx]) for idx in (s.train, s.val, s.test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    all_idx = np.concatenate([s.train, s.val, s.test])
    assert sorted(all_idx.tolist()) == list(range(len(patients)))
    if len(set(patients.tolist())) >= 3:
        assert len(s.train) and len(s.val) and len(s.test)


@settings(max_examples=30, deadline=None)
@given(patients=patients_st, seed=st.integers(0, 2**16))
def test_same_seed_same_split(patients, seed):
    labels = _labels(patients, seed)
    a, b = (split_by_patient(patients, labels, seed=seed) for _ in range(2))
    for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test), strict=True):
        assert np.array_equal(x, y)


def test_patient_split_aims_at_fractions():
    patients = np.repeat([str(i) for i in range(100)], 20)
    s = split_by_patient(patients, np.zeros(2000, dtype=np.int64), (0.6, 0.1, 0.3), seed=1)
    assert abs(len(s.train) / 2000 - 0.6) < 0.03
    assert abs(len(s.test) / 2000 - 0.3) < 0.03


@pytest.mark.parametrize("seed", range(8))
def test_patient_split_keeps_each_part_as_idc_rich_as_the_cohort(seed):
    # unstratified, these cohorts' 10% validation parts held 19-40% IDC (28-34% overall)
    patients, labels = _cohort(seed)
    s = split_by_patient(patients, labels, (0.6, 0.1, 0.3), seed)
    for idx, fraction in zip((s.train, s.val, s.test), (0.6, 0.1, 0.3), strict=True):
        assert abs(labels[idx].mean() - labels.mean()) < 0.02
        assert abs(len(idx) / len(labels) - fraction) < 0.02
        assert abs(len(set(patients[idx])) / 200 - fraction) < 0.02


def test_patient_split_differs_by_seed():
    patients, labels = _cohort(0)
    a, b = (split_by_patient(patients, labels, seed=seed) for seed in (0, 1))
    assert not np.array_equal(a.val, b.val)


def test_labels_must_match_patients():
    with pytest.raises(ValueError, match="labels"):
        split_by_patient(np.array(["1", "2", "3"]), np.array([0, 1]))


def test_random_split_is_seeded_partition():
    s = split_random(1000, (0.7, 0.0, 0.3), seed=3)
    assert len(s.train) == 700 and len(s.val) == 0 and len(s.test) == 300
    assert sorted(np.concatenate([s.train, s.test]).tolist()) == list(range(1000))
    assert np.array_equal(s.test, split_random(1000, (0.7, 0.0, 0.3), seed=3).test)


def test_balance_undersamples_majority():
    labels = np.array([0] * 70 + [1] * 30)
    keep = balance(np.arange(100), labels, seed=0)
    assert (labels[keep] == 0).sum() == 30 and (labels[keep] == 1).sum() == 30


@pytest.mark.parametrize("bad", [(0.5, 0.5, 0.5), (0.0, 0.5, 0.5), (0.7, -0.1, 0.4)])
def test_bad_fractions_are_refused(bad):
    with pytest.raises(ValueError, match="fractions"):
        split_by_patient(np.array(["1", "2"]), np.array([0, 1]), bad)
