"""FedProx at the site: the proximal term's value, and that it holds training near the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.site import proximal_term
from common.training import TrainConfig, train
from tests.conftest import node_config_of
from tests.unit.test_site_privacy import DP_RUN, _audit, cfg, trained  # noqa: F401


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
    recipe = TrainConfig(epochs=3, lr=0.05, patience=None, device="cpu")
    start = _model()
    free, held = _model(), _model()
    train(free, _batches(), recipe)
    train(held, _batches(), recipe, extra_loss=proximal_term(held, 50.0))
    assert 0 < _distance(held, start) < 0.2 * _distance(free, start)


def test_the_extra_loss_moves_the_gradient_only_never_the_reported_loss():
    recipe = TrainConfig(epochs=2, lr=0.05, patience=None, device="cpu")
    plain, padded = _model(), _model()
    a = train(plain, _batches(), recipe)
    constant = train(padded, _batches(), recipe, extra_loss=lambda m: 100.0 + 0 * m[1].bias.sum())
    assert [r["train_loss"] for r in constant.history] == [r["train_loss"] for r in a.history]


def _train_message(arrays: dict, config: dict):
    import time

    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    from common import protocol
    from common.packing import pack

    packed, layout = pack(arrays)
    content = RecordDict(
        {
            protocol.ARRAYS: packed,
            protocol.LAYOUT: layout,
            protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1, **config}),
        }
    )
    meta = Metadata(7, "m1", 0, 1, "", "", time.time(), 600.0, "train", 1, 2)
    return Message(content, metadata=meta)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus's secure-RNG notice
@pytest.mark.parametrize("mu", [0.1, -1.0, "a lot"])
def test_the_site_fails_closed_on_a_proximal_term_it_cannot_honour(request, mu):
    """Under DP-SGD Opacus would drop the term; a bad mu is no mu: no weights leave, no budget."""
    site = request.getfixturevalue("cfg")  # a DP-ready site folder (test_site_privacy's)
    from flwr.app import Context, RecordDict

    from client.app import train as train_handler
    from common.ledger import PrivacyLedger
    from common.model import build_model
    from common.paths import SitePaths
    from common.site_data import model_arrays

    node = node_config_of(site)
    ledger = PrivacyLedger(SitePaths(site.state_dir).ledger)
    before = len(ledger.entries())
    msg = _train_message(model_arrays(build_model("group", seed=DP_RUN.seed)), {"proximal-mu": mu})
    with pytest.raises(ValueError, match="proximal"):
        train_handler(msg, Context(7, 1, node, RecordDict(), DP_RUN.to_run_config()))
    assert len(ledger.entries()) == before and not _audit(site, "update.sent")
