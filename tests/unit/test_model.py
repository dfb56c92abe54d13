import pytest
import torch
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError

from common.model import IDCNet, build_model, count_parameters
from common.provenance import ModelIntegrityError


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


def test_gap_variant_keeps_the_trunk_and_drops_the_dense_20000_layer():
    paper, gap = build_model("batch"), build_model("batch", kind="gap")
    # trunk 75,456 + dense 32->128 (4,224) + the paper's head from there on (12,930)
    assert count_parameters(gap) == (92_610, 960)
    assert count_parameters(build_model("group", kind="gap")) == (92_610, 0)
    trunk = sum(p.numel() for m in (paper.stem, paper.blocks) for p in m.parameters())
    assert trunk == 75_456
    assert gap(torch.rand(3, 3, 50, 50)).shape == (3, 2)
    assert ModuleValidator.validate(build_model("group", kind="gap"), strict=True) == []


def test_model_kind_is_read_back_from_the_weights():
    from common.model import model_kind

    assert model_kind(build_model("batch").state_dict()) == "paper"
    assert model_kind(build_model("group", kind="gap").state_dict()) == "gap"
    with pytest.raises(ValueError, match="head.0.weight"):
        model_kind({"stem.0.weight": torch.zeros(32, 3, 3, 3)})
    with pytest.raises(ValueError, match="model"):
        build_model(kind="resnet")  # type: ignore[arg-type]


def test_predict_rebuilds_the_variant_a_model_file_records(tmp_path):
    from client.predict import load_network
    from common.provenance import save_model
    from common.site_data import model_arrays

    arrays = model_arrays(build_model("group", seed=3, kind="gap"))
    recorded = save_model(tmp_path / "model.idc", arrays, {"model": "gap", "norm": "group"})
    model, record = load_network(recorded)
    assert isinstance(model, IDCNet) and model.kind == "gap" and model.norm == "group"
    assert record is not None and record["model"] == "gap"
    torch.testing.assert_close(model.head[0].weight, torch.from_numpy(arrays["head.0.weight"]))
    plain = tmp_path / "model.pt"  # the centralized baseline's weights: no record
    torch.save(build_model("batch", kind="gap").state_dict(), plain)
    assert load_network(plain, allow_unverified=True)[0].kind == "gap"
    lying = save_model(tmp_path / "lying.idc", arrays, {"model": "paper"})
    with pytest.raises(ModelIntegrityError, match="does not hold"):
        load_network(lying)


@pytest.mark.parametrize("kind", ["paper-ws", "gap-ws"])
def test_weight_standardized_kinds_add_a_gain_per_conv_channel_and_are_read_back(kind):
    from common.model import WSConv2d, model_kind

    plain = build_model("group", seed=0, kind=kind.removesuffix("-ws"))
    ws = build_model("group", seed=0, kind=kind)
    convs = [m for m in ws.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 9 and all(isinstance(m, WSConv2d) for m in convs)
    assert count_parameters(ws)[0] == count_parameters(plain)[0] + 9 * 32  # the gains
    assert model_kind(ws.state_dict()) == kind
    assert model_kind(plain.state_dict()) == kind.removesuffix("-ws")
    assert ModuleValidator.validate(ws, strict=True) == []  # Opacus trains it (functorch)


def test_weight_standardized_conv_uses_a_zero_mean_unit_variance_kernel():
    from common.model import WSConv2d

    conv = WSConv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(3.0)  # far from standardized
        conv.gain.copy_(torch.arange(1.0, 5.0).view(4, 1, 1, 1))
    x = torch.rand(2, 3, 8, 8)
    w = conv.weight
    std = (w - w.mean((1, 2, 3), keepdim=True)) / w.var(
        (1, 2, 3), keepdim=True, unbiased=False
    ).add(1e-5).sqrt()
    expected = torch.nn.functional.conv2d(x, std * conv.gain, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)
    # a kernel's scale and offset do not change the output: only its shape does
    with torch.no_grad():
        conv.weight.mul_(10.0).sub_(1.0)
    torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-4)
