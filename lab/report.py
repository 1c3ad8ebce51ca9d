"""Regenerate README.md's results tables and the figures in images/ from the results files.

    python -m lab.report            # rewrite the README tables, the figures, S8_Compare.ipynb
    python -m lab.report --check    # exit 1 if a README table is out of date (for CI)

Writes the results table (results/*.json), the batch-size study section
(results/batch_size/*.json), the precision check (results/precision/*.json against the fp32
runs), the speed tables (results/bench/*.txt, lab/bench.py's outputs), images/compare_variants.png,
images/confusion_matrices.png and images/batch_size_study.png. No number is typed by hand:
every cell comes from a results file.

It also re-executes S8_Compare.ipynb (it reads the same files, under nbval in CI): a results
file committed without it leaves the notebook's checked outputs stale and CI red.
"""

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

import norm_stats
import normalizations
from results import ResultsFileError, load_results
import train
from variants import DEFAULT, REGISTRY, course_variants

from lab import compare, front_page, lr_study, per_epoch, tune
from lab import train as lab_train
from lab.compare import load_runs, load_study, study_budget

ROOT = Path(__file__).resolve().parents[1]

README = ROOT / "README.md"
DOCS = ROOT / "docs"  # one page per study, their tables generated here too
IMAGES = ROOT / "images"
FIGURE = IMAGES / "compare_variants.png"
STUDY_FIGURE = IMAGES / "batch_size_study.png"
CONFUSION_FIGURE = IMAGES / "confusion_matrices.png"


def markers(name):
    """The README comments between which a generated section lives."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


START, END = markers("results")
STUDY_START, STUDY_END = markers("batch-size")
LR_FIGURE = IMAGES / "lr_study.png"
AXES_FIGURE = IMAGES / "norm_axes.png"
NORM_STATS_FIGURE = IMAGES / "norm_statistics.png"
PROBE_FIGURE = IMAGES / "layer_probe.png"
TUNING_DIR = ROOT / "results" / "tuning"
CEILING_DIR = compare.CEILING_DIR
EPOCHS_FIGURE = IMAGES / "equivalent_epochs.png"
FOREST_FIGURE = IMAGES / "technique_forest.png"
LEVERS_DIR = tune.LEVERS_DIR
LEVER_FIGURE = IMAGES / "lever_forest.png"
LEVER_GAIN = 0.5  # issue 52's bar: a lever +0.5 over recipe v3, its interval above zero
# Earlier recipes' final runs, kept beside today's for a before/after comparison, oldest first:
# (folder under results/, the label of their rows).
ARCHIVES = [("before-study", "before the study"),  # published before the recipe study
            ("recipe-v1", "recipe v1"),            # the recipe study's, before learning per epoch
            ("recipe-v2", "recipe v2"),            # Muon, before separable blocks
            ("recipe-v3", "recipe v3")]            # separable blocks, before pad2 + SiLU
PRECISION_DIR = ROOT / "results" / "precision"
BENCH_DIR = ROOT / "results" / "bench"
GPU_DIR = ROOT / "results" / "gpu"  # lab/gpu_check.py's outputs, one folder per GPU


def _train_acc(run):
    return 100 * run["history"]["train_acc"][-1]


def _flip_acc(run):
    acc = run.get("final_test_acc_flip_tta")
    return None if acc is None else 100 * acc


def archive_note(archives):
    """The table's sentence on its rows of earlier recipes (load_archives())."""
    kept = "; ".join(f"rows marked ({label}) are kept in `results/{folder}/`"
                     for label, folder, _ in archives)
    return f"; {kept}, earlier recipes' final runs for a before/after comparison" \
        if archives else ""


def target_verdict(accs, target):
    """Whether the mean of `accs` (%) meets `target`, and whether its 95% t-interval clears it."""
    mean = statistics.mean(accs)
    if mean < target:
        return f"≥ {target:.0f}: missed by {target - mean:.2f}"
    if len(accs) < 2:
        return f"≥ {target:.0f}: mean met (+{mean - target:.2f}); one seed: no interval"
    clears = "clears" if compare.t_interval(accs)[0] >= target else "does not clear"
    return f"≥ {target:.0f}: mean met (+{mean - target:.2f}); the interval {clears} it"


def summary_table(runs):
    """The front page's table: today's runs per variant, the mean test accuracy with its 95%
    t-interval, and whether the mean, and the interval, clear the target and the next one."""
    if not runs:
        return "No results yet: `python -m lab.sweep --norms batch layer group --seeds 0 1 2 --out-dir results`."
    lines = ["| variant | test acc. mean ± std (%) | 95% interval of the mean (%) | seeds | "
             "params | epochs | target | next target |", "|---|---|---|---|---|---|---|---|"]
    for variant in tuple(REGISTRY):
        rs = sorted(runs.get(variant, []), key=lambda r: r["seed"])
        if not rs:
            continue
        accs = [100 * r["final_test_acc"] for r in rs]
        if len(accs) > 1:
            low, high = compare.t_interval(accs)
            spread = f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}"
            interval = f"[{low:.2f}, {high:.2f}]"
        else:
            spread, interval = f"{statistics.mean(accs):.2f}", "-"
        lines.append(f"| {REGISTRY[variant].title} | {spread} | {interval} | {_seeds(rs)} | "
                     f"{', '.join(f'{p:,}' for p in sorted({r['num_params'] for r in rs}))} | "
                     f"{', '.join(map(str, sorted({r['epochs'] for r in rs})))} | "
                     f"{target_verdict(accs, REGISTRY[variant].target)} | "
                     f"{target_verdict(accs, REGISTRY[variant].next_target)} |")
    return "\n".join(lines)


def gpu_note(gpu):
    """The table's sentence on its rows of GPU-check notebooks (gpu_archives())."""
    return "".join(f"; rows marked ({label}) are the notebooks that `lab/gpu_check.py` ran "
                   f"there, kept in `results/{folder}/`" for label, folder, _ in gpu)


def table(runs, archives=(), gpu=()):
    """The results table: today's runs, then the final runs of earlier recipes (`archives`:
    [(label, folder, {variant: runs})], load_archives()), each row labelled with how its recipe
    differs from today's defaults, then the notebooks a GPU check ran (`gpu`, gpu_archives())."""
    lines = ["| variant | recipe | seeds | train acc. mean (%) | test acc. mean ± std (%) | "
             "flip-TTA test acc. mean (%) | best | worst | target | params | epochs | "
             "s/epoch (median) | hardware | precision | data |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = [(v, runs[v], "") for v in tuple(REGISTRY) if v in runs]
    groups += [(v, by_variant[v], f" ({label})") for label, _, by_variant in [*archives, *gpu]
               for v in tuple(REGISTRY) if v in by_variant]
    for _, group, _ in groups:
        for run in group:
            outside = train.limits_warning(run["num_params"], run["epochs"])
            if outside or run.get("outside_limits"):
                raise SystemExit(f"a {run['variant']} seed {run['seed']} run in the results "
                                 f"table is {outside or run['outside_limits']}: move its file "
                                 f"out of results/")
    for variant, group, label in groups:
        rs = sorted(group, key=lambda r: r["seed"])
        accs = [100 * r["final_test_acc"] for r in rs]
        mean = statistics.mean(accs)
        spread = f"{mean:.2f} ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else \
            f"{mean:.2f} (1 seed)"
        flips = [_flip_acc(r) for r in rs]
        flip = f"{statistics.mean(flips):.2f}" if None not in flips else "not recorded"
        recipes = sorted({compare.recipe_changes(r) for r in rs})
        hw = sorted({r["hardware"].get("gpu") or compare.threads(r["hardware"]) for r in rs})
        data = sorted({f"{compare.data_file(r)} (sha256 {r['data']['sha256'][:12]}…)"
                       for r in rs})
        epochs = sorted({r["epochs"] for r in rs})
        params = sorted({r["num_params"] for r in rs})
        precisions = sorted({recorded_precision(r) for r in rs})
        target = REGISTRY[variant].target
        verdict = (f"met (+{mean - target:.2f})" if mean >= target else
                   f"not met ({mean - target:.2f})") if len(accs) >= 3 else \
            f"needs 3 seeds ({len(accs)} so far)"
        lines.append(
            f"| {variant} | {'; '.join(f'`{r}`' if r != 'current' else r for r in recipes)}{label} | "
            f"{_seeds(rs)} | "
            f"{statistics.mean(map(_train_acc, rs)):.2f} | {spread} | {flip} | "
            f"{max(accs):.2f} | {min(accs):.2f} | ≥ {target:.0f}: {verdict} | "
            f"{', '.join(f'{p:,}' for p in params)} | {', '.join(map(str, epochs))} | "
            f"{statistics.median(t for r in rs for t in r['history']['epoch_time']):.1f} | "
            f"{'; '.join(hw)} | {', '.join(precisions)} | "
            f"{'; '.join(data)} |")
    dates = sorted(r["date"][:10] for _, rs, _ in groups for r in rs)
    if dates:
        lines.append("")
        lines.append(f"Single-view test accuracy after the last epoch; flip-TTA is the mean over "
                     f"seeds of the same models scored on the average of each test image's and "
                     f"its mirror image's logits, a separate column, never a replacement. Train "
                     f"accuracy is that of the last epoch, on the augmented training batches as "
                     f"the model saw them while it trained. std is the sample standard deviation "
                     f"over seeds; s/epoch is the median wall time of an epoch (training + test "
                     f"evaluation) over all runs, robust to the odd epoch slowed by other work on "
                     f"the machine. The recipe column says how a row's recipe differs from "
                     f"today's defaults (`current`: it is today's){archive_note(archives)}"
                     f"{gpu_note(gpu)}. "
                     f"Runs dated {dates[0]} to {dates[-1]}; one JSON file per run in `results/`.")
    return "\n".join(lines)


def study_section(study, budget, runs):
    """The batch-size study's table, the facts computed from it, and the per-class tables."""
    if not budget:
        return "No batch-size study results yet (results/batch_size/ is empty)."
    lrs = ", ".join(f"{b}: {lr:g}" for b, lr in budget["lr_by_batch"].items())
    parts = [
        compare.study_table(study), "",
        f"{budget['runs']} runs of {'/'.join(map(str, budget['epochs']))} epochs on "
        f"{'/'.join(map(str, budget['train_images']))} training images (a stratified subset, "
        f"drawn per seed), tested on all {'/'.join(map(str, budget['test_images']))} test images; "
        f"seeds {', '.join(map(str, budget['seeds']))}; peak learning rate by batch size "
        f"({lrs}); {'; '.join(budget['hardware'])}; data {', '.join(budget['data'])}; "
        f"{budget['dates'][0]} to {budget['dates'][1]}. Final single-view test accuracy (%), "
        f"mean ± sample std over seeds. {study_recipe(budget)}", "",
        *[f"- {fact}" for fact in compare.study_findings(study)],
    ]
    if runs:
        parts += ["", "Per-class test accuracy (%) of the 20-epoch runs (batch 128), mean over "
                      "seeds:", "", compare.per_class_table(runs), "",
                  "Most frequent confusions of the 20-epoch runs (true → predicted, share of "
                  "the true class's test images, confusion matrices summed over seeds):", "",
                  *compare.most_confused_lines(runs)]
    return "\n".join(parts)


def against_today(recipes):
    """How recipe labels (compare.recipe_changes) read against today's defaults: "today's
    defaults", or "today's defaults but `lr 0.1` / ...", so a study run before a recipe change
    names the one it used."""
    if recipes == ["current"]:
        return "today's defaults"
    return f"today's defaults but {' / '.join(f'`{r}`' for r in recipes)}"


def study_recipe(budget):
    """Which recipe a study ran, but for the batch size and rate it varies."""
    recipes = budget.get("recipe") or ["current"]
    caveat = "" if recipes == ["current"] else "; the comparisons hold within that recipe"
    return f"Recipe: {against_today(recipes)}{caveat}."


def recorded_precision(run):
    """The precision a results file records; files from before the policy ran fp32 (CPU
    autocast was off then), so they say nothing and mean fp32."""
    return run.get("precision") or "fp32"


def same_recipe(a, b):
    """Whether two runs computed the same thing but for the seed and the precision."""
    return compare.recipe_changes(a) == compare.recipe_changes(b) and a["variant"] == b["variant"]


def device_kind(run):
    return run.get("hardware", {}).get("device", "cpu")


def arithmetic(run):
    """What decides a run's rounding: its precision and the kind of device it ran on."""
    return recorded_precision(run), device_kind(run)


def precision_section(checks, runs, archives=()):
    """Each run of results/precision/ against the seed spread of the runs of the same variant
    and recipe done in other arithmetic (another precision, or another kind of device) in
    results/ or an archive of it (ARCHIVES): the same computation, rounded differently."""
    if not checks:
        return "No precision-check runs yet (results/precision/ is empty)."
    lines = ["| run | precision | hardware | test acc. (%) | reference runs: precision, device, "
             "seeds | reference mean ± std (range) | difference from the reference mean | "
             "within the reference range? |", "|---|---|---|---|---|---|---|---|"]
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
        head = f"| {run['variant']} seed {run['seed']} | {run['precision']} |"
        if len(accs) > 1:
            groups = {}
            for r in ref:
                groups.setdefault(f"{recorded_precision(r)}, {device_kind(r)}", []).append(
                    str(r["seed"]))
            mean, std = statistics.mean(accs), statistics.stdev(accs)
            described = "; ".join(f"{k}, " + ", ".join(seeds) for k, seeds in groups.items())
            lines.append(
                f"{head} {compare.threads(run['hardware'])} | {acc:.2f} | {described} | "
                f"{mean:.2f} ± {std:.2f} ({min(accs):.2f}–{max(accs):.2f}) | "
                f"{acc - mean:+.2f} ({(acc - mean) / std:+.1f} std) | {verdict} |")
        else:
            lines.append(f"{head} - | {acc:.2f} | - | - | - | {verdict} |")
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
    lines = ["| machine kind | pipeline | precision | train img/s | s/epoch | × usual (train) | "
             "eval img/s | first-step s |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for bench in sorted(benches, key=lambda b: b["date"], reverse=True):
        usual = next(r for r in bench["rows"] if r["pipeline"] == "usual")
        for row in bench["rows"]:
            default = " (default)" if row["pipeline"] == "repo" else ""
            first = f"{row['first_s']:.1f}" if row["first_s"] is not None else "-"
            lines.append(
                f"| {bench['kind']} | {row['pipeline']}{default} | {row['precision']} | "
                f"{row['train_ips']:.0f} | {row['s_epoch']:.1f} | "
                f"{row['train_ips'] / usual['train_ips']:.2f} | {row['eval_ips']:.0f} | {first} |")
        notes.append(f"- {bench['kind']}: `{bench['command']}` ({bench['date']}; "
                     f"{bench['machine'].split(';')[0]})")
    return "\n".join(lines + ["", "Medians of the repetitions; s/epoch = 50,000 / train img/s "
                               "(training only); first-step s = the untimed warm-up steps and "
                               "first evaluation, where a compiled variant pays its compile "
                               "time. Sources, newest first:", ""] + notes)


def config_names():
    """{recipe change: lab/tune.py's configuration that makes it}, the study grid's names
    first (those its files were run under), then single configurations and pairs, so that a
    run's configuration is read from its settings, not from its file name."""
    names = [config for grid in tune.GRIDS.values() for _, configs, *_ in grid()
             for config in configs]
    names += list(tune.CONFIGS) + [f"{a}+{b}" for i, a in enumerate(tune.CONFIGS)
                                   for b in list(tune.CONFIGS)[i + 1:]]
    found = {}
    for name in names:
        if tune.missing_bases(name):  # mlr0.1 alone is refused: it refines muon
            continue
        try:
            model_config, config = lab_train.configs_from(
                lab_train.parse_args(tune.config_flags(name)))
        except ValueError:  # a pair that cannot be built (skipinit+no-skips) was never run
            continue
        run = {"variant": model_config.norm, "model_config": model_config.to_dict(),
               "train_config": config.to_dict()}
        found.setdefault(compare.recipe_changes(run, ignore=("norm", "epochs")), name)
    return found


def load_tuning(folder=TUNING_DIR):
    """{(norm, configuration, epochs): [runs]} of the files in results/tuning/, each grouped by
    what its results file records: variant, budget and how its recipe differs from today's."""
    groups, names = {}, config_names()
    for run in compare.read_results(folder) if folder.is_dir() else []:
        change = compare.recipe_changes(run, ignore=("norm", "epochs"))
        key = (run["variant"], names.get(change, change), run["epochs"])
        groups.setdefault(key, []).append(run)
    return groups


def spearman(xs, ys):
    """Rank correlation of two equally long lists (no ties expected among accuracy means)."""
    rank = lambda v: {x: i for i, x in enumerate(sorted(v))}  # noqa: E731
    rx, ry = rank(xs), rank(ys)
    n = len(xs)
    return 1 - 6 * sum((rx[x] - ry[y]) ** 2 for x, y in zip(xs, ys)) / (n * (n * n - 1))


def tuning_section(groups):
    """The ablation table (each configuration against recipe v1, same norm and budget)
    and the proxy check (configurations run at two budgets: do they rank alike?)."""
    if not groups:
        return "No tuning runs yet (results/tuning/ is empty)."
    lines = ["| variant | configuration | change from recipe v1 | params | epochs | seeds "
             "| val. acc. mean (min–max) | Δ per seed (paired) | mean paired Δ [95% CI] | "
             "verdict | flip-TTA val. acc. |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(tune.CONFIGS)
    for key in sorted(groups, key=lambda k: (tuple(REGISTRY).index(k[0]), k[2],
                                             order.index(k[1]) if k[1] in order else 99, k[1])):
        norm, config, epochs = key
        runs, base = groups[key], groups.get((norm, "base", epochs), [])
        accs = compare.accuracies(runs)
        mean = statistics.mean(accs)
        if base and config != "base":
            # Same seed, same initialization and data order: the difference the lever made.
            diff = compare.paired_difference(runs, base)
            paired = ", ".join(f"{d:+.2f}" for d in diff["diffs"]) or "-"
            delta_cell = _delta(diff, runs)
            # Full-budget pairs are read as the study reads them; 5-epoch screens at their 2.
            verdict = decision(diff) if epochs == train.MAX_EPOCHS else compare.verdict(diff)
        else:
            delta_cell, verdict, paired = "-", "-", "-"
        try:
            change = " ".join(tune.change_flags(config)) or "(recipe v1)"
        except SystemExit:  # a configuration renamed since its runs: say so, do not guess
            change = "(no longer defined in lab/tune.py)"
        lines.append(
            f"| {norm} | {config} | `{change}` | {runs[0]['num_params']:,} | {epochs} | "
            f"{_seeds(runs)} | "
            f"{mean:.2f} ({min(accs):.2f}–{max(accs):.2f}) | {paired} | {delta_cell} | {verdict} | "
            f"{statistics.mean(compare.accuracies(runs, 'final_test_acc_flip_tta')):.2f} |")
    runs_all = [r for rs in groups.values() for r in rs]
    dates = sorted(r["date"][:10] for r in runs_all)
    hardware = sorted({f"{compare.threads(r['hardware'])}, {r['precision']}" for r in runs_all})
    train_images = sorted({r["data"]["train_images"] for r in runs_all})
    val_images = sorted({r["data"]["test_images"] for r in runs_all})
    lines += ["", f"{len(runs_all)} runs, each trained on {'/'.join(map(str, train_images))} "
                  f"training images and scored on the {'/'.join(map(str, val_images))} held-out "
                  f"validation images (never the test set); single-view validation accuracy "
                  f"after the last epoch. Each change is compared with recipe v1's run "
                  f"of the same seed (same initialization and data order): the per-seed "
                  f"differences, their mean and its 95% t-interval over seeds; a change wins "
                  f"when the interval lies above zero, loses when it lies below, read over "
                  f"{len(tune.PROTOCOL_SEEDS)} seeds or more at {train.MAX_EPOCHS} epochs "
                  f"(the 5-epoch screens: 2). {'; '.join(hardware)}; {dates[0]} to {dates[-1]}."]
    budgets = sorted({k[2] for k in groups})
    for norm in tuple(REGISTRY):
        for short, full in [(a, b) for a in budgets for b in budgets if a < b]:
            both = [c for (n, c, e) in groups if n == norm and e == short
                    and (norm, c, full) in groups]
            if len(both) < 3:
                continue
            means = {e: [statistics.mean(compare.accuracies(groups[(norm, c, e)])) for c in both]
                     for e in (short, full)}
            ranked = lambda e: ", ".join(c for _, c in sorted(zip(means[e], both), reverse=True))  # noqa: E731
            lines += ["", f"Proxy check ({norm}): {len(both)} configurations at {short} and "
                          f"{full} epochs. Ranked at {short}: {ranked(short)}; at {full}: "
                          f"{ranked(full)}. Spearman rank correlation "
                          f"{spearman(means[short], means[full]):.2f}."]
    return "\n".join(lines)


def recipe_by_epochs(tuning, ceiling):
    """{variant: {epochs: [runs]}} of recipe v1 on the validation split: its 20-epoch runs
    (results/tuning/) and the longer ones (results/ceiling/)."""
    curves = {}
    for (norm, config, epochs), runs in [*tuning.items(), *ceiling.items()]:
        if config == "base" and epochs >= 20:
            curves.setdefault(norm, {})[epochs] = runs
    return {v: dict(sorted(curves[v].items())) for v in tuple(REGISTRY) if v in curves}


def technique_means(tuning):
    """{variant: {configuration: mean validation accuracy (%)}} of the 20-epoch changes."""
    means = {}
    for (norm, config, epochs), runs in tuning.items():
        if epochs == 20 and config != "base":
            means.setdefault(norm, {})[config] = statistics.mean(compare.accuracies(runs))
    return means


NOTE_20, NOTE_BEYOND = "the assignment's budget", "beyond the 20-epoch limit: a scale, never a result"


def decision(diff):
    """The learning-per-epoch study's verdict, read at the protocol's 4 seeds and, for a pair
    given EXTRA_SEEDS, at 8, never in between: stopping at the first look whose interval clears
    zero would turn noise into wins."""
    first, extended = len(tune.PROTOCOL_SEEDS), len(tune.PROTOCOL_SEEDS) + len(tune.EXTRA_SEEDS)
    if first < len(diff["seeds"]) < extended:
        return f"extending to {extended} paired seeds ({len(diff['seeds'])} so far)"
    verdict = compare.verdict(diff, min_seeds=first)
    if verdict == "no decision" and len(diff["seeds"]) >= extended:
        return f"not adopted: no decision at {extended} paired seeds, the protocol's most"
    return verdict


def greedy_reference(groups, variant, config, base):
    """What a 20-epoch change is judged against (the greedy step): a change stacked on one
    that won ("muon+aflip" on "muon"), that one, the best of them by mean; else `base`."""
    parts, base_runs = config.split("+"), groups.get((variant, base, 20), [])
    one_less = ["+".join(parts[:i] + parts[i + 1:]) for i in range(len(parts))
                if len(parts) > 1]
    winners = [c for c in one_less if c != base and (variant, c, 20) in groups and decision(
        compare.paired_difference(groups[(variant, c, 20)], base_runs)) == "wins"]
    return max(winners, key=lambda c: statistics.mean(compare.accuracies(groups[(variant, c, 20)])),
               default=base)


def technique_rows(tuning, reruns=None):
    """Every change measured at 20 epochs, in the study's order: {"variant", "config", "runs",
    "mean" (validation accuracy %), "against" (its reference), "diff" (paired with it),
    "decision"}. Each seed is paired with the
    reference's run in its own arithmetic where `reruns` (results/arithmetic/) holds one."""
    reruns, rows, order = reruns or {}, [], list(tune.CONFIGS)
    for variant, by_config in technique_means(tuning).items():
        base = tuning.get((variant, "base", 20), [])
        for config in sorted(by_config, key=lambda c: order.index(c) if c in order else 99):
            runs = tuning[(variant, config, 20)]
            reference = greedy_reference(tuning, variant, config, "base")
            first = tuning[(variant, reference, 20)] if reference != "base" else base
            again = reruns.get((variant, reference, 20), [])
            paired_with = compare.alike_base(runs, first, again)
            diff = compare.paired_difference(runs, paired_with)
            rerun_pairs = sum(any(b is r for r in again) for b in paired_with)
            against = "recipe v1" if reference == "base" else reference
            if rerun_pairs:
                against += (f" (re-runs: {rerun_pairs} of {len(paired_with)} "
                            f"seed{'s' * (len(paired_with) != 1)})")
            rows.append({"variant": variant, "config": config, "runs": runs,
                         "mean": by_config[config], "against": against, "diff": diff,
                         "decision": decision(diff)})
    return rows


def mark_adopted(rows):
    """Each row of technique_rows() with "adopted": every part of its change is in the
    configuration that is today's recipe."""
    today = {r["variant"]: set(r["config"].split("+")) for r in rows
             if compare.recipe_changes(r["runs"][0], ignore=("norm", "epochs")) == "current"}
    return [{**row, "adopted": set(row["config"].split("+")) <= today.get(row["variant"], set())}
            for row in rows]


def per_epoch_section(tuning, ceiling, reruns=None):
    """The learning-per-epoch study: recipe v1 at 20, 40 and 80 epochs (the scale), then
    every change measured at 20 epochs with its paired interval and its worth in epochs; each
    seed paired with the reference's run in its own arithmetic where `reruns` (results/
    arithmetic/, {(variant, config, epochs): runs}) holds one."""
    reruns = reruns or {}
    curves = recipe_by_epochs(tuning, ceiling)
    if not curves:
        return "No runs of recipe v1 on the validation split yet."
    lines = ["| variant | epochs | seeds | val. acc. mean (min–max) | note |", "|---|---|---|---|---|"]
    for variant, by_epochs in curves.items():
        for epochs, runs in by_epochs.items():
            accs = compare.accuracies(runs)
            lines.append(f"| {variant} | {epochs} | "
                         f"{_seeds(runs)}"
                         f" | {statistics.mean(accs):.2f} ({min(accs):.2f}–{max(accs):.2f}) | "
                         f"{NOTE_20 if epochs == 20 else NOTE_BEYOND} |")
    lines += ["", "| variant | change (20 epochs) | flags | seeds | val. acc. mean | compared with "
                  "| mean paired Δ [95% CI] | verdict | recipe v1 needs (epochs) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in technique_rows(tuning, reruns):
        worth = per_epoch.equivalent_epochs(row["mean"], per_epoch.recipe_curve(
            curves.get(row["variant"], {})))
        worth = "-" if worth is None else worth if isinstance(worth, str) else f"{worth:.0f}"
        try:
            flags = " ".join(tune.change_flags(row["config"]))
        except SystemExit:
            flags = "(no longer defined in lab/tune.py)"
        lines.append(f"| {row['variant']} | {row['config']} | `{flags}` | {_seeds(row['runs'])} | "
                     f"{row['mean']:.2f} | {row['against']} | {_delta(row['diff'], row['runs'])} | "
                     f"{row['decision']} | {worth} |")
    runs_all = [r for by_epochs in curves.values() for rs in by_epochs.values() for r in rs] + \
        [r for variant, by_config in technique_means(tuning).items() for config in by_config
         for r in tuning[(variant, config, 20)]]
    lines += ["", f"Validation accuracy (%) after the last epoch, 45,000 training images, 5,000 "
                  f"held out; {'; '.join(sorted({compare.threads(r['hardware']) + ', ' + r['precision'] for r in runs_all}))}; "
                  f"runs dated {min(r['date'][:10] for r in runs_all)} to "
                  f"{max(r['date'][:10] for r in runs_all)}. \"Recipe v1 needs\": the epochs "
                  f"at which recipe v1 reaches the change's mean, read off the first table "
                  f"(linear in log2 epochs). Each seed is paired with the reference's run of "
                  f"that seed, its re-run in the same arithmetic where one exists "
                  f"([below](#learning-per-epoch): results/arithmetic/)."]
    return "\n".join(lines)


def on_lever_base(groups):
    """The groups of `groups` ({(variant, configuration, epochs): runs}) that are recipe v3
    or a change on top of it: the lever study's share of the learning-per-epoch study's runs."""
    return {key: runs for key, runs in groups.items()
            if key[1] == tune.LEVER_BASE or key[1].startswith(f"{tune.LEVER_BASE}+")}


def lever_rows(levers):
    """Each lever of the lever study (results/levers-h200/) against recipe v3 run in the
    same folder, same variant and seeds, or a stack of levers against the one it stacks on
    (greedy_reference): technique_rows()' keys, by variant, largest gain first, and
    "over_base", its paired difference with recipe v3 (the bar's)."""
    rows = []
    for (variant, config, epochs), runs in levers.items():
        if config == tune.LEVER_BASE or epochs != 20 or (variant, tune.LEVER_BASE, 20) not in levers:
            continue
        reference = greedy_reference(levers, variant, config, tune.LEVER_BASE)
        diff = compare.paired_difference(runs, levers[(variant, reference, 20)])
        bar = bar_base(levers, variant, config)
        rows.append({"variant": variant, "config": config, "runs": runs,
                     "mean": statistics.mean(compare.accuracies(runs)),
                     "against": tune.LEVER_BASE_LABEL if reference == tune.LEVER_BASE else
                     lever_name(reference), "diff": diff, "decision": decision(diff),
                     "over_base": diff if reference == bar else
                     compare.paired_difference(runs, levers[(variant, bar, 20)]),
                     "adopted": False})
    # unpaired rows (no shared seed: no mean) after the paired ones
    return sorted(rows, key=lambda r: (tuple(REGISTRY).index(r["variant"]),
                                       r["diff"]["mean"] is None, -(r["diff"]["mean"] or 0)))


def bar_base(levers, variant, config):
    """What a lever must beat by the bar: recipe v3, or for a round-2 lever (on top of the
    adopted pad2+silu) recipe v4, where its runs exist."""
    round2 = config.startswith(f"{tune.ROUND2_BASE}+")
    return tune.ROUND2_BASE if round2 and (variant, tune.ROUND2_BASE, 20) in levers \
        else tune.LEVER_BASE


def lever_name(config):
    """"silu" for "muon+sep+silu": a lever by what it adds to recipe v3."""
    return config.removeprefix(f"{tune.LEVER_BASE}+")


def clears_gain(diff):
    """Whether a paired difference meets the lever study's bar: mean at least LEVER_GAIN and
    its 95% interval above zero."""
    return diff["low"] is not None and diff["low"] > 0 and diff["mean"] >= LEVER_GAIN


def levers_section(levers, grid="levers"):
    """The lever study's table: recipe v3, then each lever on it, paired by seed; a line
    per variant saying whether any lever (a stack: over recipe v3) clears +LEVER_GAIN with
    its interval above zero. `grid`: lab/tune.py's grid that runs them."""
    if not any(lever_rows(levers)):
        return f"No lever runs yet: `python -m lab.tune --grid {grid}`."
    lines = [f"| variant | lever on {tune.LEVER_BASE_LABEL} | flags | params | seeds | val. acc. mean "
             "(min–max) | compared with | Δ per seed (paired) | mean paired Δ [95% CI] | verdict | "
             f"+{LEVER_GAIN} over {tune.LEVER_BASE_LABEL}, interval above 0 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows, verdicts = lever_rows(levers), []
    for variant in REGISTRY:
        base = levers.get((variant, tune.LEVER_BASE, 20))
        if not base:
            continue
        accs = compare.accuracies(base)
        lines.append(f"| {variant} | ({tune.LEVER_BASE_LABEL}) | `{' '.join(tune.change_flags(tune.LEVER_BASE))}` "
                     f"| {base[0]['num_params']:,} | {_seeds(base)} | {statistics.mean(accs):.2f} "
                     f"({min(accs):.2f}–{max(accs):.2f}) | - | - | - | - | - |")
        mine = [r for r in rows if r["variant"] == variant]
        for row in mine:
            accs = compare.accuracies(row["runs"])
            flags = " ".join(tune.change_flags(row["config"])[len(tune.change_flags(tune.LEVER_BASE)):])
            lines.append(
                f"| {variant} | {lever_name(row['config'])} | `{flags}` | "
                f"{row['runs'][0]['num_params']:,} | {_seeds(row['runs'])} | "
                f"{row['mean']:.2f} ({min(accs):.2f}–{max(accs):.2f}) | {row['against']} | "
                f"{', '.join(f'{d:+.2f}' for d in row['diff']['diffs']) or '-'} | "
                f"{_delta(row['diff'], row['runs'])} | {row['decision']} | "
                f"{'yes' if clears_gain(row['over_base']) else 'no'}"
                f"{'' if row['over_base'] is row['diff'] else ' (' + _delta(row['over_base']) + ')'} |")
        paired = [r for r in mine if r["over_base"]["low"] is not None]
        if paired:
            best = max(paired, key=lambda r: r["over_base"]["mean"])
            above = [f"{lever_name(r['config'])} ({_delta(r['over_base'])})" for r in paired
                     if r["over_base"]["low"] > 0]
            met = [r for r in paired if clears_gain(r["over_base"])]
            verdicts.append(
                f"{REGISTRY[variant].title}: "
                + (f"met by {', '.join(lever_name(r['config']) for r in met)}"
                   if met else f"missed: no lever gains +{LEVER_GAIN} with its interval above "
                               f"zero; the largest mean gain over {tune.LEVER_BASE_LABEL} is {lever_name(best['config'])}, "
                               f"{_delta(best['over_base'])}")
                + (f"; interval above zero: {', '.join(above)}" if above else
                   "; no interval lies above zero") + ".")
    every = [r for runs in levers.values() for r in runs]
    images = lambda key: "/".join(sorted({f"{r['data'][key]:,}" for r in every}))  # noqa: E731
    hardware = sorted({f"{r['hardware'].get('gpu') or compare.threads(r['hardware'])}, "
                       f"{r['precision']}" for r in every})
    dates = sorted(r["date"][:10] for r in every)
    lines += ["", f"{len(every)} runs of 20 epochs, each trained on "
                  f"{images('train_images')} training images and scored on the "
                  f"{images('test_images')} held-out "
                  f"validation images (never the test set), data {', '.join(sorted({compare.data_file(r) for r in every}))}; "
                  f"single-view validation accuracy (%) after the last epoch; "
                  f"{'; '.join(hardware)}; {' to '.join(sorted({dates[0], dates[-1]}))}. Each "
                  f"lever is paired with the run of the same seed of what it is compared with "
                  f"({tune.LEVER_BASE_LABEL}, or the winning lever a stack builds on), the bar's "
                  f"column with {tune.LEVER_BASE_LABEL} (a round-2 lever's, on top of "
                  f"{lever_name(tune.ROUND2_BASE)}, with recipe v4), in the same "
                  f"folder (same initialization, data order and arithmetic); verdicts as in "
                  f"the learning-per-epoch study (4 paired seeds, then 8).",
              "", f"The bar (+{LEVER_GAIN} points with the interval above zero), per variant:",
              "", *[f"- {v}" for v in verdicts]]
    return "\n".join(lines)


def lever_summary_section(gpu_levers, cpu_levers):
    """The front page's view of the lever study: every lever measured on recipe v3, per
    variant its mean paired difference from recipe v3 with the 95% interval, one row per lever
    and arithmetic (the GPU screen's runs pair only with each other, the CPU's likewise); bold
    where it clears the bar (+LEVER_GAIN, interval above zero)."""
    cells = {}  # (lever, where) -> {variant: row}
    for groups in (cpu_levers, gpu_levers):
        for row in lever_rows(groups):
            first = row["runs"][0]
            where = f"{first['hardware'].get('gpu') or 'CPU'}, {first['precision']}"
            cells.setdefault((lever_name(row["config"]), where), {})[row["variant"]] = row
    if not cells:
        return "No lever runs yet: `python -m lab.tune --grid levers` or `--grid levers-cpu`."

    def cell(row):
        if row is None:
            return "not run"
        text = f"{_delta(row['over_base'])} ({len(row['over_base']['seeds'])})"
        return f"**{text}**" if clears_gain(row["over_base"]) else text

    variants = [v for v in REGISTRY if any(v in by_variant for by_variant in cells.values())]
    best = lambda key: max(r["over_base"]["mean"] if r["over_base"]["mean"] is not None  # noqa: E731
                           else float("-inf") for r in cells[key].values())
    lines = [f"| lever on {tune.LEVER_BASE_LABEL} | flags | runs on | "
             + " | ".join(REGISTRY[v].title for v in variants) + " |",
             "|---|---|---|" + "---|" * len(variants)]
    base_flags = len(tune.change_flags(tune.LEVER_BASE))
    for key in sorted(cells, key=lambda k: (-best(k), k)):
        flags = " ".join(tune.change_flags(f"{tune.LEVER_BASE}+{key[0]}")[base_flags:])
        lines.append(f"| {key[0]} | `{flags}` | {key[1]} | "
                     + " | ".join(cell(cells[key].get(v)) for v in variants) + " |")
    return "\n".join(lines + [
        "", f"Validation split, 20 epochs: each cell is the lever's mean paired difference from "
            f"{tune.LEVER_BASE_LABEL} run in the same arithmetic, in points, with its 95% interval "
            f"and (the number of paired seeds), a round-2 lever's (on top of "
            f"{lever_name(tune.ROUND2_BASE)}) from recipe v4; bold: +{LEVER_GAIN} with the "
            f"interval above zero; each lever's runs, verdict and greedy step in the tables "
            f"below."])


def recipe_choice_section(levers):
    """One recipe for all three variants or one per variant (issue 52): each change measured on
    more than one variant, by variant, its validation mean and paired gain over recipe v3,
    and the variants on which it clears the bar; a change joins one recipe for all only if it
    clears the bar on every variant, else the README shows both comparisons."""
    rows = {(r["variant"], r["config"]): r for r in lever_rows(levers)}
    variants = [v for v in REGISTRY if (v, tune.LEVER_BASE, 20) in levers]
    shared = [c for c in dict.fromkeys(config for _, config in rows)
              if sum((v, c) in rows for v in variants) > 1]
    if not shared:
        return "No change measured on more than one variant yet."
    lines = [f"| {tune.LEVER_BASE_LABEL} + | " + " | ".join(REGISTRY[v].title for v in variants)
             + f" | +{LEVER_GAIN} with its interval above 0 on |",
             "|---|" + "---|" * len(variants) + "---|",
             "| (nothing) | " + " | ".join(
                 f"{statistics.mean(compare.accuracies(levers[(v, tune.LEVER_BASE, 20)])):.2f} "
                 f"({len(levers[(v, tune.LEVER_BASE, 20)])} seeds)" for v in variants) + " | - |"]
    for config in sorted(shared, key=lambda c: (-sum((v, c) in rows for v in variants), c)):
        mine = [rows.get((v, config)) for v in variants]
        cells = ["not run" if r is None else
                 f"{r['mean']:.2f}: {_delta(r['over_base'])} ({len(r['runs'])} seeds)"
                 for r in mine]
        met = [REGISTRY[v].title for v, r in zip(variants, mine)
               if r is not None and clears_gain(r["over_base"])]
        lines.append(f"| {lever_name(config)} | {' | '.join(cells)} | "
                     f"{'every variant' if len(met) == len(variants) else ', '.join(met) or 'none'} |")
    return "\n".join(lines + [
        "", "Validation accuracy (%) after 20 epochs, the runs of the table above; each cell: "
            f"the change's mean, then its mean paired difference from {tune.LEVER_BASE_LABEL} with the "
            f"95% interval (seeds shared with {tune.LEVER_BASE_LABEL})."])


FINAL_SEEDS = (0, 1, 2, 3, 4)  # issue 52: five seeds per variant in every recipe's final runs


def seed_phrase(seeds):
    """"seeds 0 to 2", "seeds 0 and 1", "seed 3", "seeds 0, 2 and 4": seeds for prose."""
    seeds = sorted(seeds)
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]} to {seeds[-1]}"
    return f"seeds {', '.join(map(str, seeds[:-1]))} and {seeds[-1]}"


def _spread(values):
    """"1.69 to 2.47": the range of `values`, for prose."""
    return f"{min(values):.2f} to {max(values):.2f}"


def _mean_std(runs):
    """"85.11 ± 0.38%": the mean test accuracy of `runs` with its sample std."""
    accs = compare.accuracies(runs)
    return f"{compare.mean_std(accs)}%" + (" (1 seed)" if len(accs) == 1 else "")


def missing_finals(runs):
    """{variant: the FINAL_SEEDS it has no run of} over every course variant."""
    return {v: [s for s in FINAL_SEEDS if s not in {r["seed"] for r in runs.get(v, [])}]
            for v in course_variants()}


def _previous_recipe(archives):
    """(label, runs) of the recipe before today's: the newest archive."""
    label, _, previous = archives[-1] if archives else ("the previous recipe", None, {})
    return label, previous


def _capitalized(label):
    """"Recipe v3" from "recipe v3": a label at the start of a sentence."""
    return label[:1].upper() + label[1:]


def leader(runs):
    """(best, others, ahead, diff) of `runs` ({variant: runs}): the variant with the best mean,
    the others, whether every run of the best lies above every run of the others, and the
    others' paired difference (compare.paired_difference) where there are two; None with fewer
    than two variants."""
    variants = [v for v in course_variants() if runs.get(v)]
    if len(variants) < 2:
        return None
    best = max(variants, key=lambda v: statistics.mean(compare.accuracies(runs[v])))
    others = [v for v in variants if v != best]
    ahead = min(compare.accuracies(runs[best])) > max(a for v in others for a in compare.accuracies(runs[v]))
    diff = compare.paired_difference(runs[others[0]], runs[others[1]]) if len(others) == 2 else None
    return best, others, ahead, diff


def leader_sentence(runs, previous, label):
    """"In today's recipe every BatchNorm run is above every LayerNorm and GroupNorm run, as in
    recipe v3; LayerNorm − GroupNorm, paired by seed: ..., not separated (recipe v3: ...)" and the like."""
    now, before = leader(runs), leader(previous)
    if now is None:
        return ""
    best, others, ahead, diff = now
    names = " and ".join(REGISTRY[v].title for v in others)
    sentence = (f"In today's recipe every {REGISTRY[best].title} run is above every {names} run"
                if ahead else f"In today's recipe {REGISTRY[best].title} leads in the mean, "
                              f"but not every run is above every {names} run")
    if before and before[:3] == now[:3]:
        sentence += f", as in {label}"

    def apart(d):
        return f"{_delta(d)}, {'separated' if d['low'] > 0 or d['high'] < 0 else 'not separated'}"
    if diff and diff["low"] is not None:
        sentence += (f"; {REGISTRY[others[0]].title} − {REGISTRY[others[1]].title}, paired by "
                     f"seed: {apart(diff)}")
        if before and before[1] == others and before[3]["low"] is not None:
            sentence += f" ({label}: {apart(before[3])})"
    return sentence + "."


def finals_section(runs, archives, levers, per_seed=False):
    """Today's recipe's final runs in words, every number from the results files: whether all
    FINAL_SEEDS have run, each variant's paired difference from the previous recipe's runs of
    the same seeds (archives[-1]) on the test set beside the adopted lever's on the validation
    split (`levers`: the lever study's CPU runs), train accuracy and the train-test gap, the
    next targets and which variant leads. `per_seed`: docs/results.md's version, each seed's
    accuracy and difference listed."""
    variants = [v for v in course_variants() if runs.get(v)]
    if not variants:
        return ("No final runs of today's recipe yet: `python -m lab.sweep --norms batch layer "
                f"group --seeds {' '.join(map(str, FINAL_SEEDS))} --out-dir results`.")
    label, previous = _previous_recipe(archives)
    title = {v: REGISTRY[v].title for v in variants}
    by_seed = {v: sorted(runs[v], key=lambda r: r["seed"]) for v in variants}
    missing = missing_finals(runs)
    complete = not any(missing.values())
    adopted = {r["variant"]: r["over_base"] for r in lever_rows(levers)
               if r["config"] == f"{tune.LEVER_BASE}+{tune.ADOPTED_LEVER}"}
    tested = {v: compare.paired_difference(by_seed[v], previous.get(v, [])) for v in variants}
    parts = []

    if adopted and not per_seed:
        gains = compare.listed(f"{_delta(adopted[v])} ({title[v]})" for v in variants if v in adopted)
        bar = f", each clearing the bar of +{LEVER_GAIN}" if all(map(clears_gain, adopted.values())) else ""
        parts.append(f"The lever study chose it on the validation split before any of these "
                     f"test-set runs existed: {gains} points over {tune.LEVER_BASE_LABEL}, with "
                     f"their paired 95% intervals{bar}.")
    done = sum(map(len, by_seed.values()))
    if complete:
        parts.append(f"Its final runs are complete: {done} runs, {seed_phrase(FINAL_SEEDS)} of "
                     f"every variant.")
    else:
        have = "; ".join(f"{title[v]} {seed_phrase([r['seed'] for r in by_seed[v]])}" for v in variants)
        rest = "; ".join(f"{REGISTRY[v].title} {seed_phrase(s)}" for v, s in missing.items() if s)
        parts.append(f"**Its final runs are not complete**: {done} of "
                     f"{len(FINAL_SEEDS) * len(course_variants())} have run ({have}); the rest "
                     f"({rest}) run next, and until then the intervals are wide and the verdicts "
                     f"provisional.")

    if per_seed:
        hardware = sorted({f"{compare.threads(r['hardware'])}, {recorded_precision(r)}"
                           for rs in by_seed.values() for r in rs})
        listed = []
        for v in variants:
            paired_by_seed = dict(zip(tested[v]["seeds"], tested[v]["diffs"]))
            diffs = [f"{paired_by_seed[r['seed']]:+.2f}" if r["seed"] in paired_by_seed else "-"
                     for r in by_seed[v]]
            listed.append(f"{title[v]} {', '.join(f'{a:.2f}' for a in compare.accuracies(by_seed[v]))}% "
                          f"({', '.join(diffs)})")
        parts.append(f"On the test set ({'; '.join(hardware)}), seed by seed, each with its "
                     f"difference from {label}'s run of the same seed: {'; '.join(listed)}.")

    paired = [v for v in variants if tested[v]["mean"] is not None]
    if paired:
        diffs = compare.listed(f"{_delta(tested[v])} ({title[v]}, {len(tested[v]['seeds'])} seeds)"
                        for v in paired)
        validation = compare.listed(f"{adopted[v]['mean']:+.2f}" for v in paired if v in adopted)
        above = [title[v] for v in paired if tested[v]["low"] is not None and tested[v]["low"] > 0]
        if above:
            verdict = f"the interval lies above zero for {compare.listed(above)}"
        elif complete:
            verdict = ("no interval lies above zero: the test set does not confirm the gain at "
                       "95%; the decision stays the validation split's, as the protocol takes it")
        else:
            verdict = "no interval lies above zero so far"
        parts.append(f"Against {label}'s runs of the same seeds, the mean paired difference on "
                     f"the test set is {diffs} points"
                     f"{f' (validation: {validation})' if validation else ''}; {verdict}.")
        rise = [_train_acc(r) - _train_acc(b) for v in paired for r in by_seed[v]
                for b in previous[v] if b["seed"] == r["seed"]]
        moved = (f"rose by {_spread(rise)} points on every paired run" if min(rise) > 0 else
                 f"moved by {min(rise):+.2f} to {max(rise):+.2f} points")
        gaps = [_train_acc(r) - 100 * r["final_test_acc"] for v in variants for r in by_seed[v]]
        old_gaps = [_train_acc(r) - 100 * r["final_test_acc"] for v in variants
                    for r in previous.get(v, [])]
        parts.append(f"Train accuracy, on the augmented batches, {moved}, and ends "
                     f"{_spread(gaps)} points above test accuracy ({label}: {_spread(old_gaps)}).")

    if not per_seed:
        nexts = [v for v in variants if REGISTRY[v].next_target is not None]
        short = [v for v in nexts if statistics.mean(compare.accuracies(by_seed[v])) < REGISTRY[v].next_target]
        if short:
            misses = compare.listed(f"{REGISTRY[v].next_target - statistics.mean(compare.accuracies(by_seed[v])):.2f} "
                             f"({title[v]})" for v in short)
            uppers = {v: compare.t_interval(compare.accuracies(by_seed[v]))[1] for v in short}
            uppers = {v: u for v, u in uppers.items() if u is not None}
            reach = [title[v] for v, u in uppers.items() if u >= REGISTRY[v].next_target]
            ends = (f"; the upper ends of their 95% intervals "
                    f"({compare.listed(f'{title[v]} {u:.2f}' for v, u in uppers.items())}) "
                    f"{'reach the target for ' + compare.listed(reach) if reach else 'fall short too'}"
                    if uppers else "")
            parts.append(f"The next targets ({' / '.join(f'{REGISTRY[v].next_target:.0f}' for v in nexts)}) "
                         f"are missed{'' if complete else ' so far'} by {misses} points in the "
                         f"mean{ends}.")
        if previous:
            finals = compare.listed(f"{title[v]} {_mean_std(previous[v])}" for v in variants if previous.get(v))
            sizes = "/".join(sorted({str(len(rs)) for rs in previous.values()}))
            parts.append(f"{_capitalized(label)}'s final runs: {finals} ({sizes} seeds "
                         f"each).")
        parts.append(leader_sentence(by_seed, previous, label))
    return " ".join(p for p in parts if p)


def finals_answer(runs, archives):
    """docs/results.md's answer: each variant's mean test accuracy with its 95% interval against
    the target and the next one, how many of the final runs have run, the previous recipe's
    final means, and which variant leads."""
    variants = [v for v in course_variants() if runs.get(v)]
    if not variants:
        return "**Answer:** no final runs of today's recipe yet."
    label, previous = _previous_recipe(archives)
    scores = []
    for v in variants:
        accs = compare.accuracies(runs[v])
        low, high = compare.t_interval(accs)
        interval = "one seed" if low is None else f"95% interval [{low:.2f}, {high:.2f}]"
        verdicts = "; ".join(target_verdict(accs, t).replace("; ", ", ") for t in
                             (REGISTRY[v].target, REGISTRY[v].next_target) if t is not None)
        scores.append(f"{REGISTRY[v].title} {_mean_std(runs[v])} ({interval}; {verdicts})")
    done, planned = sum(len(runs[v]) for v in variants), len(FINAL_SEEDS) * len(course_variants())
    status = (f"{len(FINAL_SEEDS)} seeds each" if not any(missing_finals(runs).values()) else
              f"{done} of its {planned} final runs so far")
    before = compare.listed(f"{REGISTRY[v].title} {_mean_std(previous[v])}" for v in variants
                     if previous.get(v))
    return (f"**Answer:** on the JPEG copy's test set, today's recipe ({status}) scores "
            f"{compare.listed(scores)}." + (f" {_capitalized(label)}'s final runs: {before}."
                                     if before else "")
            + f" {leader_sentence(runs, previous, label)}").rstrip()


def arithmetic_section(tuning, reruns):
    """A baseline arm re-run, same seeds, in the arithmetic its changes ran in (results/
    arithmetic/): how far the arithmetic alone moves it, then each single change on it paired
    with the re-run of its seed where the two share arithmetic, beside its usual comparison."""
    if not reruns:
        return "No re-runs yet (results/arithmetic/ is empty)."
    lines = ["| variant | arm | seeds | first run: arithmetic, val. acc. | re-run: arithmetic, "
             "val. acc. | Δ per seed (re-run − first) | mean Δ [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    changes = ["", "| variant | change (20 epochs) | seeds | Δ against the first runs [95% CI] "
                   "| Δ against the re-runs, same arithmetic [95% CI] | verdict |",
               "|---|---|---|---|---|---|"]
    for (variant, arm, epochs), again in sorted(reruns.items()):
        first = tuning.get((variant, arm, epochs), [])
        diff = compare.paired_difference(again, first)
        seeds = set(diff["seeds"])
        if not seeds:
            continue
        kinds = lambda runs: "; ".join(sorted({compare.arithmetic(r) for r in runs  # noqa: E731
                                               if r["seed"] in seeds}))
        mean = lambda runs: statistics.mean(100 * r["final_test_acc"] for r in runs  # noqa: E731
                                            if r["seed"] in seeds)
        lines.append(f"| {variant} | {arm} | {', '.join(map(str, sorted(seeds)))} | "
                     f"{kinds(first)}, {mean(first):.2f} | {kinds(again)}, {mean(again):.2f} | "
                     f"{', '.join(f'{d:+.2f}' for d in diff['diffs'])} | {_delta(diff)} |")
        by_seed = {r["seed"]: compare.arithmetic(r) for r in again}
        arm_parts = arm.split("+")
        for (v, config, e), runs in sorted(tuning.items()):
            parts = config.split("+")
            # one change on top of the arm; longer stacks are judged against their own reference
            if v != variant or e != epochs or not (set(arm_parts) < set(parts)
                                                   and len(parts) == len(arm_parts) + 1):
                continue
            alike = [r for r in runs if by_seed.get(r["seed"]) == compare.arithmetic(r)]
            if not alike:
                continue
            against = compare.paired_difference(alike, again)
            changes.append(f"| {variant} | {config} | "
                           f"{', '.join(map(str, against['seeds']))} | "
                           f"{_delta(compare.paired_difference(alike, first))} | "
                           f"{_delta(against)} | {decision(against)} |")
    every = [r for rs in reruns.values() for r in rs]
    dates = [r["date"][:10] for r in every]
    return "\n".join(lines + (changes if len(changes) > 3 else []) + [
        "", f"Validation accuracy (%) after the last epoch, 45,000 training images, 5,000 held "
            f"out; the re-runs: {'; '.join(sorted({compare.threads(r['hardware']) for r in every}))}"
            f", {' to '.join(sorted({min(dates), max(dates)}))}. "
            f"A change's seeds count only where it ran in the same arithmetic as the re-run."])


def _seeds(runs):
    """"0, 1, 2": the seeds of `runs`, in order, for a table cell."""
    return ", ".join(str(seed) for seed in sorted(r["seed"] for r in runs))


def _delta(diff, runs=None):
    """"+0.42 [-0.10, +0.94]": a paired difference's mean and 95% interval, "-" without pairs;
    "(seeds 0, 1, 2, 3)" after it where `runs` has seeds the reference lacks."""
    if diff["mean"] is None:
        return "-"
    interval = "" if diff["low"] is None else f" [{diff['low']:+.2f}, {diff['high']:+.2f}]"
    cell = f"{diff['mean']:+.2f}{interval}"
    if runs is not None and diff["seeds"] != sorted(r["seed"] for r in runs):
        cell += f" (seeds {', '.join(map(str, diff['seeds']))})"
    return cell


def replace_between(text, start, end, body):
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the {start} / {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


# The README's generated sections, in README order: (marker, renderer of the loaded files).
SECTIONS = [
    ("front-run-time", lambda f: front_page.run_time(f["runs"], gpu_archives(f["gpu_checks"]))),
    ("front-results", lambda f: front_page.results_table(f["runs"])),
    ("front-batch-size", lambda f: front_page.batch_size_sentence(f["study"], f["budget"])),
    ("front-notice", lambda f: front_page.notice(f["runs"])),
    ("summary", lambda f: summary_table(f["runs"])),
    ("finals", lambda f: finals_section(f["runs"], f["archives"], on_lever_base(f["tuning"]))),
    ("results", lambda f: table(f["runs"], f["archives"], gpu_archives(f["gpu_checks"]))),
    ("finals-answer", lambda f: finals_answer(f["runs"], f["archives"])),
    ("finals-per-seed", lambda f: finals_section(f["runs"], f["archives"], on_lever_base(f["tuning"]), per_seed=True)),
    ("batch-size", lambda f: study_section(f["study"], f["budget"], f["runs"])),
    ("precision", lambda f: precision_section(f["checks"], f["runs"], f["archives"])),
    ("tuning", lambda f: tuning_section(f["tuning"])),
    ("per-epoch", lambda f: per_epoch_section(f["tuning"], f["ceiling"], f["arithmetic"])),
    ("arithmetic", lambda f: arithmetic_section(f["tuning"], f["arithmetic"])),
    ("levers", lambda f: levers_section(f["levers"])),
    ("levers-cpu", lambda f: levers_section(on_lever_base(f["tuning"]), "levers-cpu")),
    ("recipe-choice", lambda f: recipe_choice_section(on_lever_base(f["tuning"]))),
    ("levers-summary", lambda f: lever_summary_section(f["levers"], on_lever_base(f["tuning"]))),
    ("speed", lambda f: speed_section(f["bench_files"])),
    ("gpu-check", lambda f: gpu_section(f["gpu_checks"])),
    ("lr-study", lambda f: lr_section(f["lr_study"])),
    ("norm-statistics", lambda f: norm_statistics_section(f["runs"])),
]


def render_readme(readme_text, files):
    """A page's text (README.md or docs/*.md) with each generated section rebuilt from `files`
    (load_files(): what each renderer reads; one left out renders as empty), where the page
    has its markers."""
    files = {"runs": {}, "archives": [], "study": {}, "budget": None, "checks": [],
             "bench_files": [], "tuning": {}, "ceiling": {}, "arithmetic": {}, "lr_study": {},
             "levers": {},
             "gpu_checks": [],
             **files}
    text = readme_text
    for name, render in SECTIONS:
        start, end = markers(name)
        if start in text:
            text = replace_between(text, start, end, render(files))
    return text


def lr_section(study):
    runs = lr_study.lr_runs(study)
    if not runs:
        return "No learning-rate study results yet (results/lr_study/ is empty)."
    shared = lambda key: "/".join(sorted({str(key(r)) for r in runs}))
    scored = shared(lambda r: r["data"]["test_images"])
    evaluated = lr_study.eval_set(study)
    scored_on = (f"the {scored} validation images held out of the training set (never trained "
                 f"on; the test set is not used)" if evaluated == "validation"
                 else f"all {scored} test images")
    changes = sorted({compare.recipe_changes(r, ignore=("epochs", "lr")) for r in runs})
    otherwise = f"the recipe otherwise {against_today(changes)}"
    return (f"{lr_study.lr_table(study)}\n\n{len(runs)} runs of {shared(lambda r: r['epochs'])} "
            f"epochs on {shared(lambda r: r['data']['train_images'])} training images (a "
            f"stratified subset, drawn per seed), scored on {scored_on}, batch "
            f"{shared(lambda r: r['train_config']['batch_size'])}, {otherwise}; "
            f"{'; '.join(sorted({compare.threads(r['hardware']) for r in runs}))}, "
            f"{shared(lambda r: r['precision'])}; data {shared(compare.data_file)}; "
            f"{min(r['date'][:10] for r in runs)} to {max(r['date'][:10] for r in runs)}. "
            f"Final single-view {evaluated} accuracy (%); a rate counts within "
            f"the window only if no "
            f"seed diverged there.")


def norm_statistics_section(runs):
    measured = compare.norm_statistics_runs(runs)
    if not measured:
        return "No results file holds the statistics yet (runs from before norm_stats.py)."
    table = norm_stats.statistics_table({v: r["norm_statistics"] for v, r in measured.items()})
    sources = "; ".join(f"{v}: seed {r['seed']}, {compare.threads(r['hardware'])}, {r['precision']}, "
                        f"{r['date'][:10]}" for v, r in measured.items())
    return (f"{table}\n\nStd of each set's activations, lowest to highest over the sets and the "
            f"layers, on {next(iter(measured.values()))['norm_statistics']['images']} test "
            f"images (25 per class) in evaluation mode. Runs: {sources}.")


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
        lines = [f"**{gpu}**, torch {hw['torch']}, {summary['date']}; data "
                 f"{summary['data']}; check wall time {summary['wall_s']:.0f} s.", "",
                 "| run | how it ran | precision | CUDA graphs | test acc. (%) | epoch time, "
                 "all epochs (s) | first epoch (s) | median epoch (s) |",
                 "|---|---|---|---|---|---|---|---|"]
        bn = []
        for kind, how in (("train", "train.py, alone on the GPU"),
                          ("notebooks", "notebook, beside the other notebooks and the tests")):
            for run in runs.get(kind, []):
                total, first, median = _epoch_times(run)
                graphs = "on" if run["train_config"].get("cuda_graphs") else "off"
                lines.append(f"| {run['variant']} seed {run['seed']}, {run['epochs']} epochs | "
                             f"{how} | {run['precision']} | {graphs} | "
                             f"{100 * run['final_test_acc']:.2f} | {total:.1f} | {first:.1f} | "
                             f"{median:.2f} |")
                if kind == "train" and run["variant"] == DEFAULT and run["epochs"] == 20:
                    bn.append((total, run["precision"], graphs))
        statuses = "; ".join(f"{s['step']}: {s['status']}" for s in summary["steps"])
        lines += ["", f"Steps: {statuses}."]
        if bn:
            total, precision, graphs = min(bn)
            verdict = "met" if total <= 30 else f"missed by {total - 30:.1f} s"
            lines += ["", f"Target for a 20-epoch BatchNorm run of today's recipe: at most 30 s of "
                          f"epoch time (stretch: 10 s). Fastest measured: {total:.1f} s "
                          f"({precision}, CUDA graphs {graphs}): {verdict}."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def load_archives(results_dir=ROOT / "results"):
    """[(label, folder, {variant: runs})] of the ARCHIVES that exist, oldest first."""
    return [(label, folder, load_runs(results_dir / folder)) for folder, label in ARCHIVES
            if (results_dir / folder).is_dir()]


def load_files():
    """Every committed results file the README's sections are generated from."""
    return {"runs": load_runs(), "study": load_study(), "budget": study_budget(),
            "checks": load_precision_checks(), "bench_files": bench_files(),
            "tuning": load_tuning(), "ceiling": load_tuning(CEILING_DIR),
            "arithmetic": load_tuning(compare.ARITHMETIC_DIR), "levers": load_tuning(LEVERS_DIR),
            "archives": load_archives(), "gpu_checks": load_gpu_checks(),
            "lr_study": lr_study.load_lr_study()}


def render_current(text, files=None):
    """README text with every generated section rebuilt from the committed files."""
    return render_readme(text, load_files() if files is None else files)


def write_figures(runs, study, lr_study, tuning=None, ceiling=None, arithmetic=None,
                  levers=None):
    import matplotlib
    matplotlib.use("Agg")  # files only; the notebooks draw the same figures inline

    if runs:
        compare.plot_variant_curves(runs, FIGURE)
        compare.plot_confusion_matrices(runs, CONFUSION_FIGURE)
    if study:
        compare.plot_batch_size_study(study, STUDY_FIGURE)
    normalizations.plot_norm_axes(AXES_FIGURE)
    curves = recipe_by_epochs(tuning or {}, ceiling or {})
    if any(len(by_epochs) > 1 for by_epochs in curves.values()):
        paired = {v: {c: acc for c, acc in by_config.items() if len(tuning[(v, c, 20)]) > 1}
                  for v, by_config in technique_means(tuning).items()}  # the table has the rest
        per_epoch.plot_equivalent_epochs(curves, paired, EPOCHS_FIGURE)
    rows = [r for r in technique_rows(tuning or {}, arithmetic) if r["diff"]["low"] is not None]
    if rows:
        per_epoch.plot_technique_forest(mark_adopted(rows), FOREST_FIGURE)
    rows = [{**r, "config": lever_name(r["config"])} for r in lever_rows(levers or {})
            if r["diff"]["low"] is not None]
    if rows:
        per_epoch.plot_technique_forest(rows, LEVER_FIGURE, title=(
            f"Each lever on {tune.LEVER_BASE_LABEL} at 20 epochs (GPU, paired seeds)\n"
            "filled: interval above zero (wins)"))
    if lr_study:
        lr_study.plot_lr_study(lr_study, LR_FIGURE)
    measured = compare.norm_statistics_runs(runs)
    if measured:
        norm_stats.plot_norm_statistics({v: r["norm_statistics"] for v, r in measured.items()},
                                        NORM_STATS_FIGURE)
        norm_stats.plot_layer_probe({v: r["history"] for v, r in measured.items()},
                                    next(iter(measured.values()))["norm_statistics"]["layers"],
                                    PROBE_FIGURE)


def execute_compare_notebook():
    """Run S8_Compare.ipynb in place and clean it as every committed notebook is cleaned."""
    notebook = ROOT / "S8_Compare.ipynb"
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                    "--inplace", "--ExecutePreprocessor.timeout=-1", str(notebook)],
                   cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "lab.make_notebooks", "--clean",
                    str(notebook)], cwd=ROOT, check=True)


def pages():
    """The pages whose generated sections this script writes: README.md and docs/*.md."""
    return [README, *sorted(DOCS.glob("*.md"))]


def render_pages(files):
    """{page: its text with every generated section rebuilt}; each section lives on one page."""
    rendered = {page: render_readme(page.read_text(), files) for page in pages()}
    for name, _ in SECTIONS:
        holders = [p.name for p in rendered if markers(name)[0] in p.read_text()]
        if len(holders) > 1:
            raise SystemExit(f"the {name} section's markers are on {', '.join(holders)}: "
                             f"keep them on one page")
    if not any(START in text for text in rendered.values()):
        raise SystemExit(f"no page holds the results table's markers {START} / {END}")
    return rendered


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="only check that README.md and docs/*.md are current")
    p.add_argument("--no-notebook", action="store_true",
                   help="skip re-executing S8_Compare.ipynb (tables and figures only)")
    args = p.parse_args()
    files = load_files()
    rendered = render_pages(files)
    stale = [page for page, text in rendered.items() if text != page.read_text()]
    if args.check:
        if stale:
            sys.exit(f"generated tables out of date in {', '.join(str(p.relative_to(ROOT)) for p in stale)}: "
                     f"run python -m lab.report")
        print(f"README.md and docs/*.md ({len(rendered) - 1} pages) are current")
        return
    for page in stale:
        page.write_text(rendered[page])
    write_figures(files["runs"], files["study"], files["lr_study"], files["tuning"],
                  files["ceiling"], files["arithmetic"], files["levers"])
    if not args.no_notebook:
        execute_compare_notebook()
    print(f"README.md tables rewritten from {sum(len(r) for r in files['runs'].values())} "
          f"results files and {files['budget']['runs'] if files['budget'] else 0} batch-size "
          f"study files")


if __name__ == "__main__":
    try:
        main()
    except ResultsFileError as err:
        sys.exit(f"error: {err}")
