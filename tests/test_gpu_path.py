"""The GPU path, checked on the CPU: fp16 with Muon (GradScaler), the torch the code needs, a first
step that a GPU library cannot run, and CUDA graphs as a setting with its eager fallback."""

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import precision
import train
from model import build_model
from optimizers import MUON_TORCH, KernelMatrix, make_optimizer
from precision import EagerFallback, UnsupportedStepError, autocast, compile_model
from checkpoints import recipe
from conftest import NARROW_NET
from utils import TrainConfig, fit, training_step

ROOT = Path(__file__).resolve().parents[1]
SCALE = 2.0 ** 16  # GradScaler's default initial scale


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def muon_matrices(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"] if isinstance(p, KernelMatrix)]


# 1. fp16 with Muon: every gradient unscaled once and checked for inf/NaN.

# "cuda": the optimizers as built for a GPU (fused SGD, BatchedMuon), on CPU tensors: Colab's T4
# runs fp16 with them
@pytest.mark.parametrize("layout", ["cpu", "cuda"])
def test_fp16_muon_keeps_the_momentum_of_the_unscaled_gradient(layout):
    model = build_model("batch", seed=0)
    reference = copy.deepcopy(model)
    config = TrainConfig()
    optimizer = make_optimizer(model, config, layout)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, y = batch()
    with autocast("cpu", "fp16"):  # the same fp16 forward, backward without scaling
        loss = F.cross_entropy(reference(x), y, label_smoothing=config.label_smoothing)
    loss.backward()
    training_step(model, x, y, optimizer, "fp16", scaler, config.label_smoothing)
    assert scaler.get_scale() == SCALE  # no inf/NaN: the step was taken
    names = {id(p): n for n, p in model.named_parameters()}
    reference_grads = dict(reference.named_parameters())
    matrices = muon_matrices(optimizer)
    assert len(matrices) == 7
    for matrix in matrices:
        grad = reference_grads[names[id(matrix.kernel)]].grad
        expected = (1 - config.momentum) * grad.permute(matrix.order).reshape(len(grad), -1)
        buffer = optimizer.optimizers[1].state[matrix]["momentum_buffer"]  # Chain(sgd, muon)
        torch.testing.assert_close(buffer, expected, rtol=0.05,
                                   atol=0.01 * expected.abs().max().item())


def momenta(optimizer):
    parts = getattr(optimizer, "optimizers", [optimizer])
    return {id(p): s["momentum_buffer"].clone() for o in parts for p, s in o.state.items()
            if s.get("momentum_buffer") is not None}


# "cuda" steps on the device: the optimizers take the scale and the inf flag from the scaler
# and skip there (no host read); "cpu" lets the scaler read the flag and skip the call
@pytest.mark.parametrize("layout", ["cpu", "cuda"])
@pytest.mark.parametrize("name", ["muon", "sgd"])
def test_an_inf_in_one_kernels_gradient_skips_the_whole_step_and_halves_the_scale(layout, name):
    model = build_model("batch", seed=0)
    fresh = copy.deepcopy(model)
    optimizer = make_optimizer(model, TrainConfig(optimizer=name), layout)
    kernel = model.C4[0][1].weight  # C4's 1x1 half: Muon's under muon, SGD's under sgd

    def plant_inf(grad):
        grad = grad.clone()
        grad.view(-1)[0] = float("inf")
        return grad

    handle = kernel.register_hook(plant_inf)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    momenta_before = momenta(optimizer)  # fused SGD's start at zero
    training_step(model, *batch(), optimizer, "fp16", scaler)
    assert scaler.get_scale() == SCALE / 2
    for name_, p in model.named_parameters():
        assert torch.equal(p, before[name_]), f"{name_} changed in a step that had to be skipped"
    for key, momentum in momenta(optimizer).items():  # as before, or zero where it starts now
        assert torch.equal(momentum, momenta_before.get(key, torch.zeros_like(momentum)))
    # the next step is the first one taken: as a fresh model's first step at the halved scale
    handle.remove()
    training_step(model, *batch(seed=1), optimizer, "fp16", scaler)
    reference = make_optimizer(fresh, TrainConfig(optimizer=name), layout)
    training_step(fresh, *batch(seed=1), reference,
                  "fp16", torch.amp.GradScaler("cpu", init_scale=SCALE / 2))
    for (name_, p), q in zip(model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(p, q, msg=f"{name_} after a skipped first step")


def test_a_two_epoch_fp16_muon_run_ends_finite(tiny_data):
    model = build_model("batch", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fp16 is slow on CPUs: said elsewhere
        history = fit(model, tiny_data, TrainConfig(epochs=2, batch_size=20, precision="fp16"),
                      "cpu", progress=False)
    assert history["precision"] == ["fp16", "fp16"]
    assert all(map(torch.isfinite, map(torch.tensor, history["train_loss"] + history["test_loss"])))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# 2. The torch the code needs.

def test_requirements_name_a_torch_that_has_muon():
    line = next(l for l in (ROOT / "requirements.txt").read_text().splitlines()
                if re.match(r"torch\s*>=", l))
    version = tuple(int(v) for v in re.search(r">=\s*([\d.]+)", line)[1].split("."))
    assert version >= tuple(int(v) for v in MUON_TORCH.split("."))


def test_a_torch_without_muon_gets_one_line_naming_its_version_before_the_data_loads(
        monkeypatch, tmp_path):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ValueError) as caught:
        make_optimizer(build_model("batch", seed=0), TrainConfig())
    message = str(caught.value)
    assert "\n" not in message and torch.__version__ in message
    assert f"torch {MUON_TORCH}" in message and "--optimizer sgd" in message
    # the command line says it before it looks for data (this path does not exist)
    with pytest.raises(ValueError, match="needs torch"):
        train.main(["--data", str(tmp_path / "absent"), "--out-dir", str(tmp_path),
                    "--no-progress"])
    make_optimizer(build_model("batch", seed=0), TrainConfig(optimizer="sgd"))  # sgd still works


# 3. A first step that a GPU library cannot run.

NO_ENGINE = "GET was unable to find an engine to execute this computation"


def fail_depthwise_under_cudnn(model):
    """Make the depthwise convs fail as cuDNN does on a T4 in fp16, but only while cuDNN is on."""
    def raise_under_cudnn(module, args):
        if torch.backends.cudnn.enabled:
            raise RuntimeError(NO_ENGINE)

    for conv in precision.depthwise_convs(model):
        conv.register_forward_pre_hook(raise_under_cudnn)


def test_fp16_depthwise_convs_that_cudnn_cannot_run_run_without_it_with_one_warning(tiny_data):
    model = build_model("batch", seed=0, **NARROW_NET)
    fail_depthwise_under_cudnn(model)
    with pytest.warns(RuntimeWarning, match="running them without cuDNN") as caught:
        history = fit(model, tiny_data, TrainConfig(epochs=1, batch_size=20, precision="fp16"),
                      "cpu", progress=False)
    assert len([w for w in caught if "cuDNN" in str(w.message)]) == 1
    assert torch.backends.cudnn.enabled  # on again for everything else
    assert all(conv.without_cudnn for conv in precision.depthwise_convs(model))
    assert all(map(torch.isfinite, map(torch.tensor, history["train_loss"])))


@pytest.mark.parametrize("name, advice", [("fp16", "--precision fp32"),
                                          ("bf16", "--precision fp16 or fp32"),
                                          ("fp32", "--device cpu")])
def test_a_first_step_the_library_cannot_run_stops_in_one_line_naming_what_to_pass(
        name, advice, tiny_data, monkeypatch):
    def no_engine(*args, **kwargs):
        raise RuntimeError(f"cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\n{NO_ENGINE}")

    monkeypatch.setattr(F, "cross_entropy", no_engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(UnsupportedStepError) as caught:
            fit(build_model("batch", seed=0), tiny_data,
                TrainConfig(epochs=1, batch_size=20, precision=name), "cpu", progress=False)
    message = str(caught.value)
    assert "\n" not in message and name in message and advice in message
    assert precision.cpu_info()[0] in message  # names the device
    assert issubclass(UnsupportedStepError, train.USER_ERRORS)  # the CLI prints it, no traceback


def test_other_errors_of_the_first_step_are_not_disguised(tiny_data, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(F, "cross_entropy", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fit(build_model("batch", seed=0), tiny_data, TrainConfig(epochs=1, batch_size=20),
            "cpu", progress=False)


# 4. CUDA graphs as a setting.

def test_cuda_graphs_are_off_by_default_and_not_part_of_the_recipe():
    assert TrainConfig().cuda_graphs is False
    assert recipe(TrainConfig(cuda_graphs=True)) == recipe(TrainConfig())


def test_cuda_graphs_on_a_cpu_warn_and_train_exactly_as_eager(tiny_data):
    config = TrainConfig(epochs=1, batch_size=20)
    eager = fit(build_model("group", seed=0), tiny_data, config, "cpu", progress=False)
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        graphs = fit(build_model("group", seed=0), tiny_data,
                     TrainConfig(epochs=1, batch_size=20, cuda_graphs=True), "cpu",
                     progress=False)
    assert graphs["test_loss"] == eager["test_loss"]


def test_a_capture_that_fails_falls_back_to_eager_with_one_warning():
    model = build_model("batch", seed=0).eval()

    def failing_capture(x):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    wrapped = EagerFallback(model, failing_capture, "CUDA graphs")
    assert list(wrapped.parameters()) == list(model.parameters())
    x, _ = batch(4)
    with pytest.warns(RuntimeWarning, match="CUDA graphs failed .*running eagerly"):
        out = wrapped(x)
    torch.testing.assert_close(out, model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(x)  # warned once only


def test_compile_model_without_either_option_returns_the_model_itself():
    model = build_model("batch", seed=0)
    assert compile_model(model, False, False, "cpu") is model
