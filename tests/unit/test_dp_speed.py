"""Row 4's DP-SGD step time: both steps measured in one process, through the product's DP path."""

from __future__ import annotations

import pytest
import torch

from common.privacy import FUNCTORCH_MIN_BATCH
from simulation.dp_speed import step_times


def test_a_dp_step_and_a_plain_step_are_timed_and_compared():
    speed = step_times("gap", 8, timed=2, warmup=0)
    assert speed["plain_s"] > 0 and speed["dp_s"] > 0
    assert speed["ratio"] == pytest.approx(speed["dp_s"] / speed["plain_s"])
    assert 8 < FUNCTORCH_MIN_BATCH and speed["grad_sample_mode"] == "hooks"  # the product's pick
    assert (speed["model"], speed["batch"], speed["timed_steps"]) == ("gap", 8, 2)
    assert speed["threads"] == torch.get_num_threads()


@pytest.mark.parametrize("args", [(0, 1, 0), (8, 0, 0), (8, 1, -1)])
def test_bad_counts_are_refused(args):
    batch, timed, warmup = args
    with pytest.raises(ValueError, match="need batch >= 1"):
        step_times("gap", batch, timed=timed, warmup=warmup)
