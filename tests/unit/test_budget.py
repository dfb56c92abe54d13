"""Offline privacy-budget maths and the ``idc-sim budget`` command (simulation/budget.py)."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from common.privacy import PRIVACY_UNIT
from simulation.budget import (
    add_budget_arguments,
    epsilon_for_plan,
    noise_for_epsilon,
    plan_steps,
    run_budget,
)


def test_opacus_known_answer():
    # Opacus's own known answer: sigma 1.5, q 0.04 (batch 256 of 6400), 2250 steps.
    assert round(epsilon_for_plan(1.5, 0.04, steps=2250, delta=1e-5), 2) == 7.33


def test_rounds_times_epochs_is_the_same_plan_as_steps():
    assert plan_steps(0.04, rounds=30, local_epochs=3) == 2250
    assert epsilon_for_plan(1.5, 0.04, rounds=30, local_epochs=3) == epsilon_for_plan(
        1.5, 0.04, steps=2250
    )
    assert plan_steps(1 / 49, rounds=1, local_epochs=1) == 49  # 1/(1/49) is just above 49
    assert plan_steps(0.3, rounds=2, local_epochs=1) == 8  # ceil(3.33) batches per epoch


def test_plan_equals_a_stepped_opacus_accountant():
    acc = RDPAccountant()
    for _ in range(3 * 2 * 25):
        acc.step(noise_multiplier=1.2, sample_rate=0.04)
    ours = epsilon_for_plan(1.2, 0.04, rounds=3, local_epochs=2, delta=1e-6)
    assert ours == pytest.approx(acc.get_epsilon(1e-6), rel=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {"steps": 10, "rounds": 1, "local_epochs": 1},
        {},
        {"rounds": 3},
        {"rounds": 0, "local_epochs": 1},
        {"steps": 0},
    ],
)
def test_a_plan_needs_steps_or_rounds_and_epochs(kw: dict[str, int]):
    with pytest.raises(ValueError, match="steps|rounds"):
        plan_steps(0.04, **kw)


@settings(max_examples=12, deadline=None)
@given(
    target=st.floats(0.5, 10.0),
    q=st.floats(0.005, 0.2),
    steps=st.integers(50, 3000),
)
def test_noise_for_epsilon_round_trips(target: float, q: float, steps: int):
    noise = noise_for_epsilon(target, q, steps=steps, delta=1e-5)
    eps = epsilon_for_plan(noise, q, steps=steps, delta=1e-5)
    assert eps <= target
    assert eps >= target - 0.02  # Opacus's bisection tolerance is 0.01


@settings(max_examples=12, deadline=None)
@given(noise=st.floats(0.5, 5.0), q=st.floats(0.005, 0.5), steps=st.integers(1, 2000))
def test_epsilon_grows_with_steps_and_shrinks_with_noise(noise: float, q: float, steps: int):
    eps = epsilon_for_plan(noise, q, steps=steps)
    assert epsilon_for_plan(noise, q, steps=steps + 10) > eps
    assert epsilon_for_plan(noise * 1.5, q, steps=steps) < eps


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="idc-sim budget")
    add_budget_arguments(parser)
    return run_budget(parser.parse_args(argv))


def test_cli_prints_epsilon_and_the_privacy_unit(capsys: pytest.CaptureFixture[str]):
    assert _run(["--noise", "1.5", "--sample-rate", "0.04", "--steps", "2250"]) == 0
    out = capsys.readouterr().out
    assert "total epsilon 7.33" in out and "2250 steps" in out and PRIVACY_UNIT in out


def test_cli_target_mode_and_patch_counts(capsys: pytest.CaptureFixture[str]):
    argv = [
        "--target-epsilon",
        "8",
        "--patches",
        "6400",
        "--batch-size",
        "256",
        "--rounds",
        "30",
        "--local-epochs",
        "3",
    ]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    assert "2250 steps" in out and "sample rate 0.04" in out
    noise = float(out.split("noise multiplier ")[1].split()[0])
    assert 1.3 < noise < 1.5  # a little less noise than the 7.33 plan's 1.5


def test_cli_refuses_a_delta_too_large_for_the_data(capsys: pytest.CaptureFixture[str]):
    argv = ["--noise", "1", "--patches", "500", "--steps", "10", "--delta", "0.01"]
    assert _run(argv) == 2
    assert "delta=0.01" in capsys.readouterr().err
