import pytest
import torch
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError

from common.model import build_model, count_parameters


def test_batch_model_matches_table_2_totals():
    assert count_parameters(build_model("batch")) == (2_648_514, 960)
    assert sum(count_parameters(build_model("batch"))) == 2_649_474


def test_group_model_has_same_trainable_parameters_and_passes_opacus():
    model = build_model("group")
    assert count_parameters(model) == (2_648_514, 0)
    assert ModuleValidator.validate(model, strict=True) == []
    with pytest.raises(UnsupportedModuleError):
        ModuleValidator.validate(build_model("batch"), strict=True)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_output_is_two_logits(norm):
    model = build_model(norm).eval()
    assert model(torch.rand(5, 3, 50, 50)).shape == (5, 2)


def test_seeded_initialisation_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_model(seed=7), build_model(seed=7), build_model(seed=8)
    assert torch.rand(1) == before
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    assert not torch.equal(a.head[0].weight, c.head[0].weight)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm"):
        build_model("layer")  # type: ignore[arg-type]
