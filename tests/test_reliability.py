"""What a run guarantees (docs/reliability.md): never a NaN
result, one process per run name, never a silent replacement of another run's files, every
setting checked before the data loads, one line for every problem a user can fix."""

import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import plots  # noqa: E402
import precision  # noqa: E402
from conftest import NARROW_NET, ROOT, make_archive, write_image_tree  # noqa: E402
from dataset import DatasetWarning, load_cifar10  # noqa: E402
from model import ModelConfig, build_model  # noqa: E402
import utils  # noqa: E402
from results import (ResultsFileError, RunLock, RunLockedError, check_publishable,  # noqa: E402
                     config_run_name, same_recipe)
from checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from utils import NonFiniteLossError, TrainConfig, fit  # noqa: E402

import train  # noqa: E402

from lab import compare, make_notebooks, report, sweep  # noqa: E402
from lab.levers import LabModelConfig, LabTrainConfig  # noqa: E402
from lab.train import LAB_CHOICES  # noqa: E402


def run_train(*args, cwd, env=None):
    """train.py as a user runs it: its exit code, stdout and stderr."""
    base = {"S8_CACHE_DIR": str(cwd / "cache"), "PATH": "/usr/bin:/bin", "TMPDIR": str(cwd)}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env={**base, **(env or {})})


def one_line_error(out):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


@pytest.fixture
def archive(tmp_path):
    write_image_tree(tmp_path / "tree")
    return str(make_archive(tmp_path / "tree", tmp_path / "tiny.tar.gz"))


# 1. A NaN anywhere in an epoch stops the run before its checkpoint and results are written.

def test_a_nan_only_in_evaluation_publishes_nothing(archive, tmp_path):
    # SGD: Muon's orthogonalized steps stay bounded whatever --lr says
    out = run_train("--optimizer", "sgd", "--lr", "1e6", "--subset", "2", "--epochs", "2",
                    "--data", archive, "--no-progress", cwd=tmp_path)
    assert "the evaluation loss became nan at epoch 1" in one_line_error(out)
    assert not list(tmp_path.glob("runs/*.json")) and not list(tmp_path.glob("checkpoints/*.pt"))


def test_a_nan_at_the_end_of_an_epoch_keeps_the_last_clean_checkpoint(tiny_data, tmp_path,
                                                                      monkeypatch):
    real = utils.evaluate
    calls = []

    def evaluation_breaks_in_epoch_2(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        return {**result, "loss": math.nan} if len(calls) == 2 else result

    monkeypatch.setattr(utils, "evaluate", evaluation_breaks_in_epoch_2)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(NonFiniteLossError, match="evaluation loss became nan at epoch 2") as err:
        fit(build_model("batch", seed=0), tiny_data, TrainConfig(epochs=3, batch_size=20),
            "cpu", checkpoint_path=ckpt, progress=False)
    assert "checkpoint of epoch 1, the last complete one" in str(err.value)
    assert load_checkpoint(ckpt)["epoch"] == 1


def test_a_nan_learning_rate_is_refused_before_the_data_loads(tmp_path):
    out = run_train("--lr", "nan", "--data", str(tmp_path / "absent.tar.gz"), cwd=tmp_path)
    assert one_line_error(out) == "error: --lr must be above 0, got nan"


# 2. One process per run name.

@pytest.mark.parametrize("second_seed", ["0", "1"])
def test_a_second_run_of_a_held_name_is_refused_at_start_up(archive, tmp_path, second_seed):
    lock_target = tmp_path / "checkpoints" / "mine.pt"
    with RunLock(lock_target):  # a live run of that name (this process)
        out = run_train("--run-name", "mine", "--seed", second_seed, "--subset", "2",
                        "--epochs", "1", "--data", archive, cwd=tmp_path)
    line = one_line_error(out)
    assert f"is in use by process {os.getpid()}" in line and "another --run-name" in line
    assert not (tmp_path / "runs" / "mine.json").exists()


def test_two_simultaneous_runs_of_one_name_give_one_run_and_one_refusal(archive, tmp_path):
    args = ("--run-name", "same", "--subset", "2", "--epochs", "3", "--data", archive,
            "--no-progress")
    base = {"S8_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    runs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                             env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outcomes = sorted((p.wait(), p.stderr.read()) for p in runs)
    assert [code for code, _ in outcomes] == [0, 1], outcomes
    assert "is in use by process" in outcomes[1][1]
    assert json.loads((tmp_path / "runs" / "same.json").read_text())["epochs"] == 3


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    stale = tmp_path / "run.pt.lock"
    stale.write_text("999999999")  # a crashed run's file: nobody holds the lock on it
    with RunLock(tmp_path / "run.pt"):
        assert stale.read_text() == str(os.getpid())
        with RunLock(tmp_path / "run.pt"):  # the same process may take it again
            pass
        assert stale.exists()
    assert not stale.exists()
    code = ("import sys; sys.path.insert(0, %r); from results import RunLock; "
            "RunLock(%r).__enter__(); print('held')" % (str(ROOT), str(tmp_path / "x.pt")))
    subprocess.run([sys.executable, "-c", code], check=True)  # holds it, then dies
    with RunLock(tmp_path / "x.pt"):
        pass


def test_the_lock_says_who_holds_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, %r); from results import "
         "RunLock; RunLock(%r).__enter__(); print('held', flush=True); time.sleep(30)"
         % (str(ROOT), str(tmp_path / "r.pt"))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid}"):
            with RunLock(tmp_path / "r.pt"):
                pass
    finally:
        holder.kill()


# 3. The notebooks write where train.py does, and never over another configuration's files.

def notebook_config(tmp_path, monkeypatch, **env):
    for key in ("S8_SMOKE", "CI", "S8_PUBLISH"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _, nb = make_notebooks.notebook("batch")
    config_cell = next(c.source for c in nb.cells if c.source.startswith("# Configuration"))
    run_cell = next(c.source for c in nb.cells if "run = config_run_name(" in c.source)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(config_cell, scope)
    return scope, run_cell


def test_a_notebook_run_writes_into_runs_under_a_name_with_its_settings(tmp_path, monkeypatch):
    scope, run_cell = notebook_config(tmp_path, monkeypatch)
    setup = scope["setup"]
    assert setup.epochs == 20 and setup.subset is None
    assert setup.results_dir == Path("runs") and setup.images_dir == Path("runs")
    assert "config_run_name(model.config, config, subset=setup.subset)" in run_cell
    model = build_model("batch")
    assert config_run_name(model.config, TrainConfig(epochs=5)) == "batch_seed0_e5"
    assert config_run_name(model.config, TrainConfig(batch_size=32, lr=0.025)) == \
        "batch_seed0_bs32_lr0.025"  # the notebook's LR and BATCH_SIZE are in the name


def test_only_s8_publish_1_makes_a_full_notebook_run_write_the_committed_files(tmp_path,
                                                                               monkeypatch):
    scope, _ = notebook_config(tmp_path, monkeypatch, S8_PUBLISH="1")
    assert scope["setup"].results_dir == Path("results")
    assert scope["setup"].images_dir == Path("images")
    smoke, _ = notebook_config(tmp_path, monkeypatch, S8_PUBLISH="1", S8_SMOKE="1")
    assert smoke["setup"].results_dir.parent != Path(".")  # a smoke run never writes the repository


def test_publishing_never_replaces_another_configurations_results(tmp_path):
    published = tmp_path / "batch_seed0.json"
    published.write_text(json.dumps({"model_config": {"norm": "batch"}, "train_config": {}}))
    model = build_model("batch", seed=0)
    with pytest.raises(ValueError, match="holds the results of a run with other settings"):
        check_publishable(published, model, TrainConfig(epochs=5))
    check_publishable(tmp_path / "batch_seed0_e5.json", model, TrainConfig(epochs=5))


# 4. Figures are guarded like results files.

def test_a_run_never_overwrites_another_runs_figures(archive, tmp_path):
    figure = tmp_path / "shared" / "theirs_curves.png"
    figure.parent.mkdir()
    figure.write_bytes(b"their curves")
    out = run_train("--run-name", "theirs", "--images-dir", str(figure.parent), "--subset", "2",
                    "--epochs", "1", "--data", archive, cwd=tmp_path)
    assert "theirs_curves.png already exists" in one_line_error(out)
    assert figure.read_bytes() == b"their curves"


# 5. A write that fails after training says where the trained model is.

def test_a_failed_write_after_training_is_one_line_and_resume_rebuilds_the_results(
        archive, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("S8_CACHE_DIR", str(tmp_path / "cache"))

    def denied(path, payload):
        raise PermissionError(13, "Permission denied", str(path))

    args = ["--subset", "2", "--epochs", "1", "--data", archive, "--no-progress"]
    monkeypatch.setattr(train, "save_json_atomic", denied)
    with pytest.raises(train.OutputError) as err:
        train.main(args)
    message = str(err.value)
    assert "runs/batch_seed0_e1_subset2.json" in message and "Permission denied" in message
    assert "checkpoints/batch_seed0_e1_subset2.pt" in message and "--resume" in message
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("S8_CACHE_DIR", str(tmp_path / "cache"))
    results = train.main([*args, "--resume", "--out-dir", "elsewhere"])
    assert (tmp_path / "elsewhere" / "batch_seed0_e1_subset2.json").exists()
    assert results["epochs"] == 1


# 6. Every setting's range is checked before the data loads.

@pytest.mark.parametrize("flags, message", [
    (["--widths", "0", "0", "0"], "widths needs 3 positive stage widths"),
    (["--widths", "-4", "8", "8"], "widths needs 3 positive stage widths"),
    (["--device", "cuda"], "device 'cuda' is not available on this machine"),
    (["--label-smoothing", "2"], "--label-smoothing must be at least 0 and below 1"),
    (["--pad", "40"], "--pad must be at least 0 and at most 31"),
    (["--pct-start", "1.5"], "--pct-start must be at least 0 and below 1"),
])
def test_settings_out_of_range_get_one_line_before_the_data_loads(tmp_path, flags, message):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = run_train(*flags, "--data", str(tmp_path / "absent.tar.gz"), cwd=tmp_path)
    assert message in one_line_error(out)


# 7. Outside the assignment's limits: allowed, said, recorded, kept out of the results table.

def test_a_run_outside_the_limits_is_flagged_and_refused_by_the_report(archive, tmp_path):
    out = run_train("--conv", "full", "--widths", "32", "48", "64", "--dry-run", "--subset", "2", "--data",
                    archive, "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    warning = [line for line in out.stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "168,106 parameters (limit: under 50,000)" in warning[0]
    results_path = next(p.rstrip(",;") for p in out.stdout.split() if ".json" in p)
    run = json.loads(open(results_path).read())
    assert "168,106 parameters" in run["outside_limits"]
    with pytest.raises(SystemExit, match="outside the assignment's limits"):
        report.table({"batch": [run]})


def test_more_than_20_epochs_is_flagged():
    assert train.limits_warning(46_538, 20) is None
    assert "25 epochs (limit: 20)" in train.limits_warning(46_538, 25)


# 8. A copy with missing images is named, class by class.

def test_a_truncated_copy_names_the_classes_that_lack_images(tmp_path):
    write_image_tree(tmp_path / "tree")
    for image in sorted((tmp_path / "tree" / "train" / "horse").iterdir())[1:]:
        image.unlink()  # cut at a file boundary: class 7 keeps 1 of 3
    with pytest.warns(DatasetWarning, match=r"train/horse: 1 \(expected 3\)"):
        load_cifar10(tmp_path / "tree", cache_dir=tmp_path / "cache", verbose=False)


def test_a_source_calling_itself_cifar10_is_held_to_the_full_counts(tmp_path):
    write_image_tree(tmp_path / "cifar10")
    with pytest.warns(DatasetWarning, match=r"train/airplane: 3 \(expected 5000\)"):
        load_cifar10(tmp_path / "cifar10", cache_dir=tmp_path / "cache", verbose=False)


def test_a_complete_balanced_copy_gets_no_warning(tmp_path):
    write_image_tree(tmp_path / "tree")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)
        load_cifar10(tmp_path / "tree", cache_dir=tmp_path / "cache", verbose=False)


# 9. A precision this CPU only emulates is named as slow.

@pytest.mark.parametrize("name, flags, says", [
    ("bf16", {"avx2"}, "bf16 is emulated on this CPU"),
    ("fp16", {"avx2"}, "fp16 runs slower than fp32 on CPUs"),
    ("fp16", {"avx512_fp16", "amx_fp16"}, "fp16 runs slower than fp32 on CPUs")])
def test_a_forced_precision_that_is_slow_on_this_cpu_warns_once(name, flags, says, tiny_data,
                                                                 monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_info", lambda: ("cpu", flags))
    with pytest.warns(RuntimeWarning, match=says) as caught:
        fit(build_model("group", seed=0, **NARROW_NET), tiny_data,
            TrainConfig(epochs=1, batch_size=20, precision=name), "cpu", progress=False)
    assert len([w for w in caught if "slower than fp32" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        precision.warn_if_emulated("fp32", "cpu")


# 10. Advice that works, checks in the right order, nothing left behind.

def test_an_existing_results_file_suggests_what_keeps_both(archive, tmp_path):
    args = ("--subset", "2", "--epochs", "1", "--data", archive, "--no-progress")
    assert run_train(*args, cwd=tmp_path).returncode == 0
    line = one_line_error(run_train(*args, cwd=tmp_path))
    assert "--run-name to keep both" in line and "--out-dir" not in line


def test_a_damaged_checkpoint_is_named_before_the_data_loads(tmp_path):
    ckpt = tmp_path / "junk.pt"
    ckpt.write_bytes(b"not a checkpoint")
    out = run_train("--resume", "--checkpoint", str(ckpt), "--data",
                    str(tmp_path / "absent.tar.gz"), cwd=tmp_path)
    assert f"checkpoint {ckpt} is unreadable" in one_line_error(out)


def test_a_checkpoint_of_other_settings_is_named_before_the_data_loads(archive, tmp_path):
    args = ("--subset", "2", "--epochs", "1", "--data", archive, "--no-progress",
            "--checkpoint", "run.pt", "--run-name", "r")
    assert run_train(*args, cwd=tmp_path).returncode == 0
    out = run_train(*args[:-2], "--run-name", "r2", "--lr", "0.2", "--resume", cwd=tmp_path,
                    env={"S8_CACHE_DIR": str(tmp_path / "empty-cache")})
    assert "belongs to a different run (train.lr: checkpoint 0.1, now 0.2)" in one_line_error(out)
    assert not (tmp_path / "empty-cache").exists()  # refused before the data was read


def test_an_empty_data_variable_is_named_as_empty(tmp_path):
    out = run_train("--dry-run", cwd=tmp_path, env={"CIFAR10_DATA": ""})
    assert "CIFAR10_DATA is set but empty" in one_line_error(out)


def test_a_failed_dry_run_leaves_no_folder_behind(tmp_path):
    out = run_train("--dry-run", "--data", str(tmp_path / "absent.tar.gz"), cwd=tmp_path)
    assert out.returncode == 1
    assert not list(tmp_path.glob("s8_dry_run_*"))


def test_files_from_before_a_setting_existed_or_left_the_course_still_resume(tiny_data, tmp_path):
    """A checkpoint or results file written before a setting was added is read with that
    setting's default, and one that records a setting since moved to the lab (or retired) at its
    off value is read without it: either still resumes and is recognised as the same run."""

    ckpt = tmp_path / "run.pt"
    config = TrainConfig(epochs=2, batch_size=20, optimizer="sgd")  # what files before it ran
    fit(build_model("batch", seed=0), tiny_data, config, "cpu", checkpoint_path=ckpt,
        progress=False)
    state = load_checkpoint(ckpt)
    for key in ("optimizer", "muon_lr"):  # added since
        del state["fingerprint"]["train"][key]
    state["fingerprint"]["model"].update(identity_init="off", skips="blocks", dropout=0.0)
    state["fingerprint"]["train"].update(whiten="off", ema_decay=0.0, lookahead_alpha=0.5)
    save_checkpoint(ckpt, state)
    fit(build_model("batch", seed=0), tiny_data, config, "cpu", checkpoint_path=ckpt,
        resume=True, progress=False)
    model = build_model("batch", seed=0)
    results = tmp_path / "run.json"
    payload = {"model_config": model.config.to_dict(), "train_config": config.to_dict()}
    del payload["train_config"]["muon_lr"]
    payload["model_config"]["weight_std"], payload["train_config"]["alternate_flip"] = False, False
    results.write_text(json.dumps(payload))
    assert same_recipe(results, model.config, config)
    payload["model_config"]["weight_std"] = True  # a lab run: not the course's
    results.write_text(json.dumps(payload))
    assert not same_recipe(results, model.config, config)
    payload["model_config"]["weight_std"] = False
    results.write_text(json.dumps(payload))
    assert not same_recipe(results, model.config, TrainConfig(epochs=3, batch_size=20,
                                                              optimizer="sgd"))


@pytest.mark.parametrize("cls, field", [(LabModelConfig, "identity_init"),
                                        (LabModelConfig, "skips"), (ModelConfig, "conv"),
                                        (TrainConfig, "optimizer"), (LabTrainConfig, "whiten"),
                                        (TrainConfig, "precision")])
def test_a_config_refuses_a_name_it_does_not_know_in_one_line_listing_those_it_does(cls, field):
    """Notebooks build the configs directly, without train.py's parser to check the names."""
    with pytest.raises(ValueError, match=rf"^{field} must be one of .+, got 'nonsense'$") as err:
        cls(**{field: "nonsense"})
    assert all(name in str(err.value) for name in LAB_CHOICES[field]())


# 11. Every run's files are its own: figures under the lock, broken files named, no leftovers.

def test_two_runs_sharing_an_images_folder_give_one_run_and_one_refusal(archive, tmp_path):
    base = {"S8_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    runs = [subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--run-name", "same", "--images-dir", "shared",
         "--out-dir", f"out{i}", "--checkpoint", f"ckpt{i}/same.pt", "--subset", "2",
         "--epochs", "3", "--data", archive, "--no-progress"], cwd=tmp_path, env=base,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outcomes = sorted((p.wait(), p.stderr.read()) for p in runs)
    assert [code for code, _ in outcomes] == [0, 1], outcomes
    assert "same_curves.png is in use by process" in outcomes[1][1] or \
        "is in use by process" in outcomes[1][1]
    finished = [i for i in (0, 1) if (tmp_path / f"out{i}" / "same.json").exists()]
    assert len(finished) == 1  # the figures and the one results file describe the same run
    source = plots.figure_source(tmp_path / "shared" / "same_curves.png")
    assert source == str((tmp_path / f"out{finished[0]}" / "same.json").resolve())


def test_resume_never_lets_a_run_with_other_settings_replace_another_runs_figures(archive,
                                                                                  tmp_path):
    args = ("--run-name", "x", "--images-dir", "shared", "--subset", "2", "--epochs", "1",
            "--data", archive, "--no-progress")
    assert run_train(*args, "--out-dir", "a", cwd=tmp_path).returncode == 0
    figure = tmp_path / "shared" / "x_curves.png"
    theirs = figure.read_bytes()
    refused = one_line_error(run_train(*args, "--out-dir", "b", "--lr", "0.05", cwd=tmp_path))
    assert "x_curves.png already exists" in refused and "--resume" not in refused  # advice that works
    resumed = one_line_error(run_train(*args, "--out-dir", "b", "--lr", "0.05", "--resume",
                                       cwd=tmp_path))
    assert "x_curves.png was drawn by another run" in resumed and "--run-name" in resumed
    assert figure.read_bytes() == theirs
    # the run that drew them may still continue: its own figures are recognised
    assert run_train(*args, "--out-dir", "a", "--resume", cwd=tmp_path).returncode == 0


def test_an_unreadable_results_file_is_named_by_every_reader(archive, tmp_path, capsys):
    broken = tmp_path / "runs" / "batch_seed0_e1_subset2.json"
    broken.parent.mkdir()
    broken.write_text('{"variant": "batch", "seed": 0, "final_te')  # a half-written file
    with pytest.raises(ResultsFileError, match="batch_seed0_e1_subset2.json is unreadable"):
        compare.read_results(broken.parent)  # report, the comparison notebook
    out = one_line_error(run_train("--subset", "2", "--epochs", "1", "--data", archive,
                                   "--resume", cwd=tmp_path))
    assert "batch_seed0_e1_subset2.json is unreadable" in out and "other settings" not in out
    assert "git checkout --" in out
    with pytest.raises(SystemExit):
        sweep.run_all([("batch_seed0_e1_subset2", ["--data", archive])], broken.parent, "x")
    assert "error: results file" in capsys.readouterr().out  # named, not skipped as done


def test_a_write_failure_whose_lock_cannot_be_removed_is_still_one_line(archive, tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("S8_CACHE_DIR", str(tmp_path / "cache"))
    unlink = Path.unlink

    def read_only_folder(path, *args, **kwargs):  # what a folder made read-only does
        if path.name.endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, *args, **kwargs)

    def denied(path, payload):
        raise PermissionError(13, "Permission denied", str(path))

    args = ["--subset", "2", "--epochs", "1", "--data", archive, "--no-progress"]
    monkeypatch.setattr(Path, "unlink", read_only_folder)
    monkeypatch.setattr(train, "save_json_atomic", denied)
    with pytest.raises(train.OutputError) as err:
        train.main(args)
    assert err.value.__suppress_context__ and "\n" not in str(err.value)  # printed alone
    assert (tmp_path / "runs" / "batch_seed0_e1_subset2.json.lock").exists()  # left behind
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("S8_CACHE_DIR", str(tmp_path / "cache"))
    results = train.main([*args, "--resume"])  # the stale lock does not block the rebuild
    assert results["epochs"] == 1 and (tmp_path / "runs" / "batch_seed0_e1_subset2.json").exists()


def test_a_dry_run_stopped_by_sigterm_leaves_no_folder_behind(tmp_path):
    write_image_tree(tmp_path / "tree20", per_class=(20, 20))
    data = make_archive(tmp_path / "tree20", tmp_path / "twenty.tar.gz")
    # The child holds its training step until signalled: a dry run this small can finish
    # between the test's seeing its locks and the signal's arriving (CI saw exit code 0).
    child = ("import sys, time, train\n"
             "def held_fit(*args, **kwargs):\n"
             "    print('training', flush=True)\n"
             "    time.sleep(120)\n"
             "train.fit = held_fit\n"
             "train.main(sys.argv[1:])\n")
    run = subprocess.Popen([sys.executable, "-c", child, "--dry-run", "--data", str(data),
                            "--no-progress"], cwd=tmp_path,
                           env={"S8_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
                                "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in run.stdout:  # the summary first, then the held step's word
        if line == "training\n":
            break
    else:
        raise AssertionError(f"the dry run never reached training: {run.communicate()[1]}")
    assert list(tmp_path.glob("s8_dry_run_*/*.lock"))  # what the signal must clean up
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    assert not list(tmp_path.glob("s8_dry_run_*"))


@pytest.mark.parametrize("device, says", [("gpu", "device 'gpu' is unknown"),
                                          ("cuda:7", "device 'cuda:7' is not available"),
                                          ("xpu", "device 'xpu' is not available")])
def test_an_unknown_or_absent_device_gets_one_line_listing_this_machines(device, says, tmp_path):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    line = one_line_error(run_train("--device", device, "--dry-run", cwd=tmp_path))
    assert says in line and "which has: cpu" in line


@pytest.mark.parametrize("caps", [{"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
                                  {"ONEDNN_MAX_CPU_ISA": "avx512_core"},
                                  {"ATEN_CPU_CAPABILITY": "default"}])
def test_isa_caps_that_exclude_bf16_make_auto_pick_fp32_and_are_recorded(caps, monkeypatch):
    monkeypatch.setattr(precision, "_probe_native_bf16", lambda: True)  # a bf16-capable CPU
    for name in precision.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    for name, value in caps.items():
        monkeypatch.setenv(name, value)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    info = precision.hardware_info("cpu")
    assert info["cpu_native_bf16"] is False and info["cpu_native_bf16_uncapped"] is True
    assert info["isa_caps"] == caps


def test_caps_that_keep_bf16_leave_auto_alone(monkeypatch):
    monkeypatch.setattr(precision, "_probe_native_bf16", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    assert "cpu_native_bf16_uncapped" not in precision.hardware_info("cpu")


def test_a_smoke_notebook_run_keeps_its_files_in_runs_and_replaces_the_last_ones(tmp_path,
                                                                                 monkeypatch):
    leftover = tmp_path / "runs" / "smoke_batch" / "runs" / "old.json"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("{}")
    scope, _ = notebook_config(tmp_path, monkeypatch, S8_SMOKE="1")
    assert scope["setup"].results_dir == Path("runs") / "smoke_batch" / "runs"  # ignored by git
    assert scope["setup"].checkpoint_dir.is_relative_to(Path("runs"))
    assert not leftover.exists()  # the last smoke run's files are gone, not piled up
    assert "tempfile" not in next(c.source for c in make_notebooks.notebook("batch")[1].cells
                                  if c.source.startswith("# Configuration"))
