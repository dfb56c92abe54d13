"""The recipe levers around the one loop: augmentation, AdamW, cosine schedule, averaging."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from common.augment import augment_batch, color_jitter, dihedral
from common.config import RunConfig
from common.dataset import make_loader
from common.privacy import make_private, release
from common.recipe import EMA_WARMUP, Recipe, make_optimizer
from common.training import TrainConfig, train, train_epoch
from tests.unit.test_privacy import _dataset, _dp

CPU = torch.device("cpu")


def _small(norm: str = "batch", seed: int = 0) -> nn.Module:
    """A small conv net with a norm layer and dropout: what averaging must handle, fast.

    Batch norm brings running statistics and a step counter into the state dict; group norm
    keeps it Opacus-compatible.
    """
    torch.manual_seed(seed)
    layer = nn.BatchNorm2d(4) if norm == "batch" else nn.GroupNorm(2, 4)
    return nn.Sequential(
        nn.Conv2d(3, 4, 5, stride=5),
        layer,
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(4 * 10 * 10, 2),
    )


def _symmetries(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images of one (C, H, W) patch under the square's symmetry group."""
    rots = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return rots + [r.flip(-1) for r in rots]


def test_dihedral_gives_each_patch_one_of_its_8_symmetries_and_all_8_occur():
    x = torch.rand(400, 3, 50, 50)
    out = dihedral(x, torch.Generator().manual_seed(0))
    seen = set()
    for before, after in zip(x, out, strict=True):
        matches = [i for i, s in enumerate(_symmetries(before)) if torch.equal(s, after)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))
    with pytest.raises(ValueError, match="square"):
        dihedral(torch.rand(2, 3, 50, 40), torch.Generator())


def test_color_jitter_is_mild_stays_in_range_and_differs_per_patch():
    x = torch.rand(64, 3, 50, 50)
    out = color_jitter(x.clone(), torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    diff = (out - x).abs().flatten(1).mean(1)
    assert 0.0 < float(diff.min()) and float(diff.max()) < 0.1
    assert len(set(diff.tolist())) == 64


def test_augmentation_is_seeded_and_none_is_the_identity():
    x = torch.rand(8, 3, 50, 50)
    a = augment_batch(x, "dihedral+color", torch.Generator().manual_seed(3))
    b = augment_batch(x, "dihedral+color", torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert augment_batch(x, "none", torch.Generator()) is x
    assert augment_batch(x[:0], "dihedral", torch.Generator()).shape == (0, 3, 50, 50)


class _Spy(nn.Module):
    """A tiny model that records whether each input it saw was in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 50 * 50, 2)
        self.seen: list[tuple[bool, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, x.detach().clone()))
        return self.fc(x.flatten(1))


def test_the_loop_augments_training_batches_only_never_validation():
    x = torch.rand(4, 3, 50, 50)
    batches = [(x, torch.tensor([0, 1, 0, 1]))]
    spy = _Spy()
    config = TrainConfig(epochs=2, device="cpu", recipe=Recipe(augment="dihedral+color"))
    train(spy, batches, config, val_loader=batches)
    trained = [seen for training, seen in spy.seen if training]
    validated = [seen for training, seen in spy.seen if not training]
    assert len(trained) == len(validated) == 2
    assert all(not torch.equal(seen, x) for seen in trained)
    assert all(torch.equal(seen, x) for seen in validated)


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        ({"augment": "flip"}, "augment"),
        ({"weight_decay": -0.1}, "weight decay"),
        ({"lr_schedule": "step"}, "schedule"),
        ({"ema": 1.0}, "ema"),
        ({"optimizer": "rmsprop"}, "optimizer"),
    ],
)
def test_recipe_rejects_bad_values_naming_them(kw: dict[str, object], word: str):
    with pytest.raises(ValueError, match=word):
        Recipe(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("augment", "flip"),
        ("weight-decay", -1.0),
        ("lr-schedule", "step"),
        ("ema", 1.5),
        ("optimizer", "rmsprop"),
    ],
)
def test_run_config_names_the_bad_recipe_key(key: str, value: object):
    with pytest.raises(ValueError, match=f"'{key}'"):
        RunConfig.from_run_config({key: value})


def test_run_config_keys_reach_the_recipe_and_defaults_keep_todays_training():
    run = RunConfig.from_run_config(
        {
            "augment": "dihedral",
            "weight-decay": 0.05,
            "lr-schedule": "cosine",
            "ema": 0.9,
            "optimizer": "sgd",
        }
    )
    assert Recipe.from_run(run) == Recipe("dihedral", 0.05, "cosine", 0.9, "sgd")
    default = Recipe.from_run(RunConfig())
    # Sites have always trained on flipped, rotated, jittered patches with a plain Adam.
    assert default == Recipe(augment="dihedral+color")
    assert RunConfig().model == "paper"
    assert TrainConfig().recipe == Recipe()  # the bare loop changes nothing


def test_weight_decay_switches_adam_to_adamw():
    params = list(nn.Linear(2, 2).parameters())
    assert type(make_optimizer(params, 1e-3, Recipe())) is torch.optim.Adam
    adamw = make_optimizer(params, 1e-3, Recipe(weight_decay=0.05))
    assert type(adamw) is torch.optim.AdamW
    assert adamw.param_groups[0]["weight_decay"] == 0.05


def test_sgd_steps_by_the_gradients_size_where_adam_steps_by_its_learning_rate():
    """Why DP-SGD rows may choose SGD: on a gradient that is all noise of one small size, Adam's
    first step moves every coordinate by the learning rate; SGD's moves it by lr x gradient."""
    params = [nn.Parameter(torch.zeros(10_000))]
    noise = 1e-3 * torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    steps = {}
    for name in ("adam", "sgd"):
        params[0].data.zero_()
        opt = make_optimizer(params, 0.01, Recipe(optimizer=name))  # type: ignore[arg-type]
        params[0].grad = noise.clone()
        opt.step()
        steps[name] = params[0].detach().abs().mean().item()
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.9
    assert abs(steps["adam"] - 0.01) < 1e-4  # lr on every coordinate, whatever the noise's size
    assert abs(steps["sgd"] - 0.01 * noise.abs().mean().item()) < 1e-9


def _batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(8, 3, 50, 50, generator=gen), torch.randint(0, 2, (8,), generator=gen))
        for _ in range(n)
    ]


def test_cosine_schedule_spans_the_calls_steps():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 50 * 50, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lrs: list[float] = []
    batches = _Recorder(_batches(4), opt, lrs)
    config = TrainConfig(epochs=2, lr=0.1, device="cpu", recipe=Recipe(lr_schedule="cosine"))
    train(model, batches, config, optimizer=opt)
    # 8 steps: lr(step) = 0.05 * (1 + cos(pi * step / 8)); the last one ends at 0.
    expected = [0.05 * (1 + torch.cos(torch.tensor(torch.pi * s / 8)).item()) for s in range(8)]
    assert lrs == pytest.approx(expected)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


class _Recorder:
    """Batches that note the optimizer's learning rate as each one is trained on."""

    def __init__(self, batches: list, opt: torch.optim.Optimizer, lrs: list[float]) -> None:
        self.batches, self.opt, self.lrs = batches, opt, lrs

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.lrs.append(self.opt.param_groups[0]["lr"])
            yield batch


def _manual_average(model: nn.Module, batches, opt, decay: float, epochs: int) -> dict:
    """Train without averaging, folding each step into an average by hand."""
    avg = {k: v.clone() for k, v in model.state_dict().items()}
    t = itertools.count(1)

    def fold() -> None:
        d = min(decay, (1 + (u := next(t))) / (EMA_WARMUP + u))
        for k, v in model.state_dict().items():
            avg[k] = avg[k] * d + v * (1 - d) if v.is_floating_point() else v.clone()

    torch.manual_seed(0)  # train() draws dropout's masks from TrainConfig.seed (0)
    for _ in range(epochs):
        train_epoch(model, batches, opt, CPU, after_step=fold)
    return avg


def test_the_returned_model_is_the_parameter_average():
    batches = _batches()
    plain = _small()
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    expected = _manual_average(plain, batches, opt, 0.9, epochs=2)
    model = _small()
    config = TrainConfig(
        epochs=2,
        lr=1e-3,
        patience=None,
        device="cpu",
        channels_last="off",  # the layout of the hand-made run: same kernels, same numbers
        recipe=Recipe(ema=0.9),
    )
    train(model, batches, config)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key].to(value.dtype), msg=key)


def test_validation_and_the_best_epoch_use_the_average():
    batches = _batches()
    model = _small()
    config = TrainConfig(epochs=2, lr=1e-3, patience=5, device="cpu", recipe=Recipe(ema=0.99))
    rows: list[dict[str, float]] = []
    result = train(model, batches, config, val_loader=batches, on_epoch=rows.append)
    from common.training import evaluate

    # The returned weights are the averaged ones of the best epoch: evaluated again, they
    # give exactly the validation loss that epoch recorded.
    again = evaluate(model, batches, CPU).loss
    assert again == pytest.approx(rows[result.best_epoch - 1]["val_loss"], rel=1e-5)


def _private(recipe: Recipe, lr: float = 1e-2):
    model = _small("group")
    opt = make_optimizer(model.parameters(), lr, recipe)
    loader = make_loader(_dataset(64), batch_size=16, shuffle=True, seed=0)
    return model, make_private(model, opt, loader, _dp(), epochs=2, seed=0)


def test_averaging_works_through_a_real_opacus_engine():
    """The same seeded DP-SGD run twice: once averaged by the loop, once by hand."""
    model, private = _private(Recipe())
    torch.manual_seed(0)
    try:
        expected = _manual_average(private.model, private.loader, private.optimizer, 0.9, 2)
        live = copy.deepcopy(private.model.state_dict())
    finally:
        release(private)
    model, private = _private(Recipe(ema=0.9))
    config = TrainConfig(
        epochs=2, patience=None, device="cpu", channels_last="off", recipe=Recipe(ema=0.9)
    )  # the DP path's layout (client/private.py), and the hand-made run's
    torch.manual_seed(0)
    try:
        result = train(private.model, private.loader, config, optimizer=private.optimizer)
        state = private.model.state_dict()
    finally:
        release(private)
    assert result.steps > 0
    for key, value in state.items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert any(not torch.equal(state[k], live[k]) for k in state)  # an average, not the last


def test_cosine_augmentation_and_weight_decay_work_through_a_real_opacus_engine():
    recipe = Recipe(augment="dihedral+color", weight_decay=0.01, lr_schedule="cosine", ema=0.5)
    model, private = _private(recipe)
    start = copy.deepcopy(model.state_dict())
    config = TrainConfig(epochs=2, lr=1e-2, patience=None, device="cpu", recipe=recipe)
    try:
        result = train(private.model, private.loader, config, optimizer=private.optimizer)
    finally:
        release(private)
    assert result.steps > 0
    assert private.optimizer.param_groups[0]["lr"] < 1e-2  # the schedule drove the DP optimizer
    assert type(private.optimizer.original_optimizer) is torch.optim.AdamW
    state = model.state_dict()
    assert any(not torch.equal(state[k], start[k]) for k in state)


def test_the_centralized_baseline_names_a_bad_lever_before_reading_data():
    from simulation.centralized import BaselineConfig

    assert BaselineConfig().recipe() == Recipe(augment="dihedral+color")  # as it always trained
    assert BaselineConfig(lr_schedule="cosine").train_config().recipe.lr_schedule == "cosine"
    with pytest.raises(ValueError, match="ema"):
        BaselineConfig(ema=1.5)
