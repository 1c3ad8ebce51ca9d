"""Train one variant from the command line; writes a results JSON and PNGs.

    python train.py --norm group --epochs 20
    python train.py --norm batch --dry-run          # one epoch on a small subset, into a temp dir
    python train.py --norm layer --resume           # continue an interrupted run

Runs with different settings get different names (batch_seed0, batch_seed0_e1_subset20, ...),
so no run can replace another's checkpoint or results; an existing checkpoint or results file
of the same name is only continued (--resume) or replaced (--overwrite) on request.
"""

import argparse
import json
import tempfile
from pathlib import Path

from dataset import DATA_ENV_VAR, DatasetError, load_cifar10
from model import ACTIVATIONS, NORM_ALIASES, ModelConfig, build_model
from precision import PRECISIONS
from utils import (CheckpointError, NonFiniteLossError, TrainConfig,
                   collect_misclassified, divergence_results, fit, get_device, load_results, make_results,
                   make_test_loader, plot_history, plot_misclassified, predict, recipe,
                   refuse_to_replace_checkpoint, save_json_atomic, show_summary)

DEFAULTS = TrainConfig()
MODEL_DEFAULTS = ModelConfig()
RESULTS_DIR = Path("results")
# Every setting that changes what a run computes: (the tag it adds to the run's default name
# when it differs from its default, that default), in name order.
NAME_SETTINGS = {
    "epochs": ("e", DEFAULTS.epochs), "batch_size": ("bs", DEFAULTS.batch_size),
    "lr": ("lr", DEFAULTS.lr), "weight_decay": ("wd", DEFAULTS.weight_decay),
    "label_smoothing": ("ls", DEFAULTS.label_smoothing), "pct_start": ("ws", DEFAULTS.pct_start),
    "ema": ("ema", DEFAULTS.ema_decay), "dropout": ("drop", MODEL_DEFAULTS.dropout),
    "groups": ("g", MODEL_DEFAULTS.num_groups), "group_size": ("gs", MODEL_DEFAULTS.group_size),
    "widths": ("w", MODEL_DEFAULTS.widths), "activation": ("", MODEL_DEFAULTS.activation),
    "pad": ("pad", DEFAULTS.pad), "flip": ("flip", DEFAULTS.flip),
    "subset": ("subset", None), "train_subset": ("trainsub", None),
    "validation": ("val", None),
}


class OutputError(ValueError):
    """An output location cannot be written, or already holds another run's files."""


def _tag_value(value):
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "-".join(map(str, value))
    return str(value)


def run_name(norm, seed, **settings):
    """`<norm>_seed<seed>` for the default recipe, plus a tag per non-default setting, e.g.
    run_name("batch", 0, epochs=1, subset=20) == "batch_seed0_e1_subset20"."""
    unknown = set(settings) - set(NAME_SETTINGS)
    if unknown:
        raise TypeError(f"run_name got unknown settings {sorted(unknown)}")
    if norm != "group":
        settings.pop("groups", None)  # only GroupNorm reads these
        settings.pop("group_size", None)
    tags = [tag + _tag_value(settings[key]) for key, (tag, default) in NAME_SETTINGS.items()
            if key in settings and _tag_value(settings[key]) != _tag_value(default)]
    return "_".join([f"{norm}_seed{seed}", *tags])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--norm", default="batch", choices=sorted(NORM_ALIASES),
                   help="normalization: batch/bn, group/gn or layer/ln; none/identity (no "
                        "normalization) is the learning-rate study's reference (default: batch)")
    p.add_argument("--groups", type=int, default=MODEL_DEFAULTS.num_groups,
                   help=f"GroupNorm only: number of channel groups; must divide every stage "
                        f"width {MODEL_DEFAULTS.widths} (default: {MODEL_DEFAULTS.num_groups})")
    p.add_argument("--group-size", type=int, default=MODEL_DEFAULTS.group_size, metavar="N",
                   help="GroupNorm only: groups of N channels each instead of --groups groups; "
                        "N must divide every stage width (default: 0, off)")
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs,
                   help=f"training epochs (default: {DEFAULTS.epochs})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help=f"images per step (default: {DEFAULTS.batch_size})")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr,
                   help=f"peak OneCycle learning rate (default: {DEFAULTS.lr})")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay,
                   help=f"weight decay of conv weights (default: {DEFAULTS.weight_decay})")
    p.add_argument("--label-smoothing", type=float, default=DEFAULTS.label_smoothing,
                   help=f"label smoothing (default: {DEFAULTS.label_smoothing})")
    p.add_argument("--pct-start", type=float, default=DEFAULTS.pct_start,
                   help=f"fraction of the steps spent warming up (default: {DEFAULTS.pct_start})")
    p.add_argument("--ema", type=float, default=DEFAULTS.ema_decay, metavar="DECAY",
                   help="evaluate an exponential moving average of the weights with this decay "
                        "per step, e.g. 0.99; 0 disables it (default: 0)")
    p.add_argument("--dropout", type=float, default=0.0, help="Dropout2d rate (default: 0)")
    p.add_argument("--widths", type=int, nargs=3, default=MODEL_DEFAULTS.widths,
                   metavar=("W32", "W16", "W8"),
                   help=f"channels at 32x32, 16x16 and 8x8 (default: "
                        f"{' '.join(map(str, MODEL_DEFAULTS.widths))}); keep the parameter "
                        f"count under 50,000")
    p.add_argument("--activation", default=MODEL_DEFAULTS.activation,
                   choices=sorted(ACTIVATIONS), help="after each norm (default: relu)")
    p.add_argument("--pad", type=int, default=DEFAULTS.pad,
                   help=f"random-crop padding in pixels, 0 for none (default: {DEFAULTS.pad})")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="no random horizontal flips while training")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed (default: 0)")
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
                        "and evaluate on them instead of the test set: for choosing settings "
                        "(tools/tune.py)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--precision", default=DEFAULTS.precision, choices=PRECISIONS,
                   help="auto: bf16 on CUDA >= 8.0 and on CPUs with native bf16, fp16 with a "
                        "gradient scaler on older GPUs (T4, V100), else fp32 (default: auto)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (falls back to eager if it fails)")
    p.add_argument("--out-dir", default="runs",
                   help="where the results JSON goes (default: runs/; full runs for the "
                        "README: results/)")
    p.add_argument("--images-dir", default=None,
                   help="where the PNGs go (default: the --out-dir)")
    p.add_argument("--run-name", default=None,
                   help="name of the results file and figures (default: <norm>_seed<seed>)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file, rewritten after every epoch "
                        "(default: checkpoints/<run name>.pt)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint if it exists (it must match this run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint and results of this run's name")
    p.add_argument("--dry-run", action="store_true",
                   help="1 epoch on 20 images per class, outputs in a temp dir (for CI)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--record-divergence", action="store_true",
                   help="if the loss becomes NaN/inf, write a results file saying where (epoch, "
                        "step) and exit 0, instead of failing: for sweeps over learning rates")
    args = p.parse_args(argv)
    if args.dry_run:
        args.epochs = 1
        if not args.train_subset:
            args.subset = args.subset or 20
        tmp = Path(tempfile.mkdtemp(prefix="s8_dry_run_"))
        args.out_dir, args.images_dir, args.checkpoint = tmp, tmp, tmp / "checkpoint.pt"
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (BatchNorm cannot normalize a single image)")
    for flag in ("subset", "train_subset", "validation"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1 image per class")
    return args


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


def check_previous_results(path, model, config, args):
    """Refuse to replace a results file unless asked to, or unless this run continues it."""
    if not path.exists() or args.overwrite:
        return
    if not args.resume:
        raise OutputError(f"{path} already exists; pass --resume to continue that run, "
                          f"--run-name or --out-dir to keep both, or --overwrite to replace it")
    try:
        previous = load_results(path)
        now = json.loads(json.dumps({"model": model.config.to_dict(),  # as JSON stores it
                                     "train": recipe(config)}))
        same = (previous["model_config"] == now["model"]
                and all(previous["train_config"].get(k) == v for k, v in now["train"].items()))
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if not same:
        raise OutputError(f"{path} holds the results of a run with other settings; pass "
                          f"--run-name or --out-dir to keep both, or --overwrite to replace it")


def main(argv=None):
    args = parse_args(argv)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                         pct_start=args.pct_start, ema_decay=args.ema, seed=args.seed,
                         pad=args.pad, flip=args.flip,
                         precision=args.precision, compile=args.compile)
    out_dir = Path(args.out_dir)
    images_dir = Path(args.images_dir) if args.images_dir else out_dir
    if (args.subset or args.train_subset or args.validation) and \
            out_dir.resolve() == RESULTS_DIR.resolve():
        raise SystemExit(f"{RESULTS_DIR}/ holds full runs scored on the test set only; drop "
                         f"--subset/--train-subset/--validation or pick another --out-dir")

    # Everything that can be checked without the data is checked first (seconds, not minutes).
    model = build_model(args.norm, seed=args.seed, num_groups=args.groups,
                        group_size=args.group_size, dropout=args.dropout,
                        widths=tuple(args.widths), activation=args.activation)
    name = args.run_name or run_name(
        model.config.norm, args.seed, **{key: getattr(args, key) for key in NAME_SETTINGS})
    checkpoint = Path(args.checkpoint or Path("checkpoints") / f"{name}.pt")
    for folder in dict.fromkeys((out_dir, images_dir, checkpoint.parent)):
        check_writable(folder)
    results_path = out_dir / f"{name}.json"
    check_previous_results(results_path, model, config, args)
    refuse_to_replace_checkpoint(checkpoint, args.resume, args.overwrite)
    device = get_device(args.device)

    data = load_cifar10(args.data)
    if args.validation:  # before any subset, so that the held-out images never train
        data = data.validation_split(args.validation)
    if args.subset:
        data = data.subset(args.subset, args.subset, seed=args.seed)
    elif args.train_subset:
        data = data.subset(args.train_subset, None, seed=args.seed)
    print(f"{name}: {model.get_num_params():,} trainable parameters")
    show_summary(model)

    eval_set = "validation" if args.validation else "test"
    try:
        history = fit(model, data, config, device, checkpoint_path=checkpoint,
                      resume=args.resume, progress=not args.no_progress,
                      overwrite=args.overwrite, eval_name="val" if args.validation else "test")
    except NonFiniteLossError as err:
        if not args.record_divergence:
            raise
        path = save_json_atomic(results_path, divergence_results(model, data, config, device, err,
                                                                 eval_set=eval_set))
        print(f"diverged at epoch {err.epoch}, step {err.step}; recorded in {path}")
        return load_results(path)

    title = f"{model.config.norm} norm, batch {config.batch_size}, seed {args.seed}"
    plot_history(history, images_dir / f"{name}_curves.png", title=title)
    test_loader = make_test_loader(data, config, device)
    precision = history["precision"][-1] or "fp32"
    logits = predict(model, test_loader, precision)  # serves the grid and the confusion matrix
    mistakes = collect_misclassified(model, test_loader, limit=10, logits=logits)
    plot_misclassified(mistakes, data.classes, images_dir / f"{name}_misclassified.png",
                       title=title)
    results = make_results(model, data, config, history, device, logits=logits,
                           eval_set=eval_set)
    path = save_json_atomic(results_path, results)
    print(f"final {eval_set} accuracy {100 * results['final_test_acc']:.2f}% after "
          f"{results['epochs']} epochs ({results['wall_time_s']:.0f} s, {results['precision']}); "
          f"results in {path}, figures in {images_dir}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (DatasetError, CheckpointError, NonFiniteLossError, ValueError) as err:
        # Problems the user can fix: say what and how, without a traceback.
        raise SystemExit(f"error: {err}") from None
