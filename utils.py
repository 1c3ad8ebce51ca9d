"""The training configuration, the training loop and evaluation: what the notebooks, the command
line and the tests train with (checkpoints: checkpoints.py; the lab's extensions: Hooks)."""

import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import (TrainingState, load_checkpoint, recipe, refuse_to_replace_checkpoint,
                         save_checkpoint)
from dataset import TensorLoader
from model import check_choice, check_range
from norm_stats import fixed_batch, probe_layers
from optimizers import OPTIMIZERS, make_optimizer
from precision import (PRECISIONS, autocast, compile_model, get_device, guarded_first_step,
                       make_grad_scaler, resolve_precision, warn_if_emulated)



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
    seed: int = 0                 # model init, data order, augmentation
    eval_batch_size: int = 1000   # images per evaluation forward pass
    pad: int = 2                  # random-crop padding in pixels (reflect); 0: no crop
    flip: bool = True             # random horizontal flips while training
    optimizer: str = "muon"       # muon (the 3x3 blocks' kernels; SGD for the rest), sgd or adamw
    muon_lr: float = 0.05         # Muon's peak learning rate for the 3x3 blocks' kernels
    precision: str = "auto"       # auto, fp32, bf16 or fp16; auto picks by device (precision.py)
    cuda_graphs: bool = False     # replay the model's kernels as CUDA graphs (CUDA only; docs/speed.md)

    def __post_init__(self):
        check_range(self, epochs=(1, None), batch_size=(2, None), lr=(0, None, "open"),
                    seed=(0, 2**32 - 1),  # what numpy's seeding takes
                    momentum=(0, 1, "half"), weight_decay=(0, None), label_smoothing=(0, 1, "half"),
                    pct_start=(0, 1, "half"), eval_batch_size=(1, None), pad=(0, 31),
                    muon_lr=(0, None, "open"))
        check_choice(self, optimizer=OPTIMIZERS, precision=PRECISIONS)
        if self.optimizer != "muon" and self.muon_lr != TrainConfig.muon_lr:
            raise ValueError(f"muon_lr applies to optimizer 'muon' only, got optimizer "
                             f"{self.optimizer!r}; add --optimizer muon or leave --muon-lr out")

    def to_dict(self):
        return asdict(self)

    def hooks(self):
        """What this recipe adds to the training loop: nothing (the lab's recipes add theirs)."""
        return Hooks()


class Hooks:
    """The points where a recipe extends `fit`; the course's extend nothing. The lab's study
    switches subclass it (lab/levers.py, LabHooks), and their configuration's hooks() makes one."""

    def prepare(self, model, data):              # before the loaders and the optimizer exist
        pass

    def make_loaders(self, data, config, device, channels_last):
        return make_loaders(data, config, device, channels_last)

    def make_optimizer(self, model, config, device):
        return make_optimizer(model, config, device)

    def after_step(self, model):                 # after each optimizer and scheduler step
        pass

    def eval_model(self, model):                 # the model that evaluation scores
        return model

    def finish(self, model):                     # once training ends: what `model` keeps
        pass

    def state_dict(self):                        # what a checkpoint keeps of the hooks
        return None

    def load_state_dict(self, state):
        pass


# Steps between reads of the device-side non-finite-loss flag: one host sync per this many steps.
NAN_CHECK_EVERY = 100


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names where and what to do."""
    def __init__(self, message, epoch=None, step=None):
        super().__init__(message)
        self.epoch, self.step = epoch, step


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
                    progress=None, precision="fp32", scaler=None, hooks=None):
    """One pass over `loader`; returns {"loss", "acc"} averaged over the images seen.

    `precision`: a resolved one (precision.py); `scaler`: fp16's GradScaler; `hooks`: the
    recipe's Hooks, told after each step. Raises NonFiniteLossError naming the first step whose loss
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
        if hooks is not None:
            hooks.after_step(model)  # a compiled model yields the same parameters
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
    kernel matrices included, and skips the whole step if any is inf/NaN (on CUDA the
    optimizers do both on the device: optimizers.py)."""
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


def make_loaders(data, config, device, channels_last=True, **options):
    """The training loader (`options`: TensorLoader's others) and the evaluation loader."""
    train = TensorLoader(data.train_x, data.train_y, data.mean, data.std, config.batch_size,
                         train=True, device=device, seed=config.seed, pad=config.pad,
                         flip=config.flip, channels_last=channels_last, **options)
    return train, make_test_loader(data, config, device, channels_last)


def run_fingerprint(model, data, config):
    """What a checkpoint must match to be resumed: architecture, recipe and data (not how the
    arithmetic is done: a CPU fp32 checkpoint may be resumed in bf16 on a GPU)."""
    return {"model": model.config.to_dict(), "train": recipe(config),
            "num_params": model.get_num_params(), "data_sha256": data.sha256,
            "train_images": len(data.train_y), "test_images": len(data.test_y)}


HISTORY = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time",
           "precision", "activation_rms", "grad_norm")


def fit(model, data, config, device=None, checkpoint_path=None, resume=False, progress=True,
        on_epoch_end=None, channels_last=True, overwrite=False, eval_name="test"):
    """Train `model` for config.epochs; return the history: lists with one entry per epoch of
    each HISTORY key ("epoch_time" in s; "activation_rms" and "grad_norm" per normalization
    layer: norm_stats.probe_layers). With `checkpoint_path` a checkpoint is written atomically
    after every clean epoch (a NaN anywhere in an epoch raises NonFiniteLossError first);
    `resume` continues from it after checking it belongs to this run, reproducing the
    uninterrupted run on CPU; an existing one is never replaced unless `overwrite`.
    `on_epoch_end(epoch, history)` runs after each checkpoint; `eval_name` labels the
    evaluation set in the log; config.hooks() adds the recipe's own steps (Hooks)."""
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
    hooks = config.hooks()
    hooks.prepare(model, data)
    train_loader, test_loader = hooks.make_loaders(data, config, device, channels_last)
    optimizer = hooks.make_optimizer(model, config, device)
    run = TrainingState(model, optimizer, make_scheduler(optimizer, config, len(train_loader)),
                        train_loader, make_grad_scaler(device, precision), hooks,
                        {k: [] for k in HISTORY})
    probe_batch = fixed_batch(data.train_x, data.train_y, data.mean, data.std, device)
    fingerprint = run_fingerprint(model, data, config)
    start_epoch = resume_from(run, checkpoint_path, fingerprint, config, eval_name) if resume \
        else 1
    step_model = compile_model(model, False, config.cuda_graphs, device)  # shares the parameters
    bar = progress_bar(config.epochs, len(train_loader), start_epoch) if progress else None
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            t0, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            train, test = train_and_evaluate(run, step_model, test_loader, config, epoch, bar,
                                             precision, checkpoint_path)
            record(run.history, epoch=epoch, train_loss=train["loss"], train_acc=train["acc"],
                   test_loss=test["loss"], test_acc=test["acc"], lr=lr,
                   epoch_time=time.perf_counter() - t0,  # the probe is diagnostics, not training
                   precision=precision, **probe_layers(model, probe_batch))
            line = epoch_line(run.history, -1, config.epochs, eval_name)
            if bar is not None:
                bar.write(line, file=sys.stdout)  # above the bar, which stays on stderr
            else:
                print(line, flush=True)
            if checkpoint_path:
                save_checkpoint(checkpoint_path, run.checkpoint(epoch, fingerprint))
            if on_epoch_end is not None:
                on_epoch_end(epoch, run.history)
    finally:
        if bar is not None:
            bar.close()
    hooks.finish(model)
    return run.history


def resume_from(run, checkpoint_path, fingerprint, config, eval_name):
    """The epoch to start from: after the checkpoint's, restored into `run` once it is shown to
    be this run's (its log printed again), or 1 where there is none."""
    if not (checkpoint_path and checkpoint_path.exists()):
        print(f"No checkpoint at {checkpoint_path}: training starts from epoch 1.")
        return 1
    epoch = run.restore(load_checkpoint(checkpoint_path, fingerprint,
                                        (type(run.model.config), type(config))))
    print(f"Resumed from {checkpoint_path} after epoch {epoch}; its log so far:")
    for i in range(len(run.history["epoch"])):
        print(epoch_line(run.history, i, config.epochs, eval_name))
    return epoch + 1


def train_and_evaluate(run, step_model, test_loader, config, epoch, bar, precision,
                       checkpoint_path):
    """One epoch of training, then the evaluation; a NonFiniteLossError saying which
    checkpoint is left if anything became NaN/inf."""
    try:
        train = train_one_epoch(step_model, run.loader, run.optimizer, run.scheduler,
                                config.label_smoothing, epoch, bar, precision, run.scaler,
                                run.hooks)
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f"{err} {_kept_checkpoint(checkpoint_path, epoch)}",
                                 err.epoch, err.step) from None
    test = evaluate(run.hooks.eval_model(step_model), test_loader, precision)
    broken = non_finite(train, test, run.model)
    if broken:
        raise NonFiniteLossError(
            f"{broken} at epoch {epoch}; training stopped. Lower the learning rate (it "
            f"peaks at {config.lr:g}; --lr). {_kept_checkpoint(checkpoint_path, epoch)}",
            epoch=epoch)
    return train, test


def record(history, **values):
    for key, value in values.items():
        history[key].append(value)


def progress_bar(epochs, steps_per_epoch, start_epoch):
    """A bar over every step of the run, on stderr (the epoch lines go above it, to stdout)."""
    return tqdm(total=epochs * steps_per_epoch, initial=(start_epoch - 1) * steps_per_epoch,
                unit="step", file=sys.stderr, mininterval=2.0, dynamic_ncols=False, ncols=80)


def non_finite(train, test, model):
    """What went non-finite by the end of an epoch, or None: a NaN on the last steps or only in
    evaluation (BatchNorm's running statistics) escapes the per-step check, never this one."""
    bad = [f"the {name} loss became {v}" for name, v in (("training", train["loss"]),
                                                           ("evaluation", test["loss"]))
           if not math.isfinite(v)]
    bad += ["the weights or running statistics became non-finite"] * (not all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()))
    return bad[0] if bad else None


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


