"""The statistics measured inside the networks: what the README's explanation relies on."""

import copy

import matplotlib
import pytest
import torch
import torch.nn.functional as F

matplotlib.use("Agg")

import norm_stats  # noqa: E402
from conftest import NORMS  # noqa: E402
from model import build_model  # noqa: E402
from norm_stats import (axis_statistics, fixed_batch, measure_norm_statistics, norm_layers,  # noqa: E402
                        plot_layer_probe, plot_norm_statistics, probe_layers)
from results import make_results  # noqa: E402
from utils import TrainConfig, fit  # noqa: E402

# fp32 everywhere: "auto" would run bf16 on some CPUs and fp32 on others
SHORT = TrainConfig(epochs=2, batch_size=20, lr=0.05, seed=0, eval_batch_size=50,
                    precision="fp32")
OWN_AXES = {"batch": "per_channel", "layer": "per_image", "group": "per_group"}


def test_axis_statistics_of_a_tensor_normalized_per_channel():
    x = torch.randn(8, 16, 4, 4) * torch.arange(1, 9).view(-1, 1, 1, 1) + 3  # images' scales differ
    per_channel = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), unbiased=False,
                                                                 keepdim=True)
    stats = axis_statistics(per_channel)
    assert stats["per_channel"]["abs_mean"] < 1e-6
    assert stats["per_channel"]["std_min"] == pytest.approx(1, abs=1e-6)
    assert stats["per_channel"]["std_max"] == pytest.approx(1, abs=1e-6)
    # normalizing per channel keeps the images' different scales: far from unit std per image
    assert stats["per_image"]["std_max"] / stats["per_image"]["std_min"] > 3


@pytest.mark.parametrize("norm", NORMS)
def test_each_method_normalizes_along_its_own_axes(norm, tiny_data):
    model = build_model(norm, seed=0)
    fit(model, tiny_data, SHORT, "cpu", progress=False)
    stats = measure_norm_statistics(model, tiny_data, "cpu")
    assert stats["layers"] == ["C1", "C2", "C4", "C5", "C7", "C8", "C9"]
    assert len(stats["normalized"]) == len(stats["input"]) == len(stats["output"]) == 7
    for layer in stats["normalized"]:
        own = layer[OWN_AXES[norm]]
        if norm == "batch":  # running statistics: near, not at, 0 and 1 at test time
            # after 20 steps at momentum 0.1 a running variance still holds 0.9**20 = 12% of its
            # initial 1, so the deep layers' small variances come out at 0.2 to 0.3 of unit std
            assert own["abs_mean"] < 1.0 and 0.1 < own["std_median"] < 5
        else:  # per-image methods normalize every test image exactly
            assert own["abs_mean"] < 1e-4
            assert own["std_min"] == pytest.approx(1, abs=1e-3)
            assert own["std_max"] == pytest.approx(1, abs=1e-3)


def test_batchnorm_normalizes_each_channel_exactly_by_the_statistics_it_holds(tiny_data):
    """BatchNorm's claim without its running averages' lag: once the statistics it holds are
    those of one batch, that batch comes out at mean 0 and std 1 per channel, at every layer."""
    model = build_model("batch", seed=0)
    fit(model, tiny_data, SHORT, "cpu", progress=False)
    x, _ = fixed_batch(tiny_data.test_x, tiny_data.test_y, tiny_data.mean, tiny_data.std, "cpu")
    for _, bn in norm_layers(model):
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: after one batch, that batch's statistics
    with torch.no_grad():
        model.train()(x)
    stats = measure_norm_statistics(model, tiny_data, "cpu")  # the same batch, evaluation mode
    for layer in stats["normalized"]:
        own = layer["per_channel"]
        assert own["abs_mean"] < 1e-4
        assert own["std_min"] == pytest.approx(1, abs=1e-3)
        assert own["std_max"] == pytest.approx(1, abs=1e-3)


def test_layernorm_output_is_normalized_per_image_but_not_per_channel(tiny_data):
    model = build_model("layer", seed=0)
    fit(model, tiny_data, SHORT, "cpu", progress=False)
    stats = measure_norm_statistics(model, tiny_data, "cpu")
    spread = [s["per_channel"]["std_max"] / s["per_channel"]["std_min"]
              for s in stats["normalized"]]
    assert max(spread) > 1.5


def test_measuring_leaves_the_model_untouched(tiny_data):
    model = build_model("batch", seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_norm_statistics(model, tiny_data, "cpu")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("norm", NORMS)
def test_probe_reports_every_layer_and_touches_nothing(norm, tiny_data):
    model = build_model(norm, seed=0).train()
    batch = fixed_batch(tiny_data.train_x, tiny_data.train_y, tiny_data.mean, tiny_data.std, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    probe = probe_layers(model, batch)
    assert len(probe["activation_rms"]) == len(probe["grad_norm"]) == len(norm_layers(model))
    assert all(v > 0 and torch.isfinite(torch.tensor(v))
               for v in probe["activation_rms"] + probe["grad_norm"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_probe_does_not_change_training(tiny_data, monkeypatch):
    with_probe = fit(build_model("batch", seed=0), tiny_data, SHORT, "cpu", progress=False)
    monkeypatch.setattr("utils.probe_layers",
                        lambda model, batch: {"activation_rms": None, "grad_norm": None})
    without = fit(build_model("batch", seed=0), tiny_data, SHORT, "cpu", progress=False)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert with_probe[key] == without[key]
    assert len(with_probe["grad_norm"]) == SHORT.epochs
    assert len(with_probe["grad_norm"][0]) == 7


def test_fixed_batch_is_class_balanced_and_repeatable(tiny_data):
    x, y = fixed_batch(tiny_data.test_x, tiny_data.test_y, tiny_data.mean, tiny_data.std, "cpu")
    assert torch.bincount(y).tolist() == [10] * 10  # tiny_data has 10 test images per class
    x2, _ = fixed_batch(tiny_data.test_x, tiny_data.test_y, tiny_data.mean, tiny_data.std, "cpu")
    assert torch.equal(x, x2)


def test_results_carry_the_statistics(tiny_data):
    model = build_model("group", seed=0)
    history = fit(model, tiny_data, SHORT, "cpu", progress=False)
    results = make_results(model, tiny_data, SHORT, history, "cpu")
    assert results["norm_statistics"]["layers"][0] == "C1"
    assert set(results["norm_statistics"]["input"][0]) == set(norm_stats.AXES)


def test_figures_draw_one_column_per_variant(tiny_data, tmp_path):
    summaries, histories = {}, {}
    for norm in NORMS:
        model = build_model(norm, seed=0)
        histories[norm] = fit(model, tiny_data, SHORT, "cpu", progress=False)
        summaries[norm] = measure_norm_statistics(model, tiny_data, "cpu")
    fig = plot_norm_statistics(summaries, tmp_path / "stats.png")
    assert (tmp_path / "stats.png").stat().st_size > 0
    assert sorted(ax.get_title() for ax in fig.axes) == sorted(
        [f"{n}: input" for n in NORMS] + [f"{n}: normalized output" for n in NORMS])
    # every layer of every variant is one line in the probe figure's panels
    fig = plot_layer_probe(histories, summaries["batch"]["layers"], tmp_path / "probe.png")
    assert all(len(ax.get_lines()) == 7 for ax in fig.axes)


def test_the_probe_reports_the_conv_that_feeds_each_norm_of_a_separable_block(tiny_data):
    model = build_model("batch", seed=0, conv="separable")
    batch = fixed_batch(tiny_data.train_x, tiny_data.train_y, tiny_data.mean, tiny_data.std, "cpu")
    probe = probe_layers(model, batch)
    reference = copy.deepcopy(model).train()
    F.cross_entropy(reference(batch[0]), batch[1]).backward()
    assert probe["grad_norm"][1] == pytest.approx(reference.C2[0][1].weight.grad.norm().item(),
                                                  rel=1e-4)  # C2's 1x1, not its depthwise
