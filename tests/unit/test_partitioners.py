"""Patient-level partitioners: disjoint, complete, seeded; label skew follows alpha."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulation.partitioners import (
    MIN_PATIENTS,
    PatientTable,
    iid,
    label_skew,
    partition,
    site_positive_shares,
    site_shift,
    size_skew,
)


def _table(n: int, seed: int) -> PatientTable:
    rng = np.random.default_rng(seed)
    ids = np.array([str(10000 + i) for i in range(n)])
    return PatientTable(ids, rng.integers(5, 300, n), rng.uniform(0.0, 1.0, n))


def _assert_partition(parts, ids, sites):
    assert len(parts) == sites
    flat = np.concatenate(parts).tolist()
    assert len(flat) == len(set(flat))  # no patient in two sites
    assert sorted(flat) == sorted(np.asarray(ids).tolist())  # every patient somewhere
    assert min(len(p) for p in parts) >= MIN_PATIENTS


problems = st.integers(1, 12).flatmap(
    lambda k: st.tuples(st.just(k), st.integers(k * MIN_PATIENTS, k * MIN_PATIENTS + 150))
)
KINDS = ("iid", "label-skew", "size-skew")


@settings(max_examples=60, deadline=None)
@given(
    problem=problems,
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(KINDS),
    alpha=st.sampled_from([0.05, 0.5, 100.0]),
    exponent=st.sampled_from([0.0, 1.0, 3.0]),
)
def test_disjoint_complete_and_seeded(problem, seed, kind, alpha, exponent):
    sites, n = problem
    table = _table(n, seed)
    a = partition(kind, table, sites, seed, alpha=alpha, exponent=exponent)
    _assert_partition(a, table.ids, sites)
    b = partition(kind, table, sites, seed, alpha=alpha, exponent=exponent)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_sizes_differ_by_at_most_one_and_seed_matters():
    ids = [str(i) for i in range(50)]
    parts = iid(ids, 7, seed=1)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert any(not np.array_equal(x, y) for x, y in zip(parts, iid(ids, 7, seed=2), strict=True))


@settings(max_examples=15, deadline=None)
@given(base=st.integers(0, 2**16))
def test_label_skew_spread_grows_as_alpha_shrinks(base):
    table = _table(240, base)
    spreads = {}
    for alpha in (100.0, 1.0, 0.1):
        per_seed = [
            site_positive_shares(
                label_skew(table.ids, table.positive_share, 4, alpha, seed=base + s), table
            ).std()
            for s in range(8)
        ]
        spreads[alpha] = float(np.mean(per_seed))
    assert spreads[100.0] < spreads[1.0] < spreads[0.1], spreads


def test_size_skew_follows_the_power_law():
    table = _table(400, 0)
    even = sorted(len(p) for p in size_skew(table.ids, 5, exponent=0.0, seed=3))
    assert even[-1] - even[0] <= 1
    skewed = sorted((len(p) for p in size_skew(table.ids, 5, exponent=1.5, seed=3)), reverse=True)
    assert skewed[0] > 3 * skewed[-1]
    # largest / second largest follows the rank law: (1/1) / (1/2)**1.5 = 2.83 before the floor
    assert 2.3 < (skewed[0] - MIN_PATIENTS) / (skewed[1] - MIN_PATIENTS) < 3.3


def test_site_shift_follows_synth_sites_and_checks_them():
    ids = [str(20000 + i) for i in range(12)]
    site_of = {p: i % 3 for i, p in enumerate(ids)}
    parts = site_shift(ids, site_of, 3)
    _assert_partition(parts, ids, 3)
    for k, part in enumerate(parts):
        assert {site_of[p] for p in part.tolist()} == {k}
    with pytest.raises(ValueError, match="--sites must be 3"):
        site_shift(ids, site_of, 4)
    with pytest.raises(ValueError, match="no stain site"):
        site_shift([*ids, "99"], site_of, 3)


def test_bad_arguments_name_the_value():
    table = _table(10, 0)
    with pytest.raises(ValueError, match="cannot fill 4 sites"):
        iid(table.ids, 4)
    with pytest.raises(ValueError, match="alpha"):
        label_skew(table.ids, table.positive_share, 2, alpha=0.0)
    with pytest.raises(ValueError, match="partition must be one of"):
        partition("random", table, 2)
    with pytest.raises(ValueError, match="site_of"):
        partition("site-shift", table, 2)


def test_patient_table_from_patches():
    t = PatientTable.from_patches(["b", "a", "b", "b"], [1, 0, 0, 1])
    assert t.ids.tolist() == ["a", "b"]
    assert t.patches.tolist() == [1, 3]
    assert np.allclose(t.positive_share, [0.0, 2 / 3])
