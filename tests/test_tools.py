import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import report  # noqa: E402


def fake_run(variant, seed, acc, epochs=3):
    return {"variant": variant, "seed": seed, "final_test_acc": acc, "epochs": epochs,
            "num_params": 46538, "time_per_epoch_s": 40.0, "date": f"2026-11-2{seed}T00:00:00",
            "hardware": {"cpu": "Some CPU", "cpu_threads": 2},
            "data": {"source": "cifar10-jpeg.tar.gz (archive)", "sha256": "ab" * 32},
            "history": {"epoch": [1, 2, 3], "test_acc": [0.5, 0.6, acc],
                        "epoch_time": [40.0, 41.0, 90.0],
                        "test_loss": [1.5, 1.2, 1.0]}}


def test_table_reports_mean_std_best_worst_from_the_files():
    runs = {"batch": [fake_run("batch", s, a) for s, a in ((0, 0.80), (1, 0.82), (2, 0.84))],
            "group": [fake_run("group", 0, 0.75)]}
    text = report.table(runs)
    batch_row = next(l for l in text.splitlines() if l.startswith("| batch"))
    assert "| 0, 1, 2 | 82.00 ± 2.00 | 84.00 | 80.00 | ≥ 85: not met |" in batch_row
    group_row = next(l for l in text.splitlines() if l.startswith("| group"))
    assert "needs 3 seeds (1 so far)" in group_row
    assert "Runs dated 2026-11-20 to 2026-11-22" in text
    assert batch_row.split(" | ")[8] == "41.0"  # median epoch time, not the mean


def test_readme_section_is_replaced_between_the_markers():
    runs = {"layer": [fake_run("layer", 0, 0.7)]}
    out = report.render_readme(f"intro\n{report.START}\nold\n{report.END}\noutro\n", runs)
    assert out.startswith("intro\n") and out.endswith("outro\n") and "old" not in out
    assert "| layer | 0 | 70.00 (1 seed) |" in out
    with pytest.raises(SystemExit, match="markers"):
        report.render_readme("no markers", runs)


def test_notebook_cleaner_keeps_what_a_notebook_displays(tmp_path):
    import nbformat
    from make_notebooks import clean

    nb = nbformat.v4.new_notebook(metadata={"widgets": {"state": {}}})
    cell = nbformat.v4.new_code_cell("x", metadata={"execution": {"iopub.status.busy": "t"}})
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr",
                                           text="  0%|    | 0/9\r 50%|#   | 4/9\r100%|####| 9/9\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="epoch 1: ok\n")]
    nb.cells.append(cell)
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    clean(path)
    out = nbformat.read(path, as_version=4)
    assert "widgets" not in out.metadata and "execution" not in out.cells[0].metadata
    assert [o["text"] for o in out.cells[0].outputs] == ["100%|####| 9/9\n", "epoch 1: ok\n"]


def test_sweep_skips_runs_whose_results_exist(tmp_path):
    import subprocess

    (tmp_path / "batch_seed0.json").write_text("{}")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "sweep.py"), "--norms", "bn",
                          "--seeds", "0", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert "skip" in out.stdout and "batch_seed0.json" in out.stdout
    assert "train.py" not in out.stdout


def test_readme_results_tables_are_generated_from_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    current = report.render_readme(readme, report.load_runs(), report.load_study(),
                                   report.study_budget())
    assert current == readme, "README.md's results tables are stale: run python tools/report.py"


def test_sweep_plans_the_batch_size_study_with_linearly_scaled_learning_rates():
    import sweep

    runs = sweep.plan(["bn", "gn"], [0, 1], batch_sizes=[128, 2])
    names = [name for name, _ in runs]
    assert names == ["batch_bs2_seed0", "group_bs2_seed0", "batch_bs128_seed0",
                     "group_bs128_seed0", "batch_bs2_seed1", "group_bs2_seed1",
                     "batch_bs128_seed1", "group_bs128_seed1"]
    args = dict(zip(runs[0][1][::2], runs[0][1][1::2]))
    assert args == {"--norm": "batch", "--seed": "0", "--batch-size": "2",
                    "--lr": repr(0.1 * 2 / 128), "--run-name": "batch_bs2_seed0"}
    assert sweep.plan(["layer"], [3]) == [("layer_seed3", ["--norm", "layer", "--seed", "3"])]


def test_sweep_skips_finished_study_runs_and_refuses_batch_size_one(tmp_path):
    import subprocess

    for norm in ("batch", "group"):
        (tmp_path / f"{norm}_bs4_seed0.json").write_text("{}")
    cmd = [sys.executable, str(ROOT / "tools" / "sweep.py"), "--norms", "bn", "gn", "--seeds",
           "0", "--batch-sizes", "4", "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert out.stdout.count(": already done") == 2 and "train.py" not in out.stdout
    out = subprocess.run(cmd[:-3] + ["1", "--out-dir", str(tmp_path)], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "at least 2" in out.stderr


def test_notebook_writer_keeps_executed_notebooks(tmp_path, monkeypatch):
    import nbformat
    import make_notebooks

    monkeypatch.setattr(make_notebooks, "ROOT", tmp_path)
    name, nb = make_notebooks.compare_notebook()
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="ran\n")]
    nbformat.write(nb, tmp_path / name)
    monkeypatch.setattr(sys, "argv", ["make_notebooks.py", name])
    make_notebooks.main()
    assert make_notebooks.has_outputs(tmp_path / name)  # the run's outputs survive
    monkeypatch.setattr(sys, "argv", ["make_notebooks.py", "--force", name])
    make_notebooks.main()
    assert not make_notebooks.has_outputs(tmp_path / name)
