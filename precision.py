"""Which arithmetic precision a run uses, decided in one place from what the device can do.

`resolve_precision("auto", device)` picks:

    CUDA, compute capability >= 8.0 (A100, L4, H100, RTX 30xx+)  bf16 autocast
    CUDA below 8.0 (Colab's T4, V100)                            fp16 autocast + GradScaler
    CPU with native bf16 (AMX or AVX512-BF16)                    bf16 autocast
    anything else (AVX2-only CPUs, MPS)                          fp32

Why: bf16 keeps fp32's exponent range, so it needs no loss scaling, and tensor cores from
compute capability 8.0 on run it natively. Below 8.0 `torch.cuda.is_bf16_supported()` can answer
True through emulation, yet cuDNN has no bf16 convolutions there; fp16 is what those tensor cores
run, and its narrow range needs a gradient scaler. On CPUs, oneDNN's bf16 convolutions are faster
than fp32 only with native bf16 instructions and about 10x slower without them (measured on the
three CPU kinds in results/bench/; README "Speed").

An explicit "fp32", "bf16" or "fp16" is honoured, except bf16 on a CUDA device below 8.0.
"""

from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16():
    """True if the CPU executes bf16 arithmetic natively (AMX tiles or AVX512-BF16).

    Asks torch's own CPU probes (the instruction sets oneDNN will dispatch to), not the model
    name; falls back to the kernel's CPU flags on torch builds without those probes."""
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(probe is not None for probe in probes):
        return any(probe() for probe in probes)
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(requested, device, *, capability=None, native_bf16=None):
    """The concrete precision ("fp32", "bf16" or "fp16") for `requested` on `device`.

    `capability` (CUDA (major, minor)) and `native_bf16` (CPU) default to what this machine
    reports; tests pass them to stand in for other hardware."""
    requested = str(requested).strip().lower()
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = capability or torch.cuda.get_device_capability(device)
        if requested == "auto":
            return "bf16" if major >= 8 else "fp16"
        if requested == "bf16" and major < 8:
            raise ValueError(
                f"bf16 needs a GPU of compute capability 8.0 or newer; this one is {major}.{minor}"
                f" (cuDNN has no bf16 convolutions there): use --precision fp16 or auto")
        return requested
    if requested != "auto":
        return requested
    if device.type == "cpu":
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        return "bf16" if native else "fp32"
    return "fp32"  # MPS and other backends: no measured gain from autocast here


def autocast(device, precision):
    """The autocast context for a resolved precision; fp32 runs without one."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def make_grad_scaler(device, precision):
    """A GradScaler for fp16, whose small range underflows small gradients; None otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)

