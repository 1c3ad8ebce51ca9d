"""Run train.py for every (normalization, seed[, batch size]) combination, skipping runs whose
results file exists.

    # the 20-epoch runs of the README's results table
    python -m lab.sweep --norms batch layer group --seeds 0 1 2 --out-dir results

    # the batch-size study: learning rate scaled linearly with the batch size (scaled_lr)
    python -m lab.sweep --batch-sizes 2 4 8 16 32 64 128 --seeds 0 1 --jobs 2 \\
        --out-dir results/batch_size --epochs 6 --train-subset 1000

    # the learning-rate study: every peak rate for every normalization and none; a run whose
    # loss becomes NaN is recorded as diverged (train.py --record-divergence)
    python -m lab.sweep --norms batch layer group none --lrs 0.0125 0.025 0.05 0.1 0.2 0.4 \\
        0.8 1.6 --seeds 0 1 2 --out-dir results/lr_study --epochs 6 --train-subset 1000 --validation

Each run is its own process, writes its results file when it finishes and resumes from its
checkpoint, so an interrupted sweep picks up where it stopped when started again. Arguments
not listed here go to train.py unchanged.
"""

import argparse
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from results import NOT_NAMED, ResultsFileError, finished, run_name
from utils import TrainConfig
from variants import DEFAULT, canonical_norm, course_variants

from lab.processes import STOPPED, Children
from lab.train import LAB_CONFIGS, configs_from, parse_args

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "lab.train"]  # what each run is: train.py with the lab's switches


def scaled_lr(batch_size, base_lr=TrainConfig.lr, base_batch_size=TrainConfig.batch_size):
    """Linear scaling rule (Goyal et al., 2017; used by the GroupNorm paper): the peak learning
    rate is proportional to the batch size, `base_lr` at `base_batch_size` images per step.

    Keeps lr/batch, the noise scale of SGD, equal across batch sizes, so that a fixed number of
    epochs is a comparable budget: at batch 2 the rate is 64x smaller, for 64x more steps."""
    return base_lr * batch_size / base_batch_size


def passed_settings(train_args):
    """{setting: value} of what the flags passed through to every train.py change (`--epochs
    3 --subset 200`), as run_name takes them, so that a run's name says them: a 3-epoch subset
    run is not batch_seed0. Flags train.py does not know fail here, in one line."""
    args = parse_args(["--norm", DEFAULT, *train_args])
    model_config, config = configs_from(args)
    settings = {k: v for k, v in {**model_config.to_dict(), **config.to_dict()}.items()
                if k not in NOT_NAMED}
    return {**settings, "subset": args.subset, "train_subset": args.train_subset,
            "validation": args.validation}


def plan(norms, seeds, batch_sizes=None, base_lr=TrainConfig.lr, lrs=None, settings=None):
    """[(name, train.py arguments)] in the order to run them: seed by seed, so that a sweep cut
    short leaves whole seeds; within a seed the small (slow) batches first, to balance --jobs.
    With `lrs`: every peak learning rate for every norm, each run recording a divergence.
    `settings` (passed_settings): what every run also changes, tagged in the name of a plain
    run (whose name would otherwise be a final run's); a study's runs are named by the study,
    in a folder of their own, one budget each (docs/batch-size.md, docs/learning-rate.md)."""
    settings = settings or {}
    if lrs:
        if batch_sizes:
            raise ValueError("sweep either batch sizes or learning rates, not both")
        return [(name, ["--norm", norm, "--seed", str(seed), "--lr", repr(lr),
                        "--record-divergence", "--run-name", name])
                for seed in seeds for lr in sorted(lrs) for norm in map(canonical_norm, norms)
                for name in [run_name(norm, seed, study=f"lr{lr:g}")]]
    runs = []
    for seed in seeds:
        for batch_size in sorted(batch_sizes) if batch_sizes else [None]:
            for norm in map(canonical_norm, norms):
                args = ["--norm", norm, "--seed", str(seed)]
                if batch_size is None:
                    name = run_name(norm, seed, classes=LAB_CONFIGS, **{**settings, "lr": base_lr})
                    if base_lr != TrainConfig.lr:
                        args += ["--lr", repr(base_lr)]
                else:
                    name = run_name(norm, seed, study=f"bs{batch_size}")
                    args += ["--batch-size", str(batch_size),
                             "--lr", repr(scaled_lr(batch_size, base_lr))]
                args += ["--run-name", name]  # the name the sweep checks for, whatever else
                runs.append((name, args))
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--norms", nargs="+", default=list(course_variants()),
                   help=f"variants to run (default: {' '.join(course_variants())})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds to run (default: 0 1 2)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help="run every batch size, with the learning rate scaled linearly from "
                        "--lr at batch 128; results named <norm>_bs<B>_seed<seed>.json")
    p.add_argument("--lrs", nargs="+", type=float, default=None,
                   help="run every peak learning rate (the learning-rate study); results named "
                        "<norm>_lr<lr>_seed<seed>.json, diverged runs recorded as such")
    p.add_argument("--lr", type=float, default=TrainConfig.lr,
                   help=f"peak learning rate at batch {TrainConfig.batch_size} "
                        f"(default: {TrainConfig.lr})")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, the CPU threads shared among them (default: 1); "
                        "with more than 1, each run's output goes to <log-dir>/<name>.log")
    p.add_argument("--log-dir", default="runs/logs", help="(default: runs/logs)")
    p.add_argument("--out-dir", default="runs", help="results folder (default: runs)")
    p.add_argument("--images-dir", default="runs",
                   help="figure folder (default: runs; images/ keeps the notebooks' seed-0 runs)")
    args, train_args = p.parse_known_args(argv)  # anything else goes to train.py as it is
    if any(b < 2 for b in args.batch_sizes or []):
        p.error("--batch-sizes must be at least 2 (BatchNorm cannot normalize a single image)")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.lrs and args.batch_sizes:
        p.error("--lrs and --batch-sizes are separate studies: pass one of them")
    if any(lr <= 0 for lr in args.lrs or []):
        p.error("--lrs must be positive")

    try:
        settings = passed_settings(train_args)
    except ValueError as err:
        p.error(str(err))
    run_all(plan(args.norms, args.seeds, args.batch_sizes, args.lr, args.lrs, settings),
            args.out_dir, args.images_dir, train_args, args.jobs, args.log_dir)


def threads_per_run(jobs):
    """The CPU threads each of `jobs` runs at a time gets: the cores shared out, or with one
    job torch's own count (OMP_NUM_THREADS, else every core)."""
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else torch.get_num_threads()


def run_all(runs, out_dir, images_dir, train_args=(), jobs=1, log_dir="runs/logs"):
    """Run train.py for each (name, arguments[, its own out_dir]) of `runs`, `jobs` at a time,
    skipping those whose results file exists and resuming from their checkpoints; exit non-zero
    if any failed, after trying all of them (one diverged or broken run must not stop a night's
    sweep)."""
    todo = []
    for name, run_args, *own_dir in runs:
        folder = own_dir[0] if own_dir else out_dir
        out = Path(folder) / f"{name}.json"
        todo.append((name, out, [*TRAIN, *run_args,
                                 "--out-dir", str(folder), "--images-dir", str(images_dir),
                                 "--resume", "--no-progress", *train_args]))

    env = dict(os.environ)
    # `-m lab.train` from any folder: the repository on the path, as pytest.ini puts it
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if jobs > 1:  # share the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(threads_per_run(jobs))
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    children, printing = Children(), threading.Lock()

    def say(line):  # whole lines: the jobs' threads print at once
        with printing:
            print(line, flush=True)

    def run(job):
        name, out, cmd = job
        if children.stopping:  # the sweep was stopped: the runs left neither start nor log
            return name, STOPPED
        try:
            done = finished(out)  # checked just before the run: another sweep may have finished it
        except ResultsFileError as err:
            say(f"error: {err}")
            return name, 1
        if done:
            say(f"skip {out}: already done")
            return name, 0
        say("+ " + " ".join(cmd))
        if jobs == 1:
            return name, children.run(cmd, env=env)
        with open(Path(log_dir) / f"{name}.log", "a") as log:
            code = children.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        say(f"{'done' if code == 0 else f'FAILED (exit {code})'}: {name}")
        return name, code

    with children.stopped_by_sigterm(), ThreadPoolExecutor(max_workers=jobs) as pool:
        failed = [name for name, code in pool.map(run, todo) if code != 0]
    if failed:
        sys.exit(f"{len(failed)} of {len(todo)} planned runs failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
