"""Training and evaluation throughput: the usual DataLoader pipeline vs this repository's path.

    python -m lab.bench                       # CPU (or the best device), BatchNorm model, 3 repetitions
    python -m lab.bench --device cuda --steps 200 --variants repo+compile repo+graphs
    python -m lab.bench --profile             # where the time of this repository's training step goes
    python -m lab.bench --ops --precision fp16   # what one training step costs: ops, host syncs
    python -m lab.bench --variants repo+fp32 repo+bf16 repo+compile repo+nchw   # what else was tried
    python -m lab.bench --conv separable --widths 32 64 88   # the network of `tune.py`'s sep

"usual": PIL images -> RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize in a
         DataLoader (batch 128, shuffle, num_workers=2), NCHW model, fp32, plain training step.
"repo":  the default path: uint8 tensors on the device, normalized and augmented per batch
         (dataset.TensorLoader), channels_last model, the training step of
         utils.train_one_epoch, at the precision the policy picks for this device
         (precision.resolve_precision("auto"); printed in the table).

Variants of the repository's path (`--variants`, options joined with "+"): fp32, bf16, fp16
(force a precision instead of the policy's), compile (torch.compile of the model), graphs
(torch.compile with mode="reduce-overhead", i.e. CUDA graphs; CUDA only), nchw (contiguous
instead of channels_last), wholestep (the whole training step, schedule and optimizers included,
as one CUDA graph: lab/step_graph.py; eager elsewhere). A compiled variant's one-time compile cost is reported separately
("first-step s": the untimed warm-up steps and first evaluation, compilation included), never
mixed into its throughput.

Every measurement runs in its own subprocess (so peak RSS belongs to one pipeline), and the
repetitions alternate between pipelines so that drift in machine load hits both alike. Figures
are medians over repetitions; seconds per epoch are 50,000 images / training throughput.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from dataset import load_cifar10
from model import CONVS, ModelConfig, build_model
from precision import (compile_model, get_device, hardware_info, make_grad_scaler,
                       resolve_precision)
from optimizers import make_optimizer
from utils import (TrainConfig, evaluate, make_loaders, make_scheduler, train_one_epoch,
                   training_step)
from variants import DEFAULT

from lab.step_graph import DeviceSchedule, WholeStep

ROOT = Path(__file__).resolve().parents[1]

TRAIN_IMAGES = 50_000
PRECISION_OPTIONS = ("fp32", "bf16", "fp16")
VARIANT_OPTIONS = {*PRECISION_OPTIONS, "compile", "graphs", "nchw", "wholestep"}


def worker(args):
    """Measure one pipeline; print one JSON line."""
    device = get_device(args.device)
    data = load_cifar10(args.data, verbose=False)
    if args.subset:
        data = data.subset(args.subset, args.subset)
    model = build_model(args.norm, seed=0, conv=args.conv, widths=args.widths)
    config = TrainConfig(batch_size=args.batch_size, eval_batch_size=args.eval_batch_size)
    options = set(args.pipeline.split("+")[1:])
    unknown = options - VARIANT_OPTIONS
    if unknown:
        sys.exit(f"unknown variant option(s) {sorted(unknown)}; choose from "
                 f"{sorted(VARIANT_OPTIONS)}")
    step_model, precision = model, "fp32"
    if args.pipeline.startswith("repo"):
        channels_last = "nchw" not in options
        model.to(device, memory_format=torch.channels_last if channels_last
                 else torch.contiguous_format)
        train_loader, test_loader = make_loaders(data, config, device, channels_last)
        forced = options & set(PRECISION_OPTIONS)
        precision = resolve_precision(forced.pop() if forced else "auto", device)
        # compiled during the untimed warm-up steps; "graphs" captures CUDA graphs, as
        # TrainConfig.cuda_graphs does in training
        step_model = compile_model(model, "compile" in options, "graphs" in options, device)
        stream = _forever(train_loader)
        eval_fn = lambda: evaluate(step_model, test_loader, precision)  # noqa: E731
    else:
        model.to(device)
        stream, eval_fn = _usual_pipeline(data, args, device, model)
    optimizer = make_optimizer(model, config, device)
    scaler = make_grad_scaler(device, precision)

    # "wholestep": the step, the schedule and the sums as one CUDA graph (lab/step_graph.py)
    whole = WholeStep(model, optimizer, DeviceSchedule(optimizer, 10**6, config.pct_start),
                      precision, scaler, config.label_smoothing) if "wholestep" in options else None

    def train_steps(n):  # the real training step, over n batches of the stream
        if whole is None:
            train_one_epoch(step_model, Steps(stream, n, device), optimizer,
                            label_smoothing=config.label_smoothing, precision=precision,
                            scaler=scaler)
            return
        for x, y in Steps(stream, n, device):
            whole(x, y)
        whole.epoch_means()  # its one host read, as an epoch's end

    # compiled variants compile again for eval mode: the first evaluation stays out of the timing
    first_time = timed(device, lambda: (train_steps(args.warmup), eval_fn()))
    train_time = timed(device, lambda: train_steps(args.steps))
    eval_time = timed(device, eval_fn)

    out = {"pipeline": args.pipeline, "precision": precision,
           "train_ips": args.steps * args.batch_size / train_time,
           "eval_ips": len(data.test_y) / eval_time,
           "first_s": first_time,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out), flush=True)


class Steps:
    """A loader of exactly `n` batches taken from an endless stream (what train_one_epoch needs)."""

    def __init__(self, stream, n, device):
        self.stream, self.n, self.device = stream, n, device

    def __iter__(self):
        for _ in range(self.n):
            yield next(self.stream)


def _forever(loader):
    while True:
        yield from loader


def timed(device, fn):
    """Seconds `fn()` takes, the device's queued work included (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _usual_pipeline(data, args, device, model):
    class PILImages(Dataset):  # what torchvision.datasets.CIFAR10 does per item
        def __init__(self, x, y, transform):
            self.x, self.y, self.transform = x.permute(0, 2, 3, 1).numpy(), y.tolist(), transform

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.x[i])), self.y[i]

    normalize = transforms.Normalize(data.mean, data.std)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                   normalize])
    test_tf = transforms.Compose([transforms.ToTensor(), normalize])
    pin = device.type == "cuda"
    train = DataLoader(PILImages(data.train_x, data.train_y, train_tf), args.batch_size,
                       shuffle=True, num_workers=args.workers, drop_last=True, pin_memory=pin,
                       persistent_workers=args.workers > 0)
    test = DataLoader(PILImages(data.test_x, data.test_y, test_tf), 1000,
                      num_workers=args.workers, pin_memory=pin)

    def batches():
        for x, y in _forever(train):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    @torch.no_grad()
    def evaluate_usual():
        model.eval()
        correct = 0
        for x, y in test:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        model.train()
        return correct

    return batches(), evaluate_usual


def profile(args):
    """Operator-level profile of `args.steps` training steps on the repository's path."""
    device = get_device(args.device)
    data = load_cifar10(args.data, verbose=False)
    if args.subset:
        data = data.subset(args.subset, args.subset)
    model = build_model(args.norm, seed=0, conv=args.conv, widths=args.widths).to(
        device, memory_format=torch.channels_last)
    config = TrainConfig(batch_size=args.batch_size)
    stream = _forever(make_loaders(data, config, device)[0])
    optimizer = make_optimizer(model, config, device)
    precision = resolve_precision("auto", device)
    scaler = make_grad_scaler(device, precision)
    print(f"profiling the default path: precision {precision}")

    def steps(n):
        train_one_epoch(model, Steps(stream, n, device), optimizer, precision=precision,
                        scaler=scaler)

    steps(args.warmup)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        steps(args.steps)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
    print(f"{args.steps} steps of {args.batch_size} images: {total:.2f} s of CPU op time "
          f"-> {total / args.steps * 1000:.1f} ms/step, "
          f"{total / (args.steps * args.batch_size) * TRAIN_IMAGES:.1f} s per 50,000 images")


# Operations that launch no kernel: views, allocations and metadata (the --ops count leaves them out)
NOT_KERNELS = {"aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::reshape",
               "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::squeeze",
               "aten::unsqueeze", "aten::select", "aten::slice", "aten::unbind", "aten::detach",
               "aten::detach_", "aten::alias", "aten::lift_fresh", "aten::resolve_conj",
               "aten::resolve_neg", "aten::empty", "aten::empty_like", "aten::empty_strided",
               "aten::numpy_T", "aten::matrix_H", "aten::mT", "aten::flatten", "aten::split",
               "aten::chunk", "aten::narrow", "aten::result_type",
               "aten::_reshape_alias", "aten::set_", "aten::is_same_size", "aten::size",
               "aten::stride", "aten::dim"}
# Reads of a device value by the host: each is a sync on a GPU
HOST_SYNCS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero",
              "aten::equal", "aten::_assert_async"}


def step_op_counts(events):
    """{"total", "optimizer", "host_syncs"} of a profiled training step's `events`
    (torch.profiler's events()): the kernel-like ops, i.e. the aten ops that are neither views,
    allocations nor metadata and run inside no other such op (a matmul counts once, not its
    helpers); "optimizer": those inside an optimizer's step; "host_syncs": reads of a device
    value by the host."""
    def ancestors(event):
        parent = event.cpu_parent
        while parent is not None:
            yield parent
            parent = parent.cpu_parent
    counts = {"total": 0, "optimizer": 0, "host_syncs": 0}
    for event in events:
        if event.name in HOST_SYNCS:
            counts["host_syncs"] += 1
        if not event.name.startswith("aten::") or event.name in NOT_KERNELS:
            continue
        above = list(ancestors(event))
        if any(a.name.startswith("aten::") and a.name not in NOT_KERNELS for a in above):
            continue
        counts["total"] += 1
        counts["optimizer"] += any(a.name.startswith("Optimizer.step#") for a in above)
    return counts


def step_ops(data, precision, norm=DEFAULT):
    """step_op_counts of one training step at batch 2 (the count does not depend on the batch)
    on the CPU as it runs on CUDA (fused SGD): the next augmented batch, forward, loss, backward,
    both optimizers and the schedule (the epoch's running sums aside), after one step that
    creates the optimizers' state."""
    config = TrainConfig(batch_size=2)
    model = build_model(norm, seed=0).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config, "cuda")  # its fused SGD runs on CPU tensors too
    loader = make_loaders(data, config, "cpu")[0]
    scheduler = make_scheduler(optimizer, config, len(loader))
    scaler = make_grad_scaler("cpu", precision)
    batches = iter(loader)

    def step():
        x, y = next(batches)
        training_step(model, x, y, optimizer, precision, scaler, config.label_smoothing)
        scheduler.step()

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return step_op_counts(prof.events())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--norm", default=DEFAULT, help=f"model variant (default: {DEFAULT})")
    p.add_argument("--conv", default=ModelConfig.conv, choices=CONVS,
                   help=f"the 3x3 blocks after C1 (default: {ModelConfig.conv})")
    p.add_argument("--widths", type=int, nargs=3, default=ModelConfig.widths, metavar="C",
                   help="channels at 32x32, 16x16 and 8x8 (default: %(default)s)")
    p.add_argument("--data", default=None, help="CIFAR-10 source (default: $CIFAR10_DATA)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch (default: 128)")
    p.add_argument("--eval-batch-size", type=int, default=1000,
                   help="evaluation batch of the repository's path (default: 1000)")
    p.add_argument("--steps", type=int, default=60, help="timed training steps (default: 60)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per pipeline (default: 3)")
    p.add_argument("--workers", type=int, default=2, help="usual pipeline's DataLoader workers")
    p.add_argument("--subset", type=int, default=None, metavar="N",
                   help="N images per class in each split: for smoke runs, not for figures")
    p.add_argument("--variants", nargs="*", default=[], metavar="repo+OPTION",
                   help="extra pipelines: repo+fp32, repo+bf16, repo+fp16, repo+compile, "
                        "repo+graphs, repo+nchw, or combinations such as repo+bf16+compile")
    p.add_argument("--profile", action="store_true",
                   help="profile this repository's training steps instead (operator table)")
    p.add_argument("--ops", action="store_true",
                   help="count what one training step costs instead: kernel-like ops, those of "
                        "the optimizers, host syncs (batch 2 on the CPU is enough)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"],
                   help="with --ops: the step's precision (default: bf16)")
    p.add_argument("--worker", dest="pipeline", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.pipeline:
        return worker(args)
    if args.profile:
        return profile(args)
    if args.ops:
        counts = step_ops(load_cifar10(args.data, verbose=False).subset(2, 2), args.precision,
                          args.norm)
        print(f"ops per training step: total {counts['total']}; optimizer "
              f"{counts['optimizer']}; host syncs {counts['host_syncs']} ({args.precision}, "
              f"{torch.__version__})")
        return

    device = get_device(args.device)
    hw = hardware_info(device)
    isa = (f", {hw['cpu_capability']}, native bf16: {'yes' if hw['cpu_native_bf16'] else 'no'}"
           if device.type == "cpu" else f", compute capability {hw['gpu_capability']}"
           if device.type == "cuda" else "")
    print(f"machine: {hw.get('gpu', hw['cpu'])} ({hw['device']}{isa}), {hw['cpu_threads']} "
          f"threads, torch {hw['torch']}, python {hw['python']}, {os.cpu_count()} CPUs; "
          f"policy's precision: {resolve_precision('auto', device)}; "
          f"model {args.norm}, conv {args.conv}, widths {list(args.widths)}, "
          f"batch {args.batch_size}, {args.steps} timed steps, "
          f"median of {args.reps}")
    runs = {name: [] for name in ["usual", "repo", *args.variants]}
    base = [sys.executable, "-m", "lab.bench", "--device", str(args.device or ""), "--norm", args.norm,
            "--conv", args.conv, "--widths", *map(str, args.widths),
            "--batch-size", str(args.batch_size), "--eval-batch-size", str(args.eval_batch_size),
            "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--workers", str(args.workers)] + \
        (["--subset", str(args.subset)] if args.subset else []) + \
        (["--data", args.data] if args.data else [])
    for rep in range(args.reps):
        for pipeline in runs:
            out = subprocess.run(base + ["--worker", pipeline], capture_output=True, text=True,
                                 cwd=ROOT)
            lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"{pipeline} run failed:\n{out.stdout}\n{out.stderr}")
            runs[pipeline].append(json.loads(lines[-1][len("RESULT "):]))
            print(f"  rep {rep + 1} {pipeline:18s}: {runs[pipeline][-1]['train_ips']:8.0f} img/s",
                  flush=True)

    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]
                  if k not in ("pipeline", "precision")} | {"precision": rs[0]["precision"]}
           for name, rs in runs.items()}
    mem_key = "cuda_max_allocated_mb" if "cuda_max_allocated_mb" in med["repo"] else None
    width = max(12, *map(len, runs))
    header = f"{'pipeline':{width}s} {'precision':>9s} {'train img/s':>12s} {'s/epoch':>8s} " \
             f"{'eval img/s':>11s} {'first-step s':>12s} {'peak RSS MB':>12s}" + \
             (f" {'CUDA max MB':>12s}" if mem_key else "")
    print("\n" + header + "\n" + "-" * len(header))
    for name, m in med.items():
        print(f"{name:{width}s} {m['precision']:>9s} {m['train_ips']:12.0f} "
              f"{TRAIN_IMAGES / m['train_ips']:8.1f} {m['eval_ips']:11.0f} {m['first_s']:12.1f} "
              f"{m['peak_rss_mb']:12.0f}" + (f" {m[mem_key]:12.0f}" if mem_key else ""))
    print()
    for name in runs:
        if name != "usual":
            print(f"speed-up of {name} over usual: training "
                  f"{med[name]['train_ips'] / med['usual']['train_ips']:.2f}x, evaluation "
                  f"{med[name]['eval_ips'] / med['usual']['eval_ips']:.2f}x")
    for name in runs:
        if {"compile", "graphs"} & set(name.split("+")):
            print(f"one-time compile cost of {name}: first steps and evaluation took "
                  f"{med[name]['first_s']:.1f} s against {med['repo']['first_s']:.1f} s for repo "
                  f"(+{med[name]['first_s'] - med['repo']['first_s']:.1f} s)")


if __name__ == "__main__":
    main()
