"""Where a run's first epoch spends the time the later ones do not (on the H200 the first epoch
of a 20-epoch run took 19.2 s against a 4.35 s median): each setting in a fresh process, so
that what happens once per process happens in it, one epoch's training steps timed one by one,
then the per-epoch probe and the evaluation, twice each.

    python -m lab.first_epoch --device cuda --data cifar10-jpeg.tar.gz

Settings (CUDA; the CPU measures "default" only):
    default        as fit runs: cudnn.benchmark on (cuDNN tries its kernels for every new shape),
                   CUDA's lazy module loading (a kernel's module loads at its first launch)
    no-autotune    cudnn.benchmark off
    eager-loading  CUDA_MODULE_LOADING=EAGER: every module loads when CUDA starts, off the clock

Per setting: the first step, the second, the median step, the last (smaller) batch, the first
and second probe (norm_stats.probe_layers) and evaluation, and the extra: what the epoch and
its probe and evaluation took beyond the steps at the median and the second ones.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from dataset import load_cifar10
from model import build_model
from norm_stats import fixed_batch, probe_layers
from optimizers import make_optimizer
from precision import get_device, make_grad_scaler, resolve_precision
from utils import TrainConfig, evaluate, make_loaders, make_scheduler, training_step
from variants import DEFAULT

from lab.bench import timed
from lab.compare import markdown_table

SETTINGS = {"default": {}, "no-autotune": {}, "eager-loading": {"CUDA_MODULE_LOADING": "EAGER"}}


def measure(args):
    """One setting in this process: {"steps": [s per step], "probe": [s, s], "eval": [s, s]}."""
    device = get_device(args.device)
    data = load_cifar10(args.data, verbose=False)
    if args.subset:
        data = data.subset(args.subset, args.subset)
    torch.backends.cudnn.benchmark = device.type == "cuda" and args.worker != "no-autotune"
    config = TrainConfig()
    precision = resolve_precision(config.precision, device)
    model = build_model(DEFAULT, seed=0).to(device, memory_format=torch.channels_last)
    train_loader, test_loader = make_loaders(data, config, device)
    optimizer = make_optimizer(model, config, device)
    scheduler = make_scheduler(optimizer, config, len(train_loader))
    scaler = make_grad_scaler(device, precision)
    probe_batch = fixed_batch(data.train_x, data.train_y, data.mean, data.std, device)

    def step(x, y):
        training_step(model, x, y, optimizer, precision, scaler, config.label_smoothing)
        scheduler.step()

    model.train()
    steps = [timed(device, lambda: step(x, y)) for x, y in train_loader]
    result = {"setting": args.worker, "precision": precision, "steps": steps,
              "probe": [], "eval": []}
    for _ in range(2):
        result["probe"].append(timed(device, lambda: probe_layers(model, probe_batch)))
        result["eval"].append(timed(device, lambda: evaluate(model, test_loader, precision)))
        model.train()
    print("RESULT " + json.dumps(result), flush=True)


def row(result):
    steps, probe, evals = result["steps"], result["probe"], result["eval"]
    median = statistics.median(steps)
    extra = sum(steps) - median * len(steps) + probe[0] - probe[1] + evals[0] - evals[1]
    return [result["setting"], result["precision"], len(steps), f"{steps[0]:.3f}",
            f"{steps[1]:.3f}" if len(steps) > 1 else "–", f"{1000 * median:.1f}",
            f"{steps[-1]:.3f}", f"{probe[0]:.3f} / {probe[1]:.3f}",
            f"{evals[0]:.3f} / {evals[1]:.3f}", f"{extra:.2f}"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--data", default=None, help="CIFAR-10 source (default: $CIFAR10_DATA)")
    p.add_argument("--subset", type=int, default=None, metavar="N",
                   help="N images per class in each split: for smoke runs, not for figures")
    p.add_argument("--worker", default=None, choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return measure(args)
    device = get_device(args.device)
    settings = list(SETTINGS) if device.type == "cuda" else ["default"]
    rows = []
    for setting in settings:
        command = [sys.executable, "-m", "lab.first_epoch", "--worker", setting,
                   "--device", device.type] + (["--data", args.data] if args.data else []) + \
                  (["--subset", str(args.subset)] if args.subset else [])
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, **SETTINGS[setting]})
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if done.returncode or line is None:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return f"error: setting {setting} failed ({tail})"
        rows.append(row(json.loads(line[len("RESULT "):])))
    print(f"one epoch of BatchNorm's default run on {device.type}, each setting in a fresh "
          f"process; seconds unless marked")
    print(markdown_table(["setting", "precision", "steps", "first step", "second step",
                          "median step (ms)", "last step", "probe 1st / 2nd",
                          "evaluation 1st / 2nd", "extra s"], rows, right=range(2, 10)))


if __name__ == "__main__":
    sys.exit(main())
