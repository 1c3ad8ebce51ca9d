import json
import subprocess
import sys

from PIL import Image as PILImage

from conftest import ROOT, make_archive
from model import ModelConfig
from results import run_name
from utils import TrainConfig


def run_train(*args, cwd, env_cache):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env={"S8_CACHE_DIR": str(env_cache),
                                                               "PATH": "/usr/bin:/bin"})


def test_dry_run_writes_results_and_figures_outside_the_repository(image_tree, tmp_path):
    archive = make_archive(image_tree[0], tmp_path / "tiny.tar.gz")
    out = run_train("--norm", "gn", "--dry-run", "--subset", "2", "--data", str(archive),
                    "--no-progress", cwd=tmp_path, env_cache=tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    results_path = next(p.rstrip(",;") for p in out.stdout.split()
                        if "group_seed0_e1_subset2.json" in p)  # the name tells the settings
    results = json.loads(open(results_path).read())
    assert results["variant"] == "group" and results["epochs"] == 1
    assert results["data"]["train_images"] == 20
    folder = results_path.rsplit("/", 1)[0]
    assert "s8_dry_run_" in folder
    for png in ("group_seed0_e1_subset2_curves.png", "group_seed0_e1_subset2_misclassified.png"):
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
    results_path = next(p.rstrip(",;") for p in out.stdout.split() if "batch_bs4_seed0.json" in p)
    results = json.loads(open(results_path).read())
    assert results["data"]["train_images"] == 20 and results["data"]["test_images"] == 20
    assert results["train_config"]["batch_size"] == 4
    assert 0 <= results["final_test_acc_batch_stats"] <= 1


def test_batch_of_one_is_refused_before_anything_runs(tmp_path):
    out = run_train("--batch-size", "1", cwd=tmp_path, env_cache=tmp_path / "cache")
    assert out.returncode == 1 and out.stderr == "error: --batch-size must be at least 2, got 1\n"
    assert not (tmp_path / "cache").exists()  # refused before the data loads


def tiny_archive(image_tree, tmp_path):
    return str(make_archive(image_tree[0], tmp_path / "tiny.tar.gz"))


def test_run_names_differ_whenever_the_settings_do():
    assert run_name("batch", 0) == "batch_seed0"  # the results table's runs keep their names
    assert run_name("batch", 0, epochs=1, subset=20) == "batch_seed0_e1_subset20"
    assert run_name("group", 1, lr=0.2, num_groups=8) == "group_seed1_lr0.2_g8"
    assert run_name("layer", 0, num_groups=8) == "layer_seed0"  # only GroupNorm reads --groups
    assert run_name("batch", 0, epochs=20, batch_size=128) == "batch_seed0"  # defaults: no tag
    assert run_name("batch", 0, widths=[24, 32, 28], activation="gelu", pad=4, flip=False,
                    validation=500) == "batch_seed0_w24-32-28_gelu_pad4_flip0_val500"
    assert run_name("batch", 0, widths=ModelConfig.widths, activation=ModelConfig.activation,
                    pad=TrainConfig.pad, flip=True) == "batch_seed0"


def test_a_short_run_never_touches_a_full_runs_checkpoint_or_results(image_tree, tmp_path):
    # The reported accident: a 1-epoch subset run while a full run is in progress.
    full_ckpt = tmp_path / "checkpoints" / "batch_seed0.pt"
    full_results = tmp_path / "runs" / "batch_seed0.json"
    for path, blob in ((full_ckpt, b"epoch-7 checkpoint"), (full_results, b"{}")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    short = ("--norm", "batch", "--epochs", "1", "--subset", "2", "--data",
             tiny_archive(image_tree, tmp_path), "--no-progress")
    out = run_train(*short, cwd=tmp_path, env_cache=tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    assert full_ckpt.read_bytes() == b"epoch-7 checkpoint" and full_results.read_bytes() == b"{}"
    assert (tmp_path / "checkpoints" / "batch_seed0_e1_subset2.pt").exists()
    assert (tmp_path / "runs" / "batch_seed0_e1_subset2.json").exists()

    # The same command again would replace its own earlier run: only when asked to.
    again = run_train(*short, cwd=tmp_path, env_cache=tmp_path / "cache")
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "batch_seed0_e1_subset2.json already exists; pass --resume" in again.stderr
    assert run_train(*short, "--resume", cwd=tmp_path,
                     env_cache=tmp_path / "cache").returncode == 0
    assert run_train(*short, "--overwrite", cwd=tmp_path,
                     env_cache=tmp_path / "cache").returncode == 0


def test_a_checkpoint_without_results_is_not_replaced_by_a_new_run(image_tree, tmp_path):
    ckpt = tmp_path / "mine.pt"
    ckpt.write_bytes(b"hours of work")
    out = run_train("--epochs", "1", "--subset", "2", "--checkpoint", str(ckpt), "--data",
                    tiny_archive(image_tree, tmp_path), cwd=tmp_path, env_cache=tmp_path / "c")
    assert out.returncode == 1 and ckpt.read_bytes() == b"hours of work"
    assert f"{ckpt} already exists; refusing to replace it" in out.stderr


def test_unwritable_output_locations_fail_before_anything_loads(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    missing_data = str(tmp_path / "no_such_data.tar.gz")  # proves the check comes first
    for flag, value in (("--out-dir", blocker / "out"), ("--images-dir", blocker / "img"),
                        ("--checkpoint", blocker / "ckpt" / "run.pt")):
        out = run_train(flag, str(value), "--data", missing_data, cwd=tmp_path,
                        env_cache=tmp_path / "cache")
        assert out.returncode == 1 and "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot write to {blocker}")


def test_resume_without_a_checkpoint_says_where_it_looked(image_tree, tmp_path):
    out = run_train("--norm", "layer", "--epochs", "1", "--subset", "2", "--resume",
                    "--no-progress", "--data", tiny_archive(image_tree, tmp_path),
                    cwd=tmp_path, env_cache=tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    assert ("No checkpoint at checkpoints/layer_seed0_e1_subset2.pt: training starts from "
            "epoch 1.") in out.stdout


def test_a_checkpoint_of_random_bytes_gets_one_line_saying_what_to_do(image_tree, tmp_path):
    ckpt = tmp_path / "junk.pt"
    ckpt.write_bytes(bytes(range(256)) * 4)
    out = run_train("--epochs", "1", "--subset", "2", "--resume", "--checkpoint", str(ckpt),
                    "--data", tiny_archive(image_tree, tmp_path), cwd=tmp_path,
                    env_cache=tmp_path / "c")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"checkpoint {ckpt} is unreadable" in lines[0] and "delete it" in lines[0]
    assert "--checkpoint" in lines[0] and "weights_only" not in out.stderr


def test_groups_are_checked_before_the_data_loads_and_documented(tmp_path):
    out = run_train("--norm", "gn", "--groups", "3", "--data", str(tmp_path / "missing.tgz"),
                    cwd=tmp_path, env_cache=tmp_path / "cache")
    assert out.returncode == 1
    assert f"GroupNorm with 3 groups cannot normalize {ModelConfig.widths[0]} channels" in out.stderr
    help_text = " ".join(run_train("--help", cwd=tmp_path,
                                   env_cache=tmp_path / "cache").stdout.split())
    assert "GroupNorm only" in help_text and "must divide every stage width" in help_text


def test_precision_flag_is_recorded_in_the_results(image_tree, tmp_path):
    out = run_train("--dry-run", "--subset", "2", "--precision", "fp16", "--no-progress", "--data",
                    tiny_archive(image_tree, tmp_path), cwd=tmp_path, env_cache=tmp_path / "c")
    assert out.returncode == 0, out.stderr
    results_path = next(p.rstrip(",;") for p in out.stdout.split() if ".json" in p)
    assert json.loads(open(results_path).read())["precision"] == "fp16"
    bad = run_train("--precision", "half", cwd=tmp_path, env_cache=tmp_path / "c")
    assert bad.returncode == 2 and "invalid choice: 'half'" in bad.stderr


def test_validation_runs_are_scored_on_held_out_training_images(image_tree, tmp_path):
    root = image_tree[0]
    for cls in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"):  # 6 training images per class, so that 1 per class can be held out
        for i in range(3, 6):
            PILImage.new("RGB", (32, 32), (i * 40, 0, 0)).save(root / "train" / cls / f"{i:04d}.png")
    archive = make_archive(root, tmp_path / "six.tar.gz")
    out = run_train("--dry-run", "--train-subset", "5", "--validation", "1", "--widths", "24", "32",
                    "28", "--activation", "silu", "--pad", "2", "--no-flip", "--no-progress",
                    "--data", str(archive), cwd=tmp_path, env_cache=tmp_path / "c")
    assert out.returncode == 0, out.stderr
    path = next(p.rstrip(",;") for p in out.stdout.split() if ".json" in p)
    results = json.loads(open(path).read())
    assert results["eval_set"] == "validation"
    assert results["data"]["test_images"] == 10 and results["data"]["train_images"] == 50
    assert results["model_config"]["widths"] == [24, 32, 28]
    assert results["model_config"]["activation"] == "silu"
    assert (results["train_config"]["pad"], results["train_config"]["flip"]) == (2, False)


def test_a_diverging_run_is_recorded_where_it_diverged_and_exits_0_when_asked(image_tree, tmp_path):
    args = ["--norm", "none", "--epochs", "2", "--train-subset", "3", "--batch-size", "2",
            "--optimizer", "sgd", "--lr", "1e6",  # SGD: Muon's steps stay bounded at any --lr
            "--data", tiny_archive(image_tree, tmp_path), "--out-dir", str(tmp_path / "out"),
            "--run-name", "none_lr1e6", "--no-progress"]
    out = run_train(*args, cwd=tmp_path, env_cache=tmp_path / "cache")
    assert out.returncode == 1 and "error: loss became" in out.stderr  # not asked: an error
    assert not (tmp_path / "out" / "none_lr1e6.json").exists()
    out = run_train(*args, "--record-divergence", "--overwrite", cwd=tmp_path,
                    env_cache=tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "out" / "none_lr1e6.json").read_text())
    assert results["final_test_acc"] is None and results["variant"] == "none"
    assert results["diverged"]["epoch"] == 1 and results["diverged"]["step"] >= 1
    assert results["train_config"]["lr"] == 1e6
    assert "diverged at epoch 1, step" in out.stdout
