"""Regenerate README.md's results tables and the figures in images/ from the results files.

    python tools/report.py            # rewrite the tables between the README's markers
    python tools/report.py --check    # exit 1 if a README table is out of date (for CI)

Writes the results table (results/*.json), the batch-size study section
(results/batch_size/*.json), images/compare_variants.png, images/confusion_matrices.png and
images/batch_size_study.png. No number is typed by hand: every cell comes from a results file.
"""

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import compare  # noqa: E402
from compare import ORDER, load_runs, load_study, study_budget  # noqa: E402

README = ROOT / "README.md"
IMAGES = ROOT / "images"
FIGURE = IMAGES / "compare_variants.png"
STUDY_FIGURE = IMAGES / "batch_size_study.png"
CONFUSION_FIGURE = IMAGES / "confusion_matrices.png"
START, END = "<!-- results:start -->", "<!-- results:end -->"
STUDY_START, STUDY_END = "<!-- batch-size:start -->", "<!-- batch-size:end -->"
TARGETS = {"batch": 85.0, "layer": 83.0, "group": 83.0}  # issue targets, mean of 3 seeds (%)


def table(runs):
    lines = ["| variant | seeds | test acc. mean ± std (%) | best | worst | target | params | "
             "epochs | s/epoch (median) | hardware | data |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant in [v for v in ORDER if v in runs]:
        rs = sorted(runs[variant], key=lambda r: r["seed"])
        accs = [100 * r["final_test_acc"] for r in rs]
        mean = statistics.mean(accs)
        spread = f"{mean:.2f} ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else \
            f"{mean:.2f} (1 seed)"
        hw = sorted({r["hardware"].get("gpu") or compare.threads(r["hardware"]) for r in rs})
        data = sorted({f"{compare.data_file(r)} (sha256 {r['data']['sha256'][:12]}…)"
                       for r in rs})
        epochs = sorted({r["epochs"] for r in rs})
        params = sorted({r["num_params"] for r in rs})
        target = TARGETS[variant]
        verdict = "met" if len(accs) >= 3 and mean >= target else (
            "not met" if len(accs) >= 3 else f"needs 3 seeds ({len(accs)} so far)")
        lines.append(
            f"| {variant} | {', '.join(str(r['seed']) for r in rs)} | {spread} | "
            f"{max(accs):.2f} | {min(accs):.2f} | ≥ {target:.0f}: {verdict} | "
            f"{', '.join(f'{p:,}' for p in params)} | {', '.join(map(str, epochs))} | "
            f"{statistics.median(t for r in rs for t in r['history']['epoch_time']):.1f} | "
            f"{'; '.join(hw)} | "
            f"{'; '.join(data)} |")
    dates = sorted(r["date"][:10] for rs in runs.values() for r in rs)
    if dates:
        lines.append("")
        lines.append(f"Single-view test accuracy after the last epoch (no test-time augmentation); "
                     f"std is the sample standard deviation over seeds; s/epoch is the median "
                     f"wall time of an epoch (training + test evaluation) over all runs, robust to "
                     f"the odd epoch slowed by other work on the machine. Runs dated "
                     f"{dates[0]} to {dates[-1]}; one JSON file per run in `results/`.")
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
        f"mean ± sample std over seeds.", "",
        *[f"- {fact}" for fact in compare.study_findings(study)],
    ]
    if runs:
        parts += ["", "Per-class test accuracy (%) of the 20-epoch runs (batch 128), mean over "
                      "seeds:", "", compare.per_class_table(runs), "",
                  "Most frequent confusions of the 20-epoch runs (true → predicted, share of "
                  "the true class's test images, confusion matrices summed over seeds):", "",
                  *compare.most_confused_lines(runs)]
    return "\n".join(parts)


def replace_between(text, start, end, body):
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the {start} / {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def render_readme(readme_text, runs, study=None, budget=None):
    text = replace_between(readme_text, START, END, table(runs))
    if STUDY_START in text or study is not None:
        text = replace_between(text, STUDY_START, STUDY_END,
                               study_section(study or {}, budget, runs))
    return text


def write_figures(runs, study):
    import matplotlib
    matplotlib.use("Agg")  # files only; the notebooks draw the same figures inline

    if runs:
        compare.plot_variant_curves(runs, FIGURE)
        compare.plot_confusion_matrices(runs, CONFUSION_FIGURE)
    if study:
        compare.plot_batch_size_study(study, STUDY_FIGURE)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that README.md is current")
    args = p.parse_args()
    runs, study, budget = load_runs(), load_study(), study_budget()
    text = README.read_text()
    new = render_readme(text, runs, study, budget)
    if args.check:
        if new != text:
            sys.exit("README.md results tables are out of date: run python tools/report.py")
        print("README.md results tables are current")
        return
    README.write_text(new)
    write_figures(runs, study)
    print(f"README.md tables rewritten from {sum(len(r) for r in runs.values())} results files "
          f"and {budget['runs'] if budget else 0} batch-size study files")


if __name__ == "__main__":
    main()
