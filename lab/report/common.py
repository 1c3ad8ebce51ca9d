"""What every generated section shares: the pages' and figures' paths, the section markers,
the recipe labels, and the phrases of seeds, spreads and verdicts."""

from pathlib import Path

from lab import compare, tune
from lab import train as lab_train


ROOT = Path(__file__).resolve().parents[2]
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


def clears_gain(diff):
    """Whether a paired difference meets the lever study's bar: mean at least LEVER_GAIN and
    its 95% interval above zero."""
    return diff["low"] is not None and diff["low"] > 0 and diff["mean"] >= LEVER_GAIN


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


def _capitalized(label):
    """"Recipe v3" from "recipe v3": a label at the start of a sentence."""
    return label[:1].upper() + label[1:]


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
