import json

import matplotlib
import pytest
import torch
from PIL import Image

matplotlib.use("Agg")

import utils  # noqa: E402
from conftest import NORMS, interrupt_after_epoch_1, synthetic_data  # noqa: E402
from model import build_model  # noqa: E402
from plots import plot_data_preview, plot_history, plot_misclassified
from results import (collect_misclassified, confusion_matrix, evaluate_batch_stats,
                     has_running_stats, load_results, make_results, save_json_atomic)
from optimizers import make_optimizer
from checkpoints import CheckpointError, load_checkpoint
from utils import (NonFiniteLossError, TrainConfig, evaluate, fit, make_loaders, predict,
                   train_one_epoch)

from lab.levers import LabTrainConfig

SHORT = TrainConfig(epochs=3, batch_size=20, lr=0.05, seed=0, eval_batch_size=50)


def same_history(a, b):
    strip = lambda h: {k: v for k, v in h.items() if k != "epoch_time"}
    return strip(a) == strip(b)


@pytest.mark.parametrize("norm", NORMS)
def test_a_few_steps_lower_the_loss(norm, tiny_data):
    model = build_model(norm, seed=0)
    config = TrainConfig(batch_size=50, lr=0.05)
    train_loader, test_loader = make_loaders(tiny_data, config, "cpu")
    optimizer = make_optimizer(model, config)
    before = evaluate(model, test_loader)["loss"]
    for epoch in range(5):
        train_one_epoch(model, train_loader, optimizer)
    assert evaluate(model, test_loader)["loss"] < 0.8 * before


def test_same_seed_gives_an_identical_history(tiny_data):
    runs = [fit(build_model("batch", seed=0), tiny_data, SHORT, "cpu", progress=False)
            for _ in range(2)]
    assert same_history(*runs)
    assert len(runs[0]["test_acc"]) == SHORT.epochs


@pytest.mark.parametrize("norm", NORMS)
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(norm, tiny_data, tmp_path):
    full = fit(build_model(norm, seed=0), tiny_data, SHORT, "cpu", progress=False)
    ckpt = tmp_path / "run.pt"
    interrupt_after_epoch_1(norm, tiny_data, SHORT, ckpt)
    # A fresh process would build a fresh model with whatever RNG state; resume must not care.
    torch.manual_seed(1234)
    resumed = fit(build_model(norm, seed=99), tiny_data, SHORT, "cpu", checkpoint_path=ckpt,
                  resume=True, progress=False)
    assert same_history(resumed, full)


def test_corrupted_checkpoint_is_refused(tiny_data, tmp_path):
    ckpt = tmp_path / "run.pt"
    fit(build_model("batch", seed=0), tiny_data, TrainConfig(**{**SHORT.to_dict(), "epochs": 1}),
        "cpu", checkpoint_path=ckpt, progress=False)
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"run.pt is unreadable.*delete it"):
        fit(build_model("batch", seed=0), tiny_data, SHORT, "cpu", checkpoint_path=ckpt,
            resume=True, progress=False)


def test_checkpoint_of_another_configuration_is_refused(tiny_data, tmp_path):
    ckpt = tmp_path / "run.pt"
    one_epoch = TrainConfig(**{**SHORT.to_dict(), "epochs": 1})
    fit(build_model("batch", seed=0), tiny_data, one_epoch, "cpu", checkpoint_path=ckpt,
        progress=False)
    with pytest.raises(CheckpointError, match=r"different run \(model.norm: checkpoint 'batch', "
                                              r"now 'group'"):
        fit(build_model("group", seed=0), tiny_data, one_epoch, "cpu", checkpoint_path=ckpt,
            resume=True, progress=False)
    other_data = synthetic_data(seed=5)
    other_data.sha256 = "f" * 64
    with pytest.raises(CheckpointError, match=r"data_sha256"):
        fit(build_model("batch", seed=0), other_data, one_epoch, "cpu", checkpoint_path=ckpt,
            resume=True, progress=False)


def test_collect_misclassified_returns_only_wrong_predictions(tiny_data):
    class AlwaysCat(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(len(x), 10)
            logits[:, 3] = 1
            return logits

    _, test_loader = make_loaders(tiny_data, TrainConfig(eval_batch_size=32), "cpu")
    mistakes = collect_misclassified(AlwaysCat(), test_loader, limit=15)
    assert len(mistakes["index"]) == 15
    assert (mistakes["pred"] == 3).all() and (mistakes["true"] != 3).all()
    assert torch.equal(mistakes["true"], tiny_data.test_y[mistakes["index"]])
    assert torch.equal(mistakes["images"], tiny_data.test_x[mistakes["index"]])
    # The test set is sorted by class; a sample, unlike the first 15 mistakes, spans many classes.
    assert len(set(mistakes["true"].tolist())) > 3


def test_confusion_matrix_counts_true_rows_and_predicted_columns(tiny_data):
    model = build_model("group", seed=0)
    fit(model, tiny_data, TrainConfig(epochs=2, batch_size=50), "cpu", progress=False)
    _, test_loader = make_loaders(tiny_data, TrainConfig(eval_batch_size=64), "cpu")
    cm = confusion_matrix(model, test_loader)
    assert cm.sum(1).tolist() == torch.bincount(tiny_data.test_y).tolist()
    assert cm.diag().sum().item() / cm.sum().item() == pytest.approx(
        evaluate(model, test_loader)["acc"])


def test_plots_write_pngs_with_the_plotted_data(tmp_path, tiny_data):
    history = {"epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.0], "test_loss": [2.1, 1.7, 1.3],
               "train_acc": [0.3, 0.5, 0.6], "test_acc": [0.25, 0.45, 0.55]}
    fig = plot_history(history, tmp_path / "curves.png", title="t")
    loss_ax, acc_ax = fig.axes
    assert [list(l.get_ydata()) for l in loss_ax.lines] == [[2.0, 1.5, 1.0], [2.1, 1.7, 1.3]]
    assert list(acc_ax.lines[1].get_ydata()) == pytest.approx([25, 45, 55])
    assert Image.open(tmp_path / "curves.png").format == "PNG"

    mistakes = {"images": tiny_data.test_x[:7], "true": torch.tensor([0, 1, 2, 3, 4, 5, 6]),
                "pred": torch.tensor([1, 2, 3, 4, 5, 6, 7])}
    fig = plot_misclassified(mistakes, tiny_data.classes, tmp_path / "grid.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "true: airplane\npred: automobile" and len(titles) == 7
    assert Image.open(tmp_path / "grid.png").format == "PNG"


def test_results_json_round_trips_and_leaves_no_temp_file(tmp_path, tiny_data):
    model = build_model("group", seed=0)
    history = fit(model, tiny_data, TrainConfig(epochs=1, batch_size=50), "cpu", progress=False)
    results = make_results(model, tiny_data, TrainConfig(epochs=1, batch_size=50), history,
                           "cpu")
    path = save_json_atomic(tmp_path / "out" / "group_seed0.json", results)
    assert load_results(path) == json.loads(json.dumps(results))
    assert results["variant"] == "group" and results["final_test_acc"] == history["test_acc"][-1]
    assert sum(map(sum, results["confusion_matrix"])) == len(tiny_data.test_y)
    assert list(results["per_class_acc"]) == list(tiny_data.classes)
    for key in ("seed", "epochs", "num_params", "wall_time_s", "hardware", "data", "date"):
        assert key in results
    assert [p.name for p in path.parent.iterdir()] == ["group_seed0.json"]


def test_batch_stats_accuracy_normalizes_each_batch_by_itself_and_keeps_running_stats(tiny_data):
    model = build_model("batch", seed=0)
    fit(model, tiny_data, TrainConfig(epochs=2, batch_size=50), "cpu", progress=False)
    running = {k: v.clone() for k, v in model.state_dict().items()}
    n = len(tiny_data.test_y)
    # One batch holding the whole test set: the same as a train-mode forward pass over it.
    _, whole = make_loaders(tiny_data, TrainConfig(eval_batch_size=n), "cpu")
    x, y = next(iter(whole))
    model.train()
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    model.load_state_dict(running)
    assert evaluate_batch_stats(model, tiny_data, n, "cpu") == pytest.approx(expected)
    assert all(torch.equal(v, running[k]) for k, v in model.state_dict().items())
    # Small batches move BatchNorm away from its running-statistics accuracy.
    assert evaluate_batch_stats(model, tiny_data, 2, "cpu") != evaluate(model, whole)["acc"]


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_per_image_norms_have_no_train_eval_discrepancy(norm, tiny_data):
    model = build_model(norm, seed=0)
    fit(model, tiny_data, TrainConfig(epochs=1, batch_size=50), "cpu", progress=False)
    _, test_loader = make_loaders(tiny_data, TrainConfig(eval_batch_size=64), "cpu")
    assert not has_running_stats(model)
    assert evaluate_batch_stats(model, tiny_data, 4, "cpu") == pytest.approx(
        evaluate(model, test_loader)["acc"])
    assert has_running_stats(build_model("batch", seed=0))


def test_results_record_batch_stats_accuracy_for_batchnorm_only(tiny_data):
    config = TrainConfig(epochs=1, batch_size=8)
    for norm, recorded in (("batch", True), ("group", False)):
        model = build_model(norm, seed=0)
        history = fit(model, tiny_data, config, "cpu", progress=False)
        results = make_results(model, tiny_data, config, history, "cpu")
        assert (results["final_test_acc_batch_stats"] is not None) == recorded


def test_results_from_precomputed_logits_equal_a_fresh_evaluation(tiny_data):
    config = TrainConfig(epochs=1, batch_size=50)
    model = build_model("layer", seed=0)
    history = fit(model, tiny_data, config, "cpu", progress=False)
    _, test_loader = make_loaders(tiny_data, config, "cpu")
    logits = predict(model, test_loader)
    fresh = make_results(model, tiny_data, config, history, "cpu")
    reused = make_results(model, tiny_data, config, history, "cpu", logits=logits)
    assert reused["confusion_matrix"] == fresh["confusion_matrix"]
    assert torch.equal(collect_misclassified(model, test_loader, logits=logits)["index"],
                       collect_misclassified(model, test_loader)["index"])


def test_nan_in_the_first_epoch_does_not_promise_a_checkpoint(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "one_cycle", lambda step, *a: 1e12)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(NonFiniteLossError) as err:
        fit(build_model("batch", seed=0), tiny_data, TrainConfig(epochs=2, batch_size=20),
            "cpu", checkpoint_path=ckpt, progress=False)
    assert "at epoch 1" in str(err.value)
    assert "No epoch had completed, so there is no checkpoint" in str(err.value)
    assert "left intact" not in str(err.value) and not ckpt.exists()


def test_fit_never_replaces_an_existing_checkpoint_unless_told_to(tiny_data, tmp_path):
    ckpt = tmp_path / "run.pt"
    one_epoch = TrainConfig(**{**SHORT.to_dict(), "epochs": 1})
    fit(build_model("batch", seed=0), tiny_data, one_epoch, "cpu", checkpoint_path=ckpt,
        progress=False)
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match=r"run.pt already exists; refusing to replace it"):
        fit(build_model("group", seed=0), tiny_data, one_epoch, "cpu", checkpoint_path=ckpt,
            progress=False)
    assert ckpt.read_bytes() == before
    fit(build_model("group", seed=0), tiny_data, one_epoch, "cpu", checkpoint_path=ckpt,
        progress=False, overwrite=True)
    assert load_checkpoint(ckpt)["fingerprint"]["model"]["norm"] == "group"


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror(tiny_data):
    model = build_model("group", seed=0).eval()
    _, test_loader = make_loaders(tiny_data, TrainConfig(eval_batch_size=64), "cpu")
    x = torch.cat([x for x, _ in test_loader])
    with torch.no_grad():
        expected = (model(x) + model(x.flip(3))) / 2
    assert torch.allclose(predict(model, test_loader, flip_tta=True), expected, atol=1e-5)
    assert not torch.allclose(predict(model, test_loader), expected, atol=1e-5)


def test_results_record_flip_tta_accuracy_beside_single_view(tiny_data):
    config = TrainConfig(epochs=1, batch_size=50)
    model = build_model("layer", seed=0)
    history = fit(model, tiny_data, config, "cpu", progress=False)
    results = make_results(model, tiny_data, config, history, "cpu")
    _, test_loader = make_loaders(tiny_data, config, "cpu")
    tta = predict(model, test_loader, flip_tta=True).argmax(1)
    assert results["final_test_acc_flip_tta"] == pytest.approx(
        (tta == tiny_data.test_y).float().mean().item())
    assert results["final_test_acc"] == history["test_acc"][-1]  # single view is unchanged


def test_augmentation_strength_reaches_the_training_loader(tiny_data):
    train, _ = make_loaders(tiny_data, TrainConfig(pad=0, flip=False, batch_size=50), "cpu")
    assert (train.pad, train.flip) == (0, False)
    x, y = next(iter(train))  # without crop or flip, batches are the normalized images
    images = (tiny_data.train_x.float() / 255 - train.mean) / train.std
    assert all(any(torch.allclose(img, ref) for ref in images[tiny_data.train_y == label])
               for img, label in zip(x[:5], y[:5]))


def test_ema_evaluates_and_returns_the_weight_average(tiny_data):
    plain_model = build_model("batch", seed=0)
    plain = fit(plain_model, tiny_data, SHORT, "cpu", progress=False)
    # A decay of ~0 makes the average the current weights: the same run, through the EMA path.
    near_zero = LabTrainConfig(**{**SHORT.to_dict(), "ema_decay": 1e-12})
    same = fit(build_model("batch", seed=0), tiny_data, near_zero, "cpu", progress=False)
    assert same["test_acc"] == plain["test_acc"]
    assert same["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-5)
    # A real decay evaluates other weights, and fit hands back those weights.
    ema_model = build_model("batch", seed=0)
    averaged = fit(ema_model, tiny_data, LabTrainConfig(**{**SHORT.to_dict(), "ema_decay": 0.9}),
                   "cpu", progress=False)
    assert averaged["train_loss"] == plain["train_loss"]  # training itself is untouched
    assert averaged["test_loss"] != plain["test_loss"]
    assert not torch.equal(ema_model.C1[0].weight, plain_model.C1[0].weight)
    _, test_loader = make_loaders(tiny_data, SHORT, "cpu")
    assert evaluate(ema_model, test_loader, averaged["precision"][-1])["loss"] == \
        pytest.approx(averaged["test_loss"][-1], rel=1e-5)


def test_a_resumed_ema_run_equals_the_uninterrupted_one(tiny_data, tmp_path):
    config = LabTrainConfig(**{**SHORT.to_dict(), "ema_decay": 0.9})
    full = fit(build_model("group", seed=0), tiny_data, config, "cpu", progress=False)
    ckpt = tmp_path / "run.pt"
    interrupt_after_epoch_1("group", tiny_data, config, ckpt)
    resumed = fit(build_model("group", seed=0), tiny_data, config, "cpu", checkpoint_path=ckpt,
                  resume=True, progress=False)
    assert same_history(resumed, full)


def test_data_preview_shows_a_row_per_class_and_the_augmented_copies(tiny_data, tmp_path):
    fig, shown = plot_data_preview(tiny_data, tmp_path / "preview.png", pad=2, flip=True,
                                    per_class=3)
    assert (tmp_path / "preview.png").stat().st_size > 0
    assert shown.shape == (10, 3)
    assert [set(tiny_data.train_y[row].tolist()) for row in shown] == [{c} for c in range(10)]
    images = [ax.get_images() for ax in fig.axes]
    assert sum(len(i) for i in images) == 10 * 3 * 2  # originals and augmented, nothing else
    first = fig.axes[0].get_images()[0].get_array()
    assert first.shape == (32, 32, 3)
    assert torch.allclose(torch.tensor(first.data, dtype=torch.float32),
                          tiny_data.train_x[shown[0, 0]].permute(1, 2, 0).float() / 255)
