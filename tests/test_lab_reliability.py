"""The lab's tools keep the training command's guarantees: one-line errors before any work, no
orphans after a stop, and no stray run in the published tables."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import ROOT, make_archive, write_image_tree
from results import ResultsFileError
from test_tools import fake_run

from lab import compare, sweep


def write_run(folder, name, **fields):
    run = {**fake_run("batch", 0, 0.85, epochs=20), **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(run))
    return folder / f"{name}.json"


def test_the_finals_take_a_final_run(tmp_path):
    write_run(tmp_path, "batch_seed0")
    assert [r["seed"] for r in compare.load_runs(tmp_path)["batch"]] == [0]


def test_a_stray_subset_run_is_refused_by_name_not_put_into_the_finals(tmp_path):
    write_run(tmp_path, "batch_seed0")
    stray = write_run(tmp_path, "batch_seed0_e1_subset200", epochs=1)
    with pytest.raises(ResultsFileError, match=f"{stray} is not a final run .*batch_seed0.json"
                                               f".*move it to runs/"):
        compare.load_runs(tmp_path)


def test_a_validation_run_under_a_finals_name_is_refused(tmp_path):
    path = write_run(tmp_path, "batch_seed0", eval_set="validation")
    with pytest.raises(ResultsFileError, match=f"{path} is not a final run"):
        compare.load_runs(tmp_path)


def test_a_results_file_without_its_accuracy_is_named(tmp_path):
    path = write_run(tmp_path, "batch_seed0")
    run = json.loads(path.read_text())
    del run["final_test_acc"]
    path.write_text(json.dumps(run))
    with pytest.raises(ResultsFileError, match=f"results file {path} lacks final_test_acc"):
        compare.load_runs(tmp_path)


def test_a_results_file_of_an_unknown_variant_is_named(tmp_path):
    path = write_run(tmp_path, "weird_seed0", variant="weird")
    with pytest.raises(ResultsFileError, match=f"results file {path} is of an unknown variant "
                                               f"'weird'"):
        compare.load_runs(tmp_path)


def one_line(done):
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    return lines[0]


def run_repeat(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lab.repeat", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "CIFAR10_DATA": "nowhere"})


def test_repeat_names_an_unreadable_results_file_in_one_line(tmp_path):
    (tmp_path / "r.json").write_text("{trunc")
    assert "is unreadable" in one_line(run_repeat(tmp_path / "r.json", cwd=ROOT))


def test_repeat_refuses_a_file_without_a_history_before_the_data_loads(tmp_path):
    path = write_run(tmp_path, "batch_seed0")
    run = json.loads(path.read_text())
    del run["history"]
    path.write_text(json.dumps(run))
    line = one_line(run_repeat(path, cwd=ROOT))  # CIFAR10_DATA=nowhere: it never got there
    assert "lacks epoch, train_loss" in line and "finished train.py run" in line


def test_repeat_refuses_a_missing_gpu_before_the_data_loads(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = write_run(tmp_path, "batch_seed0")
    assert "device 'cuda' is not available" in one_line(
        run_repeat(path, "--device", "cuda", cwd=ROOT))


FAKE_TRAIN = """import os, sys, time
from pathlib import Path
print(os.getpid(), flush=True)
time.sleep(30)
Path(sys.argv[sys.argv.index("--out-dir") + 1], "late.json").write_text("{}")
"""


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sigterm_to_a_sweep_stops_its_running_train_py_and_starts_no_other(tmp_path, jobs):
    (tmp_path / "train.py").write_text(FAKE_TRAIN)
    sweep = ("import sys\nfrom pathlib import Path\nfrom lab import sweep\n"
             "sweep.TRAIN = [sys.executable, str(Path(sys.argv[1], 'train.py'))]\n"
             "sweep.main(['--norms', 'bn', '--seeds', '0', '1', '2', '3', '--out-dir', sys.argv[2],"
             f" '--jobs', '{jobs}', '--log-dir', sys.argv[3]])\n")
    logs = tmp_path / "logs"
    run = subprocess.Popen([sys.executable, "-c", sweep, str(tmp_path), str(tmp_path / "out"),
                            str(logs)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    if jobs == "1":
        children = [next(int(line) for line in run.stdout if line.strip().isdigit())]
    else:  # each run's output goes to its log: wait for both running runs to print their pid
        deadline = time.time() + 30
        while len([p for p in logs.glob("*.log") if p.read_text().strip()]) < 2 \
                and time.time() < deadline:
            time.sleep(0.2)
        children = [int(p.read_text().split()[0]) for p in logs.glob("*.log")]
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 128 + signal.SIGTERM
    for child in children:
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)  # stopped with the sweep, not orphaned
    said = run.stdout.read()
    assert not [s for s in range(int(jobs), 4) if f"--seed {s} " in said]  # the runs left: not started
    assert len(list(logs.glob("*.log"))) == (0 if jobs == "1" else 2)  # none for runs left
    time.sleep(1)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def run_train(*args, cwd):
    """train.py as a user runs it, pointed at no data: whatever it refuses, it refuses first."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True,
                          env={**os.environ, "S8_CACHE_DIR": str(cwd / "cache"),
                               "CIFAR10_DATA": str(cwd / "no-such-data.tar.gz")})


def test_a_subset_run_into_the_repositorys_results_is_refused_from_any_folder(tmp_path):
    line = one_line(run_train("--subset", "20", "--epochs", "1", "--out-dir", ROOT / "results",
                              cwd=tmp_path))
    assert "is the repository's results/" in line and "pick another --out-dir" in line


def test_a_folder_as_checkpoint_is_refused_before_any_work_even_with_overwrite(tmp_path):
    (tmp_path / "ckpt").mkdir()
    line = one_line(run_train("--epochs", "1", "--subset", "2", "--checkpoint", tmp_path / "ckpt",
                              "--overwrite", "--out-dir", tmp_path / "out", cwd=tmp_path))
    assert f"{tmp_path / 'ckpt'} is a folder; --checkpoint takes a file's path" in line


@pytest.mark.parametrize("flags, says", [
    (["--groups", "0"], "--groups must be at least 1, got 0"),
    (["--seed", "-1"], "--seed must be at least 0 and at most 4294967295, got -1")])
def test_a_setting_out_of_range_is_named_by_its_flag_before_the_data_loads(flags, says,
                                                                           tmp_path):
    assert says in one_line(run_train(*flags, "--dry-run", cwd=tmp_path))


def run_gpu_check(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lab.gpu_check", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_the_gpu_check_refuses_a_machine_without_a_gpu_unless_asked_for_its_smoke_version():
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "run it on a GPU, or pass --smoke --out DIR" in one_line(run_gpu_check())


def test_the_gpu_check_refuses_missing_data_and_an_unwritable_out_before_any_step(tmp_path):
    line = one_line(run_gpu_check("--device", "cpu", "--smoke", "--out", tmp_path / "o",
                                  "--data", tmp_path / "nope.tar.gz"))
    assert f"--data {tmp_path / 'nope.tar.gz'} does not exist" in line
    (tmp_path / "file").write_text("")
    line = one_line(run_gpu_check("--device", "cpu", "--smoke", "--out", tmp_path / "file" / "o"))
    assert "cannot write to" in line and not (tmp_path / "o").exists()


def test_the_gpu_check_stops_at_data_that_does_not_load_and_says_why(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run_gpu_check("--device", "cpu", "--smoke", "--out", tmp_path / "o",
                         env={"CIFAR10_DATA": str(tmp_path / "empty"),
                              "S8_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode != 0 and "error: the data did not load (" in done.stderr
    steps = json.loads((tmp_path / "o" / "summary.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["data_cache"]  # nothing else ran


def snapshot(folder):
    return {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_sigterm_to_the_gpu_check_stops_its_notebook_and_kernel(tmp_path):
    write_image_tree(tmp_path / "tree", per_class=(30, 30))
    data = make_archive(tmp_path / "tree", tmp_path / "small.tar.gz")
    out = tmp_path / "check"
    run = subprocess.Popen([sys.executable, "-m", "lab.gpu_check", "--device", "cpu", "--smoke",
                            "--data", str(data), "--out", str(out), "--jobs", "2"], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT),
                                "S8_CACHE_DIR": str(tmp_path / "cache")})
    notebook_log = out / "logs" / "notebook_S8_BatchNorm_fp32.log"
    deadline = time.monotonic() + 240
    while not notebook_log.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert notebook_log.exists(), run.communicate()[1]
    time.sleep(3)  # the worker has started its kernel
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    after_exit = snapshot(out)
    time.sleep(5)
    assert snapshot(out) == after_exit  # nothing writes into the folder after the check exits
    leftover = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout
    assert not leftover.strip(), leftover


def test_a_sweep_names_a_plain_run_by_the_settings_passed_through_to_it():
    """A 3-epoch subset run must not take the name of a final run (batch_seed0.json)."""
    short = sweep.passed_settings(["--epochs", "3", "--subset", "200"])
    assert [name for name, _ in sweep.plan(["bn"], [0], settings=short)] == \
        ["batch_seed0_e3_subset200"]
    how = sweep.passed_settings(["--precision", "fp32"])  # how it computes: not in the name
    assert [name for name, _ in sweep.plan(["bn"], [0], settings=how)] == ["batch_seed0"]


def test_the_gpu_grid_script_sends_back_its_plan_and_log_where_the_grid_cannot_run(tmp_path):
    """lab/gpu_grid.sh, a lent GPU's one call, checked where it can be: on a machine without
    CUDA the grid refuses in one line, and the script still sends back what it has."""
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA: the grid would run")
    write_image_tree(tmp_path / "tree")
    data = make_archive(tmp_path / "tree", tmp_path / "small.tar.gz")
    out = tmp_path / "out"
    out.mkdir()
    repo = tmp_path / "repo"  # a copy of the code: the script's scratch (runs/) stays out of ours
    shutil.copytree(ROOT / "lab", repo / "lab", ignore=shutil.ignore_patterns("__pycache__"))
    for module in ROOT.glob("*.py"):
        shutil.copy(module, repo)
    done = subprocess.run(["bash", "lab/gpu_grid.sh", "round2-gpu"], cwd=repo, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable,
                               "CIFAR10_DATA": str(data), "S8_CACHE_DIR": str(tmp_path / "cache"),
                               "DEADLINE": "120"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 of 52 runs done" in (out / "plan_before.txt").read_text()
    assert "runs on a CUDA GPU, and this machine has none" in done.stdout
    with tarfile.open(out / "grid.tgz") as tgz:
        assert "runs/tune.log" in tgz.getnames()
    assert (repo / "runs" / "tune.log").exists()  # its scratch beside the code it ran
    missing = subprocess.run(["bash", "lab/gpu_grid.sh", "round2-gpu"], cwd=repo, text=True,
                             capture_output=True, env={**os.environ, "OUT": str(out),
                                                       "CIFAR10_DATA": str(tmp_path / "no.tgz")})
    assert missing.returncode == 2 and "error: no data at" in missing.stdout
