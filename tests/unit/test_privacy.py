"""DP-SGD setup, the on-disk privacy ledger and the budget gate (common/privacy, common/ledger)."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from common.dataset import PatchDataset, make_loader
from common.ledger import LedgerEntry, LedgerError, PrivacyLedger, epsilon_from_history
from common.model import build_model
from common.privacy import (
    PRIVACY_UNIT,
    BudgetExceeded,
    DPConfig,
    RoundPlan,
    check_budget,
    check_delta,
    make_private,
    plan_round,
    release,
    steps_taken,
)
from common.training import TrainConfig, train, train_epoch

FP = "sha256:site-a-train"
CPU = torch.device("cpu")


def _dataset(n: int, seed: int = 0) -> PatchDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 50, 50, 3), dtype=np.uint8)
    return PatchDataset(images, rng.integers(0, 2, n))


def _dp(**kw: object) -> DPConfig:
    args: dict[str, object] = {
        "noise_multiplier": 1.0,
        "target_epsilon": None,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
    }
    args.update(kw)
    return DPConfig(**args)  # type: ignore[arg-type]


def _entry(round_: int, run: str = "run-1", steps: int = 8) -> LedgerEntry:
    return LedgerEntry(run, round_, noise_multiplier=1.1, sample_rate=0.25, steps=steps, delta=1e-5)


# -- DPConfig -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"noise_multiplier": None}, "target_epsilon"),  # neither set
        ({"target_epsilon": 2.0}, "target_epsilon"),  # both set
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"noise_multiplier": None, "target_epsilon": 0.0}, "target_epsilon"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": math.inf}, "max_grad_norm"),
        ({"delta": 1.0}, "delta"),
        ({"accountant": "gdp"}, "accountant"),
    ],
)
def test_dp_config_rejects_bad_values_naming_the_field(kw: dict[str, object], field: str):
    with pytest.raises(ValueError, match=field):
        _dp(**kw)


# -- accounting known answers ---------------------------------------------------------------


def test_ledger_epsilon_over_rounds_equals_one_opacus_accountant(tmp_path: Path):
    rounds, epochs, per_epoch, q, noise = 3, 2, 4, 0.25, 1.1
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    reference = RDPAccountant()
    for r in range(1, rounds + 1):
        ledger.record(FP, LedgerEntry("run-1", r, noise, q, epochs * per_epoch, 1e-5))
        for _ in range(epochs * per_epoch):
            reference.step(noise_multiplier=noise, sample_rate=q)
    assert ledger.epsilon(FP, 1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    prv = PRVAccountant()
    prv.history = [(noise, q, rounds * epochs * per_epoch)]
    assert ledger.epsilon(FP, 1e-5, "prv") == pytest.approx(prv.get_epsilon(1e-5), rel=1e-3)


def test_projected_epsilon_is_the_total_with_the_round_added(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    projected = ledger.projected_epsilon(FP, 1e-5, 1.1, 0.25, 8)
    ledger.record(FP, _entry(1))
    assert ledger.epsilon(FP, 1e-5) == pytest.approx(projected, rel=1e-12)
    assert epsilon_from_history([(0.0, 0.25, 1)], 1e-5) == math.inf


# -- ledger persistence and failure ---------------------------------------------------------


def test_ledger_survives_restart_and_a_second_run_with_epsilon_growing(tmp_path: Path):
    path = tmp_path / "state" / "privacy-ledger.json"
    eps = [PrivacyLedger(path).epsilon(FP, 1e-5)]
    for run in ("run-1", "run-2"):
        for r in (1, 2):
            PrivacyLedger(path).record(FP, _entry(r, run))  # a new object: a restarted process
            eps.append(PrivacyLedger(path).epsilon(FP, 1e-5))
    assert eps[0] == 0.0
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    history = PrivacyLedger(path).history(FP)
    assert [(e.run_id, e.round) for e in history] == [
        ("run-1", 1),
        ("run-1", 2),
        ("run-2", 1),
        ("run-2", 2),
    ]
    assert PrivacyLedger(path).history("another-data-set") == []
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]
    table = PrivacyLedger(path).format()
    assert "run-2" in table and f"{eps[-1]:.4g}" in table


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"format": "something else", "version": 1, "datasets": {}}),
        json.dumps(
            {
                "format": "idc-fl privacy ledger",
                "version": 1,
                "datasets": {FP: {"rounds": [{"run_id": "r", "round": 1}], "refusals": []}},
            }
        ),  # an entry missing its noise, rate, steps and delta
        "",
    ],
)
def test_corrupt_ledger_is_an_error_never_an_empty_history(tmp_path: Path, content: str):
    path = tmp_path / "ledger.json"
    path.write_text(content)
    ledger = PrivacyLedger(path)
    with pytest.raises(LedgerError, match="corrupt"):
        ledger.epsilon(FP, 1e-5)
    with pytest.raises(LedgerError):
        ledger.record(FP, _entry(1))
    assert path.read_text() == content  # the evidence is left alone


def test_unreadable_ledger_is_an_error(tmp_path: Path):
    path = tmp_path / "ledger.json"
    path.mkdir()
    with pytest.raises(LedgerError, match="cannot be read"):
        PrivacyLedger(path).history(FP)


# -- budget gate ----------------------------------------------------------------------------


def test_budget_refuses_at_the_cap_and_the_refusal_is_recorded(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    cap = 2.0 * ledger.projected_epsilon(FP, 1e-5, 1.1, 0.25, 8)
    rounds = 0
    with pytest.raises(BudgetExceeded) as refused:
        while True:
            total = check_budget(ledger, FP, cap, 1e-5, 1.1, 0.25, 8)
            assert total <= cap
            rounds += 1
            ledger.record(FP, _entry(rounds))
    err = refused.value
    assert rounds >= 2 and err.cap == cap and err.projected > cap
    assert err.spent == pytest.approx(ledger.epsilon(FP, 1e-5))
    assert f"{err.spent:.4g}" in str(err) and f"{err.cost:.4g}" in str(err)
    assert f"cap {cap:.4g}" in str(err)
    ledger.record_refusal(FP, "run-1", rounds + 1, str(err))
    assert [(r.round, r.reason) for r in ledger.refusals(FP)] == [(rounds + 1, str(err))]
    assert "refused" in ledger.format(FP)
    with pytest.raises(BudgetExceeded):  # no noise: infinite epsilon, whatever the cap
        check_budget(PrivacyLedger(tmp_path / "other.json"), FP, 1e9, 1e-5, 0.0, 0.25, 1)


def test_delta_must_be_below_one_over_n():
    check_delta(1e-5, 1000)
    for delta in (1e-3, 2e-3, 0.0):
        with pytest.raises(ValueError, match=r"delta=.*n=1000"):
            check_delta(delta, 1000)
    assert "patch" in PRIVACY_UNIT and "k*epsilon" in PRIVACY_UNIT


# -- make_private ---------------------------------------------------------------------------


def _private_setup(norm: str = "group", n: int = 64, batch: int = 16, **dp: object):
    model = build_model(norm, seed=0)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = make_loader(_dataset(n), batch_size=batch, shuffle=True, seed=0)
    return model, opt, loader, _dp(**dp)


def _tap(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], shapes: list[tuple[int, ...]]):
    """Pass batches through to the loop, noting the shape of each one it trained on."""
    for x, y in batches:
        shapes.append(tuple(x.shape))
        yield x, y


def test_make_private_fails_closed_on_batch_norm():
    model, opt, loader, dp = _private_setup("batch")
    with pytest.raises(ValueError, match="BatchNorm.*norm='group'"):
        make_private(model, opt, loader, dp, epochs=1, seed=0)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # not "fixed"


def test_the_training_loader_is_poisson_and_the_ledger_gets_real_steps(tmp_path: Path):
    model, opt, loader, dp = _private_setup(target_epsilon=3.0, noise_multiplier=None)
    private = make_private(model, opt, loader, dp, epochs=1, seed=1)
    assert isinstance(private.loader, DPDataLoader)  # what the loop must iterate
    assert isinstance(private.loader.batch_sampler, UniformWithReplacementSampler)
    assert private.loader.dataset is loader.dataset
    shapes: list[tuple[int, ...]] = []
    result = train(
        private.model,
        _tap(private.loader, shapes),
        TrainConfig(epochs=1, patience=None, device="cpu"),
        optimizer=private.optimizer,
    )
    sizes = [shape[0] for shape in shapes]
    assert len(sizes) == private.planned_steps == 4 and len(set(sizes)) > 1  # Poisson
    assert result.steps == steps_taken(private) == private.planned_steps
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.record(
        FP,
        LedgerEntry(
            "run-1",
            1,
            private.noise_multiplier,
            private.sample_rate,
            steps_taken(private),
            dp.delta,
        ),
    )
    assert 2.9 <= ledger.epsilon(FP, dp.delta) <= 3.0  # noise chosen for the round's target
    private.engine.accountant.history.append((0.5, private.sample_rate, 1))
    with pytest.raises(RuntimeError, match="noise=0.5"):
        steps_taken(private)  # a step the plan did not cover must not go unrecorded
    release(private)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="already private"):
        make_private(private.model, private.optimizer, loader, dp, epochs=1)  # type: ignore[arg-type]


def test_empty_poisson_batches_flow_through_the_shared_loop():
    model, opt, loader, dp = _private_setup(n=12, batch=1)
    private = make_private(model, opt, loader, dp, epochs=1, seed=3)
    shapes: list[tuple[int, ...]] = []
    stats = train_epoch(private.model, _tap(private.loader, shapes), private.optimizer, CPU)
    assert (0, 3, 50, 50) in shapes and len(shapes) == plan_round(dp, loader, 1).steps == 12
    assert stats["steps"] == steps_taken(private) == 12


def test_private_training_without_noise_or_clipping_equals_plain_training():
    gen = torch.Generator().manual_seed(5)
    batches = [
        (torch.rand(16, 3, 50, 50, generator=gen), torch.randint(0, 2, (16,), generator=gen))
        for _ in range(2)
    ]
    plain = build_model("group", seed=0)
    torch.manual_seed(0)  # the same dropout masks for both
    train_epoch(plain, batches, torch.optim.SGD(plain.parameters(), lr=0.1), CPU)

    model, _, loader, _ = _private_setup()  # 64 patches, batch 16: expected batch 16
    dp = _dp(noise_multiplier=0.0, max_grad_norm=1e9)
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, dp, 1)
    torch.manual_seed(0)
    train_epoch(private.model, batches, private.optimizer, CPU)
    initial = build_model("group", seed=0)
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
    moved = max(
        float((p - p0).detach().abs().max())
        for p, p0 in zip(plain.parameters(), initial.parameters(), strict=True)
    )
    assert moved > 1e-3  # the steps did something for the two to agree on
    with pytest.raises(RuntimeError, match="iterated another loader"):
        steps_taken(private)  # explicit batches are no Poisson sample: the ledger refuses


def test_plan_matches_what_the_accountant_records_when_1_over_q_rounds_down():
    dp = _dp()
    assert plan_round(dp, range(93), 2) == RoundPlan(1.0, 1 / 92, 184)  # int(1/(1/93)) == 92
    model, opt, loader, dp = _private_setup(n=93, batch=1)
    private = make_private(model, opt, loader, dp, epochs=1, seed=0)
    assert len(private.loader) == private.planned_steps == 92
    train_epoch(private.model, itertools.islice(private.loader, 3), private.optimizer, CPU)
    assert steps_taken(private) == 3  # the accountant's rate is the planned 1/92


def test_functorch_default_clips_like_opacus_hooks_and_small_batches_use_hooks():
    gen = torch.Generator().manual_seed(7)
    batch = [(torch.rand(16, 3, 50, 50, generator=gen), torch.randint(0, 2, (16,), generator=gen))]
    params = {}
    for mode in ("hooks", "functorch"):
        model, opt, loader, _ = _private_setup()
        dp = _dp(noise_multiplier=0.0, max_grad_norm=0.5)  # clipping bites, no noise
        private = make_private(model, opt, loader, dp, 1, grad_sample_mode=mode)  # type: ignore[arg-type]
        assert private.grad_sample_mode == mode
        torch.manual_seed(0)
        train_epoch(private.model, batch, private.optimizer, CPU)
        params[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(params["functorch"], params["hooks"], rtol=1e-4, atol=1e-6)
    for batch_size, mode in ((32, "functorch"), (16, "hooks")):  # 64 patches
        model, opt, loader, dp = _private_setup(batch=batch_size)
        assert make_private(model, opt, loader, dp, 1).grad_sample_mode == mode
