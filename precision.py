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
three CPU kinds in results/bench/; docs/speed.md).

An explicit "fp32", "bf16" or "fp16" is honoured, except bf16 on a CUDA device below 8.0.
`hardware_info` describes the device for a results file; `compile_model` is the opt-in
torch.compile or CUDA graphs with its eager fallback; `guarded_first_step` turns a GPU library
that cannot run the first step into one line of advice.
"""

import importlib
import os
import platform
import re
import warnings
from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Environment variables that cap the instruction sets of torch's CPU kernels (ATen, oneDNN, MKL):
# set to AVX2 on an AVX512 CPU, a run repeats an AVX2 CPU's arithmetic bit for bit
# (docs/learning-per-epoch.md, "Same seeds, other arithmetic"), so a results file records them
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")


# oneDNN's ISA levels below AVX512_CORE_BF16, and ATen's below AVX-512: capped to one of these,
# torch runs bf16 without the instructions, however capable the CPU
CAPS_WITHOUT_BF16 = {"ONEDNN_MAX_CPU_ISA": {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE",
                                            "AVX512_CORE_VNNI"},
                     "ATEN_CPU_CAPABILITY": {"default", "avx2"}}


def caps_without_bf16():
    """{variable: value} of the ISA caps set in the environment that exclude native bf16."""
    return {name: os.environ[name] for name, levels in CAPS_WITHOUT_BF16.items()
            if os.environ.get(name, "").strip().upper() in {level.upper() for level in levels}}


def cpu_has_native_bf16():
    """True if the CPU executes bf16 arithmetic natively (AMX tiles or AVX512-BF16) and no ISA
    cap in the environment (ISA_CAPS) keeps torch from using those instructions.

    Asks torch's own CPU probes (the instruction sets oneDNN will dispatch to), not the model
    name; falls back to the kernel's CPU flags on torch builds without those probes."""
    return not caps_without_bf16() and _probe_native_bf16()


def _probe_native_bf16():
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
        # what decides CPU speed (docs/speed.md), which the model name does not tell
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["cpu_native_bf16"] = cpu_has_native_bf16()
        caps = {name: os.environ[name] for name in ISA_CAPS if name in os.environ}
        if caps:
            info["isa_caps"] = caps
        if caps_without_bf16():  # what the CPU could do, had the caps not hidden it
            info["cpu_native_bf16_uncapped"] = _probe_native_bf16()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def get_device(name=None):
    """`name` if given (and present), else the best available: cuda, then mps, then cpu."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            device = None
        if device is None or not device_present(device):
            raise ValueError(f"device {name!r} is {'not available' if device else 'unknown'} on "
                             f"this machine, which has: {', '.join(available_devices())}; "
                             f"leave --device out to use the best one")
        return device
    return next(device for device in map(torch.device, ("cuda", "mps", "cpu"))
                if device_present(device))


def available_devices():
    """The devices this machine can run on, as --device takes them."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] * (
            torch.cuda.device_count() > 1)
    if device_present(torch.device("mps")):
        names.append("mps")
    return names


def device_present(device):
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return False  # xpu, meta, ...: not a device this project trains on


def compile_model(model, enabled, cuda_graphs=False, device="cpu"):
    """`model` compiled (torch.compile) if `enabled`, or captured as CUDA graphs (torch.compile's
    "reduce-overhead" mode) if `cuda_graphs`; either falls back to the eager model, with one
    warning, where compilation or capture is unavailable or fails on a first batch: a speed
    option must never stop a run."""
    if cuda_graphs and torch.device(device).type != "cuda":
        warnings.warn(f"CUDA graphs need a CUDA device, not {torch.device(device).type}; "
                      f"training runs without them", RuntimeWarning, stacklevel=2)
        cuda_graphs = False
    if not (enabled or cuda_graphs):
        return model
    what = "CUDA graphs" if cuda_graphs else "torch.compile"
    try:
        dynamo = importlib.import_module("torch._dynamo")  # absent or broken on some platforms
        dynamo.config.suppress_errors = True  # a failing graph runs eagerly instead
        compiled = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)
    except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
        warnings.warn(f"{what} unavailable ({type(err).__name__}: {err}); running eagerly",
                      RuntimeWarning, stacklevel=2)
        return model
    return EagerFallback(model, compiled, what)


def first_line(err, limit=200):
    """An exception's message cut to its first line, for a one-line warning ("" if none)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else ""


class EagerFallback(torch.nn.Module):
    """Runs `compiled` (a compiled or graph-captured `model`) and, the first time it raises,
    warns once and runs the eager `model` from then on. Its parameters are `model`'s."""

    def __init__(self, model, compiled, what):
        super().__init__()
        self.model, self.what, self.failed = model, what, False
        self.__dict__["compiled"] = compiled  # not a submodule: parameters() stay `model`'s

    def forward(self, x):
        if not self.failed:
            try:
                if self.what == "CUDA graphs":  # a new step: may reuse the last one's outputs
                    torch.compiler.cudagraph_mark_step_begin()
                return self.compiled(x)
            except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
                self.failed = True
                reason = first_line(err)
                warnings.warn(f"{self.what} failed ({type(err).__name__}: {reason}); running "
                              f"eagerly", RuntimeWarning, stacklevel=2)
        return self.model(x)


class UnsupportedStepError(RuntimeError):
    """The device's libraries cannot run a training step in this precision; the message (one
    line) names the device and what to pass instead."""


# What cuDNN and cuBLAS (and oneDNN) say when they have no kernel for a layer and dtype.
LIBRARY_ERROR = re.compile(r"cudnn|cublas|onednn|mkldnn|unable to find an engine|no engine|"
                           r"not supported", re.IGNORECASE)
ADVICE = {"fp16": "--precision fp32 (PRECISION = \"fp32\" in a notebook)",
          "bf16": "--precision fp16 or fp32 (PRECISION in a notebook)",
          "fp32": "--device cpu"}


def device_name(device):
    """The GPU's name, or the CPU's model name."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info()[0]


def depthwise_convs(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)
            and m.groups > 1 and m.groups == m.in_channels]


def run_depthwise_without_cudnn(model):
    """Run the forward and backward of `model`'s depthwise convs with cuDNN off (PyTorch's own
    CUDA kernels), the rest as before; returns how many convs that is."""
    convs = [m for m in depthwise_convs(model) if not getattr(m, "without_cudnn", False)]
    for conv in convs:
        conv.without_cudnn = True
        conv.register_forward_pre_hook(_cudnn_off, prepend=True)  # around every other hook
        conv.register_forward_hook(_cudnn_back_on, always_call=True)  # also when forward raises
    return len(convs)


def _cudnn_off(module, args=None):
    module.cudnn_was = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False


def _cudnn_restore(module):
    torch.backends.cudnn.enabled = module.cudnn_was


def _cudnn_back_on(module, args, output):
    _cudnn_restore(module)
    if getattr(output, "grad_fn", None) is not None:  # backward picks its kernels as it runs
        output.grad_fn.register_prehook(lambda grad_outputs: _cudnn_off(module))
        output.grad_fn.register_hook(lambda grad_inputs, grad_outputs: _cudnn_restore(module))


def guarded_first_step(step, model, device, precision):
    """`step()`, the first training step of a run, where a device library that has no kernel
    for it (cuDNN's "unable to find an engine", "not supported") gets one retry with the
    depthwise convs off cuDNN under fp16 (one warning), else stops the run in one line."""
    result, failure = _unless_no_kernel(step)
    if failure and precision == "fp16" and run_depthwise_without_cudnn(model):
        warnings.warn(f"cuDNN cannot run the depthwise convs in fp16 on {device_name(device)}; "
                      f"running them without cuDNN (slower)", RuntimeWarning, stacklevel=2)
        result, failure = _unless_no_kernel(step)
    if failure is None:
        return result
    reason = first_line(failure, limit=120)
    raise UnsupportedStepError(
        f"the first training step failed on {device_name(device)} in {precision} ({reason}); "
        f"pass {ADVICE[precision]} instead")


def _unless_no_kernel(step):
    """(step(), None), or (None, the error) where a device library has no kernel for it; any
    other error propagates."""
    try:
        return step(), None
    except RuntimeError as err:
        if not LIBRARY_ERROR.search(str(err)):
            raise
        return None, err


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
    """Warn once that a reduced precision forced on a CPU runs slower than fp32 there: bf16
    without native bf16 instructions (about 2.5x measured, docs/speed.md), fp16 on any CPU
    (oneDNN's fp16 convolutions were 30x slower than fp32 even with avx512_fp16)."""
    if torch.device(device).type != "cpu":
        return
    if precision == "bf16" and not cpu_has_native_bf16():
        warnings.warn("bf16 is emulated on this CPU (no native bf16 instructions) and runs "
                      "slower than fp32: leave --precision at auto", RuntimeWarning, stacklevel=3)
    elif precision == "fp16":
        warnings.warn("fp16 runs slower than fp32 on CPUs (oneDNN's fp16 convolutions, with or "
                      "without avx512_fp16): leave --precision at auto", RuntimeWarning,
                      stacklevel=3)


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

