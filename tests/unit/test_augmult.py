"""Augmentation multiplicity (common.augmult) with real Opacus: one clip per patch, same epsilon."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.augmult import AugmultDPOptimizer, check_views, repeat_views
from common.dataset import PatchDataset, make_loader
from common.model import build_model
from common.privacy import DPConfig, make_private, release, steps_taken
from common.recipe import Recipe
from common.training import TrainConfig, train

VIEWS = 3


def _setup(n: int = 8, batch: int = 4, clip: float = 1e9, views: int = VIEWS, seed: int = 0):
    model = build_model("group", seed=seed, kind="gap")
    for m in model.modules():  # dropout masks would differ between the two computations
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rng = np.random.default_rng(seed)
    data = PatchDataset(rng.integers(0, 256, (n, 50, 50, 3), dtype=np.uint8), rng.integers(0, 2, n))
    loader = make_loader(data, batch_size=batch, shuffle=True, seed=0)
    dp = DPConfig(noise_multiplier=0.0, epsilon_per_round=None, max_grad_norm=clip, delta=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plain = copy.deepcopy(model)
    return plain, make_private(model, opt, loader, dp, epochs=1, seed=0, views=views)


def _views(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n patches, each as VIEWS different flips, views of a patch next to each other."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 50, 50, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    rows, _ = repeat_views(x, y, VIEWS)
    rows = rows.clone()
    rows[1::VIEWS] = rows[1::VIEWS].flip(-1)
    rows[2::VIEWS] = rows[2::VIEWS].flip(-2)
    return rows, y.repeat_interleave(VIEWS)


def test_each_patch_gradient_is_the_mean_over_its_views_before_clipping():
    plain, private = _setup()
    rows, y = _views(2)
    private.optimizer.zero_grad()
    F.cross_entropy(private.model(rows), y).backward()
    folded = private.optimizer.grad_samples
    params = [p for p in plain.parameters() if p.requires_grad]
    assert isinstance(private.optimizer, AugmultDPOptimizer) and len(folded[0]) == 2
    for i in range(2):  # the oracle: plain autograd of the patch's mean loss over its views
        mine = slice(i * VIEWS, (i + 1) * VIEWS)
        grads = torch.autograd.grad(F.cross_entropy(plain(rows[mine]), y[mine]), params)
        for g, per_patch in zip(grads, folded, strict=True):
            torch.testing.assert_close(per_patch[i], g, rtol=1e-4, atol=1e-6)
    release(private)


def test_clipping_bounds_one_patch_whatever_its_number_of_views():
    clip = 1e-3  # far below any gradient of a fresh network: the clip bites
    for views in (1, 4):
        _, private = _setup(clip=clip, views=views)
        x, y = torch.rand(1, 3, 50, 50), torch.tensor([1])
        rows, labels = repeat_views(x, y, views)
        rows = rows + 0.05 * torch.rand(rows.shape)  # different views of the one patch
        private.optimizer.zero_grad()
        F.cross_entropy(private.model(rows), labels).backward()
        private.optimizer.clip_and_accumulate()  # before the noise: what the patch adds
        total = torch.cat([p.summed_grad.flatten() for p in private.optimizer.params]).norm()
        assert 0.99 * clip <= float(total) <= clip * (1 + 1e-4), views  # K clipped views: K*clip
        release(private)


def test_views_leave_sampling_and_epsilon_unchanged_and_the_loop_sees_k_rows_per_patch():
    seen: dict[int, list[int]] = {}
    spent = {}
    for views in (1, VIEWS):
        _, private = _setup(n=32, batch=8, clip=1.0, views=views)
        rows: list[int] = []
        batches = private.loader

        def tap(batches=batches, rows=rows):
            for x, y in batches:
                rows.append(len(y))
                yield x, y

        config = TrainConfig(epochs=1, patience=None, device="cpu", recipe=Recipe("dihedral"))
        train(private.model, tap(), config, optimizer=private.optimizer)
        seen[views] = rows
        plan = (private.noise_multiplier, private.sample_rate, private.planned_steps)
        spent[views] = (plan, steps_taken(private))
        release(private)
    assert spent[VIEWS] == spent[1]  # same noise, rate and steps: the accountant's inputs
    assert len(seen[VIEWS]) == len(seen[1]) == 4
    assert all(n % VIEWS == 0 for n in seen[VIEWS]) and sum(seen[VIEWS]) > 0


def test_views_are_checked_and_ghost_clipping_refuses_them():
    with pytest.raises(ValueError, match="multiplicity must be an integer >= 1, got 0"):
        check_views(0)
    model = build_model("group", seed=0, kind="gap")
    data = PatchDataset(np.zeros((8, 50, 50, 3), np.uint8), np.zeros(8, int))
    loader = make_loader(data, 4, shuffle=False)
    dp = DPConfig(noise_multiplier=1.0, epsilon_per_round=None, max_grad_norm=1.0, delta=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="ghost clipping .* 2 views"):
        make_private(model, opt, loader, dp, 1, grad_sample_mode="ghost", views=2)
