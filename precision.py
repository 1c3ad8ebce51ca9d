"""The device a run uses (`get_device`), what it can do, and which arithmetic precision it runs
there, decided in one place.

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
`hardware_info` describes the device for a results file; `compile_model` is the opt-in
torch.compile with its eager fallback.
"""

import os
import platform
import warnings
from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Environment variables that cap the instruction sets of torch's CPU kernels (ATen, oneDNN, MKL):
# set to AVX2 on an AVX512 CPU, a run repeats an AVX2 CPU's arithmetic bit for bit (README
# "Same seeds, other arithmetic"), so a results file records them
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")


def cpu_has_native_bf16():
    """True if the CPU executes bf16 arithmetic natively (AMX tiles or AVX512-BF16).

    Asks torch's own CPU probes (the instruction sets oneDNN will dispatch to), not the model
    name; falls back to the kernel's CPU flags on torch builds without those probes."""
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(probe is not None for probe in probes):
        return any(probe() for probe in probes)
    return bool({"amx_bf16", "avx512_bf16"} & cpu_info()[1])


def cpu_info():
    """(model name, set of flags) of this machine's CPU, read from /proc/cpuinfo where there is
    one (Linux); elsewhere the platform's name and no flags."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name is None:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def hardware_info(device):
    """What a results file records about the device a run used."""
    device = torch.device(device)
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": cpu_info()[0], "cpu_threads": torch.get_num_threads()}
    if device.type == "cpu":
        # what decides CPU speed (README "Speed"), which the model name does not tell
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["cpu_native_bf16"] = cpu_has_native_bf16()
        caps = {name: os.environ[name] for name in ISA_CAPS if name in os.environ}
        if caps:
            info["isa_caps"] = caps
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def get_device(name=None):
    """`name` if given (and present), else the best available: cuda, then mps, then cpu."""
    if name:
        device = torch.device(name)
        present = {"cuda": torch.cuda.is_available, "cpu": lambda: True,
                   "mps": lambda: torch.backends.mps.is_available()}.get(device.type)
        if present is not None and not present():
            raise ValueError(f"device {name!r} is not available on this machine; leave the "
                             f"device out to use the best one available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compile_model(model, enabled):
    """torch.compile(model) if `enabled`, falling back to the eager model when compilation is
    unavailable (e.g. an unsupported Python) or fails on the first batch (no C compiler, an
    unsupported backend): a speed option must never stop a run."""
    if not enabled:
        return model
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # a failing graph runs eagerly instead
        return torch.compile(model)
    except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
        print(f"torch.compile unavailable ({type(err).__name__}: {err}); running eagerly")
        return model


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


def warn_if_emulated(precision, device):
    """Warn once that a reduced precision forced on a CPU without native support for it is
    emulated there, and slower than fp32 (about 2.5x measured, README "Speed")."""
    native = {"bf16": cpu_has_native_bf16,
              "fp16": lambda: bool({"avx512_fp16", "amx_fp16"} & cpu_info()[1])}
    if torch.device(device).type == "cpu" and precision in native and not native[precision]():
        warnings.warn(f"{precision} is emulated on this CPU (no native {precision} "
                      f"instructions) and runs slower than fp32: leave --precision at auto",
                      RuntimeWarning, stacklevel=3)


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

