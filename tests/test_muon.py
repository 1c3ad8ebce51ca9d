"""BatchedMuon is torch.optim.Muon computed for all the network's matrices at once: the same
numbers, step by step, and the default on CUDA. Over a whole epoch of training the two part in
the last digits (a CPU repeat of a final run differed at epoch 1's train loss, 1.5492319 against
1.5492324), so the CPU keeps torch's own, whose arithmetic its studies' runs share.

The matrices are zero-padded to one shape; the padding adds exact zeros to every sum, but a
matmul may split a longer sum differently, so for other shapes bf16 results can differ in the
last bit (a 20 x 50 matrix among these did): the bitwise check is on the network's own shapes."""

from pathlib import Path

import pytest
import torch

from conftest import synthetic_data
from model import build_model
from optimizers import BatchedMuon, KernelMatrix, make_optimizer
from utils import TrainConfig, training_step

from lab import bench

# the matrices Muon steps on in the network: C1's kernel, each separable block's 1x1 half
SHAPES = [tuple(p.shape) for p in make_optimizer(build_model("batch"), TrainConfig())
          .optimizers[1].param_groups[0]["params"]]
SETTINGS = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


def pair(dtype):
    torch.manual_seed(0)
    start = [torch.randn(shape, dtype=dtype) for shape in SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    torch_s = [torch.nn.Parameter(t.clone()) for t in start]
    return ours, BatchedMuon(ours, **SETTINGS), torch_s, torch.optim.Muon(torch_s, **SETTINGS)


def steps(ours, batched, theirs, reference, n, dtype):
    for _ in range(n):
        grads = [torch.randn(shape, dtype=dtype) for shape in SHAPES]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        batched.step()
        reference.step()


def native_bf16():
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), as oneDNN then does."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def test_bf16_matrices_match_torch_muon_bit_for_bit_over_several_steps():
    """Bitwise where the CPU has bf16 arithmetic (Zen 4, Xeon with AMX); on an AVX2-only CPU
    the stack's bf16 matmuls are emulated and may round an element up to two bf16 units apart
    (measured on an AVX2 EPYC: one element of 1 of the 7 matrices, 2**-10 at magnitude 0.1)."""
    ours, batched, theirs, reference = pair(torch.bfloat16)
    steps(ours, batched, theirs, reference, 5, torch.bfloat16)
    if native_bf16():
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    else:
        assert all(torch.allclose(p, q, rtol=2**-6, atol=2**-14) for p, q in zip(ours, theirs))


def test_fp32_matrices_match_torch_muon_within_1e_6_for_3_steps():
    """Within 1e-6, not bitwise: the padded stack's matmuls may sum in another order on another
    CPU (bitwise on the ones tried), and training amplifies 1e-7 to 1e-2 within 30 steps, so a
    longer comparison would need a tolerance of its own."""
    ours, batched, theirs, reference = pair(torch.float32)
    steps(ours, batched, theirs, reference, 3, torch.float32)
    assert max((p - q).abs().max().item() for p, q in zip(ours, theirs)) <= 1e-6
    for p, q in zip(ours, theirs):
        assert torch.allclose(batched.state[p]["momentum_buffer"],
                              reference.state[q]["momentum_buffer"], rtol=0, atol=1e-6)


def test_a_rate_held_in_a_tensor_takes_the_numbers_steps():
    """A schedule on the device sets each rate as a 0-d tensor, read by no host: the same
    steps, within the fp32 rounding of the rate."""
    ours, batched, theirs, reference = pair(torch.float32)
    batched.param_groups[0]["lr"] = torch.tensor(SETTINGS["lr"])
    steps(ours, batched, theirs, reference, 3, torch.float32)
    assert max((p - q).abs().max().item() for p, q in zip(ours, theirs)) <= 1e-6


def test_under_fp16_it_unscales_on_the_device_and_a_flagged_step_moves_nothing():
    """What GradScaler hands an optimizer that handles scaling itself: the scale and a flag set
    when a gradient is inf/NaN, as tensors, so the scaler never reads the flag back."""
    ours, batched, theirs, reference = pair(torch.float32)  # ours get scaled gradients
    scale = 2.0 ** 16
    for flagged in (False, True, False):
        grads = [torch.randn(shape) for shape in SHAPES]
        grads[3][0, 0] = float("inf") if flagged else grads[3][0, 0]
        before = [(p.detach().clone(), batched.state[p]["momentum_buffer"].clone())
                  for p in ours] if flagged else None
        for p, g in zip(ours, grads):
            p.grad = g * scale
        batched.grad_scale, batched.found_inf = torch.tensor(scale), torch.tensor(float(flagged))
        batched.step()
        del batched.grad_scale, batched.found_inf
        if flagged:
            for p, (weights, buffer) in zip(ours, before):
                assert torch.equal(p, weights)
                assert torch.equal(batched.state[p]["momentum_buffer"], buffer)
            continue
        for q, g in zip(theirs, grads):
            q.grad = g
        reference.step()
        assert max((p - q).abs().max().item() for p, q in zip(ours, theirs)) <= 1e-6


def test_a_torch_muon_checkpoint_resumes_in_batched_muon():
    ours, batched, theirs, reference = pair(torch.float32)
    steps(ours, batched, theirs, reference, 2, torch.float32)
    resumed = BatchedMuon(theirs, **SETTINGS)
    resumed.load_state_dict(reference.state_dict())  # the state is torch's: a buffer per matrix
    steps(ours, batched, theirs, resumed, 1, torch.float32)
    assert max((p - q).abs().max().item() for p, q in zip(ours, theirs)) <= 1e-6


def test_the_network_has_the_shapes_checked_here():
    assert SHAPES == [(32, 27), (32, 32), (64, 64), (64, 64), (88, 88), (88, 88), (88, 88)]


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_training_the_network_with_either_muon_takes_the_same_steps(norm):
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    weights = []
    for muon in (BatchedMuon, torch.optim.Muon):
        model = build_model(norm, seed=0)
        kernels = [p.kernel for p in make_optimizer(model, TrainConfig()).optimizers[1]
                   .param_groups[0]["params"]]
        optimizer = muon([KernelMatrix(k) for k in kernels], **SETTINGS)
        for _ in range(3):
            training_step(model, x, y, optimizer, label_smoothing=TrainConfig.label_smoothing)
        weights.append([k.detach().clone() for k in kernels])
    assert max((a - b).abs().max().item() for a, b in zip(*weights)) <= 1e-6


def test_cuda_gets_batched_muon_and_the_cpu_keeps_torchs():
    model = build_model("batch")
    assert isinstance(make_optimizer(model, TrainConfig(), "cuda").optimizers[1], BatchedMuon)
    assert type(make_optimizer(model, TrainConfig(), "cpu").optimizers[1]) is torch.optim.Muon


def test_muon_refuses_a_parameter_that_is_not_a_matrix():
    with pytest.raises(ValueError, match=r"2-D parameters only, got \[\(3, 3, 3\)\]"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(3, 3, 3))])


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_a_training_step_costs_at_most_280_ops_60_in_the_optimizers_and_no_host_sync(precision):
    """`python -m lab.bench --ops`: what a step launches on a GPU, counted on the CPU."""
    counts = bench.step_ops(synthetic_data(per_class=2, test_per_class=2), precision)
    assert counts["total"] <= 280 and counts["optimizer"] <= 60, counts
    assert counts["host_syncs"] == 0, counts
