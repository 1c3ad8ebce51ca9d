import json

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from model import ModelConfig  # noqa: E402
from utils import TrainConfig  # noqa: E402

from lab import compare, lr_study, per_epoch, report  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def study_run(variant, batch_size, seed, acc, batch_stats_acc=None, **changes):
    train_config = TrainConfig(seed=seed, batch_size=batch_size, lr=0.1 * batch_size / 128,
                               epochs=6, **changes).to_dict()
    return {"variant": variant, "seed": seed, "epochs": 6, "final_test_acc": acc,
            "final_test_acc_batch_stats": batch_stats_acc,
            "model_config": ModelConfig(norm=variant).to_dict(), "train_config": train_config,
            "data": {"source": "cifar10-jpeg.tar.gz (archive)", "train_images": 10000,
                     "test_images": 10000},
            "hardware": {"cpu": "Some CPU"}, "date": f"2026-11-2{seed}T10:00:00+00:00"}


@pytest.fixture
def study_dir(tmp_path):
    """BN collapses at batch 2 (and is far worse with batch statistics); GN and LN hold."""
    accs = {("batch", 2): (0.40, 0.50), ("batch", 128): (0.70, 0.72),
            ("group", 2): (0.60, 0.62), ("group", 128): (0.66, 0.68),
            ("layer", 2): (0.58, 0.60), ("layer", 128): (0.64, 0.66)}
    for (variant, b), pair in accs.items():
        for seed, acc in enumerate(pair):
            stats = acc - 0.2 if variant == "batch" and b == 2 else (
                acc - 0.01 if variant == "batch" else None)
            run = study_run(variant, b, seed, acc, stats)
            (tmp_path / f"{variant}_bs{b}_seed{seed}.json").write_text(json.dumps(run))
    return tmp_path


def full_run(variant, seed, confusion):
    confusion = np.asarray(confusion)
    per_class = (confusion.diagonal() / confusion.sum(1)).tolist()
    return {"variant": variant, "seed": seed, "epochs": 2, "num_params": 46538,
            "final_test_acc": float(confusion.trace() / confusion.sum()),
            "confusion_matrix": confusion.tolist(), "per_class_acc": dict(zip(CLASSES, per_class)),
            "history": {"epoch": [1, 2], "test_acc": [0.5, 0.7], "test_loss": [1.2, 0.9]}}


def cat_dog_confusion(cat_as_dog):
    cm = np.eye(10, dtype=int) * 90 + 1  # 10 off-diagonal mistakes per class, 1 in each cell
    cm[3, 3] -= cat_as_dog
    cm[3, 5] += cat_as_dog  # cats taken for dogs
    return cm


def test_study_is_loaded_by_variant_and_batch_size_with_bn_batch_stats(study_dir):
    study = compare.load_study(study_dir)
    assert study["batch"][2] == pytest.approx([40, 50])
    assert study["group"][128] == pytest.approx([66, 68])
    assert study[compare.BN_BATCH_STATS][2] == pytest.approx([20, 30])
    assert compare.BN_BATCH_STATS in study and list(study["layer"]) == [2, 128]


def test_study_table_has_mean_std_per_batch_size(study_dir):
    text = compare.study_table(compare.load_study(study_dir))
    lines = text.splitlines()
    assert lines[0] == "| batch size | BN (running stats) | LN | GN | BN (batch stats) | seeds |"
    assert lines[2] == "| 2 | 45.00 ± 7.07 | 59.00 ± 1.41 | 61.00 ± 1.41 | 25.00 ± 7.07 | 2 |"
    assert lines[3].startswith("| 128 | 71.00 ± 1.41 | 65.00 ± 1.41 | 67.00 ± 1.41 | 70.00 ± ")


def test_study_findings_name_the_drop_and_where_bn_falls_below(study_dir):
    facts = compare.study_findings(compare.load_study(study_dir))
    assert facts[0] == "BN: 71.00% at batch 128 → 45.00% at batch 2 (−26.00 points)."
    assert facts[1] == "GN: 67.00% at batch 128 → 61.00% at batch 2 (−6.00 points)."
    assert "lower mean than the better of GN/LN at batch size 2." in facts[3]
    assert facts[4].endswith("-20.00 at 2, -1.00 at 128 (points).")


def test_study_figure_uses_a_log_batch_axis_and_plots_the_means(study_dir):
    fig = compare.plot_batch_size_study(compare.load_study(study_dir))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    lines = {l.get_label(): l for l in ax.lines}
    assert set(lines) == {"BN (running stats)", "BN (batch stats)", "LN", "GN"}
    assert list(lines["BN (running stats)"].get_xdata()) == [2, 128]
    assert list(lines["BN (running stats)"].get_ydata()) == pytest.approx([45, 71])
    assert lines["BN (batch stats)"].get_linestyle() == "--"
    assert sum(len(c.get_offsets()) for c in ax.collections) == 4 * 2 * 2  # every seed a dot


def test_budget_reports_what_the_study_runs_share(study_dir):
    budget = compare.study_budget(study_dir)
    assert budget["runs"] == 12 and budget["epochs"] == [6] and budget["seeds"] == [0, 1]
    assert budget["lr_by_batch"] == {2: pytest.approx(0.0015625), 128: pytest.approx(0.1)}
    assert compare.study_budget(study_dir / "missing") is None
    # what the study varies (batch size, rate, its short budget) is not a recipe change
    assert budget["recipe"] == ["current"]
    run = study_run("batch", 8, 0, 0.5, weight_decay=1e-3)
    (study_dir / "batch_bs8_seed0.json").write_text(json.dumps(run))
    assert compare.study_budget(study_dir)["recipe"] == ["current", "weight_decay 0.001"]


def test_most_confused_pairs_come_from_summed_confusion_matrices():
    runs = {"batch": [full_run("batch", 0, cat_dog_confusion(20)),
                      full_run("batch", 1, cat_dog_confusion(10))],
            "group": [full_run("group", 0, cat_dog_confusion(0))]}
    pairs = compare.most_confused(runs, top=1)
    assert pairs["batch"][0][:2] == ("cat", "dog")
    assert pairs["batch"][0][2] == pytest.approx(100 * (21 + 11) / 200)
    assert compare.most_confused_lines(runs, top=1)[0] == "- batch: cat → dog 16.0%"
    table = compare.per_class_table(runs).splitlines()
    assert table[0] == "| class | batch (n=2) | group (n=1) |"
    assert table[5] == "| cat | 76.0 | 91.0 |"


def test_confusion_figure_shows_row_percentages_per_variant():
    runs = {"batch": [full_run("batch", 0, cat_dog_confusion(20))],
            "layer": [full_run("layer", 0, cat_dog_confusion(0))]}
    fig = compare.plot_confusion_matrices(runs)
    assert len(fig.axes) == 2
    shown = fig.axes[0].images[0].get_array()
    assert np.allclose(np.asarray(shown).sum(1), 100)
    assert shown[3, 5] == pytest.approx(21.0)


def test_combined_curves_draw_mean_and_band(tmp_path):
    runs = {"batch": [full_run("batch", 0, cat_dog_confusion(0)),
                      full_run("batch", 1, cat_dog_confusion(0))]}
    runs["batch"][1]["history"]["test_acc"] = [0.7, 0.9]
    fig = compare.plot_variant_curves(runs, tmp_path / "c.png")
    acc_ax = fig.axes[0]
    assert list(acc_ax.lines[0].get_ydata()) == pytest.approx([60, 80])
    assert len(acc_ax.collections) == 1  # the min-max band
    assert (tmp_path / "c.png").stat().st_size > 0


def test_readme_study_section_is_rewritten_between_its_markers(study_dir):
    study, budget = compare.load_study(study_dir), compare.study_budget(study_dir)
    text = (f"a\n{report.START}\n{report.END}\nb\n{report.common.STUDY_START}\nold\n"
            f"{report.common.STUDY_END}\nc\n")
    out = report.render_readme(text, {"study": study, "budget": budget})
    section = out.split(report.common.STUDY_START)[1].split(report.common.STUDY_END)[0]
    assert "old" not in section and "| 2 | 45.00 ± 7.07 |" in section
    assert "12 runs of 6 epochs on 10000 training images" in section
    assert "(2: 0.0015625, 128: 0.1)" in section
    assert out.endswith("\nc\n")


def test_unfinished_study_shows_missing_cells_and_seed_counts(study_dir):
    (study_dir / "group_bs2_seed0.json").unlink()
    (study_dir / "group_bs2_seed1.json").unlink()
    (study_dir / "layer_bs2_seed1.json").unlink()
    row = compare.study_table(compare.load_study(study_dir)).splitlines()[2]
    assert row == "| 2 | 45.00 ± 7.07 | 58.00 | – | 25.00 ± 7.07 | 1–2 |"
    assert compare.threads({"cpu": "X", "cpu_threads": 1}) == "X, 1 thread"
    capped = {"cpu": "X", "cpu_threads": 1, "cpu_capability": "AVX2", "cpu_native_bf16": True,
              "isa_caps": {"ATEN_CPU_CAPABILITY": "avx2"}}
    assert compare.threads(capped) == "X (AVX2 by ISA caps, native bf16), 1 thread"
    # caps that exclude bf16 (newer results files) describe the same CPU the same way
    hidden = {**capped, "cpu_native_bf16": False, "cpu_native_bf16_uncapped": True}
    assert compare.threads(hidden) == compare.threads(capped)
    gpu = {"device": "cuda", "cpu": "X", "cpu_threads": 2, "gpu": "NVIDIA H100 80GB HBM3",
           "gpu_capability": "9.0"}
    assert compare.threads(gpu) == "NVIDIA H100 80GB HBM3 (CUDA, compute capability 9.0)"


def lr_run(variant, lr, seed, acc):
    run = study_run(variant, 128, seed, acc)
    run["train_config"]["lr"] = lr
    if acc is None:
        run["diverged"] = {"epoch": 2, "step": 17, "message": "loss became nan"}
    return run


@pytest.fixture
def lr_study_dir(tmp_path):
    """BN: flat from 0.05 to 0.4; none: peaks at 0.05, chance at 0.4 and diverges at 0.8."""
    accs = {"batch": {0.025: (0.60, 0.62), 0.05: (0.70, 0.70), 0.1: (0.71, 0.71),
                      0.2: (0.705, 0.715), 0.4: (0.70, 0.70), 0.8: (0.65, 0.67)},
            "none": {0.025: (0.55, 0.57), 0.05: (0.60, 0.60), 0.1: (0.58, 0.58),
                     0.2: (0.40, 0.45), 0.4: (0.10, 0.10), 0.8: (None, 0.10)}}
    for variant, by_lr in accs.items():
        for lr, pair in by_lr.items():
            for seed, acc in enumerate(pair):
                (tmp_path / f"{variant}_lr{lr:g}_seed{seed}.json").write_text(
                    json.dumps(lr_run(variant, lr, seed, acc)))
    return tmp_path


def test_lr_study_finds_the_best_rate_and_the_range_within_a_point(lr_study_dir):
    study = lr_study.load_lr_study(lr_study_dir)
    assert list(study) == ["batch", "none"] and list(study["batch"]) == sorted(study["batch"])
    bn = lr_study.lr_summary(study["batch"])
    assert bn["best"] == 0.1 and bn["window"] == (0.05, 0.4)
    none = lr_study.lr_summary(study["none"])
    assert none["best"] == 0.05 and none["window"] == (0.05, 0.05)
    assert none["means"][0.8] is None  # one seed diverged: the rate has no mean
    table = lr_study.lr_table(study)
    assert "| batch | 0, 1 | 0.1 | 71.00 (71.00–71.00) | 0.05 to 0.4 | 8x | none | none |" in table
    assert "| none | 0, 1 | 0.05 | 60.00 (60.00–60.00) | 0.05 to 0.05 | 1x | 0.8: 1/2 | " \
           "0.4: 2/2, 0.8: 1/2 |" in table  # a seed at chance counts where the other diverged
    assert "test acc. at best" in table and lr_study.eval_set(study) == "test"


def test_lr_study_figure_marks_divergence_on_a_log_axis(lr_study_dir, tmp_path):
    fig = lr_study.plot_lr_study(lr_study.load_lr_study(lr_study_dir), tmp_path / "lr.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and (tmp_path / "lr.png").stat().st_size > 0
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:3] == ["batch (2 seeds)", "none (2 seeds)", "none: a seed or more diverged (NaN loss)"]
    diverged = ax.get_lines()[2]
    assert list(diverged.get_xdata()) == [0.8] and list(diverged.get_ydata()) == [10]
    assert ax.get_ylabel() == "final test accuracy (%)"


def test_lr_study_scored_on_the_validation_split_says_so(lr_study_dir, tmp_path):
    for f in lr_study_dir.glob("*.json"):
        run = json.loads(f.read_text())
        f.write_text(json.dumps({**run, "eval_set": "validation"}))
    study = lr_study.load_lr_study(lr_study_dir)
    assert "| validation acc. at best, mean (min–max) |" in lr_study.lr_table(study)
    fig = lr_study.plot_lr_study(study, tmp_path / "lr.png")
    assert fig.axes[0].get_ylabel() == "final validation accuracy (%)"


def test_the_forest_plot_groups_by_variant_sorts_by_effect_and_marks_what_was_adopted(tmp_path):
    def row(variant, config, mean, adopted=False):
        diff = {"seeds": [0, 1, 2, 3], "diffs": [mean] * 4, "mean": mean, "low": mean - 0.5,
                "high": mean + 0.5}
        return {"variant": variant, "config": config, "against": "recipe v1", "diff": diff,
                "adopted": adopted}

    rows = [row("layer", "b", 0.2), row("batch", "x", 1.0, adopted=True), row("batch", "y", -1.0)]
    fig = per_epoch.plot_technique_forest(rows, tmp_path / "forest.png")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert [l.split()[1] for l in labels] == ["y", "x", "b"]  # BN first, by effect; then LN
    stars = [line for line in fig.axes[0].lines if line.get_marker() == "*"]
    assert len(stars) == 1 and stars[0].get_xdata()[0] == 1.0
    assert (tmp_path / "forest.png").exists()


def test_a_seed_pairs_with_the_baseline_run_in_its_own_cpu_arithmetic_thread_count_included():
    # a LayerNorm run repeated with 2 threads differed from its 1-thread original; with 1 it did not
    def run(seed, threads, acc=0.8):
        return {"seed": seed, "precision": "fp32", "final_test_acc": acc,
                "hardware": {"device": "cpu", "cpu": "AMD EPYC", "cpu_capability": "AVX2",
                             "cpu_threads": threads}}

    change = [run(0, 1)]
    first, again = [run(0, 2, acc=0.79)], [run(0, 1, acc=0.78)]
    assert compare.arithmetic(change[0]) == "AVX2, 1 thread, fp32"
    assert compare.arithmetic(first[0]) == "AVX2, 2 threads, fp32"
    assert compare.alike_base(change, first, again) == again  # same threads, not the first arm
