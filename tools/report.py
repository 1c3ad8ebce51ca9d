"""Regenerate README.md's results table and the combined figure from results/*.json.

    python tools/report.py            # rewrite the table between the README's results markers
    python tools/report.py --check    # exit 1 if the README table is out of date (for CI)

No number in the table is typed by hand: every cell comes from a committed results file.
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "results"
README = ROOT / "README.md"
FIGURE = ROOT / "images" / "compare_variants.png"
START, END = "<!-- results:start -->", "<!-- results:end -->"
ORDER = ("batch", "layer", "group")
TARGETS = {"batch": 85.0, "layer": 83.0, "group": 83.0}  # issue targets, mean of 3 seeds (%)


def load_runs(results_dir=RESULTS_DIR):
    """Full runs only: the files directly in results/ (sub-studies keep their own folders)."""
    runs = defaultdict(list)
    for path in sorted(Path(results_dir).glob("*.json")):
        run = json.loads(path.read_text())
        runs[run["variant"]].append(run)
    return runs


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
        hw = sorted({r["hardware"].get("gpu") or f"{r['hardware']['cpu']}, "
                     f"{r['hardware']['cpu_threads']} threads" for r in rs})
        data = sorted({f"{Path(r['data']['source'].split(' ')[0]).name} "
                       f"(sha256 {r['data']['sha256'][:12]}…)" for r in rs})
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


def figure(runs, path=FIGURE):
    """Test accuracy and loss per epoch of each variant: mean over seeds with a min–max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in [v for v in ORDER if v in runs]:
        for ax, key, scale in ((ax_acc, "test_acc", 100), (ax_loss, "test_loss", 1)):
            curves = np.array([np.array(r["history"][key]) * scale for r in runs[variant]])
            epochs = runs[variant][0]["history"]["epoch"]
            line, = ax.plot(epochs, curves.mean(0), label=f"{variant} ({len(curves)} seeds)")
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=line.get_color(),
                            alpha=0.2)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="test cross-entropy", title="Test loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return fig


def render_readme(readme_text, runs):
    if START not in readme_text or END not in readme_text:
        raise SystemExit(f"README.md lacks the {START} / {END} markers")
    head, rest = readme_text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(runs)}\n{END}{tail}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that README.md is current")
    args = p.parse_args()
    runs = load_runs()
    text = README.read_text()
    new = render_readme(text, runs)
    if args.check:
        if new != text:
            sys.exit("README.md results table is out of date: run python tools/report.py")
        print("README.md results table is current")
        return
    README.write_text(new)
    if runs:
        figure(runs)
    print(f"README.md table rewritten from {sum(len(r) for r in runs.values())} results files")


if __name__ == "__main__":
    main()
