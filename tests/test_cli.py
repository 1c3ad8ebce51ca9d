import json
import subprocess
import sys

from conftest import ROOT, make_archive


def run_train(*args, cwd, env_cache):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env={"S8_CACHE_DIR": str(env_cache),
                                                               "PATH": "/usr/bin:/bin"})


def test_dry_run_writes_results_and_figures_outside_the_repository(image_tree, tmp_path):
    archive = make_archive(image_tree[0], tmp_path / "tiny.tar.gz")
    out = run_train("--norm", "gn", "--dry-run", "--subset", "2", "--data", str(archive),
                    "--no-progress", cwd=tmp_path, env_cache=tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    results_path = next(p.rstrip(",") for p in out.stdout.split() if "group_seed0.json" in p)
    results = json.loads(open(results_path).read())
    assert results["variant"] == "group" and results["epochs"] == 1
    assert results["data"]["train_images"] == 20
    folder = results_path.rsplit("/", 1)[0]
    assert "s8_dry_run_" in folder
    for png in ("group_seed0_curves.png", "group_seed0_misclassified.png"):
        assert open(f"{folder}/{png}", "rb").read(4) == b"\x89PNG"
    assert not (tmp_path / "results").exists() and not (tmp_path / "images").exists()


def test_bad_input_exits_with_the_message_and_no_traceback(tmp_path):
    out = run_train("--data", str(tmp_path / "missing.tar.gz"), "--dry-run", cwd=tmp_path,
                    env_cache=tmp_path / "cache")
    assert out.returncode != 0
    assert "error: CIFAR-10 source" in out.stderr and "Traceback" not in out.stderr
    out = run_train("--norm", "instance", cwd=tmp_path, env_cache=tmp_path / "cache")
    assert out.returncode == 2 and "invalid choice: 'instance'" in out.stderr


def test_study_run_trains_on_a_subset_tests_on_everything_and_takes_its_name(image_tree, tmp_path):
    archive = make_archive(image_tree[0], tmp_path / "tiny.tar.gz")
    out = run_train("--norm", "bn", "--dry-run", "--train-subset", "2", "--batch-size", "4",
                    "--run-name", "batch_bs4_seed0", "--data", str(archive), "--no-progress",
                    cwd=tmp_path, env_cache=tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    results_path = next(p.rstrip(",") for p in out.stdout.split() if "batch_bs4_seed0.json" in p)
    results = json.loads(open(results_path).read())
    assert results["data"]["train_images"] == 20 and results["data"]["test_images"] == 20
    assert results["train_config"]["batch_size"] == 4
    assert 0 <= results["final_test_acc_batch_stats"] <= 1


def test_batch_of_one_is_refused_before_anything_runs(tmp_path):
    out = run_train("--batch-size", "1", cwd=tmp_path, env_cache=tmp_path / "cache")
    assert out.returncode == 2 and "--batch-size must be at least 2" in out.stderr
