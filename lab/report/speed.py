"""The precision check, the speed tables and the GPU check's section."""

import re
import statistics

from results import load_results
from variants import DEFAULT, REGISTRY

from lab import compare
from lab.report.common import (BENCH_DIR, GPU_DIR, PRECISION_DIR, arithmetic, device_kind,
                               recorded_precision, same_recipe)


def precision_section(checks, runs, archives=()):
    """Each run of results/precision/ against the seed spread of the runs of the same variant
    and recipe done in other arithmetic (another precision, or another kind of device) in
    results/ or an archive of it (ARCHIVES): the same computation, rounded differently."""
    if not checks:
        return "No precision-check runs yet (results/precision/ is empty)."
    rows = []
    pool = [r for group in (runs, *(by_v for _, _, by_v in archives)) for rs in group.values()
            for r in rs]
    references = {id(run): sorted((r for r in pool if same_recipe(r, run)
                                   and arithmetic(r) != arithmetic(run)),
                                  key=lambda r: (recorded_precision(r), r["seed"]))
                  for run in checks}
    order = lambda r: (tuple(REGISTRY).index(r["variant"]), r["seed"], device_kind(r), r["precision"])  # noqa: E731
    for run in sorted(checks, key=order):
        ref = references[id(run)]
        accs = [100 * r["final_test_acc"] for r in ref]
        acc = 100 * run["final_test_acc"]
        verdict = "yes" if accs and min(accs) <= acc <= max(accs) else (
            "no" if accs else "no reference runs")
        head = [f"{run['variant']} seed {run['seed']}", run["precision"]]
        if len(accs) > 1:
            groups = {}
            for r in ref:
                groups.setdefault(f"{recorded_precision(r)}, {device_kind(r)}", []).append(
                    str(r["seed"]))
            mean, std = statistics.mean(accs), statistics.stdev(accs)
            described = "; ".join(f"{k}, " + ", ".join(seeds) for k, seeds in groups.items())
            rows.append([*head, compare.threads(run["hardware"]), f"{acc:.2f}", described,
                         f"{compare.mean_std(accs)} ({min(accs):.2f}–{max(accs):.2f})",
                         f"{acc - mean:+.2f} ({(acc - mean) / std:+.1f} std)", verdict])
        else:
            rows.append([*head, "-", f"{acc:.2f}", "-", "-", "-", verdict])
    lines = [compare.markdown_table(
        ["run", "precision", "hardware", "test acc. (%)", "reference runs: precision, device, seeds",
         "reference mean ± std (range)", "difference from the reference mean",
         "within the reference range?"], rows)]
    for run in checks:  # step by step, where only the precision differs
        same_seed = [r for r in references[id(run)] if r["seed"] == run["seed"]
                     and device_kind(r) == device_kind(run)]
        for ref in same_seed:
            n = min(5, len(run["history"]["train_loss"]), len(ref["history"]["train_loss"]))
            fmt = lambda r: ", ".join(f"{v:.4f}" for v in r["history"]["train_loss"][:n])  # noqa: E731
            lines += ["", f"Training loss of the first {n} epochs, {run['variant']} seed "
                          f"{run['seed']}: {fmt(run)} in {run['precision']}; {fmt(ref)} in "
                          f"{recorded_precision(ref)}."]
    return "\n".join(lines)


def parse_bench(path):
    """lab/bench.py's output file: {"machine", "command", "date", "rows": [{pipeline, precision,
    train_ips, s_epoch, eval_ips, first_s}]}. Reads the older format (no precision and
    first-step columns, whose runs were fp32 unless named +bf16) too."""
    text = path.read_text()
    meta = dict(re.findall(r"^# (\w[\w ]*): (.*)$", text, re.M))
    machine = re.search(r"^machine: (.*)$", text, re.M)
    rows = []
    for line in text[text.index("\npipeline"):].splitlines()[3:]:
        words = line.split()
        if len(words) < 5 or words[0].startswith("speed-up"):
            break
        name, rest = words[0], words[1:]
        precision = rest.pop(0) if rest[0] in ("fp32", "bf16", "fp16") else (
            "bf16" if "bf16" in name.split("+") else "fp32")
        numbers = [float(w) for w in rest]
        first = numbers[3] if len(numbers) >= 5 else None
        rows.append({"pipeline": name, "precision": precision, "train_ips": numbers[0],
                     "s_epoch": numbers[1], "eval_ips": numbers[2], "first_s": first})
    return {"machine": machine.group(1) if machine else "?", "kind": meta.get("machine kind"),
            "command": meta.get("command", "?"), "date": meta.get("date", "?"), "rows": rows}


def speed_section(bench_files):
    """One row group per benchmark output file (one machine kind each), newest first."""
    benches = [parse_bench(f) for f in bench_files]
    benches = [b for b in benches if b["rows"]]
    if not benches:
        return "No benchmark outputs yet (results/bench/ is empty)."
    rows, notes = [], []
    for bench in sorted(benches, key=lambda b: b["date"], reverse=True):
        usual = next(r for r in bench["rows"] if r["pipeline"] == "usual")
        for row in bench["rows"]:
            default = " (default)" if row["pipeline"] == "repo" else ""
            first = f"{row['first_s']:.1f}" if row["first_s"] is not None else "-"
            rows.append([bench["kind"], f"{row['pipeline']}{default}", row["precision"],
                         f"{row['train_ips']:.0f}", f"{row['s_epoch']:.1f}",
                         f"{row['train_ips'] / usual['train_ips']:.2f}", f"{row['eval_ips']:.0f}",
                         first])
        notes.append(f"- {bench['kind']}: `{bench['command']}` ({bench['date']}; "
                     f"{bench['machine'].split(';')[0]})")
    table = compare.markdown_table(["machine kind", "pipeline", "precision", "train img/s",
                                    "s/epoch", "× usual (train)", "eval img/s", "first-step s"],
                                   rows)
    return "\n".join([table, "", "Medians of the repetitions; s/epoch = 50,000 / train img/s "
                               "(training only); first-step s = the untimed warm-up steps and "
                               "first evaluation, where a compiled variant pays its compile "
                               "time. Sources, newest first:", ""] + notes)


def load_precision_checks(folder=PRECISION_DIR):
    return compare.read_results(folder) if folder.is_dir() else []


def bench_files(folder=BENCH_DIR, gpu_dir=GPU_DIR):
    """The benchmark outputs that hold a pipeline table (profiles do not), the GPU checks'
    included."""
    files = [*folder.glob("*.txt"), *gpu_dir.glob("*/bench.txt")]
    return sorted(f for f in files if "\npipeline" in f.read_text())


def load_gpu_checks(gpu_dir=GPU_DIR):
    """[(summary, {"train": [runs], "notebooks": [runs]}, its folder under results/)] of each
    lab/gpu_check.py output under results/gpu/, by GPU name; smoke runs never land there."""
    checks = []
    for path in sorted(gpu_dir.glob("*/summary.json")):
        summary = load_results(path)  # a JSON dict too: one line if unreadable
        checks.append((summary, {kind: compare.read_results(path.parent / kind)
                                 for kind in ("train", "notebooks")
                                 if (path.parent / kind).is_dir()},
                       path.parent.relative_to(gpu_dir.parent).as_posix()))
    return checks


def gpu_archives(checks):
    """The GPU checks' notebook runs at the default precision, as extra rows of the results
    table: [(label, folder, {variant: runs})]."""
    rows = []
    for summary, runs, folder in checks:
        default = [r for r in runs.get("notebooks", []) if r["train_config"]["precision"] == "auto"]
        by_variant = {}
        for run in default:
            by_variant.setdefault(run["variant"], []).append(run)
        if by_variant:
            rows.append((f"{summary['hardware']['gpu']}, notebook", f"{folder}/notebooks",
                         by_variant))
    return rows


def _epoch_times(run):
    times = run["history"]["epoch_time"]
    return sum(times), times[0], statistics.median(times)


def gpu_section(checks):
    """Per GPU check: what ran, the accuracy and the epoch times of each 20-epoch run, and the
    speed target of a 20-epoch BatchNorm run (at most 30 s of epoch time; stretch 10 s)."""
    if not checks:
        return "No GPU check yet (results/gpu/ is empty): run `python -m lab.gpu_check` on a GPU."
    parts = []
    for summary, runs, _ in checks:
        hw = summary["hardware"]
        gpu = f"{hw['gpu']} (compute capability {hw['gpu_capability']})"
        rows, bn = [], []
        for kind, how in (("train", "train.py, alone on the GPU"),
                          ("notebooks", "notebook, beside the other notebooks and the tests")):
            for run in runs.get(kind, []):
                total, first, median = _epoch_times(run)
                graphs = "on" if run["train_config"].get("cuda_graphs") else "off"
                rows.append([f"{run['variant']} seed {run['seed']}, {run['epochs']} epochs",
                             how, run["precision"], graphs, f"{100 * run['final_test_acc']:.2f}",
                             f"{total:.1f}", f"{first:.1f}", f"{median:.2f}"])
                if kind == "train" and run["variant"] == DEFAULT and run["epochs"] == 20:
                    bn.append((total, run["precision"], graphs))
        statuses = "; ".join(f"{s['step']}: {s['status']}" for s in summary["steps"])
        lines = [f"**{gpu}**, torch {hw['torch']}, {summary['date']}; data "
                 f"{summary['data']}; check wall time {summary['wall_s']:.0f} s.", "",
                 compare.markdown_table(["run", "how it ran", "precision", "CUDA graphs",
                                         "test acc. (%)", "epoch time, all epochs (s)",
                                         "first epoch (s)", "median epoch (s)"], rows),
                 "", f"Steps: {statuses}."]
        if bn:
            total, precision, graphs = min(bn)
            verdict = "met" if total <= 30 else f"missed by {total - 30:.1f} s"
            lines += ["", f"Target for a 20-epoch BatchNorm run of today's recipe: at most 30 s of "
                          f"epoch time (stretch: 10 s). Fastest measured: {total:.1f} s "
                          f"({precision}, CUDA graphs {graphs}): {verdict}."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
