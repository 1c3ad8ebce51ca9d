"""Train one variant from the command line; writes a results JSON and PNGs.

    python train.py --norm group --epochs 20
    python train.py --norm batch --dry-run          # one epoch on a small subset, into a temp dir
    python train.py --norm layer --resume           # continue an interrupted run

Runs with different settings get different names (batch_seed0, batch_seed0_e1_subset20, ...),
so no run can replace another's checkpoint, results or figures; an existing one of the same
name is only continued (--resume) or replaced (--overwrite) on request, and one process at a
time holds a name.
"""

import argparse
import inspect
import re
import shutil
import signal
import tempfile
import threading
import warnings
from dataclasses import fields
from pathlib import Path

from dataset import DATA_ENV_VAR, DatasetError, load_cifar10
from model import ACTIVATIONS, CONVS, Net, build_model, show_summary
from plots import figure_source, plot_history, plot_misclassified
from optimizers import OPTIMIZERS, check_optimizer_available
from precision import PRECISIONS, UnsupportedStepError, get_device
from results import (COURSE_CONFIGS, RunLock, RunLockedError, collect_misclassified,
                     config_run_name, divergence_results, load_results, make_results,
                     same_recipe, save_json_atomic)
from checkpoints import CheckpointError, load_checkpoint, recipe, refuse_to_replace_checkpoint
from utils import NonFiniteLossError, fit, make_test_loader, predict
from variants import norm_aliases

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # the repository's, from any folder
MAX_PARAMS, MAX_EPOCHS = 50_000, 20  # the assignment's limits
# Flags whose names predate the derived ones; every other setting's flag is its field's name.
FLAG_NAMES = {"num_groups": "--groups", "ema_decay": "--ema"}
CHOICES = {"norm": lambda: sorted(norm_aliases()), "activation": lambda: sorted(ACTIVATIONS),
           "precision": lambda: PRECISIONS,
           "optimizer": lambda: OPTIMIZERS, "conv": lambda: CONVS}  # read when the parser is built
NOT_FLAGS = {"num_classes"}
# Problems the user can fix: the command line says what and how in one line, no traceback.
USER_ERRORS = (DatasetError, CheckpointError, NonFiniteLossError, RunLockedError,
               UnsupportedStepError, ValueError)


class OutputError(ValueError):
    """An output location cannot be written, or already holds another run's files."""


def field_comments(cls):
    """{field: the comment beside it, with its continuation lines} of a configuration
    dataclass: a flag's help is the comment a reader of the class sees, so the two cannot
    drift (defaults hold no "#")."""
    comments, field = {}, None
    for line in inspect.getsource(cls).splitlines():
        declared = re.match(r"    (\w+): [^#]*#\s?(.*)$", line)
        continued = re.match(r"\s{5,}#\s?(.*)$", line)
        if declared:
            field = declared[1]
            comments[field] = declared[2].strip()
        elif continued and field:
            comments[field] += " " + continued[1].strip()
        else:
            field = None
    return comments


def flag_name(field):
    """The command-line flag of a configuration field ("lr" -> "--lr")."""
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def add_config_flags(parser, cls, choices=CHOICES):
    """One flag per field of a configuration dataclass: its name, type, default and help."""
    comments = field_comments(cls)
    defaults = cls()
    for f in fields(cls):
        if f.name in NOT_FLAGS:
            continue
        flag = flag_name(f.name)
        default = getattr(defaults, f.name)
        help_text = f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%")
        if isinstance(default, bool):
            name = flag if not default else "--no-" + flag[2:]
            parser.add_argument(name, dest=f.name, action="store_false" if default else
                                "store_true", help=("turn off: " if default else "")
                                + comments.get(f.name, ""))
        elif isinstance(default, tuple):
            parser.add_argument(flag, dest=f.name, type=type(default[0]), nargs=len(default),
                                default=default, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=default,
                                choices=choices[f.name]() if f.name in choices else None,
                                help=help_text)


def parse_args(argv=None, configs=COURSE_CONFIGS, choices=CHOICES, description=__doc__):
    """The parsed command line; `configs` the (model, train) configuration classes whose fields
    are its settings (the lab's add theirs: lab/train.py)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawTextHelpFormatter)
    settings = p.add_argument_group(f"settings ({', '.join(c.__name__ for c in configs)})")
    for cls in configs:
        add_config_flags(settings, cls, choices)
    p.add_argument("--data", default=None,
                   help=f"CIFAR-10 archive or folder (default: ${DATA_ENV_VAR}, else download)")
    subset = p.add_mutually_exclusive_group()
    subset.add_argument("--subset", type=int, default=None, metavar="N",
                        help="train on N images per class (stratified), test on N per class")
    subset.add_argument("--train-subset", type=int, default=None, metavar="N",
                        help="train on N images per class (stratified), test on the whole test "
                             "set (the batch-size study's budget)")
    p.add_argument("--validation", type=int, nargs="?", const=500, default=None, metavar="N",
                   help="hold out N training images per class (default N: 500; a fixed split) "
                        "and evaluate on them instead of the test set: for choosing settings")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--out-dir", default="runs",
                   help="where the results JSON goes (default: runs/; full runs for the "
                        "README: results/)")
    p.add_argument("--images-dir", default=None, help="where the PNGs go (default: --out-dir)")
    p.add_argument("--run-name", default=None,
                   help="name of the results file and figures (default: <norm>_seed<seed> and "
                        "a tag per non-default setting)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file, rewritten after every epoch "
                        "(default: checkpoints/<run name>.pt)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint if it exists (it must match this run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint, results and figures of this run's name")
    p.add_argument("--dry-run", action="store_true",
                   help="1 epoch on 20 images per class, outputs in a temp dir (for CI)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--record-divergence", action="store_true",
                   help="if the loss becomes NaN/inf, write a results file saying where (epoch, "
                        "step) and exit 0, instead of failing: for sweeps over learning rates")
    args, unknown = p.parse_known_args(argv)
    if unknown:  # a study's switch (--whiten, --skips, ...) is the lab's since the split
        p.error(f"unrecognized arguments: {' '.join(unknown)}"
                + (" (the studies' switches are python -m lab.train's flags)"
                   if configs == COURSE_CONFIGS else ""))
    for flag in ("subset", "train_subset", "validation"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1 image per class")
    if args.dry_run:
        args.epochs = 1
        if not args.train_subset:
            args.subset = args.subset or 20
    return args


def configs_from(args, configs=COURSE_CONFIGS):
    """(model, train) configurations of the parsed flags; each checks its own ranges, and a range
    error names the flag the user typed (--ema), not the field behind it (ema_decay)."""
    pick = lambda cls: {f.name: getattr(args, f.name) for f in fields(cls)  # noqa: E731
                        if f.name not in NOT_FLAGS}
    try:
        return tuple(cls(**pick(cls)) for cls in configs)
    except ValueError as err:
        field, _, rest = str(err).partition(" ")
        known = {f.name for cls in configs for f in fields(cls)}
        raise ValueError(f"{flag_name(field)} {rest}" if field in known else str(err)) from None


def check_writable(folder):
    """Create `folder` if needed and prove a file can be written there, before any training:
    a bad output path must fail in the first second, not after the last epoch."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to {folder} ({err.strerror or type(err).__name__}): "
                          f"choose another folder or fix its permissions") from None


def check_previous_outputs(outputs, checkpoint, model_config, config, args):
    """Refuse to replace a run's results file or figures unless asked to (--overwrite), or unless
    this run continues the one that made them (--resume, same settings): a figure is this run's
    when it was drawn for this run's results file (plots.figure_source)."""
    existing = [p for p in outputs.values() if p.exists()]
    if not existing or args.overwrite:
        return
    keep_both = "pass --run-name to keep both, or --overwrite to replace them"
    results = outputs["results"]
    foreign = [p for name, p in outputs.items() if name != "results" and p.exists()
               and figure_source(p) != str(results.resolve())]
    if not args.resume:
        ours = results.exists() or checkpoint.exists()
        resume = "pass --resume to continue that run, " if ours and not foreign else ""
        raise OutputError(f"{existing[0]} already exists; {resume}{keep_both}")
    if results.exists() and not same_recipe(results, model_config, config):
        raise OutputError(f"{results} holds the results of a run with other settings; "
                          f"{keep_both}")
    if foreign:
        raise OutputError(f"{foreign[0]} was drawn by another run (not for {results}); "
                          f"{keep_both}")


def check_checkpoint(path, model_config, config, args):
    """Before the data loads: a checkpoint this run would resume is readable and was made by
    the same model and recipe (the data's part of the fingerprint is checked once it loads)."""
    if not (args.resume and path.exists()):
        return
    classes = (type(model_config), type(config))
    saved = load_checkpoint(path, classes=classes)["fingerprint"]
    now = {"model": model_config.to_dict(), "train": recipe(config)}
    if saved["model"] != now["model"] or saved["train"] != now["train"]:
        load_checkpoint(path, {**saved, **now}, classes)  # raises, naming the settings that differ


def limits_warning(num_params, epochs):
    """One line when a run is outside the assignment's limits (allowed, for studies), or None."""
    over = [f"{num_params:,} parameters (limit: under {MAX_PARAMS:,})"] * (num_params >= MAX_PARAMS)
    over += [f"{epochs} epochs (limit: {MAX_EPOCHS})"] * (epochs > MAX_EPOCHS)
    return f"outside the assignment's limits: {'; '.join(over)}" if over else None


def stop_on_sigterm(signum, frame):
    """SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: locks released, a dry run's folder
    removed."""
    raise SystemExit(128 + signum)


def main(argv=None, net=Net, configs=COURSE_CONFIGS, choices=CHOICES, description=__doc__):
    """Parse, check and train; `net` the network class built from configs[0] (lab/train.py
    passes the lab's)."""
    args = parse_args(argv, configs, choices, description)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm) if in_main_thread else None
    dry_dir = Path(tempfile.mkdtemp(prefix="s8_dry_run_")) if args.dry_run else None
    if dry_dir:
        args.out_dir, args.images_dir, args.checkpoint = dry_dir, dry_dir, dry_dir / "checkpoint.pt"
    try:
        return run(args, net, configs)
    except BaseException:
        if dry_dir:  # a failed or stopped dry run leaves nothing behind
            shutil.rmtree(dry_dir, ignore_errors=True)
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def run(args, net=Net, configs=COURSE_CONFIGS):
    # Everything that can be checked without the data is checked first (seconds, not minutes).
    model_config, config = configs_from(args, configs)
    check_optimizer_available(config.optimizer)
    out_dir = Path(args.out_dir)
    images_dir = Path(args.images_dir) if args.images_dir else out_dir
    if (args.subset or args.train_subset or args.validation) and \
            out_dir.resolve() == RESULTS_DIR:
        raise OutputError(f"{out_dir}/ is the repository's results/, which holds full runs "
                          f"scored on the test set only; drop --subset/--train-subset/--validation "
                          f"or pick another --out-dir")
    device = get_device(args.device)
    model = build_model(seed=config.seed, net=net, **model_config.to_dict())
    outside = limits_warning(model.get_num_params(), config.epochs)
    if outside:
        print(f"warning: this run is {outside}; it will not appear in the README's results table")
    name = args.run_name or config_run_name(model_config, config, subset=args.subset,
                                            train_subset=args.train_subset,
                                            validation=args.validation)
    checkpoint = Path(args.checkpoint or Path("checkpoints") / f"{name}.pt")
    outputs = {"results": out_dir / f"{name}.json",
               "curves": images_dir / f"{name}_curves.png",
               "misclassified": images_dir / f"{name}_misclassified.png"}
    for folder in dict.fromkeys((out_dir, images_dir, checkpoint.parent)):
        check_writable(folder)
    with RunLock(checkpoint, *outputs.values()):  # one process per file, for the whole run
        check_previous_outputs(outputs, checkpoint, model_config, config, args)
        refuse_to_replace_checkpoint(checkpoint, args.resume, args.overwrite)
        check_checkpoint(checkpoint, model_config, config, args)
        return train_and_publish(args, model, config, device, name, checkpoint, outputs,
                                 outside)


def train_and_publish(args, model, config, device, name, checkpoint, outputs, outside):
    data = load_cifar10(args.data)
    if args.validation:  # before any subset, so that the held-out images never train
        data = data.validation_split(args.validation)
    if args.subset:
        data = data.subset(args.subset, args.subset, seed=config.seed)
    elif args.train_subset:
        data = data.subset(args.train_subset, None, seed=config.seed)
    print(f"{name}: {model.get_num_params():,} trainable parameters")
    show_summary(model)

    eval_set = "validation" if args.validation else "test"
    extra = {"eval_set": eval_set, "outside_limits": outside}
    try:
        history = fit(model, data, config, device, checkpoint_path=checkpoint,
                      resume=args.resume, progress=not args.no_progress,
                      overwrite=args.overwrite, eval_name="val" if args.validation else "test")
    except NonFiniteLossError as err:
        if not args.record_divergence:
            raise
        path = save_json_atomic(outputs["results"],
                                divergence_results(model, data, config, device, err, **extra))
        print(f"diverged at epoch {err.epoch}, step {err.step}; recorded in {path}")
        return load_results(path)
    try:
        results = publish(model, data, config, device, history, outputs, extra)
    except OSError as err:
        raise OutputError(
            f"could not write {err.filename or outputs['results']} "
            f"({err.strerror or type(err).__name__}); the trained model is in {checkpoint}: "
            f"rerun the same command with --resume and a writable --out-dir to write the "
            f"results from it") from None
    print(f"final {eval_set} accuracy {100 * results['final_test_acc']:.2f}% after "
          f"{results['epochs']} epochs ({results['wall_time_s']:.0f} s, {results['precision']}); "
          f"results in {outputs['results']}, figures in {outputs['curves'].parent}")
    return results


def publish(model, data, config, device, history, outputs, extra):
    """The figures, then the results file (written last and atomically: it marks a finished run)."""
    title = f"{model.config.norm} norm, batch {config.batch_size}, seed {config.seed}"
    source = outputs["results"].resolve()  # in each figure: which run drew it
    plot_history(history, outputs["curves"], title=title, source=source)
    test_loader = make_test_loader(data, config, device)
    precision = history["precision"][-1] or "fp32"
    logits = predict(model, test_loader, precision)  # serves the grid and the confusion matrix
    mistakes = collect_misclassified(model, test_loader, limit=10, logits=logits)
    plot_misclassified(mistakes, data.classes, outputs["misclassified"], title=title,
                       source=source)
    results = make_results(model, data, config, history, device, logits=logits, **extra)
    save_json_atomic(outputs["results"], results)
    return results


def command_line(entry=main):
    """Run `entry` as a command: a problem the user can fix ends in one line, no traceback."""
    warnings.simplefilter("default")
    try:
        entry()
    except USER_ERRORS as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    command_line()
