"""Read the committed results files and compare the variants; no training.

Used by S8_Compare.ipynb and by lab/report/ (which writes README.md's tables and the PNGs in
images/ from the same functions, so the notebook and the README cannot disagree).

    results/<norm>_seed<seed>.json              20-epoch runs at batch 128 (the results table)
    results/batch_size/<norm>_bs<B>_seed<s>.json the batch-size study (shorter budget)
    results/lr_study/<norm>_lr<lr>_seed<s>.json   the learning-rate study (same budget)
"""

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from plots import finish_figure, integer_epochs
from results import ResultsFileError, load_results, run_name
from checkpoints import recipe, with_defaults
from variants import REGISTRY, in_order

from lab.levers import LabModelConfig, LabTrainConfig

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
STUDY_DIR = RESULTS_DIR / "batch_size"
LR_STUDY_DIR = RESULTS_DIR / "lr_study"
CEILING_DIR = RESULTS_DIR / "ceiling"  # recipe v1 beyond 20 epochs (validation split)
ARITHMETIC_DIR = RESULTS_DIR / "arithmetic"  # a baseline re-run in its changes' arithmetic
# the variant that keeps running statistics, evaluated with train-mode (batch) statistics too
RUNNING = next(name for name, v in REGISTRY.items() if v.running_stats)
BN_BATCH_STATS = f"{RUNNING} (batch stats)"


# ---------------------------------------------------------------------------------- loading

# The order a recipe's settings are listed in: the configurations' before the course/lab split,
# so that every label reads as it did; a setting added since comes after these
FIELD_ORDER = ("norm", "num_groups", "group_size", "widths", "activation", "num_classes",
               "identity_init", "weight_std", "weight_std_depthwise", "skips", "conv",
               "depthwise_kernel", "depthwise_dilation", "se_hidden", "epochs", "batch_size", "lr",
               "momentum", "weight_decay", "label_smoothing", "pct_start", "seed",
               "eval_batch_size", "ema_decay", "pad", "flip", "precision", "cuda_graphs",
               "whiten", "norm_bias_lr", "freeze_norm_scale", "alternate_flip", "optimizer",
               "muon_lr", "muon_depthwise", "depthwise_lr", "lookahead")


def recipe_changes(run, ignore=()):
    """How a run's recipe differs from today's defaults (ModelConfig, TrainConfig), as flags
    would say it ("lr 0.1; activation relu"), or "current": so a row of an earlier recipe says
    which one it was without anyone typing it. Fields in `ignore` are left out (a study's own
    variable)."""
    every = {**LabModelConfig(norm=run["variant"]).to_dict(), **recipe(LabTrainConfig())}
    defaults = {k: every[k] for k in (*FIELD_ORDER, *every) if k in every}
    model_config, train_config = with_defaults(run["model_config"], run["train_config"],
                                               LabModelConfig, LabTrainConfig)
    ran = {**model_config, **train_config}
    skip = {"seed", "precision", "compile", "norm", *ignore}
    changed = [f"{k} {_flag_value(ran[k])}" for k in defaults
               if k in ran and k not in skip and _flag_value(ran[k]) != _flag_value(defaults[k])]
    return "; ".join(changed) or "current"


def _flag_value(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def read_results(folder):
    """Every results file directly in `folder` (not its sub-folders), in file-name order."""
    return [load_results(path) for path in sorted(Path(folder).glob("*.json"))]


def data_file(run):
    """The file name of the data copy a run read ("cifar10-jpeg.tar.gz")."""
    return Path(run["data"]["source"].split(" ")[0]).name


# What every table of final runs reads from a results file
FINAL_FIELDS = ("variant", "seed", "epochs", "final_test_acc", "num_params", "history")


def final_run(path):
    """The run of a final results file (a 20-epoch run of the defaults on the test set, named
    <norm>_seed<seed>.json), or ResultsFileError naming the file and what to do: a file that
    does not belong to the finals (a subset, a validation run, other settings) never enters
    their tables."""
    run = load_results(path)
    missing = [k for k in FINAL_FIELDS if k not in run]
    if missing:
        raise ResultsFileError(f"results file {path} lacks {', '.join(missing)}: it is not a "
                               f"finished run's file; restore it or delete it")
    if run["variant"] not in REGISTRY:
        raise ResultsFileError(f"results file {path} is of an unknown variant "
                               f"{run['variant']!r} (known: {', '.join(REGISTRY)}); restore it "
                               f"or delete it")
    final = run_name(run["variant"], run["seed"])
    if Path(path).stem != final or run.get("eval_set", "test") != "test":
        raise ResultsFileError(f"{path} is not a final run (a final run of its variant and seed "
                               f"is {final}.json, scored on the test set): {Path(path).parent}/ "
                               f"holds only final runs; move it to runs/")
    return run


def load_runs(results_dir=RESULTS_DIR):
    """{variant: [run, ...]} of the final runs directly in `results_dir` (not its
    sub-studies); a file that is not one is refused by name (final_run)."""
    runs = defaultdict(list)
    for path in sorted(Path(results_dir).glob("*.json")):
        run = final_run(path)
        runs[run["variant"]].append(run)
    return {v: sorted(runs[v], key=lambda r: r["seed"])
            for v in in_order(runs)}


def norm_statistics_runs(runs):
    """{variant: its lowest-seed run that measured the statistics inside the network} (runs
    from before norm_stats.py have none, and a variant without such a run is left out)."""
    return {v: measured[0] for v, rs in runs.items()
            if (measured := [r for r in rs if r.get("norm_statistics")])}


def load_study(study_dir=STUDY_DIR):
    """The batch-size study as {variant: {batch_size: [final test accuracy (%), one per seed]}},
    with BatchNorm's accuracy under batch statistics as the extra variant BN_BATCH_STATS."""
    study = defaultdict(lambda: defaultdict(list))
    for run in read_results(study_dir):
        batch_size = run["train_config"]["batch_size"]
        study[run["variant"]][batch_size].append(100 * run["final_test_acc"])
        if run.get("final_test_acc_batch_stats") is not None:
            study[BN_BATCH_STATS][batch_size].append(100 * run["final_test_acc_batch_stats"])
    return {v: dict(sorted(by_batch.items())) for v, by_batch in study.items()}


def study_budget(study_dir=STUDY_DIR):
    """What every run of the study shares (epochs, images, lr rule inputs, hardware, dates)."""
    runs = read_results(study_dir)
    if not runs:
        return None
    return {"runs": len(runs),
            "epochs": sorted({r["epochs"] for r in runs}),
            "train_images": sorted({r["data"]["train_images"] for r in runs}),
            "test_images": sorted({r["data"]["test_images"] for r in runs}),
            "lr_by_batch": dict(sorted({r["train_config"]["batch_size"]: r["train_config"]["lr"]
                                        for r in runs}.items())),
            "seeds": sorted({r["seed"] for r in runs}),
            "hardware": sorted({r["hardware"].get("gpu") or threads(r["hardware"]) for r in runs}),
            "data": sorted({data_file(r) for r in runs}),
            # the recipe the study ran, but for what it varies (it may predate today's)
            "recipe": sorted({recipe_changes(r, ignore=("batch_size", "lr", "epochs"))
                              for r in runs}),
            "dates": (min(r["date"][:10] for r in runs), max(r["date"][:10] for r in runs))}


def arithmetic(run):
    """"AVX2, 1 thread, fp32": what decides a run's rounding beside its seed, the instruction set
    (or GPU), on a CPU the thread count (a reduction splits by thread), and the precision; two
    runs of one seed agree only where this agrees."""
    hardware = run["hardware"]
    if hardware.get("device") == "cuda" and hardware.get("gpu"):
        return f"{hardware['gpu']}, {run['precision']}"
    threads = hardware.get("cpu_threads")
    count = f", {threads} thread{'s' * (threads != 1)}" if threads else ""
    return f"{hardware.get('cpu_capability', hardware['cpu'])}{count}, {run['precision']}"


def threads(hardware):
    """"AMD EPYC (AVX512, native bf16), 2 threads": the CPU, what decides its speed where the
    results file recorded it (older files did not), and how many threads torch used; for a run
    on a GPU, the GPU ("NVIDIA H100 80GB HBM3 (CUDA, compute capability 9.0)"), which sets
    its speed, not the host's CPU threads."""
    if hardware.get("device") == "cuda" and hardware.get("gpu"):
        return f"{hardware['gpu']} (CUDA, compute capability {hardware['gpu_capability']})"
    cpu = hardware["cpu"]
    if "cpu_capability" in hardware:
        # the CPU's own bf16, which caps that exclude it hide from cpu_native_bf16
        native = hardware.get("cpu_native_bf16_uncapped", hardware.get("cpu_native_bf16"))
        bf16 = ", native bf16" if native else ""
        capped = " by ISA caps" if hardware.get("isa_caps") else ""
        cpu = f"{cpu} ({hardware['cpu_capability']}{capped}{bf16})"
    n = hardware.get("cpu_threads")
    return cpu if n is None else f"{cpu}, {n} thread{'s' * (n != 1)}"


# Two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}


def t_interval(values):
    """(low, high): the 95% t-interval of the mean of `values`; (None, None) with fewer than 2
    (beyond the table's degrees of freedom, its last quantile: a slightly wider interval)."""
    if len(values) < 2:
        return None, None
    mean = statistics.mean(values)
    half = T_975[min(len(values) - 1, max(T_975))] * statistics.stdev(values) / len(values) ** .5
    return mean - half, mean + half


def paired_difference(runs, base, key="final_test_acc"):
    """The per-seed differences of `runs` from `base` (same seed: same initialization and data
    order) in points: {"seeds", "diffs", "mean", "low", "high"}, low-high the 95% t-interval of
    the mean (None with fewer than 2 shared seeds)."""
    base_by_seed = {r["seed"]: 100 * r[key] for r in base}
    pairs = sorted((r["seed"], 100 * r[key] - base_by_seed[r["seed"]]) for r in runs
                   if r["seed"] in base_by_seed)
    diffs = [d for _, d in pairs]
    result = {"seeds": [s for s, _ in pairs], "diffs": diffs,
              "mean": statistics.mean(diffs) if diffs else None}
    result["low"], result["high"] = t_interval(diffs)
    return result


def alike_base(runs, *arms):
    """The baseline runs to pair `runs` with, one per seed: of the arms' runs of that seed (in
    the order given: first runs, then re-runs), the first in the same arithmetic as the change's
    run, else the first; a pair that shares arithmetic differs by the change alone."""
    chosen = []
    for run in runs:
        of_seed = [b for arm in arms for b in arm if b["seed"] == run["seed"]]
        if of_seed:
            chosen.append(next((b for b in of_seed if arithmetic(b) == arithmetic(run)),
                               of_seed[0]))
    return chosen


def verdict(paired, min_seeds=2):
    """A change wins when the 95% interval of its mean paired difference lies above zero, over
    at least `min_seeds` seeds (two equal differences give an interval of zero width)."""
    if paired["low"] is None or len(paired["diffs"]) < min_seeds:
        return f"needs {min_seeds} paired seeds ({len(paired['diffs'])} so far)"
    return "wins" if paired["low"] > 0 else "loses" if paired["high"] < 0 else "no decision"


def accuracies(runs, key="final_test_acc"):
    """Each run's accuracy `key` in %."""
    return [100 * r[key] for r in runs]


def listed(items):
    """"a, b and c"."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def markdown_table(header, rows, right=()):
    """The one builder of the pages' Markdown tables: `header` the column titles, `rows` each a
    list of cell texts; the columns numbered in `right` align to the right."""
    rule = "".join("---:|" if i in right else "---|" for i in range(len(header)))
    return "\n".join(["| " + " | ".join(header) + " |", "|" + rule,
                      *("| " + " | ".join(map(str, row)) + " |" for row in rows)])


def mean_std(values):
    """"85.11 ± 0.38": the mean of `values` with its sample std ("–" for none)."""
    if len(values) > 1:
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    return f"{values[0]:.2f}" if values else "–"


# ------------------------------------------------------------------------- batch-size study

def study_table(study):
    """Markdown: one row per batch size, mean ± std (%) over seeds for each variant."""
    if not study:
        return "(no batch-size study results yet)"
    columns = [v for v in (*tuple(REGISTRY), BN_BATCH_STATS) if v in study]
    names = {**{v: REGISTRY[v].short for v in tuple(REGISTRY)}, **_running_labels()}
    batch_sizes = sorted({b for v in columns for b in study[v]})
    rows = []
    for b in batch_sizes:
        counts = sorted({len(study[v][b]) for v in columns if study[v].get(b)})
        seeds = f"{counts[0]}–{counts[-1]}" if len(counts) > 1 else str(counts[0])
        rows.append([b, *(mean_std(study[v].get(b, [])) for v in columns), seeds])
    return markdown_table(["batch size", *(names[v] for v in columns), "seeds"], rows)


def _running_labels():
    """Table and legend labels of the running-statistics variant's two evaluations."""
    short = REGISTRY[RUNNING].short
    return {RUNNING: f"{short} (running stats)", BN_BATCH_STATS: f"{short} (batch stats)"}


def study_findings(study):
    """Plain sentences of the facts the README's conclusion rests on, computed from the files:
    BN's drop from the largest to the smallest batch, GN's and LN's, and where BN falls below."""
    means = {v: {b: statistics.mean(a) for b, a in by_batch.items() if a}
             for v, by_batch in study.items()}
    if RUNNING not in means or len(means[RUNNING]) < 2:
        return []
    small, large = min(means[RUNNING]), max(means[RUNNING])
    facts = []
    for v in [RUNNING] + [v for v in tuple(REGISTRY)[::-1] if v != RUNNING]:
        if v in means and small in means[v] and large in means[v]:
            change = means[v][small] - means[v][large]
            facts.append(f"{REGISTRY[v].short}: {means[v][large]:.2f}% at batch {large} → "
                         f"{means[v][small]:.2f}% at batch {small} "
                         f"({'+' if change >= 0 else '−'}{abs(change):.2f} points).")
    others = [v for v in tuple(REGISTRY)[::-1] if v != RUNNING and v in means]
    below = [b for b in sorted(means[RUNNING])
             if others and all(b in means[v] for v in others)
             and means[RUNNING][b] < max(means[v][b] for v in others)]
    labels = _running_labels()
    if below:
        facts.append(f"{labels[RUNNING]} has a lower mean than the better of "
                     f"{'/'.join(REGISTRY[v].short for v in others)} at batch "
                     f"size{'s' if len(below) > 1 else ''} {', '.join(map(str, below))}.")
    else:
        facts.append(f"{labels[RUNNING]} has the highest mean at every batch size measured.")
    if BN_BATCH_STATS in means and small in means[BN_BATCH_STATS]:
        gaps = {b: means[BN_BATCH_STATS][b] - means[RUNNING][b]
                for b in means[BN_BATCH_STATS] if b in means[RUNNING]}
        facts.append(f"{REGISTRY[RUNNING].short} evaluated with batch statistics minus running "
                     "statistics: " + ", ".join(f"{g:+.2f} at {b}" for b, g in sorted(gaps.items()))
                     + " (points).")
    return facts


def plot_batch_size_study(study, path=None, show=False):
    """Test accuracy vs batch size (log scale): mean line and one dot per seed per variant."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    # BN's two evaluations share a colour; the dashed one is the train-mode (batch stats) one.
    labels = {**{v: REGISTRY[v].short for v in tuple(REGISTRY)}, **_running_labels()}
    styles = {**{v: (labels[v], "-", REGISTRY[v].colour) for v in tuple(REGISTRY)},
              BN_BATCH_STATS: (labels[BN_BATCH_STATS], "--", REGISTRY[RUNNING].colour)}
    for v in (v for v in (*tuple(REGISTRY), BN_BATCH_STATS) if v in study):
        label, style, colour = styles[v]
        sizes = sorted(study[v])
        line, = ax.plot(sizes, [statistics.mean(study[v][b]) for b in sizes], style,
                        color=colour, marker="o", label=label)
        for b in sizes:
            ax.scatter([b] * len(study[v][b]), study[v][b], color=line.get_color(), s=10,
                       alpha=0.5)
    ax.set_xscale("log", base=2)
    sizes = sorted({b for v in study for b in study[v]})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set(xlabel="batch size (images per step, log scale)", ylabel="test accuracy (%)",
           title="Test accuracy vs batch size (mean line, one dot per seed)")
    ax.grid(alpha=0.3)
    if study:
        ax.legend()
    fig.tight_layout()
    return finish_figure(fig, path, show)


# ------------------------------------------------------------------ per-class / confusions

def confusion_share(runs_of_variant):
    """Confusion matrix summed over seeds, as % of each true class (row = true, column =
    predicted)."""
    counts = np.sum([np.array(r["confusion_matrix"]) for r in runs_of_variant], axis=0)
    return 100 * counts / counts.sum(1, keepdims=True)


def class_names(runs):
    first = next(iter(runs.values()))[0]
    return list(first["per_class_acc"])


def per_class_table(runs):
    """Markdown: per-class test accuracy (%) of each variant, mean over its seeds."""
    variants = [v for v in tuple(REGISTRY) if v in runs]
    rows = [[cls, *(f"{100 * statistics.mean(r['per_class_acc'][cls] for r in runs[v]):.1f}"
                    for v in variants)] for cls in class_names(runs)]
    return markdown_table(["class", *(f"{v} (n={len(runs[v])})" for v in variants)], rows)


def most_confused(runs, top=3):
    """{variant: [(true class, predicted class, share of the true class's test images (%))]},
    the largest off-diagonal cells of the confusion matrix summed over seeds."""
    classes = class_names(runs)
    out = {}
    for v in (v for v in tuple(REGISTRY) if v in runs):
        share = confusion_share(runs[v])
        np.fill_diagonal(share, -1)
        cells = np.dstack(np.unravel_index(np.argsort(-share, axis=None), share.shape))[0][:top]
        out[v] = [(classes[i], classes[j], float(share[i, j])) for i, j in cells]
    return out


def most_confused_lines(runs, top=3):
    return [f"- {v}: " + "; ".join(f"{t} → {p} {s:.1f}%" for t, p, s in pairs)
            for v, pairs in most_confused(runs, top).items()]


def plot_confusion_matrices(runs, path=None, show=False):
    """One row-normalized confusion matrix (%) per variant, summed over seeds."""
    classes = class_names(runs)
    variants = [v for v in tuple(REGISTRY) if v in runs]
    # small in inches, so that GitHub's 800-pixel column shrinks it little and the digits read
    fig, axes = plt.subplots(1, len(variants), figsize=(3.4 * len(variants), 3.7), squeeze=False,
                             sharey=True)
    for ax, v in zip(axes[0], variants):
        share = confusion_share(runs[v])
        ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=7.5,
                        color="white" if share[i, j] > 50 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set(xlabel="predicted", title=f"{v} norm ({len(runs[v])} seeds, % of true class)")
        ax.title.set_fontsize(9)
    axes[0][0].set_ylabel("true")
    fig.tight_layout()
    return finish_figure(fig, path, show)


# -------------------------------------------------------------------------- learning curves

def plot_variant_curves(runs, path=None, show=False):
    """Test accuracy and loss per epoch of each variant: mean over seeds with a min–max band."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in [v for v in tuple(REGISTRY) if v in runs]:
        for ax, key, scale in ((ax_acc, "test_acc", 100), (ax_loss, "test_loss", 1)):
            curves = np.array([np.array(r["history"][key]) * scale for r in runs[variant]])
            epochs = runs[variant][0]["history"]["epoch"]
            line, = ax.plot(epochs, curves.mean(0), label=f"{variant} ({len(curves)} seeds)",
                            color=REGISTRY[variant].colour)
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=line.get_color(),
                            alpha=0.2)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="test cross-entropy", title="Test loss")
    integer_epochs(ax_acc, ax_loss)
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return finish_figure(fig, path, show)
