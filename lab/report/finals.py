"""The final runs' sections: the results tables, each recipe's finals against the targets,
and the batch-size study."""

import statistics

import train
from variants import REGISTRY, course_variants

from lab import compare, tune
from lab.report.common import (FINAL_SEEDS, LEVER_GAIN, _capitalized, _delta, _flip_acc, _mean_std,
                               _seeds, _spread, _train_acc, clears_gain, recorded_precision,
                               seed_phrase, study_recipe)
from lab.report.levers import lever_rows


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
    rows = []
    for variant in tuple(REGISTRY):
        rs = sorted(runs.get(variant, []), key=lambda r: r["seed"])
        if not rs:
            continue
        accs = [100 * r["final_test_acc"] for r in rs]
        spread, interval = compare.mean_std(accs), "-"
        if len(accs) > 1:
            low, high = compare.t_interval(accs)
            interval = f"[{low:.2f}, {high:.2f}]"
        rows.append([REGISTRY[variant].title, spread, interval, _seeds(rs),
                     ", ".join(f"{p:,}" for p in sorted({r["num_params"] for r in rs})),
                     ", ".join(map(str, sorted({r["epochs"] for r in rs}))),
                     target_verdict(accs, REGISTRY[variant].target),
                     target_verdict(accs, REGISTRY[variant].next_target)])
    return compare.markdown_table(["variant", "test acc. mean ± std (%)",
                                   "95% interval of the mean (%)", "seeds", "params", "epochs",
                                   "target", "next target"], rows)


def gpu_note(gpu):
    """The table's sentence on its rows of GPU-check notebooks (gpu_archives())."""
    return "".join(f"; rows marked ({label}) are the notebooks that `lab/gpu_check.py` ran "
                   f"there, kept in `results/{folder}/`" for label, folder, _ in gpu)


def table(runs, archives=(), gpu=()):
    """The results table: today's runs, then the final runs of earlier recipes (`archives`:
    [(label, folder, {variant: runs})], load_archives()), each row labelled with how its recipe
    differs from today's defaults, then the notebooks a GPU check ran (`gpu`, gpu_archives())."""
    rows = []
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
        spread = compare.mean_std(accs) + " (1 seed)" * (len(accs) == 1)
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
        rows.append([
            variant, "; ".join(f"`{r}`" if r != "current" else r for r in recipes) + label,
            _seeds(rs), f"{statistics.mean(map(_train_acc, rs)):.2f}", spread, flip,
            f"{max(accs):.2f}", f"{min(accs):.2f}", f"≥ {target:.0f}: {verdict}",
            ", ".join(f"{p:,}" for p in params), ", ".join(map(str, epochs)),
            f"{statistics.median(t for r in rs for t in r['history']['epoch_time']):.1f}",
            "; ".join(hw), ", ".join(precisions), "; ".join(data)])
    lines = [compare.markdown_table(
        ["variant", "recipe", "seeds", "train acc. mean (%)", "test acc. mean ± std (%)",
         "flip-TTA test acc. mean (%)", "best", "worst", "target", "params", "epochs",
         "s/epoch (median)", "hardware", "precision", "data"], rows)]
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


def missing_finals(runs):
    """{variant: the FINAL_SEEDS it has no run of} over every course variant."""
    return {v: [s for s in FINAL_SEEDS if s not in {r["seed"] for r in runs.get(v, [])}]
            for v in course_variants()}


def _previous_recipe(archives):
    """(label, runs) of the recipe before today's: the newest archive."""
    label, _, previous = archives[-1] if archives else ("the previous recipe", None, {})
    return label, previous


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
