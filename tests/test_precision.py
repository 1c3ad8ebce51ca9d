"""The precision policy (precision.py) and training under each precision."""

import pytest
import torch

import precision
import utils
from conftest import NARROW_NET, NORMS, interrupt_after_epoch_1
from model import build_model
from precision import make_grad_scaler, resolve_precision
from results import make_results, run_precision
from optimizers import make_optimizer
from checkpoints import load_checkpoint
from utils import NonFiniteLossError, TrainConfig, evaluate, fit, make_loaders, train_one_epoch


@pytest.mark.parametrize("device, capability, native_bf16, expected", [
    ("cuda", (9, 0), None, "bf16"),    # H100
    ("cuda", (8, 0), None, "bf16"),    # A100
    ("cuda", (8, 9), None, "bf16"),    # L4
    ("cuda", (7, 5), None, "fp16"),    # T4, Colab's default GPU
    ("cuda", (7, 0), None, "fp16"),    # V100
    ("cpu", None, True, "bf16"),       # AMX or AVX512-BF16
    ("cpu", None, False, "fp32"),      # AVX2 only
    ("mps", None, None, "fp32"),
])
def test_auto_picks_the_precision_each_kind_of_device_runs_fastest(device, capability,
                                                                   native_bf16, expected):
    assert resolve_precision("auto", device, capability=capability,
                             native_bf16=native_bf16) == expected


def test_an_explicit_precision_is_honoured_but_never_bf16_below_compute_capability_8():
    assert resolve_precision("fp32", "cuda", capability=(9, 0)) == "fp32"
    assert resolve_precision("FP16", "cuda", capability=(9, 0)) == "fp16"
    assert resolve_precision("bf16", "cpu", native_bf16=False) == "bf16"
    with pytest.raises(ValueError, match=r"bf16 needs .*8\.0.*this one is 7\.5.*fp16"):
        resolve_precision("bf16", "cuda", capability=(7, 5))
    with pytest.raises(ValueError, match=r"unknown precision 'half'; choose one of auto, fp32"):
        resolve_precision("half", "cpu")


def test_native_bf16_is_read_from_the_cpu_features_not_the_model_name(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert not precision.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision.cpu_has_native_bf16()
    # A torch without the probes: the kernel's CPU flags decide.
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.setattr(precision, "cpu_info", lambda: ("cpu", {"avx2", "fma"}))
    assert not precision.cpu_has_native_bf16()
    monkeypatch.setattr(precision, "cpu_info", lambda: ("cpu", {"avx2", "amx_bf16", "amx_tile"}))
    assert precision.cpu_has_native_bf16()


def test_only_fp16_gets_a_gradient_scaler():
    assert isinstance(make_grad_scaler("cpu", "fp16"), torch.amp.GradScaler)
    assert make_grad_scaler("cpu", "bf16") is None and make_grad_scaler("cpu", "fp32") is None


def test_fp16_with_the_scaler_trains_and_lowers_the_loss(tiny_data):
    model = build_model("batch", seed=0, **NARROW_NET)
    config = TrainConfig(batch_size=50, lr=0.05)
    train_loader, test_loader = make_loaders(tiny_data, config, "cpu")
    optimizer = make_optimizer(model, config)
    scaler = make_grad_scaler("cpu", "fp16")
    before = evaluate(model, test_loader, "fp16")["loss"]
    for _ in range(5):
        train_one_epoch(model, train_loader, optimizer, precision="fp16", scaler=scaler)
    assert scaler.get_scale() > 0  # the scaler took part: it holds a scale after stepping
    assert evaluate(model, test_loader, "fp16")["loss"] < 0.8 * before
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_hardware_records_the_instruction_set_caps_of_the_environment(monkeypatch):
    """A run capped to AVX2 on an AVX512 CPU says so (it pairs with AVX2 runs bit for bit)."""
    for name in precision.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    assert "isa_caps" not in precision.hardware_info("cpu")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    assert precision.hardware_info("cpu")["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2",
                                                         "MKL_CBWR": "AVX2"}


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
@pytest.mark.filterwarnings("ignore:fp16 runs slower:RuntimeWarning")  # forced on purpose
def test_fit_records_the_precision_it_used(name, tiny_data):
    config = TrainConfig(epochs=2, batch_size=50, precision=name)
    model = build_model("group", seed=0, **NARROW_NET)
    history = fit(model, tiny_data, config, "cpu", progress=False)
    assert history["precision"] == [name, name]
    assert make_results(model, tiny_data, config, history, "cpu")["precision"] == name


def test_auto_resolves_on_this_machine_and_the_results_say_to_what(tiny_data):
    config = TrainConfig(epochs=1, batch_size=50)  # precision "auto", the default
    model = build_model("layer", seed=0)
    history = fit(model, tiny_data, config, "cpu", progress=False)
    assert history["precision"] == [resolve_precision("auto", "cpu")]
    results = make_results(model, tiny_data, config, history, "cpu")
    assert results["precision"] == history["precision"][0]
    assert results["hardware"]["cpu_native_bf16"] == precision.cpu_has_native_bf16()


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
@pytest.mark.filterwarnings("ignore:fp16 runs slower:RuntimeWarning")  # forced on purpose
def test_nan_guard_stops_at_the_failing_epoch_and_keeps_the_last_checkpoint(name, tiny_data,
                                                                          tmp_path, monkeypatch):
    """Under every precision: a sane first epoch, then a learning rate of 0.05 * 1e12."""
    config = TrainConfig(epochs=3, batch_size=20, lr=0.05, seed=0, precision=name)
    steps_per_epoch = len(tiny_data.train_y) // config.batch_size
    monkeypatch.setattr(utils, "one_cycle",
                        lambda step, *a: 1.0 if step < steps_per_epoch else 1e12)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(NonFiniteLossError, match=r"at epoch 2, step \d+.*The checkpoint of "
                                                 r"epoch 1, the last complete one, is left intact"):
        fit(build_model("batch", seed=0, **NARROW_NET), tiny_data, config, "cpu",
            checkpoint_path=ckpt, progress=False)
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and len(state["history"]["test_acc"]) == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no half-written temp file


class NaNAtCall(torch.nn.Module):
    """Wraps a model; its logits are NaN on the `bad_call`-th forward pass (1-based)."""

    def __init__(self, model, bad_call):
        super().__init__()
        self.model, self.bad_call, self.calls = model, bad_call, 0

    def forward(self, x):
        self.calls += 1
        logits = self.model(x)
        return logits * float("nan") if self.calls == self.bad_call else logits


def test_nan_guard_names_the_first_bad_step_without_a_host_sync_per_step(tiny_data,
                                                                        monkeypatch):
    config = TrainConfig(batch_size=10, lr=0.05)
    train_loader, _ = make_loaders(tiny_data, config, "cpu")
    assert len(train_loader) == 20
    model = NaNAtCall(build_model("layer", seed=0), bad_call=7)
    optimizer = make_optimizer(model, config)

    syncs = []  # every way a tensor's value can reach Python
    for method in ("item", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, _o=original, _m=method: syncs.append(_m) or _o(self))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 3, step 7; .*"
                                                 r"it was 0\.05 at that step"):
        train_one_epoch(model, train_loader, optimizer, epoch=3)
    assert model.calls == 20  # the flag is read after the epoch, not at the bad step
    assert len(syncs) <= 2  # one read of the flag (and of the bad loss), not one per step


@pytest.mark.parametrize("norm", NORMS)
def test_a_run_may_resume_under_another_precision(norm, tiny_data, tmp_path):
    """Precision is how a run computes, not what: an fp32 checkpoint resumes in bf16 (say on a
    GPU after a CPU start), and the history says which epochs ran in which precision."""
    ckpt = tmp_path / "run.pt"
    interrupt_after_epoch_1(norm, tiny_data, TrainConfig(epochs=2, batch_size=50, precision="fp32"),
                            ckpt)
    history = fit(build_model(norm, seed=0), tiny_data,
                  TrainConfig(epochs=2, batch_size=50, precision="bf16"), "cpu",
                  checkpoint_path=ckpt, resume=True, progress=False)
    assert history["precision"] == ["fp32", "bf16"]
    assert run_precision(history) == "fp32, bf16"
