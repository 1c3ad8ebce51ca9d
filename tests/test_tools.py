import re
import subprocess
import sys

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

from conftest import ROOT
from model import ModelConfig
from checkpoints import recipe, with_defaults
from utils import TrainConfig
from variants import DEFAULT, course_variants

from lab import make_notebooks, per_epoch, processes, report, sweep, tune
from lab import train as lab_train
from lab.levers import LabNet
from lab.make_notebooks import clean

def fake_run(variant, seed, acc, epochs=3, flip_acc=None, precision=None, **changes):
    """A results file's fields, today's recipe unless `changes` overrides a config field."""

    model_config = ModelConfig(norm=variant).to_dict()
    train_config = TrainConfig(seed=seed).to_dict()
    for key, value in changes.items():
        (model_config if key in model_config else train_config)[key] = value
    run = {"variant": variant, "seed": seed, "final_test_acc": acc, "epochs": epochs,
           "num_params": 46538, "time_per_epoch_s": 40.0, "date": f"2026-11-2{seed}T00:00:00",
           "hardware": {"cpu": "Some CPU", "cpu_threads": 2},
           "data": {"source": "cifar10-jpeg.tar.gz (archive)", "sha256": "ab" * 32},
           "model_config": model_config, "train_config": train_config,
           "history": {"epoch": [1, 2, 3], "test_acc": [0.5, 0.6, acc],
                       "train_acc": [0.4, 0.5, acc - 0.01], "train_loss": [1.9, 1.4, 1.1],
                       "epoch_time": [40.0, 41.0, 90.0], "test_loss": [1.5, 1.2, 1.0]}}
    if flip_acc is not None:
        run["final_test_acc_flip_tta"] = flip_acc
    if precision:
        run["precision"] = precision
    return run


def row(text, start):
    return next(line for line in text.splitlines() if line.startswith(start))


def test_table_reports_mean_std_best_worst_from_the_files():
    runs = {"batch": [fake_run("batch", s, a, flip_acc=a + 0.01)
                      for s, a in ((0, 0.80), (1, 0.82), (2, 0.84))],
            "group": [fake_run("group", 0, 0.75)]}
    text = report.table(runs)
    batch_row = row(text, "| batch")
    # train acc., test mean ± std, flip-TTA beside it, best, worst, the target and the gap
    assert ("| current | 0, 1, 2 | 81.00 | 82.00 ± 2.00 | 83.00 | 84.00 | 80.00 | "
            "≥ 85: not met (-3.00) |") in batch_row
    assert "needs 3 seeds (1 so far)" in row(text, "| group")
    assert "| not recorded |" in row(text, "| group")  # an old file: no flip-TTA, never a guess
    assert "Runs dated 2026-11-20 to 2026-11-22" in text
    assert batch_row.split(" | ")[11] == "41.0"  # median epoch time, not the mean


def test_table_labels_an_earlier_recipe_by_how_it_differs_from_todays_defaults():
    old_lr = TrainConfig.lr / 2
    runs = {"batch": [fake_run("batch", s, 0.86) for s in (0, 1, 2)]}
    before = {"batch": [fake_run("batch", s, 0.81, lr=old_lr, activation="celu")
                        for s in (0, 1, 2)]}
    v1 = {"batch": [fake_run("batch", s, 0.83, lr=old_lr) for s in (0, 1, 2)]}
    archives = [("before the study", "before-study", before), ("recipe v1", "recipe-v1", v1)]
    text = report.table(runs, archives)
    rows = [line for line in text.splitlines() if line.startswith("| batch")]
    assert rows[0].startswith("| batch | current |") and "met (+1.00)" in rows[0]
    assert rows[1].startswith(f"| batch | `activation celu; lr {old_lr}` (before the study) |")
    assert rows[2].startswith(f"| batch | `lr {old_lr}` (recipe v1) |")
    assert "(before the study) are kept in `results/before-study/`" in text
    assert "(recipe v1) are kept in `results/recipe-v1/`" in text


def test_a_results_file_from_before_the_optimizer_setting_reads_as_the_sgd_it_ran():
    old = fake_run("batch", 0, 0.81)
    del old["train_config"]["optimizer"]  # recipe v1's files predate the setting
    assert report.compare.recipe_changes(old) == "optimizer sgd"
    assert report.compare.recipe_changes(fake_run("batch", 0, 0.81)) == "current"


def test_a_setting_missing_from_the_label_order_is_still_in_the_label(monkeypatch):
    run = fake_run("batch", 0, 0.81)
    run["train_config"]["lookahead"] = 5
    monkeypatch.setattr(report.compare, "FIELD_ORDER", report.compare.FIELD_ORDER[:-1])
    assert report.compare.FIELD_ORDER[-1] != "lookahead"
    assert report.compare.recipe_changes(run) == "lookahead 5"


def test_a_results_file_from_before_the_conv_setting_reads_as_the_full_convs_it_ran():
    old = fake_run("batch", 0, 0.81)
    del old["model_config"]["conv"]  # recipe v2's files predate the setting
    assert with_defaults(old["model_config"], old["train_config"], ModelConfig,
                         TrainConfig)[0]["conv"] == "full"


def test_archived_recipes_load_oldest_first_and_only_where_kept(tmp_path):
    (tmp_path / "recipe-v1").mkdir()
    assert report.load_archives(tmp_path) == [("recipe v1", "recipe-v1", {})]
    (tmp_path / "before-study").mkdir()
    assert [label for label, _, _ in report.load_archives(tmp_path)] == \
        ["before the study", "recipe v1"]


def test_precision_check_compares_with_the_same_recipe_in_another_precision():
    check = fake_run("batch", 0, 0.815, precision="bf16", lr=TrainConfig.lr / 2)
    same_recipe_fp32 = [fake_run("batch", s, a, lr=TrainConfig.lr / 2)
                        for s, a in ((0, 0.81), (1, 0.82))]
    other_recipe = [fake_run("batch", s, 0.90, precision="bf16") for s in (0, 1)]
    text = report.precision_section([check], {"batch": other_recipe},
                                    [("before the study", "before-study",
                                      {"batch": same_recipe_fp32})])
    assert "| batch seed 0 | bf16 |" in text
    assert "| fp32, cpu, 0, 1 | 81.50 ± 0.71 (81.00–82.00) | +0.00 (+0.0 std) | yes |" in text
    assert "90.00" not in text  # another recipe is no reference, whatever its precision


def test_a_gpu_run_is_checked_against_every_cpu_run_of_its_recipe():
    gpu = {"cpu": "Host", "cpu_threads": 2, "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3",
           "gpu_capability": "9.0"}
    check = {**fake_run("batch", 0, 0.83, precision="bf16"), "hardware": gpu}
    cpu_bf16 = [fake_run("batch", s, a, precision="bf16") for s, a in ((0, 0.81), (1, 0.82))]
    cpu_fp32 = [fake_run("batch", s, 0.815) for s in (0, 1)]
    text = report.precision_section([check], {"batch": cpu_bf16},
                                    [("before the study", "before-study", {"batch": cpu_fp32})])
    line = row(text, "| batch seed 0 | bf16 |")
    assert "| NVIDIA H100 80GB HBM3 (CUDA, compute capability 9.0) | 83.00 |" in line
    assert "| bf16, cpu, 0, 1; fp32, cpu, 0, 1 | 81.50 ± 0.41 (81.00–82.00) |" in line
    assert line.endswith("| +1.50 (+3.7 std) | no |")
    assert "Training loss" not in text  # step-by-step losses only where the device is the same


def test_readme_section_is_replaced_between_the_markers():
    runs = {"layer": [fake_run("layer", 0, 0.7)]}
    out = report.render_readme(f"intro\n{report.START}\nold\n{report.END}\noutro\n",
                               {"runs": runs})
    assert out.startswith("intro\n") and out.endswith("outro\n") and "old" not in out
    assert "| layer | current | 0 | 69.00 | 70.00 (1 seed) |" in out
    assert report.render_readme("no markers", {"runs": runs}) == "no markers"


def test_each_section_lives_on_one_page_and_some_page_holds_the_results_table(tmp_path,
                                                                              monkeypatch):
    front, study = tmp_path / "README.md", tmp_path / "study.md"
    front.write_text("intro\n")
    study.write_text("no tables\n")
    monkeypatch.setattr(report, "pages", lambda: [front, study])
    with pytest.raises(SystemExit, match="no page holds the results table's markers"):
        report.render_pages({"runs": {}})
    for page in (front, study):
        page.write_text(f"{report.START}\n{report.END}\n")
    with pytest.raises(SystemExit, match="keep them on one page"):
        report.render_pages({"runs": {}})


def test_notebook_cleaner_keeps_what_a_notebook_displays(tmp_path):
    nb = nbformat.v4.new_notebook(metadata={"widgets": {"state": {}}})
    cell = nbformat.v4.new_code_cell("x", metadata={"execution": {"iopub.status.busy": "t"}})
    # nbconvert saves each tqdm redraw as an output of its own
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text=text)
                    for text in ("\r  0%|    | 0/9", "\r 50%|#   | 4/9", "\r        ", "\r")]
    cell.outputs.append(nbformat.v4.new_output("stream", name="stdout", text="epoch 1: ok\n"))
    cell.outputs += [nbformat.v4.new_output("stream", name="stderr", text=text)
                     for text in ("\r 50%|#   | 4/9", "\r100%|####| 9/9\n")]
    nb.cells.append(cell)
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    clean(path)
    out = nbformat.read(path, as_version=4)
    assert "widgets" not in out.metadata and "execution" not in out.cells[0].metadata
    assert [o["text"] for o in out.cells[0].outputs] == ["epoch 1: ok\n", "100%|####| 9/9\n"]


def test_sweep_skips_runs_whose_results_exist(tmp_path):
    (tmp_path / "batch_seed0.json").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "lab.sweep", "--norms", "bn",
                          "--seeds", "0", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert "skip" in out.stdout and "batch_seed0.json" in out.stdout
    assert "lab.train" not in out.stdout  # no run started


def test_a_sweeps_jobs_print_whole_lines(tmp_path):
    """Its threads print at once; a line of one inside another's (seen in a grid's log) reads
    as a run never reported."""
    seeds = [str(s) for s in range(60)]
    for seed in seeds:
        (tmp_path / f"batch_seed{seed}.json").write_text("{}")
    out = subprocess.run([sys.executable, "-m", "lab.sweep", "--norms", "bn", "--seeds", *seeds,
                          "--jobs", "4", "--out-dir", str(tmp_path), "--log-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    lines = out.stdout.splitlines()
    assert len(lines) == 60 and all(re.fullmatch(r"skip \S+\.json: already done", x) for x in lines)


def test_readme_results_tables_are_generated_from_the_committed_results():
    rendered = report.render_pages(report.load_files())
    assert {p.name for p in rendered} >= {"README.md", "results.md", "learning-per-epoch.md"}
    stale = [p.name for p, text in rendered.items() if text != p.read_text()]
    assert not stale, f"generated tables stale in {stale}: run python -m lab.report"


def test_learning_rate_scales_linearly_with_the_batch_size():
    assert sweep.scaled_lr(128) == TrainConfig.lr
    assert sweep.scaled_lr(2) == pytest.approx(TrainConfig.lr / 64)
    assert sweep.scaled_lr(256, base_lr=0.2) == pytest.approx(0.4)


def test_sweep_plans_the_batch_size_study_with_linearly_scaled_learning_rates():
    runs = sweep.plan(["bn", "gn"], [0, 1], batch_sizes=[128, 2])
    names = [name for name, _ in runs]
    assert names == ["batch_bs2_seed0", "group_bs2_seed0", "batch_bs128_seed0",
                     "group_bs128_seed0", "batch_bs2_seed1", "group_bs2_seed1",
                     "batch_bs128_seed1", "group_bs128_seed1"]
    args = dict(zip(runs[0][1][::2], runs[0][1][1::2]))
    assert args == {"--norm": "batch", "--seed": "0", "--batch-size": "2",
                    "--lr": repr(0.1 * 2 / 128), "--run-name": "batch_bs2_seed0"}
    assert sweep.plan(["layer"], [3]) == [
        ("layer_seed3", ["--norm", "layer", "--seed", "3", "--run-name", "layer_seed3"])]
    # A non-default rate gets its own name, so it cannot be mistaken for the default run.
    assert sweep.plan(["gn"], [0], base_lr=0.2) == [
        ("group_seed0_lr0.2", ["--norm", "group", "--seed", "0", "--lr", "0.2",
                               "--run-name", "group_seed0_lr0.2"])]


def test_sweep_skips_finished_study_runs_and_refuses_batch_size_one(tmp_path):
    for norm in ("batch", "group"):
        (tmp_path / f"{norm}_bs4_seed0.json").write_text("{}")
    cmd = [sys.executable, "-m", "lab.sweep", "--norms", "bn", "gn", "--seeds",
           "0", "--batch-sizes", "4", "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.count(": already done") == 2 and "lab.train" not in out.stdout
    out = subprocess.run(cmd[:-3] + ["1", "--out-dir", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 2 and "at least 2" in out.stderr


def test_notebook_writer_keeps_executed_notebooks(tmp_path, monkeypatch):
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


def readme_commands():
    """(block number, command) for every command in README.md's bash blocks, with backslash
    continuations joined and `&&` chains split; export lines are kept as commands."""

    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = []
    for number, block in enumerate(blocks):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            commands += [(number, part.strip()) for part in line.split("&&") if part.strip()]
    return commands


def test_readme_commands_run_as_written_from_a_fresh_clone():
    """Every python call goes through the venv the setup command makes, every flag exists, and
    every command that reads CIFAR-10 is told where the local copy is."""

    commands = readme_commands()
    assert commands, "README.md has no bash blocks"
    exported, helps = set(), {}
    for block, command in commands:
        if command.startswith("export CIFAR10_DATA="):
            exported.add(block)
            continue
        words = command.split()
        python = next((w for w in words if re.fullmatch(r"(\S*/)?python3?", w)), None)
        if python is None:
            continue
        assert python in (".venv/bin/python", "python3"), f"bare {python}: {command}"
        if python == "python3":
            assert "-m venv" in command, f"runs outside the venv: {command}"
            continue
        script = words[words.index(python) + 1]
        if script == "-m":  # a module: a lab tool, or pytest (whose flags are not ours)
            script = words[words.index(python) + 2]
            if not script.startswith("lab."):
                continue
            assert (ROOT / (script.replace(".", "/") + ".py")).is_file(), \
                f"no such module {script}: {command}"
            run = ["-m", script]
        else:
            assert (ROOT / script).is_file(), f"no such script {script}: {command}"
            run = [str(ROOT / script)]
        if script not in helps:
            helps[script] = subprocess.run([sys.executable, *run, "--help"],
                                           capture_output=True, text=True, cwd=ROOT).stdout
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", command):
            assert flag in helps[script], f"{script} has no {flag}: {command}"
        if script in ("train.py", "lab.bench", "lab.sweep"):
            assert "CIFAR10_DATA=" in command or "--data" in command or block in exported, \
                f"needs the data's location (CIFAR10_DATA or --data): {command}"


@pytest.mark.parametrize("name", ["S8_BatchNorm.ipynb", "S8_LayerNorm.ipynb",
                                  "S8_GroupNorm.ipynb", "S8_Compare.ipynb"])
def test_colab_setup_cell_stops_at_once_while_the_repository_url_is_a_placeholder(
        name, tmp_path, monkeypatch):
    cell = next(c for c in nbformat.read(ROOT / name, as_version=4).cells
                if c.cell_type == "code" and "google.colab" in c.source)
    shell_calls = []

    class FakeShell:
        def system(self, cmd):
            shell_calls.append(cmd)

        def run_line_magic(self, magic, arg):
            shell_calls.append(f"%{magic} {arg}")

    def run(source):
        code = TransformerManager().transform_cell(source)
        exec(compile(code, name, "exec"), {"get_ipython": FakeShell})

    monkeypatch.chdir(tmp_path)  # no model.py / lab/compare.py here: a fresh Colab runtime
    monkeypatch.setitem(sys.modules, "google.colab", object())
    with pytest.raises(RuntimeError, match=r"REPO is still the placeholder .*Set REPO in "
                                           r"lab/make_notebooks.py"):
        run(cell.source)
    assert shell_calls == []  # nothing cloned or installed before the message
    run(cell.source.replace("YOUR-GITHUB-USER/", "someone/", 1))
    assert shell_calls[0] == "git clone -q https://github.com/{REPO}.git"


def test_tuning_plan_runs_every_configuration_on_the_validation_split():
    runs = tune.plan(["base", "lr0.2"], [0, 1], epochs=5, norm="bn")
    assert [name for name, _ in runs] == ["batch_base_e5_seed0", "batch_base_e5_seed1",
                                          "batch_lr0.2_e5_seed0", "batch_lr0.2_e5_seed1"]
    for name, args in runs:
        assert "--validation" in args and args[args.index("--run-name") + 1] == name
        assert args[args.index("--epochs") + 1] == "5"
    assert runs[2][1][runs[2][1].index("--lr") + 1] == "0.2"
    with pytest.raises(SystemExit, match="unknown configuration"):
        tune.plan(["nonsense"], [0], epochs=5)


@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_every_tuning_configuration_is_a_legal_network_for_every_variant(norm):
    """Under 50,000 parameters, group count dividing every width: the assignment's limits."""

    for config in tune.default_configs(norm):  # each as the study runs it
        model_config, _ = lab_train.configs_from(lab_train.parse_args(["--norm", norm,
                                                               *tune.config_flags(config)]))
        assert LabNet(model_config).get_num_params() < 50_000, config


def fake_tuning_run(acc, seed, epochs=5, tta=None):
    return {"final_test_acc": acc, "final_test_acc_flip_tta": tta or acc + 0.01, "seed": seed,
            "num_params": 46538, "date": "2026-11-22T00:00:00", "precision": "bf16",
            "hardware": {"cpu": "Some CPU", "cpu_threads": 1},
            "data": {"train_images": 45000, "test_images": 5000}}


def validation_runs(acc, seeds=(0, 1, 2, 3)):
    """20-epoch runs scored on the validation split, one per seed: accuracy `acc[i]`."""
    return [{**fake_tuning_run(a, s, epochs=20),
             "data": {"train_images": 45000, "test_images": 5000,
                      "source": "cifar10-jpeg.tar.gz (archive)"}}
            for s, a in zip(seeds, acc)]


def test_ablation_table_judges_each_lever_by_the_interval_of_its_paired_differences():
    base = [0.70, 0.71, 0.69, 0.72]
    groups = {("batch", "base", 5): [fake_tuning_run(a, s) for s, a in enumerate(base)],
              ("batch", "lr0.2", 5): [fake_tuning_run(a + 0.04, s) for s, a in enumerate(base)],
              ("batch", "ls0", 5): [fake_tuning_run(0.705, 0), fake_tuning_run(0.72, 1)],
              ("batch", "gelu", 5): [fake_tuning_run(a - d, s) for s, (a, d) in
                                     enumerate(zip(base, (0.01, 0.02, 0.01, 0.02)))]}
    text = report.tuning_section(groups)
    row = lambda config: next(l for l in text.splitlines() if f"| {config} |" in l)  # noqa: E731
    assert "| 74.50 (73.00–76.00) | +4.00, +4.00, +4.00, +4.00 | +4.00 [+4.00, +4.00] | wins |" \
        in row("lr0.2")
    # +0.50 and +1.00: mean +0.75, sd 0.354, t(1) = 12.706 -> half-width 3.18
    assert "| +0.50, +1.00 | +0.75 [-2.43, +3.93] | no decision |" in row("ls0")
    # -1, -2, -1, -2: mean -1.5, sd 0.577, t(3) = 3.182 -> half-width 0.92
    assert "| -1.50 [-2.42, -0.58] | loses |" in row("gelu")
    assert "`--lr 0.2`" in row("lr0.2") and "(recipe v1)" in row("base")
    assert "scored on the 5000 held-out validation images (never the test set)" in text


def test_ablation_table_reads_a_full_budget_pair_only_at_the_protocols_seeds():
    """Two seeds screen a 5-epoch proxy; at 20 epochs the table waits for 4, like the study's."""
    base = [0.70, 0.71, 0.69, 0.72]
    groups = {("batch", "base", 20): [fake_tuning_run(a, s, 20) for s, a in enumerate(base)],
              ("batch", "lr0.2", 20): [fake_tuning_run(a + 0.04 + s / 1000, s, 20)
                                       for s, a in enumerate(base[:2])],
              ("batch", "gelu", 20): [fake_tuning_run(a + 0.04 + s / 1000, s, 20)
                                      for s, a in enumerate(base)]}
    text = report.tuning_section(groups)
    row = lambda config: next(l for l in text.splitlines() if f"| {config} |" in l)  # noqa: E731
    # the interval clears zero at 2 seeds, and still no verdict
    assert "| +4.05 [+3.41, +4.69] | needs 4 paired seeds (2 so far) |" in row("lr0.2")
    assert "| wins |" in row("gelu")


def test_proxy_check_reports_rank_agreement_between_budgets():
    groups = {}
    for config, short, full in (("base", 0.70, 0.80), ("lr0.2", 0.74, 0.83),
                                ("ls0", 0.72, 0.79)):
        groups[("batch", config, 5)] = [fake_tuning_run(short, 0)]
        groups[("batch", config, 20)] = [fake_tuning_run(full, 0, epochs=20)]
    text = report.tuning_section(groups)
    assert "Ranked at 5: lr0.2, ls0, base; at 20: lr0.2, base, ls0." in text
    assert "Spearman rank correlation 0.50." in text
    assert report.common.spearman([1, 2, 3], [10, 20, 30]) == 1.0
    assert report.common.spearman([1, 2, 3], [30, 20, 10]) == -1.0


def test_tuning_combinations_join_the_flags_of_their_parts():
    assert tune.config_flags("lr0.2+ls0") == [*tune.RECIPE_V1, "--lr", "0.2", "--label-smoothing",
                                              "0"]
    (name, args), = tune.plan(["w24-32-28+ema0.99"], [1], epochs=5)
    assert name == "batch_w24-32-28+ema0.99_e5_seed1"
    last = len(args) - 1 - args[::-1].index("--widths")  # the change's, after recipe v1's
    assert args[last + 1: last + 4] == ["24", "32", "28"]
    assert args[args.index("--ema") + 1] == "0.99"
    with pytest.raises(SystemExit, match=r"unknown configuration\(s\) \['lr9'\]"):
        tune.config_flags("lr0.2+lr9")


def test_tuning_base_trains_the_recipe_v1_that_files_from_before_muon_record():
    model, config = lab_train.configs_from(lab_train.parse_args(tune.config_flags("base")))
    assert (model.conv, model.widths) == ("full", (16, 28, 32))  # the defaults until 2026-12-01
    assert (model.activation, config.pad) == ("relu", 4)  # the defaults until 2026-12-06
    assert config.optimizer == "sgd" != TrainConfig().optimizer
    # a file from before Muon: recorded every field but the optimizer, with 4-pixel padding
    old_file = {k: v for k, v in recipe(TrainConfig(pad=4)).items() if k != "optimizer"}
    assert recipe(config) == with_defaults({}, old_file, type(model), type(config))[1]
    _, muon = lab_train.configs_from(lab_train.parse_args(tune.config_flags("muon")))
    assert muon.optimizer == "muon"


def test_group_only_configurations_are_left_out_of_other_variants_studies(monkeypatch):
    planned = {}
    monkeypatch.setattr(tune, "run_all", lambda runs, *a, **k: planned.setdefault("runs", runs))
    tune.main(["--norm", "bn", "--seeds", "0"])
    parts = {part for name, _ in planned.pop("runs") for part in name.split("_")[1].split("+")}
    assert parts == set(tune.CONFIGS) - tune.GROUP_ONLY
    tune.main(["--norm", "gn", "--seeds", "0"])
    assert {part for name, _ in planned["runs"]
            for part in name.split("_")[1].split("+")} == set(tune.CONFIGS)


@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_tune_without_configs_plans_only_runs_that_train_py_accepts(norm, monkeypatch):
    """A refinement (Muon's rate) runs on top of what it refines, never alone over recipe v1,
    where TrainConfig refuses it: a default study must not fail half-way."""
    planned = {}
    monkeypatch.setattr(tune, "run_all", lambda runs, *a, **k: planned.setdefault("runs", runs))
    tune.main(["--norm", norm, "--seeds", "0", "--epochs", "20"])
    names = [name for name, _ in planned["runs"]]
    assert f"{norm}_muon+mlr0.1_e20_seed0" in names and f"{norm}_mlr0.1_e20_seed0" not in names
    for name, run_args in planned["runs"]:
        model_config, config = lab_train.configs_from(lab_train.parse_args(run_args))
        assert model_config.norm == norm and config.epochs == 20, name


def test_a_refinement_without_its_base_is_refused_in_one_line_before_any_run():
    with pytest.raises(SystemExit, match=r"^mlr0.1 refines a change it does not make; run "
                                         r"muon\+mlr0.1 instead$"):
        tune.plan(["base", "mlr0.1"], [0], epochs=20)
    assert tune.config_flags("muon+mlr0.1")[-4:] == ["--optimizer", "muon", "--muon-lr", "0.1"]


def test_batch_size_study_says_which_recipe_it_ran():
    today = {"recipe": ["current"]}
    assert report.common.study_recipe(today) == "Recipe: today's defaults."
    run = fake_run("batch", 0, 0.6, batch_size=8, lr=TrainConfig.lr / 16,
                   label_smoothing=TrainConfig.label_smoothing + 0.1)
    label = report.compare.recipe_changes(run, ignore=("batch_size", "lr", "epochs"))
    assert label == f"label_smoothing {TrainConfig.label_smoothing + 0.1}"
    assert f"`{label}`" in report.common.study_recipe({"recipe": [label]})


def test_sweep_plans_the_learning_rate_study_seed_by_seed_with_divergence_recorded():
    runs = sweep.plan(["bn", "none"], [0, 1], lrs=[0.4, 0.0125])
    assert [name for name, _ in runs] == [
        "batch_lr0.0125_seed0", "none_lr0.0125_seed0", "batch_lr0.4_seed0", "none_lr0.4_seed0",
        "batch_lr0.0125_seed1", "none_lr0.0125_seed1", "batch_lr0.4_seed1", "none_lr0.4_seed1"]
    name, args = runs[2]
    assert args[args.index("--lr") + 1] == "0.4" and "--record-divergence" in args
    assert args[args.index("--run-name") + 1] == name
    with pytest.raises(ValueError, match="not both"):
        sweep.plan(["bn"], [0], batch_sizes=[128], lrs=[0.1])


def test_equivalent_epochs_reads_a_changes_accuracy_off_recipe_v1_in_log_epochs():
    curve = [(20, 80.0), (40, 82.0), (80, 83.0)]
    assert per_epoch.equivalent_epochs(81.0, curve) == pytest.approx(20 * 2 ** 0.5)
    assert per_epoch.equivalent_epochs(82.5, curve) == pytest.approx(40 * 2 ** 0.5)
    assert per_epoch.equivalent_epochs(79.0, curve) == "< 20"
    assert per_epoch.equivalent_epochs(84.0, curve) == "> 80"
    assert per_epoch.equivalent_epochs(81.0, curve[:1]) is None


def test_per_epoch_section_places_each_change_on_recipe_v1(tmp_path):
    def runs(acc, seeds=(0, 1, 2, 3), epochs=20):
        return [fake_tuning_run(a, s, epochs=epochs) for s, a in zip(seeds, acc)]

    tuning = {("batch", "base", 20): runs([0.80, 0.81, 0.79, 0.80]),
              ("batch", "whiten", 20): runs([0.81, 0.82, 0.80, 0.81]),
              ("batch", "whiten+aflip", 20): runs([0.815, 0.815, 0.805, 0.805]),
              ("batch", "base", 5): runs([0.70, 0.71])}
    ceiling = {("batch", "base", 40): runs([0.82, 0.82], (0, 1)),
               ("batch", "base", 80): runs([0.83], (0,))}
    text = report.per_epoch_section(tuning, ceiling)
    assert "| batch | 40 | 0, 1 | 82.00 (82.00–82.00) | beyond the 20-epoch limit" in text
    row = next(line for line in text.splitlines() if "| whiten |" in line)
    # +1.00 on every seed: an interval of zero width above zero; 81.0% is 28 epochs of today's
    assert "| 81.00 | recipe v1 | +1.00 [+1.00, +1.00] | wins | 28 |" in row
    on_top = next(line for line in text.splitlines() if "| whiten+aflip |" in line)
    assert "| whiten | +0.00 [-0.92, +0.92] | no decision |" in on_top  # whiten won: against it
    tuning[("batch", "whiten", 20)] = runs([0.80, 0.82, 0.79, 0.80])  # no longer a win
    on_top = next(line for line in report.per_epoch_section(tuning, ceiling).splitlines()
                  if "| whiten+aflip |" in line)
    assert "| recipe v1 |" in on_top
    fig = per_epoch.plot_equivalent_epochs(
        report.recipe_by_epochs(tuning, ceiling), report.technique_means(tuning),
        tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 5000 and fig.axes[0].get_xscale() == "log"
    tuning[("batch", "aflip", 20)] = runs([0.90, 0.90, 0.90, 0.90])  # past the longest budget
    fig = per_epoch.plot_equivalent_epochs(
        report.recipe_by_epochs(tuning, ceiling), report.technique_means(tuning))
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert "BN aflip (> 80)" in labels and "BN whiten" in labels  # a bound says it is one


def test_figure_labels_keep_their_order_and_never_touch():
    values = [80.0, 81.0, 80.01, 80.02, 79.0]
    heights = per_epoch.spread_labels(values, 78.0, 82.0, gap=0.1)
    assert sorted(range(5), key=heights.__getitem__) == sorted(range(5), key=values.__getitem__)
    assert min(b - a for a, b in zip(sorted(heights), sorted(heights)[1:])) >= 0.1 - 1e-9
    assert heights[1] == 81.0 and heights[4] == 79.0  # labels with room stay beside their point
    crowded_top = per_epoch.spread_labels([81.95, 81.99, 82.0], 78.0, 82.0, gap=0.1)
    assert max(crowded_top) <= 82.0 and sorted(crowded_top) == crowded_top


def test_the_study_grid_runs_the_winner_on_every_variant_first_and_lists_what_is_done(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tune, "OUT_DIR", tmp_path / "tuning")
    monkeypatch.setattr(tune, "CEILING_DIR", tmp_path / "ceiling")
    runs = tune.grid_plan(tune.per_epoch_grid())
    names = [name for name, _, _ in runs]
    assert len(names) == len(set(names))  # no run planned twice
    first = {name for name, _, _ in runs[:8 * len(course_variants())]}
    assert first == {f"{v}_{c}_e20_seed{s}" for v in course_variants() for c in ("base", "muon")
                     for s in range(4)}
    for name, args, folder in runs:  # known configurations, the budget in the name
        epochs = args[args.index("--epochs") + 1]
        assert f"_e{epochs}_" in name and "--validation" in args
        assert folder == (tmp_path / "tuning" if epochs == "20" else tmp_path / "ceiling")
    (tmp_path / "ceiling").mkdir()
    (tmp_path / "ceiling" / f"{DEFAULT}_base_e80_seed1.json").write_text("{}")
    tune.main(["--grid", "--list"])
    out = capsys.readouterr().out
    assert f"done  ceiling/{DEFAULT}_base_e80_seed1" in out
    assert f"todo  ceiling/{DEFAULT}_base_e80_seed0" in out
    assert f"1 of {len(runs)} runs done" in out


def test_every_grid_run_is_read_back_under_its_configurations_name(tmp_path, monkeypatch):
    runs = []
    for norm, configs, epochs, _, _ in tune.per_epoch_grid():
        for config in configs:  # a results file records settings, not the name it ran under
            args = lab_train.parse_args(tune.config_flags(config) + ["--norm", norm])
            model_config, train_config = lab_train.configs_from(args)
            runs.append({"variant": norm, "epochs": epochs, "model_config": model_config.to_dict(),
                         "train_config": train_config.to_dict()})
    monkeypatch.setattr(report.compare, "read_results", lambda folder: runs)
    groups = report.load_tuning(tmp_path)
    assert "batch_muon+sep+mlr0.1" in {f"{norm}_{config}" for norm, config, _ in groups}
    assert set(groups) == {(norm, config, epochs) for norm, configs, epochs, _, _
                           in tune.per_epoch_grid() for config in configs}


def test_a_grid_run_writes_into_its_own_folder(tmp_path, monkeypatch):
    commands = []

    class Finished:  # a train.py that ends at once
        def __init__(self, cmd, **kwargs):
            commands.append(cmd)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(processes.subprocess, "Popen", Finished)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "done.json").write_text("{}")
    sweep.run_all([("done", [], tmp_path / "a"), ("new", [], tmp_path / "b"), ("plain", [])],
                  tmp_path / "c", tmp_path / "img")
    assert [cmd[cmd.index("--out-dir") + 1] for cmd in commands] == \
        [str(tmp_path / "b"), str(tmp_path / "c")]  # the finished one skipped


def arithmetic_run(acc, seed, capability, precision):
    r = fake_tuning_run(acc, seed, epochs=20)
    r["hardware"] = {**r["hardware"], "cpu_capability": capability}
    return {**r, "precision": precision}


def test_the_ablation_pairs_each_seed_with_the_reference_run_in_its_own_arithmetic():
    bf16 = lambda accs: [arithmetic_run(a, s, "AVX512", "bf16") for s, a in enumerate(accs)]  # noqa: E731
    fp32 = lambda accs: [arithmetic_run(a, s, "AVX2", "fp32") for s, a in enumerate(accs)]  # noqa: E731
    tuning = {("batch", "base", 20): bf16([0.80, 0.81, 0.79, 0.80]),
              ("batch", "muon", 20): bf16([0.82, 0.83, 0.81, 0.82]),  # +2 on every seed: wins
              ("batch", "muon+aflip", 20): fp32([0.815, 0.82]),
              ("batch", "muon+lookahead", 20): bf16([0.81, 0.83])}
    reruns = {("batch", "muon", 20): fp32([0.81, 0.81])}
    rows = {line.split(" | ")[1]: line for line in
            report.per_epoch_section(tuning, {}, reruns).splitlines() if "| batch | muon" in line}
    # +0.50, +1.00 against the fp32 re-runs (not -0.50, -1.00 against the bf16 first runs)
    assert "| muon (re-runs: 2 of 2 seeds) | +0.75 [-2.43, +3.93] |" in rows["muon+aflip"]
    assert "| muon | -0.50 [-6.85, +5.85] |" in rows["muon+lookahead"]  # alike: the first runs
    assert "re-runs" not in report.per_epoch_section(tuning, {})  # without re-runs: first runs


def test_the_study_decides_nothing_before_an_arm_has_the_protocols_seeds():
    tuning = {("batch", "base", 20): [fake_tuning_run(a, s, 20) for s, a in enumerate(
                  [0.80, 0.81, 0.79, 0.80])],
              ("batch", "muon", 20): [fake_tuning_run(a, s, 20) for s, a in enumerate(
                  [0.82, 0.83, 0.81, 0.82])],
              # two seeds with the same gain: an interval of zero width, not a win
              ("batch", "muon+aflip", 20): [fake_tuning_run(a, s, 20) for s, a in enumerate(
                  [0.821, 0.831])]}
    rows = {line.split(" | ")[1]: line for line in
            report.per_epoch_section(tuning, {}).splitlines() if "| batch | muon" in line}
    assert "| +0.10 [+0.10, +0.10] | needs 4 paired seeds (2 so far) |" in rows["muon+aflip"]
    assert "| wins |" in rows["muon"]


def test_an_arm_with_seeds_its_reference_lacks_says_which_seeds_its_difference_covers():
    def runs(acc):
        return [fake_tuning_run(a, s, 20) for s, a in enumerate(acc)]

    # muon took seeds 4 and 5 for a later pair; recipe v1 has only 0 to 3
    tuning = {("batch", "base", 20): runs([0.80, 0.81, 0.79, 0.80]),
              ("batch", "muon", 20): runs([0.82, 0.83, 0.81, 0.82, 0.83, 0.81]),
              ("batch", "muon+aflip", 20): runs([0.821, 0.832, 0.811, 0.822, 0.834, 0.815])}
    rows = {line.split(" | ")[1]: line for line in
            report.per_epoch_section(tuning, {}).splitlines() if "| batch | muon" in line}
    assert "| 0, 1, 2, 3, 4, 5 | 82.00 | recipe v1 | +2.00 [+2.00, +2.00] (seeds 0, 1, 2, 3) |" \
        in rows["muon"]
    assert "(seeds" not in rows["muon+aflip"]  # every seed paired: nothing to say
    # 6 seeds, between the protocol's looks at 4 and 8: the interval is shown, not judged
    assert rows["muon+aflip"].endswith("| extending to 8 paired seeds (6 so far) | - |")
    # 8 seeds, the protocol's last look: an interval still across zero ends the arm
    tuning["batch", "muon", 20] = runs([0.82, 0.83, 0.81, 0.82, 0.83, 0.81, 0.82, 0.83])
    tuning["batch", "muon+aflip", 20] = runs([0.821, 0.832, 0.811, 0.822, 0.834, 0.815, 0.81, 0.82])
    rows = {line.split(" | ")[1]: line for line in
            report.per_epoch_section(tuning, {}).splitlines() if "| batch | muon" in line}
    assert "| not adopted: no decision at 8 paired seeds, the protocol's most |" \
        in rows["muon+aflip"]


def test_arithmetic_section_pairs_a_change_with_the_rerun_of_its_seed_in_its_own_arithmetic():
    first = [arithmetic_run(a, s, "AVX512", "bf16") for s, a in enumerate([0.825, 0.810])]
    again = [arithmetic_run(a, s, "AVX2", "fp32") for s, a in enumerate([0.815, 0.805])]
    tuning = {("batch", "muon", 20): first,
              ("batch", "muon+aflip", 20): [arithmetic_run(0.818, 0, "AVX2", "fp32"),
                                             arithmetic_run(0.809, 1, "AVX2", "fp32")],
              ("batch", "muon+skipinit", 20): [arithmetic_run(0.80, 0, "AVX512", "bf16")],
              ("batch", "muon+sep+aflip", 20): [arithmetic_run(0.84, 0, "AVX2", "fp32")],
              ("batch", "aflip", 20): [arithmetic_run(0.70, 0, "AVX2", "fp32")]}
    text = report.arithmetic_section(tuning, {("batch", "muon", 20): again})
    assert ("| batch | muon | 0, 1 | AVX512, 1 thread, bf16, 81.75 | AVX2, 1 thread, fp32, 81.00 "
            "| -1.00, -0.50 | -0.75 [-3.93, +2.43] |") in text
    # +0.30, +0.40 against the re-runs, -0.70, -0.10 against the first runs of other arithmetic
    assert "| batch | muon+aflip | 0, 1 | -0.40 [-4.21, +3.41] | +0.35 [-0.29, +0.99] |" in text
    assert "muon+skipinit" not in text  # its one seed ran in the first runs' arithmetic: no pair
    assert "| aflip |" not in text   # not stacked on the re-run arm
    assert "muon+sep+aflip" not in text  # two changes on it: judged against muon+sep instead
    assert report.arithmetic_section(tuning, {}).startswith("No re-runs yet")


def test_levers_section_pairs_each_lever_with_recipe_v3_and_reads_the_half_point_bar():
    levers = {("batch", "muon+sep", 20): validation_runs([0.84, 0.85, 0.84, 0.85]),
              ("batch", "muon+sep+silu", 20): validation_runs([0.846, 0.856, 0.845, 0.856]),   # +0.57
              ("batch", "muon+sep+mdw", 20): validation_runs([0.850, 0.850, 0.845, 0.855]),   # +0.5, wide
              ("batch", "muon+sep+dil2", 20): validation_runs([0.83, 0.84, 0.83, 0.84])}      # -1.00
    text = report.levers_section(levers)
    lines = text.splitlines()
    assert [line.split(" | ")[1] for line in lines if line.startswith("| batch")] == [
        "(recipe v3)", "silu", "mdw", "dil2"]  # largest mean gain first
    assert row(text, "| batch | silu |").endswith("| wins | yes |")
    assert row(text, "| batch | mdw |").endswith("| no decision | no |")  # mean +0.5, straddles
    assert "| -1.00 [-1.00, -1.00] | loses | no |" in row(text, "| batch | dil2 |")
    assert "- BatchNorm: met by silu" in text
    # the greedy step: a stack on the winner is judged against the winner, not recipe v3
    levers[("batch", "muon+sep+silu+mdw", 20)] = validation_runs([0.846, 0.856, 0.845, 0.856])
    stack = row(report.levers_section(levers), "| batch | silu+mdw |")
    assert "| silu | +0.00, +0.00, +0.00, +0.00 |" in stack
    # ... while the bar is read over recipe v3: the stack keeps silu's +0.57
    assert stack.endswith("| yes (+0.57 [+0.50, +0.65]) |")
    del levers[("batch", "muon+sep+silu+mdw", 20)]
    # round 2: a lever on recipe v4 (pad2+silu) is read against recipe v4, not recipe v3
    levers[("batch", tune.ROUND2_BASE, 20)] = validation_runs([0.850, 0.860, 0.850, 0.860])     # +1.0
    levers[("batch", f"{tune.ROUND2_BASE}+bs64-keep", 20)] = validation_runs([0.851, 0.861, 0.851, 0.861])
    round2 = row(report.levers_section(levers), "| batch | pad2+silu+bs64-keep |")
    assert round2.endswith("| no |") and "| pad2+silu | +0.10, +0.10, +0.10, +0.10 |" in round2
    del levers[("batch", tune.ROUND2_BASE, 20)]
    del levers[("batch", f"{tune.ROUND2_BASE}+bs64-keep", 20)]
    del levers[("batch", "muon+sep+silu", 20)]
    assert "- BatchNorm: missed: no lever gains +0.5 with its interval above zero; the largest " \
           "mean gain over recipe v3 is mdw, +0.50" in report.levers_section(levers)
    assert "No lever runs yet: `python -m lab.tune --grid levers`" in report.levers_section({})
    # the CPU part: recipe v3 and the changes on it, out of the learning-per-epoch study
    tuning = {**levers, ("batch", "muon", 20): validation_runs([0.83] * 4)}
    assert list(report.on_lever_base(tuning)) == list(levers)
    assert "No lever runs yet: `python -m lab.tune --grid levers-cpu`" in report.levers_section(
        {("batch", "muon+sep", 20): levers[("batch", "muon+sep", 20)]}, "levers-cpu")


def test_round2_lists_every_lever_of_the_grid_and_judges_each_against_recipe_v4():
    v4, on_v4 = tune.ROUND2_BASE, lambda lever: (DEFAULT, f"{tune.ROUND2_BASE}+{lever}", 20)
    tuning = {(v, v4, 20): validation_runs([0.84, 0.85, 0.84, 0.85]) for v in ("layer", "group")}
    tuning |= {(DEFAULT, v4, 20): validation_runs([0.84, 0.85, 0.84, 0.85]),
              on_v4("ls0"): validation_runs([0.846, 0.856, 0.845, 0.856]),                       # +0.57
              on_v4("mdw+mlr0.1"): validation_runs([0.846, 0.856, 0.845, 0.856]),
              # a stack is judged against recipe v4 even where a part of it won alone
              on_v4("mdw+mlr0.1+aflip"): validation_runs([0.846, 0.856, 0.845, 0.856]),
              on_v4("bs32-keep"): validation_runs([0.83, 0.86], seeds=(0, 1)),
              on_v4("bs64-lin"): validation_runs([0.838, 0.851, 0.841, 0.849]),  # below +0.5
              on_v4("bs64-keep"): validation_runs([0.837, 0.855, 0.843, 0.854])}  # straddles +0.5
    text = report.round2_section(tuning)
    levers = [line.split(" | ")[1] for line in text.splitlines() if line.startswith("| BatchNorm")]
    assert levers == tune.ROUND2_LEVERS  # every candidate of the issue, in the grid's order
    assert row(text, "| BatchNorm | ls0 |").endswith("| +0.57 [+0.50, +0.65] | wins | yes |")
    assert "| +0.57 [+0.50, +0.65] | wins | yes |" in row(text, "| BatchNorm | mdw+mlr0.1+aflip |")
    planned = lambda lever: sum(name.split("_")[:2] == [DEFAULT, on_v4(lever)[1]]  # noqa: E731
                                for name, *_ in tune.grid_plan(tune.round2_cpu_grid()))
    assert f"| 2 of {planned('bs32-keep')} (0, 1) |" in row(text, "| BatchNorm | bs32-keep |")
    # after 4 seeds an interval wholly below the bar is final; one that straddles it is extended
    assert row(text, "| BatchNorm | bs64-lin |").endswith("| not adopted: interval below +0.5 | no |")
    assert row(text, "| BatchNorm | bs64-keep |").endswith("| no decision | no |")
    assert row(text, "| BatchNorm | bs32-lin |").endswith(
        f"| 0 of {planned('bs32-lin')} | - | - | - | not run yet | - |")
    assert "- BatchNorm (recipe v4: 84.50, 4 seeds): met by mdw+mlr0.1, mdw+mlr0.1+aflip, ls0" in text
    # the other variants get the smaller batches whatever BatchNorm did, the rest only if it wins
    small = ["bs64-keep", "bs64-lin", "bs32-keep", "bs32-lin"]
    assert tune.ROUND2_SMALL_BATCHES == small
    for title in ("LayerNorm", "GroupNorm"):
        assert [line.split(" | ")[1] for line in text.splitlines()
                if line.startswith(f"| {title}")] == small
    assert "- LayerNorm (recipe v4: 84.50, 4 seeds): no round-2 lever clears the bar so far; " \
           f"0 of {len(small)} levers measured" in text
    assert report.round2_section({}).startswith("No round-2 runs yet")
    # on a lent GPU: both arms in results/round2-gpu/, recipe v4's runs beside the levers'
    gpu = report.round2_section(tuning, "round2-gpu")
    assert "recipe v4's run of the same seed in results/round2-gpu/" in gpu
    assert levers == [line.split(" | ")[1] for line in gpu.splitlines()
                      if line.startswith("| BatchNorm")]
    assert "`bash lab/gpu_grid.sh round2-gpu` on a lent GPU" in report.round2_section({}, "round2-gpu")


def test_the_recipe_choice_table_shows_each_shared_change_on_every_variant_and_where_it_clears():
    def runs(acc, seeds=(0, 1, 2, 3)):
        return [fake_tuning_run(a, s, epochs=20) for s, a in zip(seeds, acc)]

    today = [0.84, 0.85, 0.84, 0.85]
    levers = {(v, "muon+sep", 20): runs(today) for v in ("batch", "layer", "group")}
    levers |= {("batch", "muon+sep+pad2", 20): runs([a + 0.006 for a in today]),  # +0.6
               ("layer", "muon+sep+pad2", 20): runs([a + 0.002 for a in today]),  # +0.2
               ("batch", "muon+sep+ls0.2", 20): runs(today)}  # one variant only: not a choice
    text = report.recipe_choice_section(levers)
    assert row(text, "| (nothing) |") == \
        "| (nothing) | 84.50 (4 seeds) | 84.50 (4 seeds) | 84.50 (4 seeds) | - |"
    assert row(text, "| pad2 |") == ("| pad2 | 85.10: +0.60 [+0.60, +0.60] (4 seeds) | "
                                     "84.70: +0.20 [+0.20, +0.20] (4 seeds) | not run | BatchNorm |")
    assert "ls0.2" not in text
    levers[("group", "muon+sep+pad2", 20)] = levers[("batch", "muon+sep+pad2", 20)]
    levers[("layer", "muon+sep+pad2", 20)] = levers[("batch", "muon+sep+pad2", 20)]
    assert row(report.recipe_choice_section(levers), "| pad2 |").endswith("| every variant |")
    assert report.recipe_choice_section({("batch", "muon+sep", 20): runs(today)}) == \
        "No change measured on more than one variant yet."


def test_the_front_pages_lever_table_gives_each_lever_over_recipe_v3_per_variant_and_arithmetic():
    def runs(acc, gpu=None):
        made = [fake_tuning_run(a, s, epochs=20) for s, a in enumerate(acc)]
        return [{**r, "hardware": {**r["hardware"], "gpu": gpu}} for r in made]

    today = [0.84, 0.85, 0.84, 0.85]
    cpu = {("batch", "muon+sep", 20): runs(today), ("layer", "muon+sep", 20): runs(today),
           ("batch", "muon+sep+pad2", 20): runs([a + 0.006 for a in today]),  # +0.6: the bar
           ("layer", "muon+sep+pad2", 20): runs([a + 0.002 for a in today])}  # +0.2
    gpu = {("batch", "muon+sep", 20): runs(today, "NVIDIA H200"),
           ("batch", "muon+sep+dil2", 20): runs([a - 0.01 for a in today], "NVIDIA H200")}
    text = report.lever_summary_section(gpu, cpu)
    assert text.splitlines()[0] == "| lever on recipe v3 | flags | runs on | BatchNorm | LayerNorm |"
    assert row(text, "| pad2 |") == ("| pad2 | `--pad 2` | CPU, bf16 | **+0.60 [+0.60, +0.60] (4)** | "
                                     "+0.20 [+0.20, +0.20] (4) |")
    # paired only within its own arithmetic, a variant it skipped said so; largest gain first
    assert row(text, "| dil2 |") == ("| dil2 | `--depthwise-dilation 2` | NVIDIA H200, bf16 | "
                                     "-1.00 [-1.00, -1.00] (4) | not run |")
    assert text.index("| pad2 |") < text.index("| dil2 |")
    assert report.lever_summary_section({}, {}).startswith("No lever runs yet")


def test_the_lever_grid_refuses_a_machine_whose_runs_would_not_pair_with_its_own(monkeypatch):
    started = []
    monkeypatch.setattr(tune, "run_all", lambda runs, *a, **k: started.append(runs))
    monkeypatch.setattr(tune.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"pair only with runs made on an NVIDIA H200 in bf16 "
                                         r".* this machine has no CUDA GPU"):
        tune.main(["--grid", "levers"])
    monkeypatch.setattr(tune.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune.torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(SystemExit, match="this machine has Tesla T4"):
        tune.main(["--grid", "levers"])
    assert not started
    monkeypatch.setattr(tune.torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    tune.main(["--grid", "levers"])
    assert [name for name, *_ in started[0][:1]] == ["batch_muon+sep_e20_seed0"]


def test_the_cpu_lever_grid_runs_only_in_the_arithmetic_of_the_runs_it_pairs_with(monkeypatch):
    started = []
    monkeypatch.setattr(tune, "run_all", lambda runs, *a, **k: started.append(runs))
    monkeypatch.setattr(tune.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tune.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with pytest.raises(SystemExit, match="would run on AVX512 kernels: run it on a CPU-only "
                                         "machine as ATEN_CPU_CAPABILITY=avx2"):
        tune.main(["--grid", "levers-cpu", "--precision", "fp32"])
    monkeypatch.setattr(tune.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.raises(SystemExit, match="AVX2 kernels without --precision fp32"):
        tune.main(["--grid", "levers-cpu", "--precision", "bf16"])
    monkeypatch.setattr(tune.os, "cpu_count", lambda: 4)
    with pytest.raises(SystemExit, match="--jobs 2 gives each run 2 threads on this 4-core "
                                         "machine: pass --jobs 4"):
        tune.main(["--grid", "levers-cpu", "--jobs", "2", "--precision", "fp32"])
    assert not started
    tune.main(["--grid", "levers-cpu", "--jobs", "4", "--precision", "fp32"])
    names = [name for name, *_ in started[0]]
    # levers' arms, and recipe v3 only on seeds the learning-per-epoch study lacks:
    # a repeat of one of its runs would pair a lever with a second baseline
    study = {name for name, *_ in tune.grid_plan(tune.per_epoch_grid())}
    assert names[0] == "batch_muon+sep+pad2+silu_e20_seed0" and not study & set(names)
    assert {int(n.rsplit("seed", 1)[1]) for n in names if n.split("_")[1] == tune.LEVER_BASE} \
        == set(tune.EXTRA_SEEDS)
    assert {folder for *_, folder in started[0]} == {tune.OUT_DIR}


def test_the_gpu_round2_grid_runs_both_arms_on_a_gpu_in_its_folders_arithmetic_only(monkeypatch,
                                                                                   tmp_path):
    started = []
    monkeypatch.setattr(tune, "run_all", lambda runs, *a, **k: started.append(runs))
    monkeypatch.setitem(tune.GRID_FOLDER_GPU, "round2-gpu", tmp_path)
    monkeypatch.setattr(tune.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="runs on a CUDA GPU, and this machine has none"):
        tune.main(["--grid", "round2-gpu"])
    monkeypatch.setattr(tune.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune.torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    (tmp_path / "batch_muon+sep+pad2+silu_e20_seed0.json").write_text(
        '{"hardware": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130"}}')
    with pytest.raises(SystemExit, match=r"in the same arithmetic, .*'s so far \(NVIDIA H200 with "
                                         r"torch 2.11.0\+cu130\), and this machine has NVIDIA "
                                         r"H100 80GB HBM3 with torch"):
        tune.main(["--grid", "round2-gpu"])
    assert not started
    monkeypatch.setattr(tune.torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(tune.torch, "__version__", "2.11.0+cu130")
    tune.main(["--grid", "round2-gpu"])
    names = [name.split("_")[1] for name, *_ in started[0]]
    # recipe v4 first (a call cut short leaves pairs), both arms on seeds 0-3, batch 32 last
    assert names[:4] == [tune.ROUND2_BASE] * 4 and len(names) == 4 * (1 + len(tune.ROUND2_LEVERS))
    assert names[-8:] == [f"{tune.ROUND2_BASE}+bs32-keep"] * 4 + [f"{tune.ROUND2_BASE}+bs32-lin"] * 4
    assert {folder for *_, folder in started[0]} == {tune.ROUND2_GPU_DIR}

def test_front_page_table_says_how_far_each_mean_is_from_both_targets_and_whether_its_interval_clears():
    def runs(accs):
        return [{"final_test_acc": a, "seed": s, "num_params": 46610, "epochs": 20}
                for s, a in enumerate(accs)]

    text = report.summary_table({"batch": runs([0.852, 0.853, 0.852]),   # tight above 85
                                 "layer": runs([0.83, 0.84, 0.82]),      # mean 83, wide
                                 "group": runs([0.8299])})
    assert row(text, "| BatchNorm |").endswith(
        "| ≥ 85: mean met (+0.23); the interval clears it | ≥ 87: missed by 1.77 |")
    assert row(text, "| LayerNorm |").endswith(
        "| ≥ 83: mean met (+0.00); the interval does not clear it | ≥ 86: missed by 3.00 |")
    assert row(text, "| GroupNorm |").endswith("| - | 0 | 46,610 | 20 | ≥ 83: missed by 0.01 | "
                                               "≥ 86: missed by 3.01 |")


def test_the_finals_prose_says_which_seeds_are_missing_and_pairs_each_variant_with_the_last_recipe():
    def finals(accs, variant, seeds=range(5)):
        return [fake_run(variant, s, a) for s, a in zip(seeds, accs)]

    v3 = {"batch": finals([0.851, 0.855, 0.849, 0.852, 0.853], "batch"),
          "layer": finals([0.837, 0.835, 0.838, 0.836, 0.839], "layer"),
          "group": finals([0.838, 0.836, 0.840, 0.836, 0.838], "group")}
    archives = [("recipe v3", "recipe-v3", v3)]
    adopted = f"{tune.LEVER_BASE}+{tune.ADOPTED_LEVER}"
    levers = {key: [fake_tuning_run(a + step, s, epochs=20) for s, a in enumerate([0.84, 0.85, 0.84, 0.85])]
              for v in ("batch", "layer", "group")
              for key, step in (((v, tune.LEVER_BASE, 20), 0), ((v, adopted, 20), 0.007))}
    # each variant +0.5 on seeds 0 to 2, BatchNorm's seed 2 +1.5; seeds 3 and 4 not run yet
    partial = {v: finals([a + 0.005 + 0.01 * (v == "batch" and s == 2) for s, a in
                          enumerate(final_accs(v3[v]))][:3], v) for v in v3}
    text = report.finals_section(partial, archives, levers)
    assert ("**Its final runs are not complete**: 9 of 15 have run (BatchNorm seeds 0 to 2; "
            "LayerNorm seeds 0 to 2; GroupNorm seeds 0 to 2); the rest (BatchNorm seeds 3 and 4; "
            "LayerNorm seeds 3 and 4; GroupNorm seeds 3 and 4) run next") in text
    assert "+0.70 [+0.70, +0.70] (BatchNorm)" in text and "each clearing the bar of +0.5" in text
    assert "is +0.83 [-0.60, +2.27] (BatchNorm, 3 seeds), +0.50 [+0.50, +0.50] (LayerNorm, " \
           "3 seeds)" in text
    assert "the interval lies above zero for LayerNorm and GroupNorm" in text
    assert "The next targets (87 / 86 / 86) are missed so far by" in text
    assert "In today's recipe every BatchNorm run is above every LayerNorm and GroupNorm run, " \
           "as in recipe v3" in text

    complete = {v: finals([a + 0.005 for a in final_accs(v3[v])], v) for v in v3}
    text = report.finals_section(complete, archives, levers)
    assert "Its final runs are complete: 15 runs, seeds 0 to 4 of every variant." in text
    assert "not complete" not in text and " so far" not in text
    answer = report.finals_answer(complete, archives)
    assert "today's recipe (5 seeds each) scores BatchNorm 85.70 ± 0.22% (95% interval " \
           "[85.42, 85.98]; ≥ 85: mean met (+0.70), the interval clears it; ≥ 87: missed by " \
           "1.30)" in answer
    detail = report.finals_section(complete, archives, levers, per_seed=True)
    assert "BatchNorm 85.60, 86.00, 85.40, 85.70, 85.80% (+0.50, +0.50, +0.50, +0.50, +0.50)" \
        in detail


def final_accs(runs):
    return [r["final_test_acc"] for r in runs]


def test_the_lever_the_front_page_credits_for_todays_recipe_is_todays_defaults():
    def configs(*flags):
        return lab_train.configs_from(lab_train.parse_args(["--norm", "batch", *flags]))

    adopted = tune.config_flags(f"{tune.LEVER_BASE}+{tune.ADOPTED_LEVER}")
    assert configs(*adopted) == configs()
    assert configs(*tune.config_flags(tune.LEVER_BASE)) != configs()


FIGURES = ("FIGURE", "STUDY_FIGURE", "CONFUSION_FIGURE", "AXES_FIGURE", "EPOCHS_FIGURE",
           "FOREST_FIGURE", "LEVER_FIGURE", "LR_FIGURE", "NORM_STATS_FIGURE", "PROBE_FIGURE")


def test_the_report_draws_every_figure_from_the_committed_files(tmp_path, monkeypatch):
    """`python -m lab.report` writes every figure of images/ (here into a temporary folder)."""
    for name in FIGURES:
        monkeypatch.setattr(report, name, tmp_path / getattr(report, name).name)
    files = report.load_files()
    report.write_figures(files["runs"], files["study"], files["lr_study"], files["tuning"],
                         files["ceiling"], files["arithmetic"], files["levers"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        getattr(report, name).name for name in FIGURES)
