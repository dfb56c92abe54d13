"""DP-SGD's step time against a plain step of the same model and batch, as the product trains.

Row 4 of :mod:`simulation.reproduce` states it beside the DP rows' accuracy (the issue's goal:
at most :data:`simulation.reproduce_targets.STEP_TIME_GOAL` times a plain step at the chosen
batch). Both steps take turns on one fixed random batch in this process, so load on a shared
machine hits both alike; the DP step goes through :func:`common.privacy.make_private`, with the
per-sample-gradient engine the product picks for that model and batch, and takes its clipping
and noise. ``benchmarks/dp_overhead.py`` compares Opacus's engines one by one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.model import build_model
from common.privacy import DPConfig, GradSampleMode, make_private
from common.site_data import Loader


def interleaved_medians(
    steps: Mapping[str, Callable[[], None]], timed: int, warmup: int
) -> dict[str, float]:
    """Median seconds per call of every step function, the functions taking turns."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(timed):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def step_times(
    kind: str, batch: int, timed: int = 5, warmup: int = 1, mode: GradSampleMode | None = None
) -> dict[str, Any]:
    """Median seconds of a plain and of a DP-SGD step of model ``kind`` on ``batch`` patches.

    Each step is forward, backward and Adam's update; the DP one also computes per-sample
    gradients, clips them (norm 1) and adds noise (multiplier 1). Returns the seconds, their
    ratio, the engine, the torch threads and the step counts, for the report.
    """
    if batch < 1 or timed < 1 or warmup < 0:
        got = f"{batch}, {timed}, {warmup}"
        raise ValueError(f"need batch >= 1, timed >= 1, warmup >= 0; got {got}")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 50, 50, generator=gen)
    y = torch.randint(0, 2, (batch,), generator=gen)

    plain = build_model("group", seed=0, kind=kind)  # type: ignore[arg-type]
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-4)

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()

    model = build_model("group", seed=0, kind=kind)  # type: ignore[arg-type]
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    # sample rate 1: the expected batch is the batch, as the product's engine choice sees it
    loader: Loader = DataLoader(TensorDataset(x, y), batch_size=batch)  # type: ignore[arg-type]
    dp = DPConfig(noise_multiplier=1.0, epsilon_per_round=None, max_grad_norm=1.0, delta=1e-5)
    private = make_private(model, opt, loader, dp, epochs=1, grad_sample_mode=mode)

    def dp_step() -> None:
        private.optimizer.zero_grad(set_to_none=True)
        private.criterion(private.model(x), y).backward()
        private.optimizer.step()

    secs = interleaved_medians({"plain": plain_step, "dp": dp_step}, timed, warmup)
    return {
        "model": kind,
        "batch": batch,
        "grad_sample_mode": private.grad_sample_mode,
        "threads": torch.get_num_threads(),
        "timed_steps": timed,
        "warmup_steps": warmup,
        "plain_s": secs["plain"],
        "dp_s": secs["dp"],
        "ratio": secs["dp"] / secs["plain"],
    }
