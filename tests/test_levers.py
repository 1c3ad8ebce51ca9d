"""The lab's network (lab/levers.py): at its defaults it is the course's, parameter for parameter
and step for step; each study switch does what it says and refuses what cannot hold."""

from dataclasses import fields

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import FULL_NET, NORMS, SEPARABLE_NET
import train
from model import ModelConfig, build_model
from optimizers import make_optimizer
from utils import TrainConfig, training_step
from variants import REGISTRY

from lab import train as lab_train
from lab.levers import (SKIP_LAYOUTS, LabModelConfig, LabTrainConfig, StdConv2d,
                        WideSeparableConv2d, build_lab_model)


@pytest.mark.parametrize("norm", REGISTRY)
@pytest.mark.parametrize("net", [{}, FULL_NET], ids=["separable", "full"])
def test_the_lab_network_at_its_defaults_is_the_course_network(norm, net):
    """The same parameters from the same seed, and two fp32 CPU steps (the lab's through its
    training hooks) with the same losses to the last bit, leaving the same state: the lab's
    studies measure the course's network and loop."""
    course, lab = build_model(norm, seed=0, **net), build_lab_model(norm, seed=0, **net)
    assert course.state_dict().keys() == lab.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(course.state_dict().values(),
                                                 lab.state_dict().values()))
    config, lab_config = TrainConfig(precision="fp32"), LabTrainConfig(precision="fp32")
    hooks = lab_config.hooks()  # the lab's steps in fit, at their defaults
    hooks.prepare(lab, None)
    optimizers = [make_optimizer(course, config), hooks.make_optimizer(lab, lab_config, "cpu")]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        (loss_course, _), (loss_lab, _) = [training_step(m, x, y, o, "fp32", label_smoothing=0.1)
                                           for m, o in zip((course, lab), optimizers)]
        hooks.after_step(lab)
        assert torch.equal(loss_course, loss_lab)
    assert hooks.eval_model(lab) is lab
    assert all(torch.equal(a, b) for a, b in zip(course.state_dict().values(),
                                                 lab.state_dict().values()))


def test_every_switch_is_off_by_default():
    config = LabModelConfig()
    assert (config.identity_init, config.weight_std, config.skips, config.group_size,
            config.depthwise_kernel, config.depthwise_dilation, config.se_hidden) == (
        "off", False, "blocks", 0, 3, 1, 0)


@pytest.mark.parametrize("norm", NORMS)
def test_skipinit_makes_each_residual_branch_pass_its_input_alone_and_still_learn(norm):
    model = build_lab_model(norm, seed=0, identity_init="skipinit").eval()
    assert set(model.branch_gains) == {"C2", "C5", "C8"}
    x = torch.randn(2, model.config.widths[0], 32, 32)
    assert torch.equal(model._stage(x, ("C2",)), x)  # the branch is gated off: the input alone
    # The trap this avoids: a zeroed norm scale makes the block ReLU(0 * z + 0) = 0, whose
    # gradient is 0, so that branch never wakes. The gain learns at once, the branch from the
    # second step on.
    model.train()
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    assert all(gain != 0 for gain in model.branch_gains.values())
    assert all(p.grad.abs().sum() > 0 for name in ("C2", "C5", "C8")
               for p in getattr(model, name)[0].parameters())  # the branch's conv(s)
    assert model.get_num_params() == build_lab_model(norm, seed=0).get_num_params() + 3


def test_dirac_identity_init_adds_an_identity_kernel_to_square_3x3_convs():
    plain = build_lab_model("batch", seed=0, **FULL_NET)
    dirac = build_lab_model("batch", seed=0, identity_init="dirac", **FULL_NET)
    for name in ("C2", "C4", "C5", "C7", "C8", "C9"):
        diff = getattr(dirac, name)[0].weight - getattr(plain, name)[0].weight
        assert torch.allclose(diff, nn.init.dirac_(torch.empty_like(diff)))
    assert torch.equal(dirac.C1[0].weight, plain.C1[0].weight)  # 3 -> 16: not square


def test_skipinit_follows_the_skip_layout():
    model = build_lab_model("batch", seed=0, identity_init="skipinit", skips="per-conv")
    assert list(model.branch_gains) == ["C2", "C4", "C5", "C7", "C8", "C9"]
    with pytest.raises(ValueError, match="identity_init skipinit needs skip connections"):
        LabModelConfig(identity_init="skipinit", skips="off")
    with pytest.raises(ValueError, match="identity_init must be one of off, skipinit, dirac"):
        LabModelConfig(identity_init="zero")  # a zeroed norm scale before ReLU: see above


@pytest.mark.parametrize("norm", NORMS)
def test_weight_standardization_convolves_with_standardized_filters(norm):
    model = build_lab_model(norm, seed=0, weight_std=True, **FULL_NET)
    conv = model.C4[0]
    x = torch.randn(2, 28, 16, 16)
    w = conv.weight
    standardized = (w - w.mean((1, 2, 3), keepdim=True)) / \
        w.var((1, 2, 3), keepdim=True, unbiased=False).add(1e-5).sqrt()
    assert torch.allclose(conv(x), F.conv2d(x, standardized, padding=1), atol=1e-5)
    assert model.get_num_params() == build_lab_model(norm, **FULL_NET).get_num_params()


def test_weight_standardization_can_leave_the_depthwise_filters_as_trained():
    """`wstd-pw`: the 1x1 halves (and C1) standardized, each depthwise filter free to average."""
    model = build_lab_model("layer", seed=0, weight_std=True, weight_std_depthwise=False,
                        **SEPARABLE_NET)
    depthwise, pointwise = model.C4[0]
    x = torch.randn(2, depthwise.in_channels, 16, 16)
    assert torch.allclose(depthwise(x), F.conv2d(x, depthwise.weight, padding=1,
                                                 groups=depthwise.groups), atol=1e-6)
    w = pointwise.weight
    standardized = (w - w.mean((1, 2, 3), keepdim=True)) / \
        w.var((1, 2, 3), keepdim=True, unbiased=False).add(1e-5).sqrt()
    assert torch.allclose(pointwise(x), F.conv2d(x, standardized), atol=1e-5)
    assert isinstance(model.C1[0], StdConv2d) and not isinstance(depthwise, StdConv2d)
    default = build_lab_model("layer", seed=0, weight_std=True, **SEPARABLE_NET)
    assert isinstance(default.C4[0][0], StdConv2d)  # by default, depthwise filters too
    with pytest.raises(ValueError, match="^weight_std_depthwise off needs weight_std on"):
        LabModelConfig(weight_std_depthwise=False)


def logits_with_a_silenced_block(model, block):
    """Logits of two different images when `block` outputs zeros."""
    getattr(model, block).register_forward_hook(lambda m, i, out: torch.zeros_like(out))
    return model(torch.randn(2, 3, 32, 32)).detach()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("skips,block", [("blocks", "C2"), ("blocks", "C5"), ("blocks", "C8"),
                                         ("per-conv", "C4"), ("per-conv", "C9")])
def test_skip_connections_carry_the_signal_past_a_silenced_block(norm, skips, block):
    # In a plain chain, a block that outputs zeros makes the logits independent of the input.
    a, b = logits_with_a_silenced_block(build_lab_model(norm, seed=0, skips=skips).eval(), block)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("skips,block", [("off", "C2"), ("off", "C8"), ("blocks", "C9")])
def test_a_block_without_a_skip_around_it_cuts_the_signal(skips, block):
    a, b = logits_with_a_silenced_block(build_lab_model("batch", seed=0, skips=skips).eval(), block)
    assert torch.allclose(a, b)


@pytest.mark.parametrize("skips", SKIP_LAYOUTS)
def test_every_skip_layout_keeps_the_parameters_and_the_logits_shape(skips):
    model = build_lab_model("group", seed=0, skips=skips)
    assert model.get_num_params() == build_lab_model("group", seed=0).get_num_params()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_an_unknown_skip_layout_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="skips must be one of blocks, per-conv, off"):
        LabModelConfig(skips="dense")


def test_group_norm_by_group_size_keeps_channels_per_group_fixed():
    model = build_lab_model("group", group_size=4, **FULL_NET)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [
        (4, 16), (4, 16), (7, 28), (7, 28), (8, 32), (8, 32), (8, 32)]
    assert model.get_num_params() == build_lab_model("group", **FULL_NET).get_num_params()
    with pytest.raises(ValueError, match=r"layer C4: GroupNorm with groups of 8 channels cannot "
                                         r"normalize 28 channels"):
        build_lab_model("group", group_size=8, **FULL_NET)


def test_dirac_with_separable_blocks_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"identity_init dirac needs conv full"):
        build_lab_model("batch", conv="separable", identity_init="dirac")


# The learning-per-epoch study's levers on the depthwise filters and the branches (issue 52)
LEVER_NETS = {"dw5": {"depthwise_kernel": 5, "widths": (32, 60, 84)},
              "dil2": {"depthwise_dilation": 2}, "se4": {"se_hidden": 4}}


@pytest.mark.parametrize("lever", LEVER_NETS)
@pytest.mark.parametrize("norm", NORMS)
def test_every_lever_network_stays_under_50k_and_every_parameter_learns(norm, lever):
    model = build_lab_model(norm, seed=0, **LEVER_NETS[lever])
    assert model.get_num_params() < 50_000
    loss = F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kernel,dilation,view", [(5, 1, 5), (3, 2, 5), (3, 1, 3)])
def test_the_depthwise_filters_see_the_view_asked_for_and_keep_the_map_size(kernel, dilation,
                                                                             view):
    conv = WideSeparableConv2d(4, 4, kernel=kernel, dilation=dilation)
    x = torch.zeros(1, 4, 11, 11, requires_grad=True)
    out = conv(x)
    assert out.shape == x.shape
    out[0, :, 5, 5].sum().backward()  # which inputs reach the centre pixel
    reached = (x.grad[0].abs().sum(0) > 0).nonzero()
    assert (reached.max(0).values - reached.min(0).values + 1).tolist() == [view, view]


def test_squeeze_excitation_gates_the_three_branches_by_their_global_averages():
    model = build_lab_model("batch", seed=0, se_hidden=4).eval()
    assert set(model.excite) == {"C2", "C5", "C8"}
    assert model.get_num_params() - build_lab_model("batch").get_num_params() == sum(
        2 * 4 * c + 4 + c for c in model.config.widths)  # two 1x1 convs with biases each
    x = torch.randn(2, 32, 16, 16)
    gate = model.excite["C2"](x) / x
    assert ((gate > 0) & (gate < 1)).all()
    torch.testing.assert_close(gate, gate[:, :, :1, :1].expand_as(gate))  # one gate a channel


@pytest.mark.parametrize("settings,message", [
    ({"depthwise_kernel": 4}, "depthwise_kernel must be odd"),
    ({"depthwise_kernel": 5, "conv": "full"}, "need conv separable"),
    ({"se_hidden": 4, "skips": "off"}, "se_hidden needs skips blocks")])
def test_lever_settings_that_cannot_hold_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError, match=message):
        build_lab_model("batch", **settings)


def test_lab_train_takes_every_flag_of_train_py_and_one_per_switch(capsys):
    """`python -m lab.train` runs what train.py runs, and the lab's switches on top; train.py
    itself offers none of them."""
    course, lab = vars(train.parse_args([])), vars(lab_train.parse_args([]))
    switches = {f.name for cls, base in ((LabModelConfig, ModelConfig),
                                         (LabTrainConfig, TrainConfig))
                for f in fields(cls) if f.name not in {g.name for g in fields(base)}}
    assert set(lab) - set(course) == switches and set(course) <= set(lab)
    assert {k: v for k, v in lab.items() if k in course} == course  # the same defaults
    with pytest.raises(SystemExit):
        train.parse_args(["--whiten", "frozen"])
    assert "the studies' switches are python -m lab.train's flags" in capsys.readouterr().err
