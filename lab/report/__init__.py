"""Regenerate README.md's results tables and the figures in images/ from the results files.

    python -m lab.report            # rewrite the README tables, the figures, S8_Compare.ipynb
    python -m lab.report --check    # exit 1 if a README table is out of date (for CI)

Writes the results table (results/*.json), the batch-size study section
(results/batch_size/*.json), the precision check (results/precision/*.json against the fp32
runs), the speed tables (results/bench/*.txt, lab/bench.py's outputs), images/compare_variants.png,
images/confusion_matrices.png and images/batch_size_study.png. No number is typed by hand:
every cell comes from a results file.

It also re-executes S8_Compare.ipynb (it reads the same files, under nbval in CI): a results
file committed without it leaves the notebook's checked outputs stale and CI red.
"""

import argparse
import subprocess
import sys

import norm_stats
import normalizations

from lab import compare, front_page, lr_study, per_epoch, tune
from lab.compare import load_runs, load_study, study_budget
from lab.report.common import (ARCHIVES, AXES_FIGURE, CEILING_DIR, CONFUSION_FIGURE, DOCS, END,
                               EPOCHS_FIGURE, FIGURE, FOREST_FIGURE, LEVERS_DIR, LEVER_FIGURE,
                               LR_FIGURE, NORM_STATS_FIGURE, PROBE_FIGURE, README, ROOT, START,
                               STUDY_FIGURE, against_today, load_tuning, markers, replace_between)
from lab.report.finals import finals_answer, finals_section, study_section, summary_table, table
from lab.report.levers import (lever_name, lever_rows, lever_summary_section, levers_section,
                               on_lever_base, recipe_choice_section, round2_section)
from lab.report.speed import (bench_files, gpu_archives, gpu_section, load_gpu_checks,
                              load_precision_checks, precision_section, speed_section)
from lab.report.tuning import (arithmetic_section, mark_adopted, per_epoch_section,
                               recipe_by_epochs, technique_means, technique_rows, tuning_section)


# The README's generated sections, in README order: (marker, renderer of the loaded files).
SECTIONS = [
    ("front-run-time", lambda f: front_page.run_time(f["runs"], gpu_archives(f["gpu_checks"]))),
    ("front-results", lambda f: front_page.results_table(f["runs"])),
    ("front-batch-size", lambda f: front_page.batch_size_sentence(f["study"], f["budget"])),
    ("front-notice", lambda f: front_page.notice(f["runs"])),
    ("summary", lambda f: summary_table(f["runs"])),
    ("finals", lambda f: finals_section(f["runs"], f["archives"], on_lever_base(f["tuning"]))),
    ("results", lambda f: table(f["runs"], f["archives"], gpu_archives(f["gpu_checks"]))),
    ("finals-answer", lambda f: finals_answer(f["runs"], f["archives"])),
    ("finals-per-seed", lambda f: finals_section(f["runs"], f["archives"], on_lever_base(f["tuning"]), per_seed=True)),
    ("batch-size", lambda f: study_section(f["study"], f["budget"], f["runs"])),
    ("precision", lambda f: precision_section(f["checks"], f["runs"], f["archives"])),
    ("tuning", lambda f: tuning_section(f["tuning"])),
    ("per-epoch", lambda f: per_epoch_section(f["tuning"], f["ceiling"], f["arithmetic"])),
    ("arithmetic", lambda f: arithmetic_section(f["tuning"], f["arithmetic"])),
    ("levers", lambda f: levers_section(f["levers"])),
    ("levers-cpu", lambda f: levers_section(on_lever_base(f["tuning"]), "levers-cpu")),
    ("recipe-choice", lambda f: recipe_choice_section(on_lever_base(f["tuning"]))),
    ("levers-summary", lambda f: lever_summary_section(f["levers"], on_lever_base(f["tuning"]))),
    ("round2", lambda f: round2_section(f["tuning"])),
    ("round2-gpu", lambda f: round2_section(f["round2_gpu"], "round2-gpu")),
    ("speed", lambda f: speed_section(f["bench_files"])),
    ("gpu-check", lambda f: gpu_section(f["gpu_checks"])),
    ("lr-study", lambda f: lr_section(f["lr_study"])),
    ("norm-statistics", lambda f: norm_statistics_section(f["runs"])),
]


def render_readme(readme_text, files):
    """A page's text (README.md or docs/*.md) with each generated section rebuilt from `files`
    (load_files(): what each renderer reads; one left out renders as empty), where the page
    has its markers."""
    files = {"runs": {}, "archives": [], "study": {}, "budget": None, "checks": [],
             "bench_files": [], "tuning": {}, "ceiling": {}, "arithmetic": {}, "lr_study": {},
             "levers": {}, "round2_gpu": {},
             "gpu_checks": [],
             **files}
    text = readme_text
    for name, render in SECTIONS:
        start, end = markers(name)
        if start in text:
            text = replace_between(text, start, end, render(files))
    return text


def lr_section(study):
    runs = lr_study.lr_runs(study)
    if not runs:
        return "No learning-rate study results yet (results/lr_study/ is empty)."
    shared = lambda key: "/".join(sorted({str(key(r)) for r in runs}))
    scored = shared(lambda r: r["data"]["test_images"])
    evaluated = lr_study.eval_set(study)
    scored_on = (f"the {scored} validation images held out of the training set (never trained "
                 f"on; the test set is not used)" if evaluated == "validation"
                 else f"all {scored} test images")
    changes = sorted({compare.recipe_changes(r, ignore=("epochs", "lr")) for r in runs})
    otherwise = f"the recipe otherwise {against_today(changes)}"
    return (f"{lr_study.lr_table(study)}\n\n{len(runs)} runs of {shared(lambda r: r['epochs'])} "
            f"epochs on {shared(lambda r: r['data']['train_images'])} training images (a "
            f"stratified subset, drawn per seed), scored on {scored_on}, batch "
            f"{shared(lambda r: r['train_config']['batch_size'])}, {otherwise}; "
            f"{'; '.join(sorted({compare.threads(r['hardware']) for r in runs}))}, "
            f"{shared(lambda r: r['precision'])}; data {shared(compare.data_file)}; "
            f"{min(r['date'][:10] for r in runs)} to {max(r['date'][:10] for r in runs)}. "
            f"Final single-view {evaluated} accuracy (%); a rate counts within "
            f"the window only if no "
            f"seed diverged there.")


def norm_statistics_section(runs):
    measured = compare.norm_statistics_runs(runs)
    if not measured:
        return "No results file holds the statistics yet (runs from before norm_stats.py)."
    table = norm_stats.statistics_table({v: r["norm_statistics"] for v, r in measured.items()})
    sources = "; ".join(f"{v}: seed {r['seed']}, {compare.threads(r['hardware'])}, {r['precision']}, "
                        f"{r['date'][:10]}" for v, r in measured.items())
    return (f"{table}\n\nStd of each set's activations, lowest to highest over the sets and the "
            f"layers, on {next(iter(measured.values()))['norm_statistics']['images']} test "
            f"images (25 per class) in evaluation mode. Runs: {sources}.")


def load_archives(results_dir=ROOT / "results"):
    """[(label, folder, {variant: runs})] of the ARCHIVES that exist, oldest first."""
    return [(label, folder, load_runs(results_dir / folder)) for folder, label in ARCHIVES
            if (results_dir / folder).is_dir()]


def load_files():
    """Every committed results file the README's sections are generated from."""
    return {"runs": load_runs(), "study": load_study(), "budget": study_budget(),
            "checks": load_precision_checks(), "bench_files": bench_files(),
            "tuning": load_tuning(), "ceiling": load_tuning(CEILING_DIR),
            "arithmetic": load_tuning(compare.ARITHMETIC_DIR), "levers": load_tuning(LEVERS_DIR),
            "round2_gpu": load_tuning(tune.ROUND2_GPU_DIR),
            "archives": load_archives(), "gpu_checks": load_gpu_checks(),
            "lr_study": lr_study.load_lr_study()}


def render_current(text, files=None):
    """README text with every generated section rebuilt from the committed files."""
    return render_readme(text, load_files() if files is None else files)


def write_figures(runs, study, rates, tuning=None, ceiling=None, arithmetic=None,
                  levers=None):
    import matplotlib
    matplotlib.use("Agg")  # files only; the notebooks draw the same figures inline

    if runs:
        compare.plot_variant_curves(runs, FIGURE)
        compare.plot_confusion_matrices(runs, CONFUSION_FIGURE)
    if study:
        compare.plot_batch_size_study(study, STUDY_FIGURE)
    normalizations.plot_norm_axes(AXES_FIGURE)
    curves = recipe_by_epochs(tuning or {}, ceiling or {})
    if any(len(by_epochs) > 1 for by_epochs in curves.values()):
        paired = {v: {c: acc for c, acc in by_config.items() if len(tuning[(v, c, 20)]) > 1}
                  for v, by_config in technique_means(tuning).items()}  # the table has the rest
        per_epoch.plot_equivalent_epochs(curves, paired, EPOCHS_FIGURE)
    rows = [r for r in technique_rows(tuning or {}, arithmetic) if r["diff"]["low"] is not None]
    if rows:
        per_epoch.plot_technique_forest(mark_adopted(rows), FOREST_FIGURE)
    rows = [{**r, "config": lever_name(r["config"])} for r in lever_rows(levers or {})
            if r["diff"]["low"] is not None]
    if rows:
        per_epoch.plot_technique_forest(rows, LEVER_FIGURE, title=(
            f"Each lever on {tune.LEVER_BASE_LABEL} at 20 epochs (GPU, paired seeds)\n"
            "filled: interval above zero (wins)"))
    if rates:  # the learning-rate study's runs
        lr_study.plot_lr_study(rates, LR_FIGURE)
    measured = compare.norm_statistics_runs(runs)
    if measured:
        norm_stats.plot_norm_statistics({v: r["norm_statistics"] for v, r in measured.items()},
                                        NORM_STATS_FIGURE)
        norm_stats.plot_layer_probe({v: r["history"] for v, r in measured.items()},
                                    next(iter(measured.values()))["norm_statistics"]["layers"],
                                    PROBE_FIGURE)


def execute_compare_notebook():
    """Run S8_Compare.ipynb in place and clean it as every committed notebook is cleaned."""
    notebook = ROOT / "S8_Compare.ipynb"
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                    "--inplace", "--ExecutePreprocessor.timeout=-1", str(notebook)],
                   cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "lab.make_notebooks", "--clean",
                    str(notebook)], cwd=ROOT, check=True)


def pages():
    """The pages whose generated sections this script writes: README.md and docs/*.md."""
    return [README, *sorted(DOCS.glob("*.md"))]


def render_pages(files):
    """{page: its text with every generated section rebuilt}; each section lives on one page."""
    rendered = {page: render_readme(page.read_text(), files) for page in pages()}
    for name, _ in SECTIONS:
        holders = [p.name for p in rendered if markers(name)[0] in p.read_text()]
        if len(holders) > 1:
            raise SystemExit(f"the {name} section's markers are on {', '.join(holders)}: "
                             f"keep them on one page")
    if not any(START in text for text in rendered.values()):
        raise SystemExit(f"no page holds the results table's markers {START} / {END}")
    return rendered


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="only check that README.md and docs/*.md are current")
    p.add_argument("--no-notebook", action="store_true",
                   help="skip re-executing S8_Compare.ipynb (tables and figures only)")
    args = p.parse_args()
    files = load_files()
    rendered = render_pages(files)
    stale = [page for page, text in rendered.items() if text != page.read_text()]
    if args.check:
        if stale:
            sys.exit(f"generated tables out of date in {', '.join(str(p.relative_to(ROOT)) for p in stale)}: "
                     f"run python -m lab.report")
        print(f"README.md and docs/*.md ({len(rendered) - 1} pages) are current")
        return
    for page in stale:
        page.write_text(rendered[page])
    write_figures(files["runs"], files["study"], files["lr_study"], files["tuning"],
                  files["ceiling"], files["arithmetic"], files["levers"])
    if not args.no_notebook:
        execute_compare_notebook()
    print(f"README.md tables rewritten from {sum(len(r) for r in files['runs'].values())} "
          f"results files and {files['budget']['runs'] if files['budget'] else 0} batch-size "
          f"study files")
