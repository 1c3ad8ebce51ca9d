"""The training techniques of the learning-per-epoch study (lab/levers.py, LabTrainConfig): each
does what its setting says, and each is off by default, leaving the recipe's computation as it was."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import FULL_NET, SEPARABLE_NET, interrupt_after_epoch_1
from dataset import TensorLoader
from model import ConvBlock, build_model
from norm_stats import fixed_batch, probe_layers
from optimizers import Chain, KernelMatrix
from utils import fit

from lab.levers import LabTrainConfig, Lookahead, patch_whitening, prepare_for_training


def optimizer_for(model, config, device="cpu"):
    """The optimizer fit builds for `config` (the lab's hooks add the lever groups)."""
    return config.hooks().make_optimizer(model, config, device)


def test_every_technique_is_off_by_default():
    train = LabTrainConfig()
    assert (train.whiten, train.norm_bias_lr, train.freeze_norm_scale, train.alternate_flip,
            train.lookahead) == ("off", 1.0, False, False, 0)


def test_patch_whitening_filters_decorrelate_the_patches_they_were_computed_from():
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(3, 3, generator=g)  # correlated colour channels
    images = torch.einsum("ij,njhw->nihw", mixing, torch.randn(64, 3, 12, 12, generator=g))
    filters = patch_whitening(images, 16, eps=0.0)
    assert filters.shape == (16, 3, 3, 3)
    assert torch.equal(filters[8:], -filters[:8])  # +/- pairs, so ReLU keeps both signs
    out = F.conv2d(images, filters[:8]).permute(1, 0, 2, 3).reshape(8, -1)
    assert torch.allclose(torch.cov(out), torch.eye(8), atol=1e-3)


def test_whitening_reads_only_the_images_it_is_given_and_can_be_frozen(tiny_data):
    model = build_model("batch", seed=0)
    images = tiny_data.train_x[:50].float() / 255
    prepare_for_training(model, LabTrainConfig(whiten="frozen"), images)
    assert torch.allclose(model.C1[0].weight, patch_whitening(images, model.config.widths[0]))
    assert not model.C1[0].weight.requires_grad
    assert model.get_num_params() == \
        build_model("batch").get_num_params() - model.C1[0].weight.numel()  # C1 no longer trains
    trainable = build_model("batch", seed=0)
    prepare_for_training(trainable, LabTrainConfig(whiten="trainable"), images)
    assert trainable.C1[0].weight.requires_grad


def test_a_frozen_first_layer_stays_put_and_the_probe_still_reports_it(tiny_data):
    model = build_model("batch", seed=0)
    config = LabTrainConfig(epochs=2, batch_size=20, whiten="frozen")
    history = fit(model, tiny_data, config, "cpu", progress=False)
    images, _ = fixed_batch(
        tiny_data.train_x, tiny_data.train_y, tiny_data.mean, tiny_data.std, "cpu", per_class=500)
    assert torch.allclose(model.C1[0].weight, patch_whitening(images, model.config.widths[0]))
    assert all(g > 0 for g in history["grad_norm"][-1])  # C1's gradient is measured anyway


def test_the_norms_shifts_get_their_own_rate_and_frozen_scales_stay_at_one(tiny_data):
    model = build_model("group", seed=0)
    config = LabTrainConfig(epochs=1, batch_size=20, norm_bias_lr=16, freeze_norm_scale=True,
                         optimizer="sgd")  # the fast group is SGD's last
    prepare_for_training(model, config, None)
    optimizer = optimizer_for(model, config)
    shifts = {id(b[1].bias) for b in model.modules() if isinstance(b, ConvBlock)}
    fast = optimizer.param_groups[-1]
    assert {id(p) for p in fast["params"]} == shifts and fast["lr"] == 16 * config.lr
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(b[1].weight) in trained for b in model.modules() if isinstance(b, ConvBlock))
    fit(model, tiny_data, config, "cpu", progress=False)
    assert all(torch.equal(b[1].weight, torch.ones_like(b[1].weight))
               for b in model.modules() if isinstance(b, ConvBlock))


# Muon: C1 and the dense kernel of C2 C4 C5 C7 C8 C9; SGD: the 1x1 transitions and head (and
# the separable blocks' depthwise filters), then the norms and the head's bias
@pytest.mark.parametrize("net,sgd_groups", [(SEPARABLE_NET, [9, 15]), (FULL_NET, [3, 15])])
def test_the_default_optimizer_is_muon_for_the_dense_kernels_and_sgd_for_the_rest(net, sgd_groups):
    optimizer = optimizer_for(build_model("batch", seed=0, **net), LabTrainConfig())
    sgd, muon = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(sgd, torch.optim.SGD)
    assert [len(g["params"]) for g in muon.param_groups] == [7]
    assert [len(g["params"]) for g in sgd.param_groups] == sgd_groups


def test_muon_takes_the_1x1_halves_of_separable_blocks_and_sgd_their_depthwise_filters():
    model = build_model("batch", seed=0, **SEPARABLE_NET)
    sgd, muon = optimizer_for(model, LabTrainConfig()).optimizers
    in_muon = {id(p.kernel) for p in muon.param_groups[0]["params"]}
    blocks = [model.C2, model.C4, model.C5, model.C7, model.C8, model.C9]
    assert in_muon == {id(model.C1[0].weight)} | {id(b[0][1].weight) for b in blocks}
    in_sgd = {id(p) for g in sgd.param_groups for p in g["params"]}
    assert all(id(b[0][0].weight) in in_sgd for b in blocks)


def test_recipe_v1_optimizer_is_sgd_with_two_groups():
    groups = optimizer_for(build_model("batch", seed=0, **FULL_NET),
                            LabTrainConfig(optimizer="sgd")).param_groups
    assert [len(g["params"]) for g in groups] == [10, 15]  # conv weights; norms and head bias


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
    images = torch.arange(8 * 3 * 4 * 4, dtype=torch.float32).view(8, 3, 4, 4).to(torch.uint8)
    labels = torch.arange(8)
    loader = TensorLoader(images, labels, (0, 0, 0), (1, 1, 1), 8, train=True, pad=0,
                          alternate_flip=True, channels_last=False)

    def flipped():
        (x, y), = list(loader)
        plain = images[y].float() / 255
        return {int(label): bool(torch.equal(img, p.flip(2)))
                for img, p, label in zip(x, plain, y)}

    first, second, third = flipped(), flipped(), flipped()
    assert all(second[i] != first[i] for i in range(8)) and third == first
    assert 0 < sum(first.values()) < 8
    resumed = TensorLoader(images, labels, (0, 0, 0), (1, 1, 1), 8, train=True, pad=0,
                           alternate_flip=True, channels_last=False)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.epoch == 3


def test_probe_reports_a_frozen_conv(tiny_data):
    model = build_model("layer", seed=0)
    model.C1[0].weight.requires_grad_(False)
    batch = (torch.randn(10, 3, 32, 32), torch.arange(10))
    grad_norms = probe_layers(model, batch)["grad_norm"]
    assert len(grad_norms) == 7 and grad_norms[0] > 0  # C1 first, frozen or not


def test_muon_updates_the_3x3_kernels_through_their_matrix_views_and_sgd_the_rest(tiny_data):
    model = build_model("batch", seed=0, **FULL_NET).to(memory_format=torch.channels_last)
    config = LabTrainConfig(optimizer="muon")
    optimizer = optimizer_for(model, config)
    assert isinstance(optimizer, Chain)
    sgd, muon = optimizer.optimizers
    kernels = [m.weight for m in model.modules()
               if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    matrices = muon.param_groups[0]["params"]
    assert len(matrices) == len(kernels) == 7 and all(isinstance(p, KernelMatrix) for p in matrices)
    assert not any(k is p for k in kernels for g in sgd.param_groups for p in g["params"])
    before = [k.detach().clone() for k in kernels]
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
    optimizer.step()
    for kernel, old, matrix in zip(kernels, before, matrices):
        assert not torch.equal(kernel, old)  # the view's update landed in the kernel
        step = (kernel - old).permute(matrix.order).reshape(kernel.shape[0], -1)
        singular = torch.linalg.svdvals(step.double())  # an orthogonalized update: equal values
        assert singular.max() / singular[singular > 1e-9].min() < 2
    optimizer.zero_grad()
    assert all(k.grad is None for k in kernels)


OPTIMIZER_SETTINGS = {"muon": {"optimizer": "muon", "lr": 0.1},
                      "adamw": {"optimizer": "adamw", "lr": 0.003},
                      "sgd+lookahead": {"optimizer": "sgd", "lookahead": 3},
                      "muon+lookahead": {"optimizer": "muon", "lookahead": 3}}


@pytest.mark.parametrize("name", OPTIMIZER_SETTINGS)
def test_every_optimizer_trains_under_one_schedule_and_resumes_exactly(name, tiny_data, tmp_path):
    config = LabTrainConfig(epochs=2, batch_size=20, **OPTIMIZER_SETTINGS[name])
    whole = fit(build_model("group", seed=0), tiny_data, config, "cpu", progress=False)
    assert whole["train_loss"][-1] < whole["train_loss"][0]
    ckpt = tmp_path / "run.pt"
    interrupt_after_epoch_1("group", tiny_data, config, ckpt)
    resumed = fit(build_model("group", seed=0), tiny_data, config, "cpu", checkpoint_path=ckpt,
                  resume=True, progress=False)
    assert resumed["test_loss"] == whole["test_loss"]  # the optimizer's state came back whole


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_lookahead_pulls_the_fast_weights_back_alpha_of_the_way_every_k_steps(optimizer):
    plain_model, model = build_model("batch", seed=0), build_model("batch", seed=0)
    settings = {"optimizer": optimizer, "lookahead": 2}
    plain = optimizer_for(plain_model, LabTrainConfig(optimizer=optimizer))
    lookahead = optimizer_for(model, LabTrainConfig(**settings))
    assert isinstance(lookahead, Lookahead)
    lookahead.param_groups[-1]["lr"] = 0.123  # what a scheduler does: it reaches the inner one
    assert lookahead.optimizer.param_groups[-1]["lr"] == 0.123
    lookahead.param_groups[-1]["lr"] = plain.param_groups[-1]["lr"]
    start = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8)
    for step in (1, 2):  # the same batch: the fast weights follow the plain optimizer's path
        for m, opt in ((plain_model, plain), (model, lookahead)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        if step == 1:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(),
                                                         plain_model.parameters()))
    for p, fast, old in zip(model.parameters(), plain_model.parameters(), start):
        torch.testing.assert_close(p, old + 0.5 * (fast - old))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), start))


def test_lookahead_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="lookahead must be at least 0"):
        LabTrainConfig(lookahead=-1)


def test_a_muon_rate_without_muon_is_refused_rather_than_ignored():
    with pytest.raises(ValueError, match="muon_lr applies to optimizer 'muon' only"):
        LabTrainConfig(optimizer="sgd", muon_lr=0.1)
    assert LabTrainConfig(optimizer="muon", muon_lr=0.1).muon_lr == 0.1


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer must be one of sgd, muon, adamw"):
        LabTrainConfig(optimizer="lion")


def test_muon_depthwise_hands_each_layers_depthwise_filters_to_muon_as_one_matrix():
    model = build_model("batch", seed=0, **SEPARABLE_NET).to(memory_format=torch.channels_last)
    optimizer = optimizer_for(model, LabTrainConfig(muon_depthwise=True))
    sgd, muon = optimizer.optimizers
    blocks = [model.C2, model.C4, model.C5, model.C7, model.C8, model.C9]
    matrices = {id(p.kernel): p for p in muon.param_groups[0]["params"]}
    assert set(matrices) >= {id(b[0][0].weight) for b in blocks}
    assert len(matrices) == 13  # C1, and each block's depthwise and 1x1 halves
    in_sgd = {id(p) for g in sgd.param_groups for p in g["params"]}
    assert not in_sgd & set(matrices)
    depthwise = model.C7[0][0].weight
    assert tuple(matrices[id(depthwise)].shape) == (depthwise.shape[0], 9)  # channels x taps
    before = depthwise.detach().clone()
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    F.cross_entropy(model(x), torch.arange(8)).backward()
    optimizer.step()
    step = (depthwise - before).reshape(depthwise.shape[0], 9).double()
    singular = torch.linalg.svdvals(step)  # orthogonalized: nine equal singular values
    assert singular.max() / singular.min() < 2


def test_depthwise_lr_scales_the_depthwise_filters_rate_alone_under_the_schedule():
    model = build_model("batch", seed=0, **SEPARABLE_NET)
    config = LabTrainConfig(depthwise_lr=4)
    sgd, _ = optimizer_for(model, config).optimizers
    depthwise = {id(b[0][0].weight) for b in (model.C2, model.C4, model.C5, model.C7, model.C8,
                                              model.C9)}
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in sgd.param_groups for p in g["params"]}
    assert {rate[i] for i in depthwise} == {(config.lr * 4, config.weight_decay)}
    assert {r for i, r in rate.items() if i not in depthwise} == {
        (config.lr, config.weight_decay), (config.lr, 0.0)}


@pytest.mark.parametrize("settings,message", [
    ({"muon_depthwise": True, "optimizer": "sgd"}, "muon_depthwise needs optimizer 'muon'"),
    ({"muon_depthwise": True, "depthwise_lr": 2}, "pass one of the two")])
def test_depthwise_optimizer_settings_that_clash_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError, match=message):
        LabTrainConfig(**settings)
