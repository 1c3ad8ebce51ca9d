"""The recipe study's and the learning-per-epoch study's sections."""

import statistics

import train
from variants import REGISTRY

from lab import compare, per_epoch, tune
from lab.report.common import _delta, _seeds, decision, spearman


def tuning_section(groups):
    """The ablation table (each configuration against recipe v1, same norm and budget)
    and the proxy check (configurations run at two budgets: do they rank alike?)."""
    if not groups:
        return "No tuning runs yet (results/tuning/ is empty)."
    rows = []
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
        rows.append([norm, config, f"`{change}`", f"{runs[0]['num_params']:,}", epochs,
                     _seeds(runs), f"{mean:.2f} ({min(accs):.2f}–{max(accs):.2f})", paired,
                     delta_cell, verdict,
                     f"{statistics.mean(compare.accuracies(runs, 'final_test_acc_flip_tta')):.2f}"])
    lines = [compare.markdown_table(
        ["variant", "configuration", "change from recipe v1", "params", "epochs", "seeds",
         "val. acc. mean (min–max)", "Δ per seed (paired)", "mean paired Δ [95% CI]", "verdict",
         "flip-TTA val. acc."], rows)]
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
    budgets, changes = [], []
    for variant, by_epochs in curves.items():
        for epochs, runs in by_epochs.items():
            accs = compare.accuracies(runs)
            budgets.append([variant, epochs, _seeds(runs),
                            f"{statistics.mean(accs):.2f} ({min(accs):.2f}–{max(accs):.2f})",
                            NOTE_20 if epochs == 20 else NOTE_BEYOND])
    for row in technique_rows(tuning, reruns):
        worth = per_epoch.equivalent_epochs(row["mean"], per_epoch.recipe_curve(
            curves.get(row["variant"], {})))
        worth = "-" if worth is None else worth if isinstance(worth, str) else f"{worth:.0f}"
        try:
            flags = " ".join(tune.change_flags(row["config"]))
        except SystemExit:
            flags = "(no longer defined in lab/tune.py)"
        changes.append([row["variant"], row["config"], f"`{flags}`", _seeds(row["runs"]),
                        f"{row['mean']:.2f}", row["against"], _delta(row["diff"], row["runs"]),
                        row["decision"], worth])
    lines = [compare.markdown_table(["variant", "epochs", "seeds", "val. acc. mean (min–max)",
                                     "note"], budgets), "",
             compare.markdown_table(["variant", "change (20 epochs)", "flags", "seeds",
                                     "val. acc. mean", "compared with", "mean paired Δ [95% CI]",
                                     "verdict", "recipe v1 needs (epochs)"], changes)]
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


def arithmetic_section(tuning, reruns):
    """A baseline arm re-run, same seeds, in the arithmetic its changes ran in (results/
    arithmetic/): how far the arithmetic alone moves it, then each single change on it paired
    with the re-run of its seed where the two share arithmetic, beside its usual comparison."""
    if not reruns:
        return "No re-runs yet (results/arithmetic/ is empty)."
    arms, changes = [], []
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
        arms.append([variant, arm, ", ".join(map(str, sorted(seeds))),
                     f"{kinds(first)}, {mean(first):.2f}", f"{kinds(again)}, {mean(again):.2f}",
                     ", ".join(f"{d:+.2f}" for d in diff["diffs"]), _delta(diff)])
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
            changes.append([variant, config, ", ".join(map(str, against["seeds"])),
                            _delta(compare.paired_difference(alike, first)), _delta(against),
                            decision(against)])
    every = [r for rs in reruns.values() for r in rs]
    dates = [r["date"][:10] for r in every]
    lines = [compare.markdown_table(
        ["variant", "arm", "seeds", "first run: arithmetic, val. acc.",
         "re-run: arithmetic, val. acc.", "Δ per seed (re-run − first)", "mean Δ [95% CI]"], arms)]
    if changes:
        lines += ["", compare.markdown_table(
            ["variant", "change (20 epochs)", "seeds", "Δ against the first runs [95% CI]",
             "Δ against the re-runs, same arithmetic [95% CI]", "verdict"], changes)]
    return "\n".join(lines + [
        "", f"Validation accuracy (%) after the last epoch, 45,000 training images, 5,000 held "
            f"out; the re-runs: {'; '.join(sorted({compare.threads(r['hardware']) for r in every}))}"
            f", {' to '.join(sorted({min(dates), max(dates)}))}. "
            f"A change's seeds count only where it ran in the same arithmetic as the re-run."])
