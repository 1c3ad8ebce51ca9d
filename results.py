"""What a run leaves behind: its name, and its results file.

`run_name` is the one builder of run names: every tool names a run by calling it, and a name
carries every setting that differs from the defaults, so that no two configurations share one.
A results file (`make_results`) records the accuracies, the per-class and confusion figures,
the statistics inside the network, the history and the provenance (configuration, data copy,
hardware, date); files are written atomically and read back as they are written.
"""

import copy
import datetime
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dataset import TensorLoader
from model import ModelConfig
from norm_stats import measure_norm_statistics
from precision import autocast, hardware_info, resolve_precision
from checkpoints import atomic_write, recipe, with_defaults
from utils import TrainConfig, make_test_loader, predict
from variants import get_variant

RESULTS_FORMAT = 1

# The settings that name a run, each with its tag; a recipe field missing here is tagged with
# its own name, so a new setting can never leave two configurations with one name.
NAME_TAGS = {
    "epochs": "e", "batch_size": "bs", "lr": "lr", "weight_decay": "wd", "label_smoothing": "ls",
    "pct_start": "ws", "ema_decay": "ema", "dropout": "drop", "num_groups": "g",
    "group_size": "gs", "widths": "w", "activation": "", "pad": "pad", "flip": "flip",
    "identity_init": "id", "weight_std": "wstd",
    "weight_std_depthwise": "wstddw", "whiten": "wh", "norm_bias_lr": "blr",
    "freeze_norm_scale": "fs", "alternate_flip": "aflip", "optimizer": "", "muon_lr": "mlr",
    "lookahead": "la", "lookahead_alpha": "laa",
}
# Which data a run trained and was scored on: not configuration fields, but part of its name.
DATA_TAGS = {"subset": "subset", "train_subset": "trainsub", "validation": "val"}
NOT_NAMED = {"norm", "seed", "num_classes", "eval_batch_size", "precision", "compile",
             "cuda_graphs"}


def _tag_value(value):
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "-".join(map(str, value))
    return str(value)


COURSE_CONFIGS = (ModelConfig, TrainConfig)


def name_defaults(classes=COURSE_CONFIGS):
    """{setting: its default} of every setting of these configuration classes that can tag a
    run's name, in name order."""
    defaults = {k: v for cls in classes for k, v in cls().to_dict().items()}
    named = [k for k in NAME_TAGS if k in defaults]
    named += [k for k in defaults if k not in NAME_TAGS and k not in NOT_NAMED]
    return {**{k: defaults[k] for k in named}, **{k: None for k in DATA_TAGS}}


def run_name(norm, seed, study=None, classes=COURSE_CONFIGS, **settings):
    """`<norm>[_<study>]_seed<seed>`, plus a tag for every setting that differs from its default,
    e.g. run_name("bn", 0, epochs=1, subset=20) == "batch_seed0_e1_subset20". `study` labels
    a study's run by what it varies ("bs16", "lr0.2", "base_e20"); `classes`: the configuration
    classes whose settings it may tag (the lab's add theirs)."""
    defaults = name_defaults(classes)
    unknown = set(settings) - set(defaults)
    if unknown:
        raise TypeError(f"run_name got unknown settings {sorted(unknown)}")
    variant = get_variant(norm)
    if not variant.uses_groups:  # only GroupNorm reads these
        settings.pop("num_groups", None)
        settings.pop("group_size", None)
    tags = [{**NAME_TAGS, **DATA_TAGS}.get(key, key) + _tag_value(settings[key])
            for key, default in defaults.items()
            if key in settings and _tag_value(settings[key]) != _tag_value(default)]
    return "_".join([variant.name, *([study] if study else []), f"seed{seed}", *tags])


def config_run_name(model_config, config, **data):
    """run_name of a run of these configurations (`data`: subset, train_subset, validation)."""
    settings = {k: v for k, v in {**model_config.to_dict(), **config.to_dict()}.items()
                if k not in NOT_NAMED}
    return run_name(model_config.norm, config.seed, classes=(type(model_config), type(config)),
                    **settings, **data)


class RunLockedError(RuntimeError):
    """Another live process holds this run's name."""


class RunLock:
    """Holds a run's files for its whole life: an exclusive lock (flock, released by the system
    when the process ends, so a crash leaves no stale lock) on `<path>.lock` beside each path,
    holding the process id. A second process is refused with one line naming the holder; the
    process that holds it may take it again (nested holders release it with the outermost)."""

    _held = {}  # lock file -> [open file, how many holders in this process]

    def __init__(self, *paths):
        self.files = [Path(f"{p}.lock") for p in paths if p is not None]

    def __enter__(self):
        taken = []
        try:
            for file in self.files:
                self._take(file)
                taken.append(file)
        except BaseException:
            for file in taken:
                self._release(file)
            raise
        return self

    def __exit__(self, *exc):
        for file in self.files:
            self._release(file)

    @classmethod
    def _take(cls, file):
        key = str(file.resolve())
        if key in cls._held:
            cls._held[key][1] += 1
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLockedError(
                f"{file.with_suffix('')} is in use by process {holder} (lock {file}); wait "
                f"for that run to finish, or give this one another --run-name") from None
        handle.seek(0), handle.truncate(), handle.write(str(os.getpid())), handle.flush()
        cls._held[key] = [handle, 1]

    @classmethod
    def _release(cls, file):
        key = str(file.resolve())
        entry = cls._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del cls._held[key]
            try:
                file.unlink(missing_ok=True)
            except OSError:  # a folder made read-only: the file stays, but no lock is held on it
                pass
            entry[0].close()  # closing releases the lock


SMOKE_IMAGES_PER_CLASS = 200  # a smoke run's stratified subset, in each split


@dataclass
class NotebookRun:
    """Where a notebook's run reads and writes, and how long it trains."""
    epochs: int
    subset: Optional[int]      # images per class in each split; None: all of them
    data: Optional[str]        # CIFAR10_DATA, an archive or folder; None downloads (Colab)
    results_dir: Path
    images_dir: Path
    checkpoint_dir: Path       # in Colab, point it at Google Drive to survive a disconnect


def notebook_run(norm, epochs, environ=os.environ):
    """A training notebook's plumbing, from the environment, so its configuration cell holds only
    what a student changes: S8_SMOKE=1 (or CI) trains 1 epoch on a small stratified subset into
    runs/smoke_<norm>/, emptied first so smoke runs never pile up or reach results/;
    S8_PUBLISH=1 writes the committed results/ and images/; otherwise runs/, as train.py does."""
    smoke = bool(environ.get("S8_SMOKE") or environ.get("CI"))
    out = Path("runs") / f"smoke_{get_variant(norm).name}" if smoke else Path(".")
    if smoke:
        shutil.rmtree(out, ignore_errors=True)
    folder = "results" if environ.get("S8_PUBLISH") == "1" else "runs"
    return NotebookRun(epochs=1 if smoke else epochs,
                       subset=SMOKE_IMAGES_PER_CLASS if smoke else None,
                       data=environ.get("CIFAR10_DATA"), results_dir=out / folder,
                       images_dir=out / ("images" if folder == "results" else "runs"),
                       checkpoint_dir=out / "checkpoints")


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


def same_recipe(path, model_config, config):
    """Whether the results file at `path` was made with these settings (any seed aside)."""
    previous = load_results(path)  # an unreadable file is said so, not called "other settings"
    try:
        as_json = lambda d: json.loads(json.dumps(d))  # noqa: E731  tuples become lists
        # settings added since that file was written: their defaults
        before, trained = map(as_json, with_defaults(
            previous["model_config"], previous["train_config"], type(model_config), type(config)))
        return before == as_json(model_config.to_dict()) and \
            all(trained.get(k) == v for k, v in as_json(recipe(config)).items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_publishable(path, model, config):
    """Refuse, before training, to write over a results file of another configuration."""
    if Path(path).exists() and not same_recipe(path, model.config, config):
        raise ValueError(f"{path} holds the results of a run with other settings; give this run "
                         f"another name or folder, or delete that file to replace it")


def save_json_atomic(path, payload):
    text = json.dumps(payload, indent=1, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def finished(path):
    """Whether the run of the results file `path` has finished (the file exists); an unreadable
    file raises ResultsFileError rather than counting as a finished run."""
    if not Path(path).exists():
        return False
    load_results(path)
    return True


class ResultsFileError(ValueError):
    """A results file that cannot be read; the message names it and says what to do."""


def load_results(path):
    """A results file's contents; an unreadable one (truncated, half-written, hand-edited) is
    named in one line with what to do, for every reader (report, compare, notebooks, tune,
    sweep, train.py --resume)."""
    try:
        with open(path) as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsFileError(
            f"results file {path} is unreadable ({type(err).__name__}: {err}): it was truncated, "
            f"half-written or edited by hand; restore it (git checkout -- {path}, if git tracks "
            f"it) or delete it and rerun that run") from None
    if not isinstance(results, dict):
        raise ResultsFileError(f"results file {path} holds a {type(results).__name__}, not a "
                               f"run's results; restore it (git checkout -- {path}, if git "
                               f"tracks it) or delete it")
    return results
