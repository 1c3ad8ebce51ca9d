"""Learning per epoch (docs/learning-per-epoch.md): a technique's result read as the epochs of
recipe v1 it is worth, and the forest plot of every technique's paired difference."""

import statistics

import matplotlib.pyplot as plt
import numpy as np

from plots import finish_figure
from variants import REGISTRY

def recipe_curve(runs_by_epochs):
    """[(epochs, mean accuracy %)] of recipe v1 at each budget, ascending."""
    return sorted((e, statistics.mean(100 * r["final_test_acc"] for r in rs))
                  for e, rs in runs_by_epochs.items() if rs)


def equivalent_epochs(accuracy, curve):
    """How many epochs recipe v1 needs to reach `accuracy` (%), read off `curve` by linear
    interpolation in log2(epochs): a number, or a bound ("< 20", "> 80") outside the curve."""
    if len(curve) < 2:
        return None
    (e_lo, a_lo), (e_hi, _) = curve[0], curve[-1]
    if accuracy < a_lo:
        return f"< {e_lo}"
    if accuracy > max(a for _, a in curve):
        return f"> {e_hi}"
    for (e0, a0), (e1, a1) in zip(curve, curve[1:]):
        if min(a0, a1) <= accuracy <= max(a0, a1) and a0 != a1:
            t = (accuracy - a0) / (a1 - a0)
            return float(2 ** (np.log2(e0) + t * (np.log2(e1) - np.log2(e0))))
    return float(curve[0][0])


def spread_labels(values, low, high, gap):
    """Heights for labels of `values` (any order; returned in that order): each as near its
    value as a `gap` to its neighbours allows, all within [low, high] where they fit."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    heights = []
    for i in order:  # upwards: no closer than `gap` to the one below
        heights.append(max(values[i], heights[-1] + gap) if heights else max(values[i], low))
    for k in range(len(heights) - 1, -1, -1):  # downwards: under the top and the one above
        ceiling = high if k == len(heights) - 1 else heights[k + 1] - gap
        heights[k] = min(heights[k], ceiling)
    placed = [0.0] * len(values)
    for i, height in zip(order, heights):
        placed[i] = height
    return placed


def plot_technique_forest(rows, path=None, show=False, title=None):
    """Each 20-epoch change's mean paired difference with its 95% interval, one row per change,
    grouped by variant and sorted by effect within each, a line at zero; filled markers for the
    changes that win (interval above zero), stars for those today's recipe adopted; an interval
    wider than the figure's scale (2 seeds) ends in an arrowhead at its edge.
    `rows`: report.technique_rows() entries with an interval; `title` replaces the default."""
    variants = [v for v in REGISTRY if any(r["variant"] == v for r in rows)]
    ordered = [r for v in variants for r in sorted(
        (r for r in rows if r["variant"] == v), key=lambda r: r["diff"]["mean"])]
    fig, ax = plt.subplots(figsize=(8, 0.24 * len(ordered) + 1.6))
    ys, y, labels = [], 0, []
    for i, r in enumerate(ordered):
        if i and r["variant"] != ordered[i - 1]["variant"]:
            y += 1  # a gap between the variants' groups
        ys.append(y)
        labels.append(f"{REGISTRY[r['variant']].short}  {r['config']}  "
                      f"(vs {r['against'].split(' (')[0]}, {len(r['diff']['seeds'])} seeds)")
        y += 1
    # the scale of the intervals of 4 seeds or more; a wider one (2 seeds) is cut at its edge
    lim = 1.1 * max(max(-r["diff"]["low"], r["diff"]["high"]) for r in ordered
                    if len(r["diff"]["seeds"]) >= 4) if any(
        len(r["diff"]["seeds"]) >= 4 for r in ordered) else None
    for r, y in zip(ordered, ys):
        colour, d = REGISTRY[r["variant"]].colour, r["diff"]
        wins = d["low"] > 0
        low, high = (max(d["low"], -lim), min(d["high"], lim)) if lim else (d["low"], d["high"])
        ax.plot([low, high], [y, y], color=colour, lw=1.6)
        for end, cut, marker in ((low, low > d["low"], "<"), (high, high < d["high"], ">")):
            if cut:
                ax.plot([end], [y], marker, color=colour, ms=5)
        ax.plot([d["mean"]], [y], "*" if r["adopted"] else "o", ms=11 if r["adopted"] else 6,
                color=colour if wins or r["adopted"] else "white", markeredgecolor=colour,
                zorder=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="validation accuracy, change minus its reference (points; mean and 95% CI "
                  "over paired seeds)",
           title=title or "Each change at 20 epochs, against its reference\n"
                          "filled: interval above zero (wins); star: adopted in today's recipe")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return finish_figure(fig, path, show)


def plot_equivalent_epochs(recipe_runs, techniques, path=None, show=False):
    """Validation accuracy of recipe v1 against its budget in epochs (log scale; one dot per
    run, the line through the means), and each technique's 20-epoch mean as a marker placed at
    the epochs recipe v1 needs for that accuracy, named in a column right of the plot.
    `recipe_runs`: {variant: {epochs: [runs]}}; `techniques`: {variant: {name: accuracy %}}."""
    fig, ax = plt.subplots(figsize=(9, 5.2))
    labels = []  # (name, x, accuracy, colour)
    for variant, by_epochs in recipe_runs.items():
        colour = REGISTRY[variant].colour
        curve = recipe_curve(by_epochs)
        ax.plot([e for e, _ in curve], [a for _, a in curve], "o-", color=colour,
                label=f"{variant}: recipe v1")
        for e, rs in by_epochs.items():
            ax.scatter([e] * len(rs), [100 * r["final_test_acc"] for r in rs], color=colour,
                       s=10, alpha=0.5)
        for name, acc in (techniques.get(variant, {}).items() if len(curve) > 1 else ()):
            where = equivalent_epochs(acc, curve)
            x = where if isinstance(where, float) else curve[0][0] if where.startswith("<") \
                else curve[-1][0]
            # off the scale: drawn at its end, pointing outwards, the bound in the label
            marker = "D" if isinstance(where, float) else "<" if where.startswith("<") else ">"
            ax.scatter([x], [acc], marker=marker, color=colour, edgecolor="k", zorder=3)
            bound = "" if isinstance(where, float) else f" ({where})"
            labels.append((f"{REGISTRY[variant].short} {name}{bound}", x, acc, colour))
    low, high = ax.get_ylim()
    # points sit on near-parallel lines, so labels beside them collide: one column instead
    heights = spread_labels([acc for _, _, acc, _ in labels], low, high, (high - low) / 28)
    for (label, x, acc, colour), height in zip(labels, heights):
        ax.annotate(label, (x, acc), xytext=(1.03, height), textcoords=("axes fraction", "data"),
                    fontsize=8, color=colour, va="center", annotation_clip=False,
                    arrowprops=dict(arrowstyle="-", color=colour, lw=0.5, alpha=0.5))
    ax.axvline(20, color="k", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ticks = sorted({e for by_epochs in recipe_runs.values() for e in by_epochs})
    ax.set_xticks(ticks, [str(e) for e in ticks])
    ax.minorticks_off()
    ax.set(xlabel="epochs of recipe v1 (beyond 20: outside the assignment's limit)",
           ylabel="validation accuracy (%)",
           title="What each 20-epoch technique is worth in epochs of recipe v1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return finish_figure(fig, path, show)
