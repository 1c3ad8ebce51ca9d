"""The GPU check: one command that runs everything the Colab GPU path relies on and keeps what it
measured, under results/gpu/<gpu>/.

    python -m lab.gpu_check --data cifar10-jpeg.tar.gz      # on a CUDA GPU: the whole check
    python -m lab.gpu_check --device cpu --smoke --data D --out DIR   # shrunk, for the tests

Steps, most needed first (each a subprocess; its log kept; a step that fails is recorded and
the check goes on; steps that would start after --deadline are recorded as skipped):

  1. a 20-epoch train.py run of the default variant (BatchNorm) at the default precision,
     alone: its epoch times are the speed figure, so nothing runs beside it
  2. the three notebooks at the default precision and S8_BatchNorm.ipynb again with
     PRECISION = "fp16" (Colab's T4 path), executed start to finish with nbclient as Colab's
     "Run all" does, beside the tests marked `cuda` (pytest -m cuda); --jobs at a time
  3. lab/bench.py: the default path, fp32, fp16, bf16 (where supported), CUDA graphs and the
     whole step as one graph (bf16 and fp16), alone; then lab/first_epoch.py: where the first
     epoch's extra time goes (cuDNN autotuning, lazy module loading, the first probe and
     evaluation)
  4. the same 20-epoch run with CUDA graphs, then at each other precision candidate (those this
     device supports), one at a time

It writes summary.json and summary.md (what ran, how long, what it measured), train/<run>.json
and its figures, bench.txt, first_epoch.txt, notebooks/<name>.ipynb (executed, cleaned as
make_notebooks.py --clean does) and logs/<step>.log. --smoke shrinks every step (1 epoch on a
subset, a few bench steps, the T4-path notebook alone) and refuses to write under results/.

Beyond torch and torchvision it needs nbclient, nbformat, ipykernel, jupyter_client,
torchsummary, matplotlib and pytest; it names the missing ones before anything runs (a bare GPU
machine may lack the Jupyter ones: download their wheels with pip download, as
../shared/gpu/README.md says, and install them there).
"""

import argparse
import hashlib
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NEEDS = ("nbclient", "nbformat", "ipykernel", "jupyter_client", "torchsummary", "matplotlib",
         "pytest")
MISSING = [name for name in NEEDS if importlib.util.find_spec(name) is None]
if MISSING and __name__ == "__main__":  # before the imports that would fail on them
    sys.exit(f"error: the GPU check needs {', '.join(MISSING)} beyond torch: pip install them "
             f"(on a machine without internet, carry their wheels)")

import nbformat  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

from precision import get_device, hardware_info, resolve_precision  # noqa: E402
from results import run_name  # noqa: E402
from train import OutputError, check_writable  # noqa: E402
from variants import DEFAULT, REGISTRY, course_variants  # noqa: E402

from lab.compare import markdown_table  # noqa: E402

from lab.make_notebooks import clean  # noqa: E402
from lab.processes import Children  # noqa: E402

T4_PRECISION = "fp16"  # what auto picks on Colab's free GPU (compute capability 7.5)
EPOCHS = 20
PRECISION_LINE = re.compile(r'^PRECISION = "[a-z0-9]+"', re.MULTILINE)


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def precision_candidates(device):
    """The precisions worth a 20-epoch run here: what auto picks first, then the others this
    device supports (bf16 needs compute capability 8.0 on CUDA, native bf16 on a CPU)."""
    default = resolve_precision("auto", device)
    if device.type == "cuda":
        others = ["fp32", "fp16"]
    elif device.type == "cpu":
        others = ["fp32"]  # bf16 is auto's pick where it is native; fp16 is slow on CPUs
    else:
        others = []
    return [default] + [p for p in others if p != default]


def notebook_with_precision(source, precision):
    """The notebook at `source` with its configuration's PRECISION set to `precision`."""
    nb = nbformat.read(source, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and PRECISION_LINE.search(c.source)]
    if len(cells) != 1:
        raise SystemExit(f"{source.name}: no single PRECISION = \"...\" line to set")
    cells[0].source = PRECISION_LINE.sub(f'PRECISION = "{precision}"', cells[0].source)
    return nb


def execute_notebook(source, dest, precision, workdir, timeout):
    """Execute a notebook as "Run all" does, in `workdir` (its runs/ and checkpoints/ go there),
    and write it, cleaned, to `dest`; the outputs are kept even when a cell fails."""
    nb = notebook_with_precision(source, precision)
    workdir.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout,
                            resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    finally:
        dest.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, dest)
        clean(dest)
        for results in sorted((workdir / "runs").glob("*.json")):  # runs/ is git-ignored
            (dest.parent / f"{dest.stem}.{results.name}").write_text(results.read_text())


def shown(command):
    """A command as a committed file records it: the interpreter as `python`, a path inside the
    repository relative to it, any other path by its name (no machine's absolute paths)."""
    words = []
    for word in map(str, command):
        path = Path(word)
        if word == sys.executable:
            word = "python"
        elif path.is_absolute():
            word = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
        words.append(word)
    return " ".join(words)


class Check:
    """Runs the steps, keeps their logs and durations, and writes the summary."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.out = Path(args.out)
        self.start = time.monotonic()
        self.steps, self.lock = [], threading.Lock()  # steps: appended by parallel jobs
        # each step in a process group of its own, so that a stop reaches what it starts too
        self.children = Children(own_group=True)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PYTHONUNBUFFERED": "1"}
        if args.data:
            self.env["CIFAR10_DATA"] = str(Path(args.data).resolve())
        self.env.pop("S8_SMOKE", None)  # the notebooks' size is this check's to choose
        if args.smoke:  # one thread a process: the smoke steps run side by side
            self.env.update(S8_SMOKE="1", OMP_NUM_THREADS="1")

    def left(self):
        return self.args.deadline - (time.monotonic() - self.start)

    def run(self, name, command, **record):
        """Run one step (a command line) unless the deadline has passed; log and record it."""
        entry = {"step": name, "command": shown(command), **record}
        if self.left() <= 0:
            entry["status"] = "skipped (deadline)"
            self.record(entry)
            return entry
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(log, "w") as f:
            try:
                rc = self.children.run(list(map(str, command)), cwd=ROOT, env=self.env,
                                       stdout=f, stderr=subprocess.STDOUT,
                                       timeout=max(1, self.left()) + self.args.grace)
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = "stopped (deadline)"
        entry.update(status=status, seconds=round(time.monotonic() - t0, 1), log=str(
            log.relative_to(self.out)))
        self.record(entry)
        print(f"[{time.monotonic() - self.start:6.0f} s] {name}: {status} "
              f"({entry['seconds']:.0f} s)", flush=True)
        return entry

    def record(self, entry):
        """Keep a step's entry and rewrite the summary: a check stopped from outside keeps
        what it finished."""
        with self.lock:
            self.steps.append(entry)
            self.summary()

    def train_runs(self, first_only=False, skip_first=False):
        """The 20-epoch BatchNorm runs: the default precision; then graphs and the others."""
        smoke = ["--epochs", "1", "--subset", "20"] if self.args.smoke else ["--epochs", EPOCHS]
        candidates = [(p, False) for p in precision_candidates(self.device)]
        if self.device.type == "cuda":
            candidates.insert(1, (candidates[0][0], True))  # graphs on the default precision
        for precision, graphs in candidates[:1] if first_only else candidates[skip_first:]:
            # how it computes is not part of a run's name (results.NOT_NAMED): said here
            name = f"{run_name(DEFAULT, 0)}_{precision}" + "_graphs" * graphs
            command = [sys.executable, "train.py", "--norm", DEFAULT, "--seed", "0",
                       "--precision", precision, "--device", self.device.type, *smoke,
                       "--out-dir", self.out / "train", "--run-name", name, "--checkpoint",
                       self.out / "checkpoints" / f"{name}.pt", "--overwrite", "--no-progress"]
            if graphs:
                command.append("--cuda-graphs")
            if self.args.data:
                command += ["--data", self.args.data]
            entry = self.run(f"train_{name}", command, precision=precision, cuda_graphs=graphs)
            path = self.out / "train" / f"{name}.json"
            if entry.get("status") == "ok" and path.exists():
                result = json.loads(path.read_text())
                times = result["history"]["epoch_time"]
                entry.update(final_test_acc=result["final_test_acc"], epochs=len(times),
                             epoch_time_total_s=round(sum(times), 2),
                             epoch_time_median_s=round(statistics.median(times), 3))
                with self.lock:
                    self.summary()

    def bench(self):
        variants = ["repo+fp32"]
        if self.device.type == "cuda":  # the whole step as one graph: lab/step_graph.py
            variants += ["repo+graphs", "repo+wholestep", "repo+fp16+wholestep"]
        if self.device.type == "cuda" and resolve_precision("auto", self.device) == "bf16":
            variants.insert(1, "repo+bf16")
        if self.device.type == "cuda":
            variants.insert(1, "repo+fp16")
        size = ["--steps", "3", "--warmup", "1", "--reps", "1", "--subset", "20"] \
            if self.args.smoke else \
            ["--steps", "200", "--warmup", "20", "--reps", "1"]
        command = [sys.executable, "-m", "lab.bench", "--device", self.device.type, *size,
                   "--variants", *variants] + (["--data", self.args.data] if self.args.data else [])
        entry = self.run("bench", command)
        log = self.out / entry.get("log", "-")
        if log.exists():
            (self.out / "bench.txt").write_text(self.bench_header(command) + log.read_text())

    def first_epoch(self):
        """Where the first epoch's extra time goes (lab/first_epoch.py), into first_epoch.txt."""
        size = ["--subset", "20"] if self.args.smoke else []
        command = [sys.executable, "-m", "lab.first_epoch", "--device", self.device.type, *size] \
            + (["--data", self.args.data] if self.args.data else [])
        entry = self.run("first_epoch", command)
        log = self.out / entry.get("log", "-")
        if log.exists():
            (self.out / "first_epoch.txt").write_text(self.bench_header(command) + log.read_text())

    def bench_header(self, command):
        """The "# key: value" lines lab/report/ reads above a lab/bench.py output."""
        hw = hardware_info(self.device)
        data = Path(self.args.data) if self.args.data else None
        digest = hashlib.sha256(data.read_bytes()).hexdigest() if data and data.is_file() else "-"
        kind = hw.get("gpu", hw["cpu"]) + (f" (compute capability {hw['gpu_capability']})"
                                           if "gpu_capability" in hw else "")
        return (f"# command: {shown(command)}\n"
                f"# date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, in lab/gpu_check.py, "
                f"alone on the machine\n"
                f"# data: {data.name if data else '-'}, sha256 {digest}\n"
                f"# machine kind: {kind}; today's network, {os.cpu_count()} CPU cores\n")

    def notebooks_and_tests(self, also=()):
        """The notebooks and the cuda tests, --jobs at a time, beside the callables `also`."""
        t4 = T4_PRECISION if self.device.type == "cuda" else "fp32"  # fp16 is slow on CPUs
        jobs = [] if self.args.smoke else [  # nbval runs every notebook in the tests already
            (f"S8_{REGISTRY[v].title}.ipynb", "auto") for v in course_variants()]
        jobs.append(("S8_BatchNorm.ipynb", t4))
        work = []
        for source, precision in jobs:
            stem = Path(source).stem + ("" if precision == "auto" else f"_{precision}")
            dest = self.out / "notebooks" / f"{stem}.ipynb"
            work.append((f"notebook_{stem}", [
                sys.executable, "-m", "lab.gpu_check", "--notebook", ROOT / source, dest,
                precision, self.out / "notebooks" / stem], {"precision": precision}))
        # without pytest.ini's nbval options: a GPU machine may have no nbval
        work.append(("tests_cuda", [sys.executable, "-m", "pytest", "-o", "addopts=", "-m", "cuda",
                                    "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"], {}))
        with ThreadPoolExecutor(self.args.jobs) as pool:
            for done in [pool.submit(self.run, name, command, **record)
                         for name, command, record in work] + [pool.submit(f) for f in also]:
                done.result()

    def summary(self):
        hw = hardware_info(self.device)
        summary = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "hardware": hw, "smoke": self.args.smoke, "data": self.args.data and
                   Path(self.args.data).name, "deadline_s": self.args.deadline,
                   "wall_s": round(time.monotonic() - self.start, 1),
                   "policy_precision": resolve_precision("auto", self.device),
                   "steps": self.steps}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        lines = [f"# GPU check on {hw.get('gpu', hw['cpu'])}", "",
                 f"{summary['date']}; torch {hw['torch']}; "
                 f"{'smoke mode; ' if self.args.smoke else ''}wall {summary['wall_s']:.0f} s; "
                 f"data: {summary['data']}", ""]
        rows = [[s["step"], s["status"], s.get("seconds", ""),
                 s.get("precision", "") + " + graphs" * bool(s.get("cuda_graphs")),
                 f"{100 * s['final_test_acc']:.2f}%" if "final_test_acc" in s else "",
                 s.get("epoch_time_total_s", "")] for s in self.steps]
        lines.append(markdown_table(["step", "status", "s", "precision", "final test acc",
                                     "epoch time total (s)"], rows, right=(2, 4, 5)))
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: the best available)")
    p.add_argument("--data", default=os.environ.get("CIFAR10_DATA"),
                   help="CIFAR-10 archive or folder (default: $CIFAR10_DATA)")
    p.add_argument("--out", default=None,
                   help="output folder (default: results/gpu/<gpu name>; --smoke: required)")
    p.add_argument("--smoke", action="store_true",
                   help="every step shrunk to seconds (1 epoch on a subset): for the tests")
    p.add_argument("--jobs", type=int, default=5,
                   help="notebooks and tests run this many at a time (default: 5)")
    p.add_argument("--deadline", type=float, default=460,
                   help="start no step after this many seconds (default: 460)")
    p.add_argument("--grace", type=float, default=60,
                   help="a step running at the deadline gets this many seconds more (default: 60)")
    p.add_argument("--notebook", nargs=4, metavar=("SOURCE", "DEST", "PRECISION", "WORKDIR"),
                   help=argparse.SUPPRESS)  # the worker that executes one notebook
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.notebook:
        source, dest, precision, workdir = args.notebook
        return execute_notebook(Path(source), Path(dest), precision, Path(workdir), timeout=None)
    try:
        device = get_device(args.device)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if device.type != "cuda" and not args.smoke:
        raise SystemExit(f"error: the GPU check times 20-epoch runs on a CUDA GPU, and this "
                         f"machine runs on {device.type}: run it on a GPU, or pass --smoke --out "
                         f"DIR for its shrunk version on the CPU")
    if args.data and not Path(args.data).exists():
        raise SystemExit(f"error: --data {args.data} does not exist: point it at a copy of "
                         f"CIFAR-10 (cifar10-jpeg.tar.gz), or leave it out to download one")
    if args.out is None:
        if args.smoke:
            raise SystemExit("error: --smoke needs --out (smoke runs never write into results/)")
        hw = hardware_info(device)
        args.out = ROOT / "results" / "gpu" / slug(hw.get("gpu") or hw["cpu"])
    elif args.smoke and Path(args.out).resolve().is_relative_to((ROOT / "results").resolve()):
        raise SystemExit("error: smoke runs never write into results/; pass another --out")
    try:
        check_writable(args.out)
    except OutputError as err:
        raise SystemExit(f"error: {err}") from None
    check = Check(args, device)
    check.out.mkdir(parents=True, exist_ok=True)
    with check.children.stopped_by_sigterm():  # a stop stops every running step too
        return run_steps(check)


def run_steps(check):
    """Every step in its order, then the summary; 1 if a step was not ok."""
    print(f"GPU check on {check.device}; writing into {check.out}", flush=True)
    data = check.run("data_cache", [sys.executable, "-c", "from dataset import load_cifar10; "
                                    "load_cifar10(__import__('os').environ.get('CIFAR10_DATA'))"])
    if data["status"] != "ok":  # every later step needs the data: stop with the reason
        reason = (check.out / data["log"]).read_text().strip().splitlines() or ["no output"]
        raise SystemExit(f"error: the data did not load ({reason[-1]}); pass --data with a "
                         f"copy of CIFAR-10")
    check.train_runs(first_only=True)
    if check.args.smoke:  # nothing is timed: the rest in a lane beside the notebook
        check.notebooks_and_tests(also=[lambda: (check.bench(), check.first_epoch(),
                                                 check.train_runs(skip_first=True))])
    else:
        check.notebooks_and_tests()
        check.bench()
        check.first_epoch()
        check.train_runs(skip_first=True)
    summary = check.summary()
    failed = [s["step"] for s in summary["steps"] if s["status"] != "ok"]
    print(f"summary in {check.out / 'summary.md'}" + (f"; not ok: {', '.join(failed)}"
                                                        if failed else "; every step ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
