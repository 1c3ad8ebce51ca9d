"""The learning-rate study (docs/learning-rate.md): which peak rates train each variant, read
from results/lr_study/ (one file per variant, rate and seed; a diverged run says where).

Used by S8_Compare.ipynb and lab/report/, like lab/compare.py."""

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt

from plots import finish_figure
from variants import REGISTRY, in_order

from lab.compare import LR_STUDY_DIR, markdown_table, read_results

LR_WINDOW = 1.0  # points of accuracy: "within 1 point of the best" rate


def load_lr_study(study_dir=LR_STUDY_DIR):
    """{variant: {peak lr: [run, ...]}}, variants in tuple(REGISTRY), rates ascending; a diverged run has
    final_test_acc None and a "diverged" entry (epoch, step)."""
    study = defaultdict(lambda: defaultdict(list))
    for run in read_results(study_dir) if Path(study_dir).is_dir() else []:
        study[run["variant"]][run["train_config"]["lr"]].append(run)
    return {v: dict(sorted(study[v].items())) for v in in_order(study)}


def lr_summary(by_lr):
    """For one variant's {lr: [runs]}: the mean accuracy (%) per rate (None where any seed
    diverged), the best rate, and the widest run of adjacent rates within LR_WINDOW of it."""
    means = {lr: (None if any(r["final_test_acc"] is None for r in runs)
                  else statistics.mean(100 * r["final_test_acc"] for r in runs))
             for lr, runs in by_lr.items()}
    scored = {lr: m for lr, m in means.items() if m is not None}
    if not scored:
        return {"means": means, "best": None, "window": None}
    best = max(scored, key=scored.get)
    rates = list(means)
    lo = hi = rates.index(best)
    near = lambda i: means[rates[i]] is not None and means[rates[i]] >= scored[best] - LR_WINDOW
    while lo > 0 and near(lo - 1):
        lo -= 1
    while hi < len(rates) - 1 and near(hi + 1):
        hi += 1
    return {"means": means, "best": best, "window": (rates[lo], rates[hi])}


def lr_runs(study):
    """Every run of a load_lr_study() result, as one list."""
    return [r for by_lr in study.values() for rs in by_lr.values() for r in rs]


def eval_set(study):
    """"validation" when every run of the study was scored on the held-out training images
    (train.py --validation), else "test"."""
    runs = lr_runs(study)
    return "validation" if runs and all(r.get("eval_set") == "validation" for r in runs) else "test"


def lr_table(study):
    """Markdown: per variant, the best peak rate, its accuracy, the range of rates within
    LR_WINDOW of it, and where runs diverged or stayed at chance."""
    if not study:
        return "(no learning-rate study results yet)"
    header = ["variant", "seeds", "best peak lr",
              f"{eval_set(study)} acc. at best, mean (min–max)",
              f"rates within {LR_WINDOW:g} point of the best", "width", "diverged (lr: seeds)",
              "at chance, below 15% (lr: seeds)"]
    rows = []
    for variant, by_lr in study.items():
        summary = lr_summary(by_lr)
        seeds = sorted({r["seed"] for runs in by_lr.values() for r in runs})
        diverged = [f"{lr:g}: {sum(r['final_test_acc'] is None for r in runs)}/{len(runs)}"
                    for lr, runs in by_lr.items() if any(r["final_test_acc"] is None for r in runs)]
        chance = [f"{lr:g}: {n}/{len(runs)}" for lr, runs in by_lr.items()
                  if (n := sum(r["final_test_acc"] is not None and r["final_test_acc"] < 0.15
                               for r in runs))]
        if summary["best"] is None:
            best = acc = window = width = "–"
        else:
            accs = [100 * r["final_test_acc"] for r in by_lr[summary["best"]]]
            best = f"{summary['best']:g}"
            acc = f"{statistics.mean(accs):.2f} ({min(accs):.2f}–{max(accs):.2f})"
            lo, hi = summary["window"]
            window, width = f"{lo:g} to {hi:g}", f"{hi / lo:g}x"
        rows.append([variant, ", ".join(map(str, seeds)), best, acc, window, width,
                     ", ".join(diverged) or 'none', ", ".join(chance) or 'none'])  # the word
    return markdown_table(header, rows)


def plot_lr_study(study, path=None, show=False):
    """Final accuracy against peak learning rate (log x), one line per variant: mean over
    seeds with the min–max band; a rate where any seed diverged is marked x at chance level."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for variant, by_lr in study.items():
        means = lr_summary(by_lr)["means"]
        ok = [lr for lr, m in means.items() if m is not None]
        accs = [[100 * r["final_test_acc"] for r in by_lr[lr]] for lr in ok]
        line, = ax.plot(ok, [statistics.mean(a) for a in accs], "o-", ms=4,
                        color=REGISTRY[variant].colour,
                        label=f"{variant} ({len(next(iter(by_lr.values())))} seeds)")
        ax.fill_between(ok, [min(a) for a in accs], [max(a) for a in accs],
                        color=line.get_color(), alpha=0.2)
        bad = [lr for lr, m in means.items() if m is None]
        if bad:
            ax.plot(bad, [10] * len(bad), "x", color=line.get_color(), ms=9, mew=2,
                    label=f"{variant}: a seed or more diverged (NaN loss)")
    ax.set_xscale("log", base=2)
    rates = sorted({lr for by_lr in study.values() for lr in by_lr})
    ax.set_xticks(rates, [f"{lr:g}" for lr in rates])  # the grid's own rates, not powers of 2
    ax.minorticks_off()
    ax.set(xlabel="peak learning rate (one-cycle, SGD with Nesterov momentum 0.9)",
           ylabel=f"final {eval_set(study)} accuracy (%)", title="Learning-rate sensitivity")
    ax.axhline(10, color="k", lw=0.6, ls=":")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return finish_figure(fig, path, show)


