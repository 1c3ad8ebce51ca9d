"""Train one variant from the command line; writes a results JSON and PNGs.

    python train.py --norm group --epochs 20
    python train.py --norm batch --dry-run          # one epoch on a small subset, into a temp dir
    python train.py --norm layer --resume           # continue an interrupted run
"""

import argparse
import tempfile
from pathlib import Path

from dataset import DATA_ENV_VAR, DatasetError, load_cifar10
from model import NORM_ALIASES, build_model
from utils import (CheckpointError, NonFiniteLossError, TrainConfig, collect_misclassified,
                   fit, get_device, make_results, make_test_loader, plot_history,
                   plot_misclassified, predict, save_json_atomic, show_summary)

DEFAULTS = TrainConfig()
RESULTS_DIR = Path("results")


def run_name(norm, seed):
    return f"{norm}_seed{seed}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--norm", default="batch", choices=sorted(NORM_ALIASES),
                   help="normalization: batch/bn, group/gn or layer/ln (default: batch)")
    p.add_argument("--groups", type=int, default=4, help="GroupNorm groups (default: 4)")
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
    p.add_argument("--dropout", type=float, default=0.0, help="Dropout2d rate (default: 0)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed (default: 0)")
    p.add_argument("--data", default=None,
                   help=f"CIFAR-10 archive or folder (default: ${DATA_ENV_VAR}, else download)")
    subset = p.add_mutually_exclusive_group()
    subset.add_argument("--subset", type=int, default=None, metavar="N",
                        help="train on N images per class (stratified), test on N per class")
    subset.add_argument("--train-subset", type=int, default=None, metavar="N",
                        help="train on N images per class (stratified), test on the whole test "
                             "set (the batch-size study's budget)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
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
    p.add_argument("--dry-run", action="store_true",
                   help="1 epoch on 20 images per class, outputs in a temp dir (for CI)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    for flag in ("subset", "train_subset"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1 image per class")
    return args


def main(argv=None):
    args = parse_args(argv)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                         seed=args.seed)
    out_dir = Path(args.out_dir)
    images_dir = Path(args.images_dir) if args.images_dir else out_dir
    if (args.subset or args.train_subset) and out_dir.resolve() == RESULTS_DIR.resolve():
        raise SystemExit(f"{RESULTS_DIR}/ holds full runs only; drop --subset or pick --out-dir")

    data = load_cifar10(args.data)
    if args.subset:
        data = data.subset(args.subset, args.subset, seed=args.seed)
    elif args.train_subset:
        data = data.subset(args.train_subset, None, seed=args.seed)
    model = build_model(args.norm, seed=args.seed, num_groups=args.groups, dropout=args.dropout)
    name = args.run_name or run_name(model.config.norm, args.seed)
    print(f"{name}: {model.get_num_params():,} trainable parameters")
    show_summary(model)

    device = get_device(args.device)
    checkpoint = args.checkpoint or Path("checkpoints") / f"{name}.pt"
    history = fit(model, data, config, device, checkpoint_path=checkpoint, resume=args.resume,
                  progress=not args.no_progress)

    title = f"{model.config.norm} norm, batch {config.batch_size}, seed {args.seed}"
    plot_history(history, images_dir / f"{name}_curves.png", title=title)
    test_loader = make_test_loader(data, config, device)
    logits = predict(model, test_loader)  # one pass serves the grid and the confusion matrix
    mistakes = collect_misclassified(model, test_loader, limit=10, logits=logits)
    plot_misclassified(mistakes, data.classes, images_dir / f"{name}_misclassified.png",
                       title=title)
    results = make_results(model, data, config, history, device, logits=logits)
    path = save_json_atomic(out_dir / f"{name}.json", results)
    print(f"final test accuracy {100 * results['final_test_acc']:.2f}% after "
          f"{results['epochs']} epochs ({results['wall_time_s']:.0f} s); results in {path}, figures in {images_dir}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (DatasetError, CheckpointError, NonFiniteLossError, ValueError) as err:
        # Problems the user can fix: say what and how, without a traceback.
        raise SystemExit(f"error: {err}") from None
