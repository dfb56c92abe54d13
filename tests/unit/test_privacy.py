"""DP-SGD setup, the accounting, the on-disk ledger and the cap (privacy, accounting, ledger)."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from common.accounting import BudgetExceeded, check_cap, check_delta, epsilon
from common.dataset import PatchDataset, make_loader
from common.ledger import LedgerEntry, LedgerError, PrivacyLedger, history
from common.model import build_model
from common.privacy import (
    LARGE_BATCH_MODE,
    PRIVACY_UNIT,
    DPConfig,
    RoundPlan,
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
        "epsilon_per_round": None,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
    }
    args.update(kw)
    return DPConfig(**args)  # type: ignore[arg-type]


def _entry(round_: int, run: str = "run-1", steps: int = 8) -> LedgerEntry:
    return LedgerEntry(run, round_, noise_multiplier=1.1, sample_rate=0.25, steps=steps, delta=1e-5)


def _eps(ledger: PrivacyLedger, delta: float = 1e-5, accountant: str = "rdp") -> float:
    return epsilon(history(ledger.entries()), delta, accountant)  # type: ignore[arg-type]


# -- DPConfig -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"noise_multiplier": None}, "epsilon_per_round"),  # neither set
        ({"epsilon_per_round": 2.0}, "epsilon_per_round"),  # both set
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"noise_multiplier": None, "epsilon_per_round": 0.0}, "epsilon_per_round"),
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
        ledger.record(LedgerEntry("run-1", r, noise, q, epochs * per_epoch, 1e-5))
        for _ in range(epochs * per_epoch):
            reference.step(noise_multiplier=noise, sample_rate=q)
    assert _eps(ledger) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    prv = PRVAccountant()
    prv.history = [(noise, q, rounds * epochs * per_epoch)]
    assert _eps(ledger, 1e-5, "prv") == pytest.approx(prv.get_epsilon(1e-5), rel=1e-3)


def test_projected_epsilon_is_the_total_with_the_round_added(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    projected = check_cap([], _entry(1).step, 1e9, 1e-5)
    ledger.record(_entry(1))
    assert _eps(ledger) == pytest.approx(projected, rel=1e-12)
    assert epsilon([(0.0, 0.25, 1)], 1e-5) == math.inf


# -- ledger persistence and failure ---------------------------------------------------------


def test_ledger_survives_restart_and_a_second_run_with_epsilon_growing(tmp_path: Path):
    path = tmp_path / "state" / "privacy-ledger.json"
    eps = [_eps(PrivacyLedger(path))]
    for run, fp in (("run-1", "folder-a"), ("run-2", "folder-b")):  # the folder changed
        for r in (1, 2):
            entry = replace(_entry(r, run), fingerprint=fp)
            PrivacyLedger(path).record(entry)  # a new object: a restarted process
            eps.append(_eps(PrivacyLedger(path)))
    assert eps[0] == 0.0
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))  # one budget for the site
    entries = PrivacyLedger(path).entries()
    assert [(e.run_id, e.round, e.fingerprint, e.status) for e in entries] == [
        ("run-1", 1, "folder-a", "spent"),
        ("run-1", 2, "folder-a", "spent"),
        ("run-2", 1, "folder-b", "spent"),
        ("run-2", 2, "folder-b", "spent"),
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]
    assert path.stat().st_mode & 0o077 == 0  # the site's own business


def test_a_version_1_ledger_reads_as_one_history_of_every_data_set(tmp_path: Path):
    rows = {fp: [{**asdict(_entry(1)), "time": t}] for fp, t in (("b", "2"), ("a", "1"))}
    for row in rows.values():
        for key in ("fingerprint", "status", "id"):
            del row[0][key]
    old = {
        "format": "idc-fl privacy ledger",
        "version": 1,
        "datasets": {fp: {"rounds": r, "refusals": []} for fp, r in rows.items()},
    }
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps(old))
    ledger = PrivacyLedger(path)
    assert [e.fingerprint for e in ledger.entries()] == ["a", "b"]  # oldest first
    assert _eps(ledger) == pytest.approx(epsilon([(1.1, 0.25, 16)], 1e-5), rel=1e-12)
    ledger.record_refusal("run-9", 1, "cap")  # the next write stores version 2
    assert json.loads(path.read_text())["version"] == 2 and len(ledger.entries()) == 2


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
        json.dumps(
            {
                "format": "idc-fl privacy ledger",
                "version": 2,
                "rounds": [{**asdict(_entry(1)), "steps": -1}],
                "refusals": [],
            }
        ),
        json.dumps({"format": "idc-fl privacy ledger", "version": 2, "rounds": {}}),
        "",
    ],
)
def test_corrupt_ledger_is_an_error_never_an_empty_history(tmp_path: Path, content: str):
    path = tmp_path / "ledger.json"
    path.write_text(content)
    ledger = PrivacyLedger(path)
    with pytest.raises(LedgerError, match="corrupt"):
        ledger.entries()
    with pytest.raises(LedgerError):
        ledger.record(_entry(1))
    assert path.read_text() == content  # the evidence is left alone


def test_unreadable_ledger_is_an_error(tmp_path: Path):
    path = tmp_path / "ledger.json"
    path.mkdir()
    with pytest.raises(LedgerError, match="cannot be read"):
        PrivacyLedger(path).entries()


# -- budget gate ----------------------------------------------------------------------------


def test_budget_refuses_at_the_cap_and_the_refusal_is_recorded(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    cap = 2.0 * check_cap([], _entry(1).step, 1e9, 1e-5)
    rounds = 0

    def within_cap(entries: list[LedgerEntry]) -> None:
        assert check_cap(history(entries), _entry(rounds + 1).step, cap, 1e-5) <= cap

    with pytest.raises(BudgetExceeded) as refused:
        while True:
            ledger.reserve(_entry(rounds + 1), within_cap)  # check and record, under one lock
            rounds += 1
    err = refused.value
    assert rounds >= 2 and err.cap == cap and err.projected > cap
    assert len(ledger.entries()) == rounds  # the refused round left no entry
    assert all(e.status == "reserved" for e in ledger.entries())  # counted before training
    assert err.spent == pytest.approx(_eps(ledger))
    assert f"{err.spent:.4g}" in str(err) and f"{err.cost:.4g}" in str(err)
    assert f"cap {cap:.4g}" in str(err)
    ledger.record_refusal("run-1", rounds + 1, str(err))
    assert [(r.round, r.reason) for r in ledger.refusals()] == [(rounds + 1, str(err))]
    with pytest.raises(BudgetExceeded):  # no noise: infinite epsilon, whatever the cap
        check_cap([], (0.0, 0.25, 1), 1e9, 1e-5)


def test_settle_records_the_steps_taken_and_never_more_than_reserved(tmp_path: Path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    entry = _entry(1, steps=8)
    ledger.reserve(entry, lambda _: None)
    with pytest.raises(LedgerError, match="more than the 8 reserved"):
        ledger.settle(entry.id, 9)
    assert ledger.settle(entry.id, 7).steps == 7
    assert [(e.steps, e.status) for e in ledger.entries()] == [(7, "spent")]
    with pytest.raises(LedgerError, match="no reserved round"):
        ledger.settle("another", 1)


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


def test_the_training_loader_is_poisson_and_the_accountant_gets_real_steps():
    model, opt, loader, dp = _private_setup(epsilon_per_round=3.0, noise_multiplier=None)
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
    entry = (private.noise_multiplier, private.sample_rate, steps_taken(private))
    assert 2.9 <= epsilon([entry], dp.delta) <= 3.0  # noise chosen for the round's target
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


@pytest.mark.parametrize("mode", ["functorch", "ghost"])
def test_every_engine_clips_like_opacus_hooks_through_the_shared_loop(mode):
    gen = torch.Generator().manual_seed(7)
    batch = [(torch.rand(16, 3, 50, 50, generator=gen), torch.randint(0, 2, (16,), generator=gen))]
    params = {}
    for name in ("hooks", mode):
        model, opt, loader, _ = _private_setup()
        dp = _dp(noise_multiplier=0.0, max_grad_norm=0.5)  # clipping bites, no noise
        private = make_private(model, opt, loader, dp, 1, grad_sample_mode=name)
        assert private.grad_sample_mode == name
        torch.manual_seed(0)
        train_epoch(private.model, batch, private.optimizer, CPU, criterion=private.criterion)
        params[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(params[mode], params["hooks"], rtol=1e-4, atol=1e-6)


def test_default_engine_is_hooks_with_the_fast_convolution_kernel():
    from common.grad_samplers import conv2d_grad_sample

    for batch_size in (32, 16):  # 64 patches; functorch is never the default
        model, opt, loader, dp = _private_setup(batch=batch_size)
        private = make_private(model, opt, loader, dp, 1)
        assert private.grad_sample_mode == LARGE_BATCH_MODE == "hooks"
        assert private.model.GRAD_SAMPLERS[torch.nn.Conv2d] is conv2d_grad_sample
        release(private)
    assert GradSampleModule.GRAD_SAMPLERS[torch.nn.Conv2d] is not conv2d_grad_sample  # no global


@pytest.mark.parametrize(
    ("in_c", "out_c", "stride", "padding", "bias", "n"),
    [(3, 32, 1, 1, True, 5), (8, 4, 2, 0, False, 3), (4, 6, 1, 2, True, 0)],
)
def test_fast_convolution_kernel_equals_opacus_per_sample_gradients(
    in_c, out_c, stride, padding, bias, n
):
    from opacus.grad_sample.conv import compute_conv_grad_sample

    from common.grad_samplers import conv2d_grad_sample

    gen = torch.Generator().manual_seed(n)
    layer = torch.nn.Conv2d(in_c, out_c, 3, stride=stride, padding=padding, bias=bias)
    x = torch.randn(n, in_c, 11, 11, generator=gen)
    out_shape = layer(x).shape if n else (0, out_c, 1, 1)
    backprops = torch.randn(out_shape, generator=gen)
    mine = conv2d_grad_sample(layer, [x], backprops)
    theirs = compute_conv_grad_sample(layer, [x], backprops)
    assert mine.keys() == theirs.keys()
    for p in mine:
        torch.testing.assert_close(mine[p], theirs[p], rtol=1e-4, atol=1e-5)


def test_ghost_clipping_takes_the_empty_poisson_batches_too():
    model, opt, loader, dp = _private_setup(n=12, batch=1)
    private = make_private(model, opt, loader, dp, epochs=1, seed=3, grad_sample_mode="ghost")
    shapes: list[tuple[int, ...]] = []
    stats = train_epoch(
        private.model,
        _tap(private.loader, shapes),
        private.optimizer,
        CPU,
        criterion=private.criterion,
    )
    assert (0, 3, 50, 50) in shapes and stats["steps"] == steps_taken(private) == 12
    assert all(torch.isfinite(p).all() for p in model.parameters())
