import numpy as np
import pytest
import torch

from common.dataset import PatchDataset, augment_batch, make_loader
from common.model import build_model
from common.training import TrainConfig, evaluate, to_device, train


def toy(n=96, seed=0):
    """Patches whose class is their brightness: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 90, (n, 50, 50, 3)).astype(np.uint8)
    images[labels == 1] += 120
    return images, labels


def test_dataset_batches_are_floats_in_unit_range():
    images, labels = toy(10)
    ds = PatchDataset(images, labels, np.array([3, 1, 7]))
    x, y = ds.__getitems__([0, 2])
    assert x.shape == (2, 3, 50, 50) and x.dtype == torch.uint8  # scaled on the device
    x, y = to_device(x, y, torch.device("cpu"))
    assert x.dtype == torch.float32
    assert torch.allclose(x[0], torch.from_numpy(images[3]).permute(2, 0, 1).float() / 255)
    assert y.tolist() == [labels[3], labels[7]]
    xi, yi = ds[1]
    assert torch.equal(xi, torch.from_numpy(images[1]).permute(2, 0, 1))
    xa, _ = PatchDataset(images, labels, augment=True).__getitems__([0])
    assert xa.dtype == torch.float32 and 0 <= xa.min() and xa.max() <= 1


def test_augmentation_keeps_shape_range_and_content():
    x = torch.rand(32, 3, 50, 50)
    out = augment_batch(x.clone(), np.random.default_rng(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    # flips and rotations move pixels; jitter is mild, so channel means stay close
    assert torch.allclose(out.mean((2, 3)), x.mean((2, 3)), atol=0.06)


def test_loader_is_seeded():
    images, labels = toy(40)
    order = [make_loader(PatchDataset(images, labels), 8, True, seed=5) for _ in range(2)]
    a = [y.tolist() for _, y in order[0]]
    b = [y.tolist() for _, y in order[1]]
    assert a == b


def test_short_training_learns_and_evaluation_reports_all_metrics():
    images, labels = toy(128)
    # group norm: what is measured is the loop, not how fast batch-norm statistics settle
    model = build_model("group", seed=0)
    loader = make_loader(PatchDataset(images, labels, augment=True), 16, True)
    val = make_loader(PatchDataset(images, labels), 64, False)
    before = evaluate(model, val, torch.device("cpu"))
    result = train(model, loader, TrainConfig(epochs=4, lr=1e-3, patience=None), val)
    after = evaluate(model, val, torch.device("cpu"))
    assert len(result.history) == 4 and result.steps == 32 and result.examples == 4 * 128
    assert after.loss < before.loss
    assert after.balanced_accuracy > 0.8 and after.examples == 128
    assert set(after.as_dict()) >= {
        "loss",
        "accuracy",
        "balanced_accuracy",
        "precision",
        "recall",
        "f1",
        "auc",
        "confusion",
    }


def test_a_last_batch_of_one_patch_does_not_stop_a_batch_norm_model():
    # 65 training patches at batch 64 (a site's or a split's count, not chosen by anyone)
    images, labels = toy(65)
    model = build_model("batch", seed=0, kind="paper")
    loader = make_loader(PatchDataset(images, labels), 64, True)
    result = train(model, loader, TrainConfig(epochs=2, lr=1e-3, patience=None))
    assert result.steps == 2 and result.examples == 2 * 64  # the lone patch is left out
    group = build_model("group", seed=0, kind="paper")  # without batch norm every patch counts
    result = train(group, loader, TrainConfig(epochs=1, lr=1e-3, patience=None))
    assert result.steps == 2 and result.examples == 65


def test_early_stopping_restores_the_best_weights():
    images, labels = toy(64)
    model = build_model(seed=0)
    loader = make_loader(PatchDataset(images, labels), 32, True)
    # validation labels flipped: validation loss rises as training succeeds
    val = make_loader(PatchDataset(images, 1 - labels), 64, False)
    seen = []
    result = train(
        model,
        loader,
        TrainConfig(epochs=8, lr=1e-3, patience=2),
        val,
        on_epoch=lambda row: seen.append(model.state_dict()["head.9.bias"].clone()),
    )
    assert result.stopped_early and len(result.history) < 8
    best = min(result.history, key=lambda r: r["val_loss"])
    assert result.best_epoch == int(best["epoch"])
    assert torch.equal(model.state_dict()["head.9.bias"], seen[result.best_epoch - 1])


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="learning rate"):
        TrainConfig(lr=-1)


def test_the_seed_fixes_the_run_whatever_the_process_rng_and_leaves_it_untouched():
    """Dropout draws from torch's global RNG, which every process seeds at random."""
    images, labels = toy(64)
    weights, after = [], []
    for process_seed in (1, 2):
        torch.manual_seed(process_seed)  # stands in for a fresh process's random seed
        model = build_model("group", seed=0)
        loader = make_loader(PatchDataset(images, labels), 16, True, seed=3)
        train(model, loader, TrainConfig(epochs=1, lr=1e-3, patience=None, seed=3))
        weights.append(torch.cat([v.flatten() for v in model.state_dict().values()]))
        after.append(torch.rand(1).item())
    assert torch.equal(weights[0], weights[1])
    torch.manual_seed(1)
    first = torch.rand(1).item()
    assert after[0] == first  # training consumed nothing from the caller's stream
