"""The one accounting module (common/accounting.py): Opacus's schedule and numbers, pure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from common.accounting import (
    check_cap,
    epsilon,
    loader_batches,
    noise_for_target,
    schedule,
    steps_per_epoch_at_rate,
)
from common.privacy import DPConfig, RoundPlan, plan_round
from simulation.budget import plan_steps


def test_opacus_known_answer():
    # Opacus's own known answer: sigma 1.5, q 0.04 (batch 256 of 6400), 2250 steps.
    assert round(epsilon([(1.5, 0.04, 2250)], 1e-5), 2) == 7.33
    assert schedule(loader_batches(6400, 256)) == (0.04, 25)


@settings(max_examples=25, deadline=None)
@given(patches=st.integers(1, 5000), batch=st.integers(1, 300))
def test_schedule_is_what_opacus_builds_from_the_loader(patches: int, batch: int):
    loader = DataLoader(TensorDataset(torch.zeros(patches)), batch_size=batch)
    assert len(loader) == loader_batches(patches, batch)
    poisson = DPDataLoader.from_data_loader(loader)
    rate, per_epoch = schedule(len(loader))
    assert per_epoch == len(poisson)  # the steps Opacus takes per epoch
    assert rate == 1 / len(poisson)  # the rate PrivacyEngine hands its accountant


def test_one_definition_of_steps_per_epoch_for_the_site_and_the_planners():
    dp = DPConfig(noise_multiplier=1.0, epsilon_per_round=None, max_grad_norm=1.0, delta=1e-5)
    for batches in (1, 25, 49, 93, 1000):
        rate, per_epoch = schedule(batches)
        assert plan_round(dp, range(batches), 3) == RoundPlan(1.0, rate, 3 * per_epoch)
        assert plan_steps(rate, rounds=1, local_epochs=3) == 3 * per_epoch  # what budget plans
    assert schedule(93) == (1 / 92, 92)  # int(1/(1/93)): Opacus accounts 1/92, conservative
    assert steps_per_epoch_at_rate(0.3) == 4  # a bare rate: never fewer steps than Opacus


def test_epsilon_of_a_history_equals_a_stepped_accountant_and_check_cap_adds_the_round():
    acc = RDPAccountant()
    for noise, rate, steps in ((1.1, 0.25, 8), (0.9, 0.1, 20)):
        for _ in range(steps):
            acc.step(noise_multiplier=noise, sample_rate=rate)
    both = epsilon([(1.1, 0.25, 8), (0.9, 0.1, 20)], 1e-5)
    assert both == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert check_cap([(1.1, 0.25, 8)], (0.9, 0.1, 20), both, 1e-5) == both
    noise = noise_for_target(3.0, 1e-5, 0.04, 100)
    assert 2.98 <= epsilon([(noise, 0.04, 100)], 1e-5) <= 3.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: epsilon([(1.0, 0.1, 1)], 1.0), "delta"),
        (lambda: epsilon([(1.0, 0.1, 1)], 1e-5, "gdp"), "accountant"),  # type: ignore[arg-type]
        (lambda: schedule(0), "batches"),
        (lambda: loader_batches(10, 0), "batch_size"),
        (lambda: noise_for_target(0.0, 1e-5, 0.1, 10), "target_epsilon"),
        (lambda: check_cap([], (1.0, 0.1, 1), float("inf"), 1e-5), "max_epsilon"),
    ],
)
def test_bad_inputs_name_themselves(call, match: str):  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        call()


def test_the_simulation_noise_keeps_every_site_within_its_total_under_the_sites_schedule():
    from types import SimpleNamespace

    from simulation.plan import DPSpec, SimPlan, noise_for_plan

    plan = SimPlan(data=Path("unused"), sites=2, rounds=3, local_epochs=2, batch_size=64)
    sites = [SimpleNamespace(split=SimpleNamespace(train=range(n))) for n in (5900, 12000)]
    noise = noise_for_plan(plan, sites, DPSpec(epsilon=4.0))  # type: ignore[arg-type]
    totals = []
    for site in sites:
        rate, per_epoch = schedule(loader_batches(len(site.split.train), 64))
        totals.append(epsilon([(noise, rate, 3 * 2 * per_epoch)], 1e-5))
    assert max(totals) <= 4.0 and max(totals) >= 4.0 - 0.02  # the smaller site binds
