"""What a run keeps on disk besides its results: checkpoints (written atomically, refused when
they belong to another run) and how a file's recorded settings read today (with_defaults)."""

import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or belongs to another configuration."""



# How a run computes, not what it computes: a checkpoint may be resumed under other values.
EXECUTION_FIELDS = ("precision", "cuda_graphs")


def recipe(config):
    """What a TrainConfig says a run computes: every field but the EXECUTION_FIELDS."""
    return {k: v for k, v in config.to_dict().items() if k not in EXECUTION_FIELDS}


# The first default of every setting whose default has changed (recipe v1, lab/tune.py's
# starting point): a file from before a setting existed ran its first default (SGD before
# 2026-11-24, full 3x3 convs before 2026-12-01, 4-pixel padding and ReLU before 2026-12-06);
# widths, recorded by every file, only for tune.py.
FIRST_DEFAULTS = {"optimizer": "sgd", "conv": "full", "widths": (16, 28, 32), "pad": 4,
                  "activation": "relu"}
# Settings that files and checkpoints written before 2026-12-07 record and the course no longer
# has (the lab's now, lab/levers.py, or retired), at the values that leave them off: a file
# that recorded them so reads as a run of the course.
OFF_VALUES = {"dropout": 0.0, "group_size": 0, "identity_init": "off", "weight_std": False,
              "weight_std_depthwise": True, "skips": "blocks", "depthwise_kernel": 3,
              "depthwise_dilation": 1, "se_hidden": 0, "compile": False, "lookahead_alpha": 0.5,
              "ema_decay": 0.0, "whiten": "off", "norm_bias_lr": 1.0, "freeze_norm_scale": False,
              "alternate_flip": False, "muon_depthwise": False, "depthwise_lr": 1.0,
              "lookahead": 0}


def with_defaults(model_config, train_config, model_class, train_class):
    """The (model, recipe) dicts a file recorded, read as settings of these configuration
    classes: the settings added since it was written at the defaults they had then, those the
    classes lack dropped where the file had them off (OFF_VALUES)."""
    model_defaults = model_class().to_dict()
    first_model = {k: v for k, v in FIRST_DEFAULTS.items() if k in model_defaults}
    first_train = {k: v for k, v in FIRST_DEFAULTS.items() if k not in model_defaults}
    model = {**model_defaults, **first_model, **model_config}
    train = {**recipe(train_class()), **first_train, **train_config}
    known = {**model_defaults, **train_class().to_dict()}
    return tuple({k: v for k, v in d.items() if k in known or k not in OFF_VALUES
                  or OFF_VALUES[k] != v} for d in (model, train))



class TrainingState:
    """What a checkpoint holds besides the RNGs: the model, the optimizer, the schedule, the
    training loader's position, fp16's scaler, the hooks' state and the history so far."""

    def __init__(self, model, optimizer, scheduler, loader, scaler, hooks, history):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loader, self.scaler, self.hooks, self.history = loader, scaler, hooks, history

    def checkpoint(self, epoch, fingerprint):
        return {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "hooks": self.hooks.state_dict(), "rng": get_rng_state(),
                "history": self.history}

    def restore(self, state):
        """Continue from a checkpoint's `state`; returns the epoch it was written after."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.hooks.load_state_dict(state.get("hooks", state.get("ema")))  # "ema" before 12-07
        set_rng_state(state["rng"])
        self.history = state["history"]
        for key in ("precision", "activation_rms", "grad_norm"):  # older checkpoints
            self.history.setdefault(key, [None] * len(self.history["epoch"]))
        return state["epoch"]


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



def get_rng_state():
    """Every global RNG that can touch training, as plain tensors/ints."""
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


def load_checkpoint(path, fingerprint=None, classes=None):
    """Load a checkpoint; refuse a damaged one or one whose fingerprint differs from this run's.
    With `classes`, the run's (model, train) configuration classes, its settings are read as
    theirs (with_defaults); without, as it recorded them."""
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
    if classes is not None:
        model, train = with_defaults(saved["model"], saved["train"], *classes)
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
