"""FedProx at the site: the proximal term's value, and that it holds training near the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.site import proximal_term
from common.training import TrainConfig, train


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 2))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 2, (8,), generator=g))] * 6


def _distance(a: nn.Module, b: nn.Module) -> float:
    return float(
        sum(((p - q) ** 2).sum() for p, q in zip(a.parameters(), b.parameters(), strict=True))
    )


def test_the_term_is_half_mu_times_the_squared_distance_from_the_global_model():
    model = _model()
    term = proximal_term(model, 0.3)
    assert float(term(model)) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    n = sum(p.numel() for p in model.parameters())
    assert float(term(model)) == pytest.approx(0.5 * 0.3 * n * 0.25)


def test_a_large_mu_keeps_local_training_near_the_global_model():
    cfg = TrainConfig(epochs=3, lr=0.05, patience=None, device="cpu")
    start = _model()
    free, held = _model(), _model()
    train(free, _batches(), cfg)
    train(held, _batches(), cfg, extra_loss=proximal_term(held, 50.0))
    assert 0 < _distance(held, start) < 0.2 * _distance(free, start)


def test_the_extra_loss_moves_the_gradient_only_never_the_reported_loss():
    cfg = TrainConfig(epochs=2, lr=0.05, patience=None, device="cpu")
    plain, padded = _model(), _model()
    a = train(plain, _batches(), cfg)
    constant = train(padded, _batches(), cfg, extra_loss=lambda m: 100.0 + 0 * m[1].bias.sum())
    assert [r["train_loss"] for r in constant.history] == [r["train_loss"] for r in a.history]
