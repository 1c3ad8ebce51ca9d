import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import FULL_NET, NORMS, ROOT, SEPARABLE_NET
from model import (ACTIVATIONS, CONVS, ModelConfig, Net, SeparableConv2d,
                   build_model, get_norm_layer)
from variants import canonical_norm


@pytest.mark.parametrize("norm", NORMS)
def test_under_50k_parameters_and_logits_shape(norm):
    model = build_model(norm, seed=0)
    assert model.get_num_params() < 50_000
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


# C1 C2 c3 C4 C5 c6 C7 C8 C9 C10; separable: C2 C4 C5 C7 C8 C9 are two convs each
@pytest.mark.parametrize("conv,convs", [("full", 10), ("separable", 16)])
def test_variants_share_the_convolution_layout(conv, convs):
    shapes = {norm: [tuple(m.weight.shape) for m in build_model(norm, conv=conv).modules()
                     if isinstance(m, nn.Conv2d)] for norm in NORMS}
    assert shapes["batch"] == shapes["group"] == shapes["layer"]
    assert len(shapes["batch"]) == convs


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("norm", NORMS)
def test_every_parameter_gets_a_finite_gradient(norm, conv):
    model = build_model(norm, seed=0, conv=conv)
    loss = F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_the_default_skips_are_the_three_documented_adds():
    model = build_model("batch", seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    h = model.C1(x)
    h = h + model.C2(h)
    h = F.max_pool2d(model.c3(h), 2)
    h = h + model.C5(model.C4(h))
    h = F.max_pool2d(model.c6(h), 2)
    h = model.C9(h + model.C8(model.C7(h)))
    assert torch.equal(model(x), model.C10(F.adaptive_avg_pool2d(h, 1)).flatten(1))


@pytest.mark.parametrize("alias,expected", [("bn", nn.BatchNorm2d), ("BatchNorm", nn.BatchNorm2d),
                                            ("gn", nn.GroupNorm), ("ln", nn.GroupNorm)])
def test_norm_factory_aliases(alias, expected):
    assert isinstance(get_norm_layer(alias)(8), expected)


def test_layer_norm_is_per_sample_over_channels_and_space():
    norm = get_norm_layer("layer")(16)
    x = torch.randn(3, 16, 5, 7) * 3 + 1
    assert norm.num_groups == 1
    assert torch.allclose(norm(x), F.layer_norm(x, x.shape[1:]), atol=1e-5)


def test_group_norm_uses_the_requested_groups():
    model = build_model("group", num_groups=2)
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {2}


@pytest.mark.parametrize("net,biased_convs", [
    (SEPARABLE_NET, [1, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1, 1]),  # their 1x1 halves
    (FULL_NET, [1, 1, 0, 1, 1, 0, 1, 1, 1, 1])])
@pytest.mark.parametrize("alias", ["none", "identity"])
def test_no_normalization_keeps_the_layout_and_puts_conv_biases_where_the_shift_was(alias, net,
                                                                                   biased_convs):
    model, reference = build_model(alias, seed=0, **net), build_model("batch", seed=0, **net)
    assert model.config.norm == "none"
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(m.weight.shape) for m in convs] == [
        tuple(m.weight.shape) for m in reference.modules() if isinstance(m, nn.Conv2d)]
    biased = [int(m.bias is not None) for m in convs]  # each conv before a norm, the classifier
    assert biased == biased_convs
    # each norm's 2C affine parameters become C biases
    assert model.get_num_params() == reference.get_num_params() - sum(
        m.out_channels for m, b in zip(convs[:-1], biased[:-1]) if b)
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_unknown_norm_lists_the_accepted_names():
    with pytest.raises(ValueError, match=r"unknown normalization 'instance'.*batch.*group.*layer"):
        build_model("instance")


def test_groups_that_do_not_divide_name_the_layer_and_channels():
    with pytest.raises(ValueError, match=r"layer C1: GroupNorm with 3 groups cannot normalize "
                                         r"16 channels"):
        Net(ModelConfig(norm="group", num_groups=3, **FULL_NET))


def test_canonical_names():
    assert [canonical_norm(n) for n in ("BN", "gn", "LayerNorm")] == ["batch", "group", "layer"]


def test_readme_states_the_real_parameter_count():
    count = build_model("batch").get_num_params()
    assert f"**{count:,} trainable parameters**" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "celu"])
@pytest.mark.parametrize("norm", NORMS)
def test_every_activation_builds_trains_and_keeps_the_parameter_count(norm, activation):
    model = build_model(norm, seed=0, activation=activation)
    assert model.get_num_params() == build_model(norm).get_num_params()
    assert sum(isinstance(m, ACTIVATIONS[activation]) for m in model.modules()) == 7  # C1 C2 C4 C5 C7 C8 C9
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_unknown_activation_names_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'; accepted: relu, gelu"):
        build_model("batch", activation="tanh")


@pytest.mark.parametrize("widths", [(24, 32, 28), (28, 32, 28)])
@pytest.mark.parametrize("norm", NORMS)
def test_the_studys_wider_networks_stay_under_50k_parameters(norm, widths):
    assert build_model(norm, widths=widths).get_num_params() < 50_000


@pytest.mark.parametrize("norm", NORMS)
def test_separable_blocks_are_a_depthwise_3x3_then_a_1x1_conv_after_a_full_c1(norm):
    model = build_model(norm, conv="separable", widths=(32, 64, 88))
    assert model.get_num_params() < 50_000
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(model.C1[0], nn.Conv2d) and model.C1[0].kernel_size == (3, 3)
    for name in ("C2", "C4", "C5", "C7", "C8", "C9"):
        depthwise, pointwise = getattr(model, name)[0]
        c = depthwise.in_channels
        assert (depthwise.groups, depthwise.out_channels, depthwise.kernel_size) == (c, c, (3, 3))
        assert pointwise.kernel_size == (1, 1) and pointwise.groups == 1, name


def test_a_separable_conv_is_the_full_conv_whose_kernel_factorizes():
    """Pointwise weight P (out, in) after depthwise filters D (in, 3, 3): the full 3x3 conv with
    kernel W[o, i] = P[o, i] * D[i]."""
    torch.manual_seed(0)
    conv = SeparableConv2d(5, 7)
    depthwise, pointwise = conv[0].weight[:, 0], conv[1].weight[:, :, 0, 0]
    x = torch.randn(2, 5, 8, 8)
    full = F.conv2d(x, pointwise[:, :, None, None] * depthwise[None], padding=1)
    torch.testing.assert_close(conv(x), full, rtol=1e-5, atol=1e-5)


