"""Device-resident batches, bf16 autocast and channels-last, on the CPU with real objects."""

import numpy as np
import pytest
import torch

from client.predict import infer
from common.accel import Accel
from common.config import RunConfig
from common.dataset import PatchDataset, make_loader
from common.model import build_model
from common.resident import ResidentBatches
from common.training import TrainConfig, evaluate, predict, train, train_epoch

CPU = torch.device("cpu")


def toy(n=96, seed=0):
    """Patches whose class is their brightness; each patch's first pixel is its own id."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 90, (n, 50, 50, 3)).astype(np.uint8)
    images[labels == 1] += 120
    return images, labels


def _ids(x: torch.Tensor, images: np.ndarray) -> list[int]:
    """Which stored patch each batch row is (rows are unique by construction)."""
    flat = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).flatten(1)
    return [int((flat == row.flatten()).all(1).nonzero()[0]) for row in x]


def test_resident_batches_yield_every_patch_once_per_epoch_shuffled_and_seeded():
    images, labels = toy(50)
    idx = np.arange(3, 50, 2)  # a split's part, not the whole set
    src = ResidentBatches(images, labels, 8, CPU, idx, shuffle=True, seed=7)
    assert len(src) == 3
    epochs = []
    for _ in range(2):
        seen = []
        for x, y in src:
            assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
            assert x.shape[1:] == (3, 50, 50) and y.dtype == torch.int64
            rows = _ids(x, images)
            assert y.tolist() == labels[rows].tolist()
            seen += rows
        assert sorted(seen) == idx.tolist()  # every patch of the part, exactly once
        epochs.append(seen)
    assert epochs[0] != idx.tolist() and epochs[0] != epochs[1]  # shuffled, anew each epoch
    again = ResidentBatches(images, labels, 8, CPU, idx, shuffle=True, seed=7)
    replay = [r for _ in range(2) for x, _ in again for r in _ids(x, images)]
    assert replay == epochs[0] + epochs[1]  # the same seed replays the same epochs
    other = ResidentBatches(images, labels, 8, CPU, idx, shuffle=True, seed=8)
    assert [r for x, _ in other for r in _ids(x, images)] != epochs[0]


def test_resident_batches_without_shuffle_match_the_loader():
    images, labels = toy(20)
    loader = make_loader(PatchDataset(images, labels), 6, shuffle=False)
    src = ResidentBatches(images, labels, 6, CPU)
    for (xl, yl), (xr, yr) in zip(loader, src, strict=True):
        assert torch.equal(xl.float() / 255, xr) and torch.equal(yl, yr)


def test_resident_batches_refuse_bad_input():
    images, labels = toy(4)
    with pytest.raises(ValueError, match="batch size"):
        ResidentBatches(images, labels, 0, CPU)
    with pytest.raises(ValueError, match="labels"):
        ResidentBatches(images, labels[:3], 2, CPU)


def test_bf16_autocast_trains_on_cpu_with_finite_loss():
    images, labels = toy(64)
    accel = Accel.resolve(CPU, "bf16", "off")
    assert accel.autocast_dtype == torch.bfloat16
    model = accel.prepare(build_model("batch", seed=0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    src = ResidentBatches(images, labels, 16, CPU, shuffle=True)
    stats = train_epoch(model, src, opt, CPU, accel=accel)
    assert np.isfinite(stats["loss"]) and stats["examples"] == 64
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    result = train(model, src, TrainConfig(epochs=1, patience=None, precision="bf16"))
    assert np.isfinite(result.history[0]["train_loss"])


def test_channels_last_gives_the_same_outputs_as_contiguous():
    images, labels = toy(32)
    model = build_model("batch", seed=0).eval()
    src = ResidentBatches(images, labels, 16, CPU)
    plain = predict(model, src, CPU, Accel.resolve(CPU, "fp32", "off"))
    nhwc = Accel.resolve(CPU, "fp32", "on")
    last = predict(model, ResidentBatches(images, labels, 16, CPU, channels_last=True), CPU, nhwc)
    assert next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(last[1], plain[1], atol=1e-5)
    np.testing.assert_allclose(last[2], plain[2], rtol=1e-5)
    np.testing.assert_allclose(infer(model, images, CPU, 16, nhwc), plain[1], atol=1e-5)
    bf16 = infer(model, images, CPU, 16, Accel.resolve(CPU, "bf16", "on"))
    np.testing.assert_allclose(bf16, plain[1], atol=0.05)  # bf16 keeps 8 bits of mantissa


def test_evaluate_on_resident_batches_equals_the_loader():
    images, labels = toy(40)
    model = build_model("group", seed=0)
    a = evaluate(model, make_loader(PatchDataset(images, labels), 16, False), CPU)
    b = evaluate(model, ResidentBatches(images, labels, 16, CPU), CPU)
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.accuracy == b.accuracy


def test_auto_is_fp32_channels_last_on_cpu_and_words_are_checked():
    auto = Accel.resolve(CPU)
    assert auto.autocast_dtype is None and auto.channels_last
    with pytest.raises(ValueError, match="precision"):
        Accel.resolve(CPU, "fp16")
    with pytest.raises(ValueError, match="channels-last"):
        TrainConfig(channels_last="yes")


def test_run_config_names_bad_precision_and_refuses_bf16_with_dp():
    assert RunConfig.from_run_config({"precision": "bf16"}).precision == "bf16"
    with pytest.raises(ValueError, match="'precision'"):
        RunConfig.from_run_config({"precision": "half"})
    with pytest.raises(ValueError, match="'channels-last'"):
        RunConfig.from_run_config({"channels-last": "maybe"})
    dp = {"dp.enabled": True, "norm": "group", "dp.noise-multiplier": 1.0}
    with pytest.raises(ValueError, match="'precision'.*DP"):
        RunConfig.from_run_config({**dp, "precision": "bf16"})
    assert RunConfig.from_run_config(dp).precision == "auto"
