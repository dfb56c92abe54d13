"""``compile``: the one loop compiled trains like eager; DP and bad words are refused."""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from client.predict import COMPILE_FROM, compile_word, infer
from common.accel import Accel, can_compile
from common.config import RunConfig
from common.resident import ResidentBatches
from common.training import TrainConfig, predict, train_epoch

CPU = torch.device("cpu")


def tiny(seed: int = 0, group_norm: bool = False) -> nn.Module:
    """A conv, a norm and a head: the paper's kinds of layer, compiled in seconds."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 5, stride=5),
        nn.GroupNorm(2, 4) if group_norm else nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def patches(n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 90, (n, 50, 50, 3)).astype(np.uint8)
    images[labels == 1] += 120
    return images, labels


def _epoch(accel: Accel, images: np.ndarray, labels: np.ndarray) -> tuple[dict, nn.Module]:
    model = accel.prepare(tiny())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    src = ResidentBatches(images, labels, 8, CPU)  # 3 steps, same order: no shuffle
    return train_epoch(model, src, opt, CPU, accel=accel), model


@pytest.mark.skipif(not can_compile(CPU), reason="torch.compile needs a C++ compiler on a CPU")
def test_compiled_loop_trains_to_the_eager_loss_and_weights(monkeypatch: pytest.MonkeyPatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "compile_threads", 1)  # no worker pool for a tiny graph
    images, labels = patches()
    eager_accel = Accel.resolve(CPU, "fp32", "off", "off")
    eager, eager_model = _epoch(eager_accel, images, labels)
    compiled_accel = Accel.resolve(CPU, "fp32", "off", "on")
    assert compiled_accel.compile and "compiled" in compiled_accel.describe()
    done, model = _epoch(compiled_accel, images, labels)
    assert done["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    assert done["accuracy"] == eager["accuracy"] and done["steps"] == 3
    # The compiled forward updated the eager model's own weights: same keys, same values.
    assert model.state_dict().keys() == eager_model.state_dict().keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, eager_model.state_dict()[name], rtol=1e-4, atol=1e-5)
    src = ResidentBatches(images, labels, 8, CPU)
    _, probs, loss = predict(model, src, CPU, compiled_accel)
    _, eager_probs, eager_loss = predict(eager_model, src, CPU, eager_accel)
    np.testing.assert_allclose(probs, eager_probs, atol=1e-5)
    np.testing.assert_allclose(loss, eager_loss, rtol=1e-4)
    np.testing.assert_allclose(infer(model, images, CPU, 8, compiled_accel), probs, atol=1e-5)


def test_compile_refuses_opacus_per_sample_gradients_with_a_reason():
    wrapped = GradSampleModule(tiny(group_norm=True))  # DP's norm
    with pytest.raises(ValueError, match="per-sample gradients.*compile"):
        Accel.resolve(CPU, compile="on").compiled(wrapped)
    assert Accel.resolve(CPU).compiled(wrapped) is wrapped  # auto: off, DP trains eagerly


def test_compile_words_are_checked_and_auto_is_off_for_training():
    assert not Accel.resolve(CPU).compile
    with pytest.raises(ValueError, match="compile must be one of"):
        Accel.resolve(CPU, compile="yes")
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="maybe")
    assert RunConfig.from_run_config({"compile": "on"}).compile == "on"
    with pytest.raises(ValueError, match="'compile'"):
        RunConfig.from_run_config({"compile": "fast"})
    dp = {"dp.enabled": True, "norm": "group", "dp.noise-multiplier": 1.0}
    assert RunConfig.from_run_config({**dp, "compile": "off"}).compile == "off"
    with pytest.raises(ValueError, match="'compile'.*with DP"):
        RunConfig.from_run_config({**dp, "compile": "on"})


def test_predict_compiles_a_large_folder_on_a_cpu_only_when_auto():
    large, small = COMPILE_FROM, COMPILE_FROM - 1
    assert compile_word("auto", large, CPU) == ("on" if can_compile(CPU) else "off")
    assert compile_word("auto", small, CPU) == "off"
    assert compile_word("auto", large, torch.device("cuda")) == "off"  # unmeasured there
    assert compile_word("off", large, CPU) == "off" and compile_word("on", 1, CPU) == "on"
