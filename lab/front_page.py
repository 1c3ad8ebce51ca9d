"""The front page's generated sections: the small results table, the time a run takes, and what
to notice, each sentence computed from the committed results files so it stays true of them.

The full tables (intervals, targets, hardware per row, earlier recipes) live on docs/results.md.
"""

import statistics

from variants import REGISTRY, course_variants

from lab import compare

NO_RUNS = ("No results yet: `python -m lab.sweep --norms batch layer group --seeds 0 1 2 "
           "--out-dir results`.")


def results_table(runs):
    """| variant | test accuracy mean ± std | lowest – highest | seeds | parameters | epochs |,
    today's runs of every variant."""
    if not runs:
        return NO_RUNS
    rows = []
    for variant in course_variants():
        rs = sorted(runs.get(variant, []), key=lambda r: r["seed"])
        if not rs:
            continue
        accs = compare.accuracies(rs)
        spread = compare.mean_std(accs)
        params = ", ".join(f"{p:,}" for p in sorted({r["num_params"] for r in rs}))
        epochs = ", ".join(map(str, sorted({r["epochs"] for r in rs})))
        rows.append([REGISTRY[variant].title, spread, f"{min(accs):.2f} – {max(accs):.2f}",
                     len(rs), params, epochs])
    return compare.markdown_table(["variant", "test accuracy, mean ± std (%)",
                                   "lowest – highest (%)", "seeds", "parameters", "epochs"], rows)


def _minutes(seconds):
    return f"{seconds / 60:.0f}"


def run_time(runs, gpu_rows):
    """One sentence: how long today's 20-epoch runs took on the CPU that ran them, and the
    notebooks on a lent GPU (`gpu_rows`: report.gpu_archives())."""
    every = [r for rs in runs.values() for r in rs]
    if not every:
        return NO_RUNS
    walls = [r["wall_time_s"] for r in every]
    threads = sorted({r["hardware"].get("cpu_threads") for r in every if r["hardware"]["device"] == "cpu"})
    cpus = sorted({r["hardware"]["cpu"] for r in every if r["hardware"]["device"] == "cpu"})
    dates = sorted({r["date"][:10] for r in every})
    when = f"on {dates[0]}" if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    epochs = "/".join(str(e) for e in sorted({r["epochs"] for r in every}))
    sentence = (f"On a 2-core CPU ({compare.listed(cpus)}; "
                f"{'/'.join(map(str, threads))} thread per run, 32-bit floats) one {epochs}-epoch "
                f"run took {_minutes(min(walls))} to {_minutes(max(walls))} minutes "
                f"({len(every)} runs, {when})")
    for label, _, by_variant in gpu_rows:
        seconds = [sum(r["history"]["epoch_time"]) for rs in by_variant.values() for r in rs]
        today = compare.recipe_changes(every[0])
        recipe_note = "" if all(compare.recipe_changes(r) == today for rs in by_variant.values()
                                for r in rs) else ", on an earlier version of the training of the same network"
        sentence += (f"; the notebooks on a lent {label.split(',')[0]} trained for "
                     f"{min(seconds):.0f} to {max(seconds):.0f} seconds{recipe_note}")
    return sentence + "."


def notice(runs):
    """'What to notice': a few sentences, each computed from the results files."""
    if not runs:
        return NO_RUNS
    facts = []
    variants = [v for v in course_variants() if runs.get(v)]
    means = {v: statistics.mean(compare.accuracies(runs[v])) for v in variants}
    best = max(variants, key=means.get)
    others = [v for v in variants if v != best]
    if others:
        ahead = min(compare.accuracies(runs[best])) > max(a for v in others for a in compare.accuracies(runs[v]))
        names = " and ".join(REGISTRY[v].title for v in others)
        facts.append(
            f"**{REGISTRY[best].title} leads.** " + (
                f"Every one of its {len(runs[best])} runs scores above every {names} run; its "
                f"mean is {means[best] - max(means[v] for v in others):.2f} to "
                f"{means[best] - min(means[v] for v in others):.2f} points higher."
                if ahead else f"It has the best mean, but not every run is above every {names} run."))
    params = {r["num_params"] for v in variants for r in runs[v]}
    recipes = {compare.recipe_changes(r) for v in variants for r in runs[v]}
    if len(params) == 1 and len(recipes) == 1:
        facts.append(f"**The comparison is fair.** All three have the same {params.pop():,} "
                     f"parameters (every norm learns one scale and one shift per channel) and the "
                     f"same training; only the normalization differs.")
    every = [r for v in variants for r in runs[v]]
    above = [r for r in every if r["history"]["train_loss"][-1] > r["history"]["test_loss"][-1]]
    gaps = [100 * (r["history"]["train_acc"][-1] - r["final_test_acc"]) for r in every]
    smoothing = {r["train_config"].get("label_smoothing") for r in every}
    if len(above) == len(every) and len(smoothing) == 1 and smoothing != {None}:
        keep = 100 * (1 - smoothing.pop())
        facts.append(f"**Train loss ends above test loss in every run**, yet train accuracy ends "
                     f"{min(gaps):.1f} to {max(gaps):.1f} points above test accuracy: the train loss "
                     f"is measured on augmented batches (random crops and flips) with label "
                     f"smoothing (each target keeps {keep:.0f}% of its probability, the rest spread "
                     f"over all classes), which caps how low it can go; the test loss sees neither.")
    return "\n".join(f"- {fact}" for fact in facts)


def batch_size_sentence(study, budget):
    """What the batch-size figure shows and at what budget: BatchNorm against the batch-free
    norms at the smallest and the largest batch size (`budget`: compare.study_budget())."""
    running = compare.RUNNING
    means = {v: {b: statistics.mean(a) for b, a in by_batch.items() if a}
             for v, by_batch in study.items() if v in REGISTRY}
    if running not in means or len(means[running]) < 2:
        return "No batch-size study results yet (results/batch_size/ is empty)."
    small, large = min(means[running]), max(means[running])
    others = [v for v in means if v != running and small in means[v] and large in means[v]]
    if not others or not budget:
        return "No batch-size study results yet (results/batch_size/ is empty)."
    return (f"Test accuracy against the batch size (the learning rate scaled with it), on a short "
            f"budget: {'/'.join(map(str, budget['epochs']))} epochs on "
            f"{'/'.join(f'{n:,}' for n in budget['train_images'])} training images, "
            f"{len(budget['seeds'])} seeds per point"
            + ("" if budget["recipe"] == ["current"] else
               ", on an earlier version of the network and its training "
               "([details](docs/batch-size.md))")
            + f". BatchNorm drops from "
            f"{means[running][large]:.2f}% at batch {large} to {means[running][small]:.2f}% at "
            f"batch {small}, while "
            + compare.listed([f"{REGISTRY[v].title} goes from {means[v][large]:.2f}% to "
                       f"{means[v][small]:.2f}%" for v in others])
            + ": they compute their statistics per image, so they never depend on the batch.")

