"""The from-scratch normalizations of normalizations.py against PyTorch's modules, and the facts
of the axes figure (nbval never compares images)."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import normalizations as ref
from model import ModelConfig

# float64 throughout: any mismatch is a wrong formula, not rounding
F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def activations(seed=0, shape=(6, 8, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    # an offset and a scale per channel, as real activations have
    return (torch.randn(shape, generator=g, dtype=F64) * 3
            + torch.arange(shape[1], dtype=F64).reshape(1, -1, 1, 1))


def with_random_affine(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        module.weight.copy_(torch.rand(module.weight.shape, generator=g, dtype=F64) + 0.5)
        module.bias.copy_(torch.randn(module.bias.shape, generator=g, dtype=F64))
    return module


def assert_same_forward_and_backward(module, ours, x):
    """Outputs, and the gradients of a non-trivial loss w.r.t. the input and the affine
    parameters, of PyTorch's module and of our formula with copies of its parameters."""
    weight = module.weight.detach().clone().requires_grad_()
    bias = module.bias.detach().clone().requires_grad_()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = module(x1), ours(x2, weight, bias)
    torch.testing.assert_close(y2, y1, **TOL)
    upstream = torch.randn(y1.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    (y1 * upstream).sum().backward()
    (y2 * upstream).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, **TOL)
    torch.testing.assert_close(weight.grad, module.weight.grad, **TOL)
    torch.testing.assert_close(bias.grad, module.bias.grad, **TOL)


def test_batch_norm_matches_pytorch_in_training_with_its_running_statistics():
    module = with_random_affine(nn.BatchNorm2d(8, momentum=0.1))
    running_mean, running_var = torch.zeros(8, dtype=F64), torch.ones(8, dtype=F64)
    for step in range(4):  # several updates: the moving average and its unbiased variance
        x = activations(seed=step)
        assert_same_forward_and_backward(
            module, lambda x, w, b: ref.batch_norm(x, w, b, running_mean, running_var,
                                                   training=True), x)
        module.weight.grad = module.bias.grad = None
    torch.testing.assert_close(running_mean, module.running_mean, **TOL)
    torch.testing.assert_close(running_var, module.running_var, **TOL)
    assert not torch.allclose(running_var, torch.ones(8, dtype=F64))  # the update did happen


def test_batch_norm_matches_pytorch_in_evaluation_with_running_statistics():
    module = with_random_affine(nn.BatchNorm2d(8))
    for step in range(3):
        module(activations(seed=step))
    module.eval()
    running_mean, running_var = module.running_mean.clone(), module.running_var.clone()
    x = activations(seed=9)
    assert_same_forward_and_backward(
        module, lambda x, w, b: ref.batch_norm(x, w, b, running_mean, running_var,
                                               training=False), x)
    # evaluation leaves the statistics alone, and one image's output ignores the others
    torch.testing.assert_close(running_mean, module.running_mean, **TOL)
    alone = ref.batch_norm(x[:1], module.weight, module.bias, running_mean, running_var, False)
    torch.testing.assert_close(alone, module(x)[:1], **TOL)


def test_layer_norm_matches_the_models_layer_norm_and_nn_layer_norm():
    x = activations()
    assert_same_forward_and_backward(with_random_affine(nn.GroupNorm(1, 8)), ref.layer_norm, x)
    # nn.LayerNorm([C, H, W]): the same statistics, an affine parameter per element
    assert_same_forward_and_backward(with_random_affine(nn.LayerNorm([8, 5, 4])),
                                     ref.layer_norm, x)


@pytest.mark.parametrize("num_groups", [1, 2, 4, 8])
def test_group_norm_matches_pytorch(num_groups):
    module = with_random_affine(nn.GroupNorm(num_groups, 8))
    assert_same_forward_and_backward(
        module, lambda x, w, b: ref.group_norm(x, num_groups, w, b), activations())


def test_instance_norm_matches_pytorch():
    module = with_random_affine(nn.InstanceNorm2d(8, affine=True))
    assert_same_forward_and_backward(module, ref.instance_norm, activations())


def test_group_norm_says_when_the_groups_do_not_divide_the_channels():
    with pytest.raises(ValueError, match="does not divide the 8 channels"):
        ref.group_norm(activations(), 3, torch.ones(8, dtype=F64), torch.zeros(8, dtype=F64))


def test_each_output_is_normalized_along_its_own_axes_only():
    """What a reader should take away: BN's output has mean 0 per channel, not per image;
    LN's per image, not per channel."""
    x = activations()
    ones, zeros = torch.ones(8, dtype=F64), torch.zeros(8, dtype=F64)
    bn = ref.batch_norm(x, ones, zeros, zeros.clone(), ones.clone(), training=True)
    ln = ref.layer_norm(x, ones, zeros)
    per_channel, per_image = (0, 2, 3), (1, 2, 3)
    assert bn.mean(dim=per_channel).abs().max() < 1e-10
    assert bn.mean(dim=per_image).abs().max() > 0.1
    assert ln.mean(dim=per_image).abs().max() < 1e-10
    assert ln.mean(dim=per_channel).abs().max() > 0.1


def test_shared_statistics_masks_shade_each_methods_set():
    shape, anchor = (6, 8, 5), (2, 5, 3)  # N, C, H*W; image 2, channel 5
    masks = {name: ref.shared_statistics_mask(axes, shape, anchor, num_groups=4)
             for name, axes in (("batch", "per_channel"), ("layer", "per_image"),
                                ("group", "per_group"), ("instance", "per_image_channel"))}
    n, c, hw = shape
    assert np.argwhere(masks["batch"].any(axis=(0, 2))).ravel().tolist() == [5]
    assert masks["batch"][:, 5, :].all() and masks["batch"].sum() == n * hw
    assert np.argwhere(masks["layer"].any(axis=(1, 2))).ravel().tolist() == [2]
    assert masks["layer"][2].all() and masks["layer"].sum() == c * hw
    # 4 groups of 2 channels: channel 5 is in the group {4, 5}
    assert np.argwhere(masks["group"][2].any(axis=1)).ravel().tolist() == [4, 5]
    assert masks["group"].sum() == 2 * hw
    assert masks["instance"][2, 5].all() and masks["instance"].sum() == hw
    for mask in masks.values():  # every set holds the anchor and spans all pixels
        assert mask[anchor] and (mask.any(axis=2) == mask.all(axis=2)).all()


def test_norm_axes_figure_draws_the_masks_with_this_repositorys_group_count(tmp_path):
    groups = ModelConfig().num_groups
    fig, masks = ref.plot_norm_axes(tmp_path / "axes.png", num_groups=groups)
    assert (tmp_path / "axes.png").stat().st_size > 10_000
    assert [ax.get_title() for ax in fig.axes] == [
        "BatchNorm", "LayerNorm", f"GroupNorm ({groups} groups)", "InstanceNorm"]
    assert list(masks) == ["BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm"]
    n, c, hw = masks["GroupNorm"].shape
    assert masks["GroupNorm"].sum() == c // groups * hw  # one image, one group, all pixels
    with pytest.raises(ValueError, match="does not divide"):
        ref.plot_norm_axes(num_groups=3)


def test_the_notebooks_check_reports_every_method_and_fails_on_a_wrong_formula(monkeypatch):
    diffs = ref.check_against_torch()
    assert len(diffs) == 6 and max(diffs.values()) < 1e-12
    # the check must see a mistake, e.g. the unbiased variance used to normalize
    monkeypatch.setattr(ref, "_normalize",
                        lambda x, mean, var, eps: (x - mean) / torch.sqrt(var * 1.01 + eps))
    assert min(ref.check_against_torch().values()) < 1e-12  # running stats unaffected
    assert max(ref.check_against_torch().values()) > 1e-4
