"""The training configuration, the training loop, evaluation and checkpoints: what the notebooks,
the command line and the tests train with."""

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from dataset import TensorLoader
from model import ModelConfig, check_choice, check_range, prepare_for_training
from norm_stats import fixed_batch, probe_layers
from optimizers import OPTIMIZERS, make_optimizer
from precision import (PRECISIONS, autocast, compile_model, get_device, guarded_first_step,
                       make_grad_scaler, resolve_precision, warn_if_emulated)

CHECKPOINT_FORMAT = 1


WHITEN_MODES = ("off", "frozen", "trainable")


@dataclass
class TrainConfig:
    # The recipe; docs/recipe.md says why each default is there, with its evidence.
    epochs: int = 20              # passes over the training set; the assignment allows 20
    batch_size: int = 128         # images per optimizer step
    lr: float = 0.1               # peak learning rate of the one-cycle schedule (all but Muon's)
    momentum: float = 0.9         # Nesterov momentum of SGD and Muon (AdamW's beta1)
    weight_decay: float = 5e-4    # L2 penalty on conv weights only (not norms, biases)
    label_smoothing: float = 0.1  # cross-entropy target smoothing
    pct_start: float = 0.25       # fraction of the steps spent warming up to `lr`
    seed: int = 0                 # model init, data order, augmentation, dropout
    eval_batch_size: int = 1000   # images per evaluation forward pass
    ema_decay: float = 0.0        # evaluate an EMA of the weights with this decay per step; 0: off
    pad: int = 2                  # random-crop padding in pixels (reflect); 0: no crop
    flip: bool = True             # random horizontal flips while training
    precision: str = "auto"       # auto, fp32, bf16 or fp16; auto picks by device (precision.py)
    compile: bool = False         # torch.compile the model; its compile time outweighs its gain here
    cuda_graphs: bool = False     # replay the model's kernels as CUDA graphs (CUDA only; docs/speed.md)
    whiten: str = "off"           # C1 whitens 3x3 patches of training images: off, frozen, trainable
    norm_bias_lr: float = 1.0     # the norms' shifts learn at this multiple of `lr`
    freeze_norm_scale: bool = False  # the norms' scales stay at 1
    alternate_flip: bool = False  # each image flipped in every other epoch instead of at random
    optimizer: str = "muon"       # muon (the 3x3 blocks' kernels; SGD for the rest), sgd or adamw
    muon_lr: float = 0.05         # Muon's peak learning rate for the 3x3 blocks' kernels
    muon_depthwise: bool = False  # Muon for the depthwise filters too (a layer's as one matrix)
    depthwise_lr: float = 1.0     # the depthwise filters learn at this multiple of `lr` (not Muon's)
    lookahead: int = 0            # Lookahead: sync with the slow weights every this many steps; 0: off
    lookahead_alpha: float = 0.5  # Lookahead: how far the slow weights move towards the fast ones

    def __post_init__(self):
        check_range(self, epochs=(1, None), batch_size=(2, None), lr=(0, None, "open"),
                    seed=(0, 2**32 - 1),  # what numpy's seeding takes
                    momentum=(0, 1, "half"), weight_decay=(0, None), label_smoothing=(0, 1, "half"),
                    pct_start=(0, 1, "half"), eval_batch_size=(1, None), ema_decay=(0, 1, "half"),
                    pad=(0, 31), norm_bias_lr=(0, None, "open"), muon_lr=(0, None, "open"),
                    depthwise_lr=(0, None, "open"),
                    lookahead=(0, None), lookahead_alpha=(0, 1, "open"))
        check_choice(self, optimizer=OPTIMIZERS, whiten=WHITEN_MODES, precision=PRECISIONS)
        if self.optimizer != "muon" and self.muon_lr != TrainConfig.muon_lr:
            raise ValueError(f"muon_lr applies to optimizer 'muon' only, got optimizer "
                             f"{self.optimizer!r}; add --optimizer muon or leave --muon-lr out")
        if self.muon_depthwise and self.optimizer != "muon":
            raise ValueError(f"muon_depthwise needs optimizer 'muon', got {self.optimizer!r}; "
                             f"add --optimizer muon or leave --muon-depthwise out")
        if self.muon_depthwise and self.depthwise_lr != 1:
            raise ValueError("depthwise_lr scales `lr` for the depthwise filters, which "
                             "muon_depthwise hands to Muon: pass one of the two")

    def to_dict(self):
        return asdict(self)


# How a run computes, not what it computes: a checkpoint may be resumed under other values.
EXECUTION_FIELDS = ("precision", "compile", "cuda_graphs")

# Steps between reads of the device-side non-finite-loss flag: one host sync per this many steps.
NAN_CHECK_EVERY = 100


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names where and what to do."""
    def __init__(self, message, epoch=None, step=None):
        super().__init__(message)
        self.epoch, self.step = epoch, step


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or belongs to another configuration."""


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def one_cycle(step, total_steps, pct_start, start=0.1, end=0.001):
    """Learning-rate factor of a linear one-cycle: start -> 1 over the warm-up, then -> end
    (torch's OneCycleLR divides by zero on runs of a few steps)."""
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

    `precision`: a resolved one (precision.py); `scaler`: fp16's GradScaler; `ema`: make_ema's
    average, updated after each step. Raises NonFiniteLossError naming the first step whose loss
    was NaN/inf, remembered on the device and read every NAN_CHECK_EVERY steps (no host sync
    per step), so the caller's last checkpoint is never replaced by a broken model."""
    model.train()
    device = loader.device
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    first_bad_step = torch.zeros((), dtype=torch.int64, device=device)  # 0: none so far
    first_bad_loss = torch.zeros((), dtype=torch.float32, device=device)
    lrs, seen = [], 0  # lrs: host-side floats, so the error can name the rate of the bad step
    for step, (x, y) in enumerate(loader, start=1):
        lrs.append(optimizer.param_groups[0]["lr"])

        def run_step():
            return training_step(model, x, y, optimizer, precision, scaler, label_smoothing)

        loss, hits = guarded_first_step(run_step, model, device, precision) if step == 1 \
            else run_step()
        is_first_bad = ~torch.isfinite(loss) & (first_bad_step == 0)
        first_bad_step = torch.where(is_first_bad, step, first_bad_step)
        first_bad_loss = torch.where(is_first_bad, loss.float(), first_bad_loss)
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)  # a compiled model yields the same parameters
        total_loss += loss * len(y)
        correct += hits
        seen += len(y)
        if progress is not None:
            progress.update(1)
        if step % NAN_CHECK_EVERY == 0:
            _raise_if_non_finite(first_bad_step, first_bad_loss, epoch, lrs)
    _raise_if_non_finite(first_bad_step, first_bad_loss, epoch, lrs)
    return {"loss": total_loss.item() / seen, "acc": correct.item() / seen}


def training_step(model, x, y, optimizer, precision="fp32", scaler=None, label_smoothing=0.0):
    """One optimizer step on the batch (x, y); returns (loss, correct predictions) as device
    tensors. Under fp16 the GradScaler unscales every gradient the optimizer steps on, Muon's
    kernel matrices included, and skips the whole step if any is inf/NaN."""
    with autocast(x.device, precision):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    hits = (logits.argmax(1) == y).sum()  # before backward, while the outputs are this step's
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skipped when the scaled gradients hold inf/NaN
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), hits


def make_ema(model, decay):
    """An exponential moving average of `model`'s weights and buffers (BatchNorm's running
    statistics move with their weights), or None when `decay` is 0."""
    if not decay:
        return None
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
    views = (lambda x: (x, x.flip(3))) if flip_tta else (lambda x: (x,))
    logits = []
    with autocast(loader.device, precision):
        for x, _ in loader:
            outputs = []
            for view in views(x):  # each copied out before the next call (CUDA graphs reuse it)
                outputs.append(model(view).float().cpu())
            logits.append(torch.stack(outputs).mean(0))
    return torch.cat(logits)


@torch.no_grad()
def evaluate(model, loader, precision="fp32"):
    """{"loss", "acc"} of `model` over an evaluation loader (plain cross-entropy, no smoothing)."""
    logits = predict(model, loader, precision)
    labels = loader.labels.cpu()
    return {"loss": F.cross_entropy(logits, labels).item(),
            "acc": (logits.argmax(1) == labels).float().mean().item()}


def make_test_loader(data, config, device, channels_last=True):
    return TensorLoader(data.test_x, data.test_y, data.mean, data.std, config.eval_batch_size,
                        train=False, device=device, channels_last=channels_last)


def make_loaders(data, config, device, channels_last=True):
    train = TensorLoader(data.train_x, data.train_y, data.mean, data.std, config.batch_size,
                         train=True, device=device, seed=config.seed, pad=config.pad,
                         flip=config.flip, alternate_flip=config.alternate_flip,
                         channels_last=channels_last)
    return train, make_test_loader(data, config, device, channels_last)


def recipe(config):
    """What a TrainConfig says a run computes: every field but the EXECUTION_FIELDS."""
    return {k: v for k, v in config.to_dict().items() if k not in EXECUTION_FIELDS}


# The first default of every setting whose default has changed (recipe v1, tools/tune.py's
# starting point): a file from before a setting existed ran its first default (SGD before
# 2026-11-24, full 3x3 convs before 2026-12-01, 4-pixel padding and ReLU before 2026-12-06);
# widths, recorded by every file, only for tune.py.
FIRST_DEFAULTS = {"optimizer": "sgd", "conv": "full", "widths": (16, 28, 32), "pad": 4,
                  "activation": "relu"}


def with_defaults(model_config, train_config):
    """The (model, recipe) dicts a file recorded, with the settings added since it was written
    at the defaults they had then."""
    model_defaults = ModelConfig().to_dict()
    first_model = {k: v for k, v in FIRST_DEFAULTS.items() if k in model_defaults}
    first_train = {k: v for k, v in FIRST_DEFAULTS.items() if k not in model_defaults}
    return ({**model_defaults, **first_model, **model_config},
            {**recipe(TrainConfig()), **first_train, **train_config})


def run_fingerprint(model, data, config):
    """What a checkpoint must match to be resumed: architecture, recipe and data (not how the
    arithmetic is done: a CPU fp32 checkpoint may be resumed in bf16 on a GPU)."""
    return {"model": model.config.to_dict(), "train": recipe(config),
            "num_params": model.get_num_params(), "data_sha256": data.sha256,
            "train_images": len(data.train_y), "test_images": len(data.test_y)}


def fit(model, data, config, device=None, checkpoint_path=None, resume=False, progress=True,
        on_epoch_end=None, channels_last=True, overwrite=False, eval_name="test"):
    """Train `model` for config.epochs with one-cycle SGD; return the history: lists with one
    entry per epoch of "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
    "epoch_time" (s), "precision" and, per normalization layer, "activation_rms" and "grad_norm"
    (norm_stats.probe_layers). With config.ema_decay every evaluation uses the average, which
    `model` holds on return. With `checkpoint_path` a checkpoint is written atomically after
    every clean epoch (a NaN anywhere in an epoch raises NonFiniteLossError first); `resume`
    continues from it after checking it belongs to this run, reproducing the uninterrupted run
    on CPU; an existing one is never replaced unless `overwrite`. `on_epoch_end(epoch, history)`
    runs after each checkpoint; `eval_name` labels the evaluation set in the log."""
    device = get_device(device)
    precision = resolve_precision(config.precision, device)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    refuse_to_replace_checkpoint(checkpoint_path, resume, overwrite)
    warn_if_emulated(precision, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: pick fastest kernels
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    seed_everything(config.seed)
    if config.whiten != "off" or config.freeze_norm_scale:  # the training split's images only
        prepare_for_training(model, config, fixed_batch(
            data.train_x, data.train_y, data.mean, data.std, "cpu", per_class=500)[0])
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
        print(f"No checkpoint at {checkpoint_path}: training starts from epoch 1.")
    # shares the parameters of `model`
    step_model = compile_model(model, config.compile, config.cuda_graphs, device)

    bar = None
    if progress:
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
            broken = non_finite(train, test, model)
            if broken:
                raise NonFiniteLossError(
                    f"{broken} at epoch {epoch}; training stopped. Lower the learning rate (it "
                    f"peaks at {config.lr:g}; --lr). {_kept_checkpoint(checkpoint_path, epoch)}",
                    epoch=epoch)
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


def non_finite(train, test, model):
    """What went non-finite by the end of an epoch, or None: a NaN on the last steps or only in
    evaluation (BatchNorm's running statistics) escapes the per-step check, never this one."""
    bad = [f"the {name} loss became {v}" for name, v in (("training", train["loss"]),
                                                           ("evaluation", test["loss"]))
           if not math.isfinite(v)]
    bad += ["the weights or running statistics became non-finite"] * (not all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()))
    return bad[0] if bad else None


def refuse_to_replace_checkpoint(path, resume, overwrite):
    """A new run must not silently replace a checkpoint: it may hold hours of another run; a
    folder is no checkpoint file at all, whatever the flags (found before any work)."""
    if path is not None and Path(path).is_dir():
        raise CheckpointError(f"{path} is a folder; --checkpoint takes a file's path, such as "
                              f"{Path(path) / 'run.pt'}")
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


def epoch_line(h, i, epochs, eval_name="test"):
    return (f"epoch {h['epoch'][i]:2d}/{epochs}: train loss {h['train_loss'][i]:.4f} acc "
            f"{100 * h['train_acc'][i]:.2f}% | {eval_name} loss {h['test_loss'][i]:.4f} acc "
            f"{100 * h['test_acc'][i]:.2f}% | {h['epoch_time'][i]:.0f} s")


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


def atomic_write(path, write):
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`: a crash
    mid-write leaves the old file intact and no half-written one. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_checkpoint(path, state):
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


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
    saved = state["fingerprint"]
    model, train = with_defaults(saved["model"], saved["train"])
    state["fingerprint"] = {**saved, "model": model, "train": train}
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
