"""The lever study's sections (on the GPU and on the CPU) and how the recipe was chosen."""

import os
import statistics

from variants import REGISTRY

from lab import compare, tune
from lab.report.common import LEVER_GAIN, ROOT, _delta, _seeds, clears_gain, decision
from lab.report.tuning import greedy_reference


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


def levers_section(levers, grid="levers"):
    """The lever study's table: recipe v3, then each lever on it, paired by seed; a line
    per variant saying whether any lever (a stack: over recipe v3) clears +LEVER_GAIN with
    its interval above zero. `grid`: lab/tune.py's grid that runs them."""
    if not any(lever_rows(levers)):
        return f"No lever runs yet: `python -m lab.tune --grid {grid}`."
    rows, verdicts, cells = lever_rows(levers), [], []
    for variant in REGISTRY:
        base = levers.get((variant, tune.LEVER_BASE, 20))
        if not base:
            continue
        accs = compare.accuracies(base)
        cells.append([variant, f"({tune.LEVER_BASE_LABEL})",
                      f"`{' '.join(tune.change_flags(tune.LEVER_BASE))}`",
                      f"{base[0]['num_params']:,}", _seeds(base),
                      f"{statistics.mean(accs):.2f} ({min(accs):.2f}–{max(accs):.2f})",
                      "-", "-", "-", "-", "-"])
        mine = [r for r in rows if r["variant"] == variant]
        for row in mine:
            accs = compare.accuracies(row["runs"])
            flags = " ".join(tune.change_flags(row["config"])[len(tune.change_flags(tune.LEVER_BASE)):])
            bar = "yes" if clears_gain(row["over_base"]) else "no"
            if row["over_base"] is not row["diff"]:
                bar += f" ({_delta(row['over_base'])})"
            cells.append([variant, lever_name(row["config"]), f"`{flags}`",
                          f"{row['runs'][0]['num_params']:,}", _seeds(row["runs"]),
                          f"{row['mean']:.2f} ({min(accs):.2f}–{max(accs):.2f})", row["against"],
                          ", ".join(f"{d:+.2f}" for d in row["diff"]["diffs"]) or "-",
                          _delta(row["diff"], row["runs"]), row["decision"], bar])
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
    header = ["variant", f"lever on {tune.LEVER_BASE_LABEL}", "flags", "params", "seeds",
              "val. acc. mean (min–max)", "compared with", "Δ per seed (paired)",
              "mean paired Δ [95% CI]", "verdict",
              f"+{LEVER_GAIN} over {tune.LEVER_BASE_LABEL}, interval above 0"]
    lines = [compare.markdown_table(header, cells),
             "", f"{len(every)} runs of 20 epochs, each trained on "
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
    rows, base_flags = [], len(tune.change_flags(tune.LEVER_BASE))
    for key in sorted(cells, key=lambda k: (-best(k), k)):
        flags = " ".join(tune.change_flags(f"{tune.LEVER_BASE}+{key[0]}")[base_flags:])
        rows.append([key[0], f"`{flags}`", key[1], *(cell(cells[key].get(v)) for v in variants)])
    header = [f"lever on {tune.LEVER_BASE_LABEL}", "flags", "runs on",
              *(REGISTRY[v].title for v in variants)]
    return "\n".join([compare.markdown_table(header, rows)] + [
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
    table = [["(nothing)", *(
        f"{statistics.mean(compare.accuracies(levers[(v, tune.LEVER_BASE, 20)])):.2f} "
        f"({len(levers[(v, tune.LEVER_BASE, 20)])} seeds)" for v in variants), "-"]]
    for config in sorted(shared, key=lambda c: (-sum((v, c) in rows for v in variants), c)):
        mine = [rows.get((v, config)) for v in variants]
        cells = ["not run" if r is None else
                 f"{r['mean']:.2f}: {_delta(r['over_base'])} ({len(r['runs'])} seeds)"
                 for r in mine]
        met = [REGISTRY[v].title for v, r in zip(variants, mine)
               if r is not None and clears_gain(r["over_base"])]
        table.append([lever_name(config), *cells,
                      "every variant" if len(met) == len(variants) else ", ".join(met) or 'none'])  # the word
    header = [f"{tune.LEVER_BASE_LABEL} +", *(REGISTRY[v].title for v in variants),
              f"+{LEVER_GAIN} with its interval above 0 on"]
    return "\n".join([compare.markdown_table(header, table)] + [
        "", "Validation accuracy (%) after 20 epochs, the runs of the table above; each cell: "
            f"the change's mean, then its mean paired difference from {tune.LEVER_BASE_LABEL} with the "
            f"95% interval (seeds shared with {tune.LEVER_BASE_LABEL})."])


def round2_verdict(diff):
    """decision(), ended where the protocol ends a lever: only an interval that straddles the
    bar gets seeds 4 to 7, so one wholly below it after 4 seeds is final."""
    said = decision(diff)
    if said == "no decision" and diff["high"] < LEVER_GAIN:
        return f"not adopted: interval below +{LEVER_GAIN}"
    return said


def round2_section(tuning, grid="round2-cpu"):
    """Round 2 of the lever study (issue 67): every round-2 lever of `tune.ROUND2_LEVERS`, in
    the grid's order, per variant where recipe v4's validation runs exist, with its paired
    difference from recipe v4 (every lever, stacks included, is judged against recipe v4), the
    seeds run of those `grid` plans, its verdict and whether it clears the bar; a lever the
    grid has not reached says so. `tuning`: the runs of the grid's folder (recipe v4's in it)."""
    planned, folders = {}, set()
    for variant, configs, _, seeds, folder in tune.GRIDS[grid]():
        folders.add(os.path.relpath(folder, ROOT))
        for config in configs:
            planned.setdefault((variant, config), []).extend(seeds)
    base_flags = len(tune.change_flags(tune.ROUND2_BASE))
    rows, verdicts, every = [], [], []
    for variant in REGISTRY:
        base = tuning.get((variant, tune.ROUND2_BASE, 20))
        if not base or not any((variant, config) in planned or (variant, config, 20) in tuning
                               for config in (f"{tune.ROUND2_BASE}+{lever}"
                                              for lever in tune.ROUND2_LEVERS)):
            continue  # round 2 reaches a variant with what wins on BatchNorm
        met, measured, listed, title = [], 0, 0, REGISTRY[variant].title
        every += base
        for lever in tune.ROUND2_LEVERS:
            config = f"{tune.ROUND2_BASE}+{lever}"
            runs, seeds = tuning.get((variant, config, 20), []), planned.get((variant, config), [])
            flags = f"`{' '.join(tune.change_flags(config)[base_flags:])}`"
            listed += bool(runs or seeds)
            if not runs:
                if seeds:
                    rows.append([title, lever, flags, "-", f"0 of {len(seeds)}", "-", "-",
                                 "-", "not run yet", "-"])
                continue
            every += runs
            diff = compare.paired_difference(runs, base)
            accs = compare.accuracies(runs)
            measured += diff["low"] is not None
            if clears_gain(diff):
                met.append(lever)
            rows.append([title, lever, flags, f"{runs[0]['num_params']:,}",
                         f"{len(runs)} of {max(len(seeds), len(runs))} ({_seeds(runs)})",
                         f"{statistics.mean(accs):.2f} ({min(accs):.2f}–{max(accs):.2f})",
                         ", ".join(f"{d:+.2f}" for d in diff["diffs"]) or "-",
                         _delta(diff, runs), round2_verdict(diff),
                         "yes" if clears_gain(diff) else "no"])
        base_accs = compare.accuracies(base)
        verdicts.append(
            f"{title} (recipe v4: {statistics.mean(base_accs):.2f}, "
            f"{len(base)} seeds): " + (f"met by {', '.join(met)}" if met else
                                       "no round-2 lever clears the bar so far") +
            f"; {measured} of {listed} levers measured on 2 or more seeds.")
    if not rows:
        how = f"bash lab/gpu_grid.sh {grid}` on a lent GPU" if grid in tune.GRID_FOLDER_GPU \
            else f"python -m lab.tune --grid {grid}`"
        return f"No round-2 runs yet: `{how}."
    hardware = sorted({f"{compare.threads(r['hardware'])}, {r['precision']}" for r in every})
    dates = sorted(r["date"][:10] for r in every)
    header = ["variant", "lever on recipe v4", "flags", "params", "seeds run (of planned)",
              "val. acc. mean (min–max)", "Δ per seed (paired)", "mean paired Δ [95% CI]",
              "verdict", f"+{LEVER_GAIN}, interval above 0"]
    return "\n".join([
        compare.markdown_table(header, rows), "",
        f"Validation accuracy (%) after 20 epochs, data "
        f"{', '.join(sorted({compare.data_file(r) for r in every}))}; each lever's run paired "
        f"with recipe v4's run of the same seed in {', '.join(sorted(folders))}/ (same "
        f"initialization, data "
        f"order and arithmetic); recipe v4's and the levers' runs: {'; '.join(hardware)}"
        + (f"; {' to '.join(sorted({dates[0], dates[-1]}))}" if dates else "")
        + f". The bar: +{LEVER_GAIN} points with the 95% interval above zero; verdicts as in "
          f"the learning-per-epoch study (4 paired seeds, then 8).", "",
        *[f"- {v}" for v in verdicts]])
