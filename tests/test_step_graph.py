"""lab/step_graph.py, the whole training step for one CUDA graph, checked on the CPU where it
runs eagerly: the same training as utils.training_step under make_scheduler's LambdaLR, and no
host read of a device value per step (what capture needs). The capture itself runs on CUDA only
(python -m lab.bench --variants repo+wholestep)."""

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from model import build_model
from optimizers import make_optimizer
from precision import make_grad_scaler
from utils import TrainConfig, make_scheduler, training_step

from lab.bench import HOST_SYNCS
from lab.step_graph import DeviceSchedule, WholeStep

STEPS_PER_EPOCH, EPOCHS = 4, 3


def batches(n, size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 3, 32, 32, generator=g).contiguous(
        memory_format=torch.channels_last), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n)]


@pytest.mark.filterwarnings("ignore:Detected call of")  # no training here
def test_the_device_schedule_sets_lambdalrs_rates():
    config = TrainConfig(epochs=EPOCHS)
    ours = make_optimizer(build_model("batch", seed=0), config, "cuda")
    theirs = make_optimizer(build_model("batch", seed=0), config, "cuda")
    schedule = DeviceSchedule(ours, EPOCHS * STEPS_PER_EPOCH, config.pct_start)
    reference = make_scheduler(theirs, config, STEPS_PER_EPOCH)
    for _ in range(EPOCHS * STEPS_PER_EPOCH + 1):
        for a, b in zip(ours.param_groups, theirs.param_groups):
            assert isinstance(a["lr"], torch.Tensor)
            assert a["lr"].item() == pytest.approx(b["lr"], rel=1e-6)
        schedule.step()
        reference.step()


# SGD alone: the rates differ in fp32's last digit from LambdaLR's, which Muon's bf16
# Newton-Schulz turns into bf16 units within a step (its tensor rate: tests/test_muon.py)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_whole_step_trains_as_the_training_step_and_the_scheduler(precision):
    config = TrainConfig(epochs=EPOCHS, optimizer="sgd")
    model = build_model("batch", seed=0).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model, config, "cuda")  # fused SGD and BatchedMuon, on the CPU
    step = WholeStep(model, optimizer,
                     DeviceSchedule(optimizer, EPOCHS * STEPS_PER_EPOCH, config.pct_start),
                     precision, make_grad_scaler("cpu", precision), config.label_smoothing)
    theirs = make_optimizer(reference, config, "cuda")
    scheduler = make_scheduler(theirs, config, STEPS_PER_EPOCH)
    scaler = make_grad_scaler("cpu", precision)
    losses, hits = [], 0
    data = batches(STEPS_PER_EPOCH)
    for x, y in data:
        step(x, y)
        loss, correct = training_step(reference, x, y, theirs, precision, scaler,
                                      config.label_smoothing)
        scheduler.step()
        losses.append(loss.item() * len(y))
        hits += correct.item()
    seen = sum(len(y) for _, y in data)
    loss, acc, first_bad = step.epoch_means()
    assert loss == pytest.approx(sum(losses) / seen, rel=1e-5)
    assert acc == hits / seen and first_bad == 0
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_a_whole_step_reads_nothing_back_from_the_device():
    """Capturable: no host read in a step, except the CPU fused SGD kernel's own read of its
    rate tensor (CUDA's takes the tensor: torch's _fused_sgd_ tensor-rate overload)."""
    config = TrainConfig(epochs=EPOCHS)
    model = build_model("batch", seed=0).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config, "cuda")
    step = WholeStep(model, optimizer,
                     DeviceSchedule(optimizer, EPOCHS * STEPS_PER_EPOCH, config.pct_start),
                     "fp16", make_grad_scaler("cpu", "fp16"))
    (x, y), (x2, y2) = batches(2)
    step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x2, y2)

    def inside_fused_sgd(event):
        while event is not None:
            if event.name == "aten::_fused_sgd_":
                return True
            event = event.cpu_parent
        return False

    reads = [e.name for e in prof.events() if e.name in HOST_SYNCS and not inside_fused_sgd(e)]
    assert reads == []


def test_a_nan_loss_is_remembered_with_its_step():
    model = build_model("batch", seed=0).to(memory_format=torch.channels_last)
    config = TrainConfig(epochs=EPOCHS)
    optimizer = make_optimizer(model, config, "cuda")
    step = WholeStep(model, optimizer,
                     DeviceSchedule(optimizer, EPOCHS * STEPS_PER_EPOCH, config.pct_start))
    (x, y), (x2, y2), (x3, y3) = batches(3)
    step(x, y)
    step(x2 * float("nan"), y2)
    step(x3, y3)
    assert step.epoch_means()[2] == 2
