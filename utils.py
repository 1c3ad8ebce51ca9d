"""Training, evaluation, checkpoints, plots and results files, shared by notebooks, CLI and tests."""

import datetime
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataset import TensorLoader, augment_batch, stratified_indices
from norm_stats import fixed_batch, measure_norm_statistics, probe_layers
from precision import autocast, cpu_has_native_bf16, make_grad_scaler, resolve_precision

RESULTS_FORMAT = 1
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    # The recipe, kept after the study on a validation split (README, "How the recipe was
    # chosen"; files in results/tuning/): no lever beat the seed-to-seed spread at 20 epochs.
    epochs: int = 20              # passes over the training set (the assignment allows at most 20)
    batch_size: int = 128         # images per optimizer step; 64 and 256 (rate scaled) changed
                                  # validation accuracy by less than the seed spread
    lr: float = 0.1               # peak learning rate of the OneCycle schedule; 0.4 led at 5 epochs
                                  # but tied at 20, 0.05 lost at both
    momentum: float = 0.9         # SGD (Nesterov) momentum
    weight_decay: float = 5e-4    # L2 penalty, applied to conv weights only (not norms, biases);
                                  # 2e-4 and 1e-3 changed little
    label_smoothing: float = 0.1  # cross-entropy target smoothing; 0 lost with both seeds
                                  # (by less than the seed spread)
    pct_start: float = 0.25       # fraction of all steps spent warming up to `lr`; 0.1 and 0.4
                                  # within the seed spread
    seed: int = 0                 # model init, data order, augmentation, dropout
    eval_batch_size: int = 1000   # images per evaluation forward pass
    ema_decay: float = 0.0        # evaluate an exponential moving average of the weights (and
                                  # BatchNorm statistics) with this decay per step; 0: off
                                  # (0.99 changed nothing, 0.998 lost 3 points at 5 epochs)
    pad: int = 4                  # random-crop padding in pixels (reflect); 0 disables the crop;
                                  # 2 (weaker) changed little
    flip: bool = True             # random horizontal flips while training
    precision: str = "auto"       # auto|fp32|bf16|fp16; auto picks by device (precision.py)
    compile: bool = False         # torch.compile the model; off by default: on 2-core CPUs its
                                  # compile time outweighs a 1.07x gain over 20 epochs (README)

    def to_dict(self):
        return asdict(self)


# How a run computes, not what it computes: a checkpoint may be resumed under other values.
EXECUTION_FIELDS = ("precision", "compile")

# Steps between reads of the device-side non-finite-loss flag: one host sync per this many
# steps instead of one per step, and at most this many steps wasted after a NaN.
NAN_CHECK_EVERY = 100


def scaled_lr(batch_size, base_lr=TrainConfig.lr, base_batch_size=TrainConfig.batch_size):
    """Linear scaling rule (Goyal et al., 2017; used by the GroupNorm paper): the peak learning
    rate is proportional to the batch size, `base_lr` at `base_batch_size` images per step.

    Keeps lr/batch, the noise scale of SGD, equal across batch sizes, so that a fixed number of
    epochs is a comparable budget: at batch 2 the rate is 64x smaller, for 64x more steps."""
    return base_lr * batch_size / base_batch_size


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names where and what to do."""

    def __init__(self, message, epoch=None, step=None):
        super().__init__(message)
        self.epoch, self.step = epoch, step


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or belongs to another configuration."""


# ---------------------------------------------------------------------------------- machine

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_device(name=None):
    """`name` if given, else the best available: cuda, then mps, then cpu."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def hardware_info(device):
    device = torch.device(device)
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cpu":
        # What decides CPU speed here (README "Speed"): the vector ISA oneDNN dispatches to and
        # native bf16, which the model name does not tell.
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["cpu_native_bf16"] = cpu_has_native_bf16()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def show_summary(model, input_size=(3, 32, 32)):
    """torchsummary's table, computed on a CPU copy in eval mode.

    torchsummary runs a forward pass in whatever mode the model is in (train mode would update
    BatchNorm's running statistics) and only accepts "cpu"/"cuda"; a CPU eval copy leaves the
    real model untouched wherever it lives (cuda, mps, cpu).
    """
    import copy
    from torchsummary import summary

    probe = copy.deepcopy(model).to("cpu").eval()
    rng = torch.get_rng_state()  # summary draws its input from the global RNG; keep runs comparable
    summary(probe, input_size, device="cpu")
    torch.set_rng_state(rng)


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


# -------------------------------------------------------------------------------- training

def make_optimizer(model, config, device="cpu"):
    """SGD with Nesterov momentum; weight decay on conv weights only, as norm scales/shifts and
    biases gain nothing from being pulled towards zero.

    On CUDA the fused kernel: one launch for all parameters, and with fp16 it takes the
    GradScaler's inf check on the device instead of a host sync per step."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=True,
        fused=torch.device(device).type == "cuda" or None,
    )


def one_cycle(step, total_steps, pct_start, start=0.1, end=0.001):
    """Learning-rate factor of a linear one-cycle: start -> 1 over the warm-up, then -> end.

    Written out rather than torch's OneCycleLR, which divides by zero on runs of a few steps
    (smoke runs, tests)."""
    warmup = max(1, round(pct_start * total_steps))
    if step < warmup:
        return start + (1 - start) * step / warmup
    return 1 + (end - 1) * min(1.0, (step - warmup) / max(1, total_steps - warmup))


def make_scheduler(optimizer, config, steps_per_epoch):
    total = config.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: one_cycle(step, total, config.pct_start))


def train_one_epoch(model, loader, optimizer, scheduler=None, label_smoothing=0.0, epoch=1,
                    progress=None, precision="fp32", scaler=None, ema=None):
    """One pass over `loader`; returns {"loss", "acc"} averaged over the images seen.

    `precision` is a resolved one ("fp32", "bf16", "fp16"; see precision.py), `scaler` the
    GradScaler that fp16 needs, `ema` an EMA of the weights (make_ema) updated after each step. Raises NonFiniteLossError naming the first step whose loss was
    NaN/inf. The check costs no host round-trip per step: the first bad step is remembered on
    the device and read every NAN_CHECK_EVERY steps and at the end, so the caller's last
    checkpoint (written only after a clean epoch) is never replaced by a broken model.
    """
    model.train()
    device = loader.device
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    first_bad_step = torch.zeros((), dtype=torch.int64, device=device)  # 0: none so far
    first_bad_loss = torch.zeros((), dtype=torch.float32, device=device)
    lrs, seen = [], 0  # lrs: host-side floats, so the error can name the rate of the bad step
    for step, (x, y) in enumerate(loader, start=1):
        lrs.append(optimizer.param_groups[0]["lr"])
        with autocast(device, precision):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        is_first_bad = ~torch.isfinite(loss) & (first_bad_step == 0)
        first_bad_step = torch.where(is_first_bad, step, first_bad_step)
        first_bad_loss = torch.where(is_first_bad, loss.detach().float(), first_bad_loss)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # skipped when the scaled gradients hold inf/NaN
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)  # a compiled model yields the same parameters
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if progress is not None:
            progress.update(1)
        if step % NAN_CHECK_EVERY == 0:
            _raise_if_non_finite(first_bad_step, first_bad_loss, epoch, lrs)
    _raise_if_non_finite(first_bad_step, first_bad_loss, epoch, lrs)
    return {"loss": total_loss.item() / seen, "acc": correct.item() / seen}


def make_ema(model, decay):
    """An exponential moving average of `model`'s weights and buffers (BatchNorm's running
    statistics move with the weights they belong to), or None when `decay` is 0.

    Averaging over the last ~1/(1-decay) steps smooths out the noise of the final steps; the
    one-cycle schedule's low final learning rate already does some of that, which is why it is
    a lever to measure rather than a default."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _raise_if_non_finite(first_bad_step, first_bad_loss, epoch, lrs):
    step = int(first_bad_step)  # the host sync, once per NAN_CHECK_EVERY steps
    if step:
        raise NonFiniteLossError(
            f"loss became {float(first_bad_loss)} at epoch {epoch}, step {step}; training "
            f"stopped. Lower the learning rate (it was {lrs[step - 1]:.4g} at that step; --lr).",
            epoch=epoch, step=step)


@torch.no_grad()
def predict(model, loader, precision="fp32", flip_tta=False):
    """Logits of every image of an (unshuffled) loader, on the CPU, in loader order.

    flip_tta: average the logits of each image and its mirror image (test-time augmentation;
    reported beside single-view accuracy, never in its place)."""
    model.eval()
    with autocast(loader.device, precision):
        return torch.cat([(model(x).float() + model(x.flip(3)).float()).div(2).cpu()
                          if flip_tta else model(x).float().cpu() for x, _ in loader])


@torch.no_grad()
def evaluate(model, loader, precision="fp32"):
    """{"loss", "acc"} of `model` over an evaluation loader (plain cross-entropy, no smoothing)."""
    logits = predict(model, loader, precision)
    labels = loader.labels.cpu()
    return {"loss": F.cross_entropy(logits, labels).item(),
            "acc": (logits.argmax(1) == labels).float().mean().item()}


def has_running_stats(model):
    """True if `model` normalizes differently in train and eval mode (BatchNorm's running stats)."""
    return any(getattr(m, "track_running_stats", False) for m in model.modules())


@torch.no_grad()
def evaluate_batch_stats(model, data, batch_size, device, seed=0, precision="fp32"):
    """Test accuracy with train-mode normalization: each batch of `batch_size` test images is
    normalized by its own statistics, as during training, instead of BatchNorm's running ones.

    The gap to `evaluate` (running statistics) is BatchNorm's train/eval discrepancy, the one
    that grows as batches shrink. Test images are visited in a seeded random order, since the
    dataset is sorted by class and single-class batches would skew batch statistics. The model
    is copied, so its running statistics are left untouched."""
    import copy

    probe = copy.deepcopy(model).to(device).train()
    order = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(seed))
    loader = TensorLoader(data.test_x[order], data.test_y[order], data.mean, data.std,
                          batch_size, train=False, device=device)
    correct = seen = 0
    with autocast(loader.device, precision):
        for x, y in loader:
            if len(y) < 2:
                break  # BatchNorm cannot normalize a batch of one image: drop such a tail
            correct += (probe(x).argmax(1) == y).sum().item()
            seen += len(y)
    return correct / seen


def make_test_loader(data, config, device, channels_last=True):
    return TensorLoader(data.test_x, data.test_y, data.mean, data.std, config.eval_batch_size,
                        train=False, device=device, channels_last=channels_last)


def make_loaders(data, config, device, channels_last=True):
    train = TensorLoader(data.train_x, data.train_y, data.mean, data.std, config.batch_size,
                         train=True, device=device, seed=config.seed, pad=config.pad,
                         flip=config.flip, channels_last=channels_last)
    return train, make_test_loader(data, config, device, channels_last)


def recipe(config):
    """What a TrainConfig says a run computes: every field but the EXECUTION_FIELDS."""
    return {k: v for k, v in config.to_dict().items() if k not in EXECUTION_FIELDS}


def run_fingerprint(model, data, config):
    """What a checkpoint must match to be resumed: architecture, recipe and data (not how the
    arithmetic is done: a CPU fp32 checkpoint may be resumed in bf16 on a GPU)."""
    return {"model": model.config.to_dict(), "train": recipe(config),
            "num_params": model.get_num_params(), "data_sha256": data.sha256,
            "train_images": len(data.train_y), "test_images": len(data.test_y)}


def fit(model, data, config, device=None, checkpoint_path=None, resume=False, progress=True,
        on_epoch_end=None, channels_last=True, overwrite=False, eval_name="test"):
    """Train `model` for config.epochs with one-cycle SGD; return the history.

    history = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
               "epoch_time", "precision", "activation_rms", "grad_norm"} (lists, one entry per
               epoch; times in seconds; precision: the one resolved from config.precision, see
               precision.py; the last two per normalization layer, norm_stats.probe_layers).
    With config.ema_decay, every evaluation uses the weight average, and `model` holds it
    when fit returns. With `checkpoint_path`, a checkpoint is written atomically after every epoch; with
    `resume=True` an existing one is loaded (after checking it belongs to this run) and
    training continues from the epoch after it, reproducing the uninterrupted run on CPU.
    An existing checkpoint is never replaced by a new run unless `overwrite=True`: it may hold
    hours of another run's work. `on_epoch_end(epoch, history)` is called after each checkpoint.
    `eval_name` labels the evaluation set in the log ("test", or "val" for a validation split).
    """
    device = get_device(device)
    precision = resolve_precision(config.precision, device)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    refuse_to_replace_checkpoint(checkpoint_path, resume, overwrite)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: pick fastest kernels
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    seed_everything(config.seed)
    train_loader, test_loader = make_loaders(data, config, device, channels_last)
    optimizer = make_optimizer(model, config, device)
    scheduler = make_scheduler(optimizer, config, len(train_loader))
    scaler = make_grad_scaler(device, precision)
    ema = make_ema(model, config.ema_decay)
    history = {k: [] for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc",
                               "lr", "epoch_time", "precision", "activation_rms", "grad_norm")}
    probe_batch = fixed_batch(data.train_x, data.train_y, data.mean, data.std, device)
    fingerprint = run_fingerprint(model, data, config)
    start_epoch = 1
    if resume and checkpoint_path and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, fingerprint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        train_loader.load_state_dict(state["loader"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        history = state["history"]
        for key in ("precision", "activation_rms", "grad_norm"):  # older checkpoints
            history.setdefault(key, [None] * len(history["epoch"]))
        start_epoch = state["epoch"] + 1
        print(f"Resumed from {checkpoint_path} after epoch {state['epoch']}; its log so far:")
        for i in range(len(history["epoch"])):
            print(epoch_line(history, i, config.epochs, eval_name))
    elif resume:
        print(f"No checkpoint at {checkpoint_path}: training starts from epoch 1."
              if checkpoint_path else "No checkpoint path given: training starts from epoch 1.")
    step_model = compile_model(model, config.compile)  # shares the parameters of `model`

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=config.epochs * len(train_loader), initial=(start_epoch - 1) *
                   len(train_loader), unit="step", file=sys.stderr, mininterval=2.0,
                   dynamic_ncols=False, ncols=80)
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            try:
                train = train_one_epoch(step_model, train_loader, optimizer, scheduler,
                                        config.label_smoothing, epoch, bar, precision, scaler,
                                        ema)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(f"{err} {_kept_checkpoint(checkpoint_path, epoch)}",
                                         err.epoch, err.step) from None
            test = evaluate(step_model if ema is None else ema.module, test_loader, precision)
            epoch_time = time.perf_counter() - t0  # the probe is diagnostics, not training
            probe = probe_layers(model, probe_batch)
            for key, value in (("epoch", epoch), ("train_loss", train["loss"]),
                               ("train_acc", train["acc"]), ("test_loss", test["loss"]),
                               ("test_acc", test["acc"]), ("lr", lr),
                               ("epoch_time", epoch_time), ("precision", precision),
                               ("activation_rms", probe["activation_rms"]),
                               ("grad_norm", probe["grad_norm"])):
                history[key].append(value)
            line = epoch_line(history, -1, config.epochs, eval_name)
            if bar is not None:
                bar.write(line, file=sys.stdout)  # above the bar, which stays on stderr
            else:
                print(line, flush=True)
            if checkpoint_path:
                save_checkpoint(checkpoint_path, {
                    "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "loader": train_loader.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "ema": ema.state_dict() if ema is not None else None,
                    "rng": get_rng_state(), "history": history,
                })
            if on_epoch_end is not None:
                on_epoch_end(epoch, history)
    finally:
        if bar is not None:
            bar.close()
    if ema is not None:  # the caller gets the weights that were evaluated
        model.load_state_dict(ema.module.state_dict())
    return history


def refuse_to_replace_checkpoint(path, resume, overwrite):
    """A new run must not silently replace a checkpoint: it may hold hours of another run."""
    if path is not None and Path(path).exists() and not (resume or overwrite):
        raise CheckpointError(
            f"{path} already exists; refusing to replace it. Resume that run (--resume, or "
            f"RESUME = True in a notebook), use another file (--checkpoint), or start again "
            f"with --overwrite")


def _kept_checkpoint(checkpoint_path, failed_epoch):
    """What the user still has after a NaN in `failed_epoch`, for the error message."""
    if checkpoint_path is None:
        return "No checkpoint was being written."
    if failed_epoch > 1 and checkpoint_path.exists():
        return (f"The checkpoint of epoch {failed_epoch - 1}, the last complete one, is left "
                f"intact at {checkpoint_path}.")
    return "No epoch had completed, so there is no checkpoint to resume from."


def epoch_line(history, i, epochs, eval_name="test"):
    return (f"epoch {history['epoch'][i]:2d}/{epochs}: train loss {history['train_loss'][i]:.4f} "
            f"acc {100 * history['train_acc'][i]:.2f}% | {eval_name} loss "
            f"{history['test_loss'][i]:.4f} "
            f"acc {100 * history['test_acc'][i]:.2f}% | {history['epoch_time'][i]:.0f} s")


# ------------------------------------------------------------------------------ checkpoints

def get_rng_state():
    """Every global RNG that can touch training (dropout uses torch's), as plain tensors/ints."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state):
    """torch.save to a temporary file, then rename: a crash mid-write leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, fingerprint=None):
    """Load a checkpoint; refuse a damaged one or one whose fingerprint differs from this run's."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own text runs to seven lines of unrelated advice
        raise CheckpointError(
            f"checkpoint {path} is unreadable (damaged or not a checkpoint: "
            f"{type(err).__name__}); delete it to start the run from scratch, or point "
            f"--checkpoint elsewhere") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (format "
                              f"{CHECKPOINT_FORMAT}); delete it or pass another path")
    if fingerprint is not None and state["fingerprint"] != fingerprint:
        diffs = _fingerprint_diff(state["fingerprint"], fingerprint)
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run ({'; '.join(diffs)}); refusing to "
            f"resume from it. Use another checkpoint path or delete it to start afresh.")
    return state


def _fingerprint_diff(saved, current, prefix=""):
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _fingerprint_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return diffs


# -------------------------------------------------------------------------------- analysis

def collect_misclassified(model, loader, limit=10, seed=0, logits=None, precision="fp32"):
    """A seeded random sample of up to `limit` wrongly classified images of an evaluation loader.

    Sampled rather than the first ones, since datasets sorted by class would show one class only.
    Returns {"index", "true", "pred"} (int64 tensors, in dataset order) and "images" (the raw
    uint8 images, i.e. denormalized, (K, 3, H, W)). `logits`: predict(model, loader), if at hand.
    """
    preds = (predict(model, loader, precision) if logits is None else logits).argmax(1)
    labels = loader.labels.cpu()
    wrong = torch.nonzero(preds != labels).flatten()
    pick = torch.randperm(len(wrong), generator=torch.Generator().manual_seed(seed))[:limit]
    wrong = wrong[pick].sort().values
    return {"index": wrong, "true": labels[wrong], "pred": preds[wrong],
            "images": loader.images[wrong.to(loader.device)].cpu()}


def confusion_matrix(model, loader, num_classes=10, logits=None, precision="fp32"):
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    preds = (predict(model, loader, precision) if logits is None else logits).argmax(1)
    labels = loader.labels.cpu()
    return torch.bincount(labels * num_classes + preds,
                          minlength=num_classes ** 2).view(num_classes, num_classes)


def finish_figure(fig, path, show):
    """Save before showing (show can leave an empty canvas behind), then free the figure."""
    import matplotlib.pyplot as plt

    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    if show:
        plt.show()
    plt.close(fig)
    return fig


def plot_history(history, path=None, title="", show=False):
    """Loss and accuracy per epoch, train and test; saved to `path` when given."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = history["epoch"]
    ax_loss.plot(epochs, history["train_loss"], label="train (smoothed targets)")
    ax_loss.plot(epochs, history["test_loss"], label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_acc.plot(epochs, [100 * a for a in history["train_acc"]], label="train (augmented)")
    ax_acc.plot(epochs, [100 * a for a in history["test_acc"]], label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return finish_figure(fig, path, show)


def plot_misclassified(mistakes, classes, path=None, title="", ncols=5, show=False):
    """A grid of misclassified images with the true and predicted class under each."""
    import matplotlib.pyplot as plt

    count = len(mistakes["true"])
    nrows = max(1, -(-count // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.9 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < count:
            ax.imshow(mistakes["images"][i].permute(1, 2, 0).numpy())
            ax.set_title(f"true: {classes[int(mistakes['true'][i])]}\n"
                         f"pred: {classes[int(mistakes['pred'][i])]}", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return finish_figure(fig, path, show)


def plot_data_preview(data, path=None, per_class=5, seed=0, pad=4, flip=True, show=False):
    """A row per class: `per_class` training images as stored, then the same images as the
    training loader augments them (crop from the `pad`-pixel reflect-padded image, flip).
    Returns the figure and the indices of the images shown (one row per class, in class order)."""
    import matplotlib.pyplot as plt

    keep = stratified_indices(data.train_y, per_class, seed)
    rows = [keep[data.train_y[keep] == c] for c in range(len(data.classes))]
    images = data.train_x[torch.cat(rows)].float().div(255)
    augmented = augment_batch(images, torch.Generator().manual_seed(seed), pad, flip)
    fig, axes = plt.subplots(len(rows), 2 * per_class + 1, figsize=(1.1 * (2 * per_class + 1),
                                                                     1.1 * len(rows)))
    for r, cls in enumerate(data.classes):
        for c in range(per_class):
            i = r * per_class + c
            axes[r, c].imshow(images[i].permute(1, 2, 0).numpy())
            axes[r, per_class + 1 + c].imshow(augmented[i].clamp(0, 1).permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(cls, rotation=0, ha="right", va="center", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
        ax.spines[:].set_visible(False)
    axes[0, per_class // 2].set_title("training images", fontsize=10)
    axes[0, per_class + 1 + per_class // 2].set_title(
        f"as trained on (crop, pad {pad}{', flip' if flip else ''})", fontsize=10)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    finish_figure(fig, path, show)
    return fig, torch.stack(rows)


# ---------------------------------------------------------------------------------- results

def make_results(model, data, config, history, device, logits=None, **extra):
    """Everything a results file records about one run.

    Times come from the history (training + evaluation, per epoch), so a resumed run reports
    the time its epochs took, not the time of the last session alone. The confusion matrix
    and per-class accuracy are of the final model on the test set (`logits`: its predictions,
    if already computed)."""
    wall_time = sum(history["epoch_time"])
    precision = run_precision(history) or resolve_precision(config.precision, device)
    used = precision.split(", ")[-1]  # a resumed run on other hardware: its last precision
    test_loader = make_test_loader(data, config, device)
    confusion = confusion_matrix(model, test_loader, len(data.classes), logits, precision=used)
    tta_preds = predict(model, test_loader, used, flip_tta=True).argmax(1)
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist()
    return {
        "format": RESULTS_FORMAT,
        "variant": model.config.norm,
        "seed": config.seed,
        "epochs": len(history["epoch"]),
        "num_params": model.get_num_params(),
        "final_test_acc": history["test_acc"][-1],
        # The mean of the logits of each test image and its mirror image: a separate number,
        # since single-view accuracy is what the assignment and the results table report.
        "final_test_acc_flip_tta": (tta_preds == test_loader.labels.cpu()).float().mean().item(),
        # BatchNorm only: the same test set normalized by the statistics of each batch of
        # `batch_size` images, as in training, rather than by the running averages.
        "final_test_acc_batch_stats": (
            evaluate_batch_stats(model, data, config.batch_size, device, config.seed, used)
            if has_running_stats(model) else None),
        "precision": precision,
        "wall_time_s": wall_time,
        "time_per_epoch_s": wall_time / len(history["epoch_time"]),
        "per_class_acc": dict(zip(data.classes, per_class)),
        # each normalization layer's input and output along every method's axes (norm_stats.py)
        "norm_statistics": measure_norm_statistics(model, data, device),
        "confusion_matrix": confusion.tolist(),
        "history": history,
        **provenance(model, data, config, device),
        **extra,
    }


def provenance(model, data, config, device):
    """What every results file says about how its run was made: the model and training
    configuration, the data copy, the hardware and the date."""
    return {
        "model_config": model.config.to_dict(),
        "train_config": config.to_dict(),
        "data": {"source": data.source, "sha256": data.sha256,
                 "train_images": len(data.train_y), "test_images": len(data.test_y),
                 "mean": list(data.mean), "std": list(data.std)},
        "hardware": hardware_info(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def divergence_results(model, data, config, device, error, **extra):
    """The results file of a run stopped by the NaN guard (`error`, a NonFiniteLossError): where
    it diverged instead of accuracies, so a sweep records it as a result and goes on."""
    return {
        "format": RESULTS_FORMAT,
        "variant": model.config.norm,
        "seed": config.seed,
        "epochs": config.epochs,
        "num_params": model.get_num_params(),
        "final_test_acc": None,
        "diverged": {"epoch": error.epoch, "step": error.step, "message": str(error)},
        "precision": resolve_precision(config.precision, device),
        **provenance(model, data, config, device),
        **extra,
    }


def run_precision(history):
    """The precision(s) a run's epochs used, in order: "bf16", or "fp32, bf16" for a run resumed
    on other hardware; None for histories from before precision was recorded."""
    used = []
    for value in history.get("precision", []):
        if value is not None and value not in used:
            used.append(value)
    return ", ".join(used) or None


def save_json_atomic(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_results(path):
    with open(path) as f:
        return json.load(f)
