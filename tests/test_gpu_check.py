"""lab/gpu_check.py in its smoke mode on the CPU: every step it runs on a GPU runs here too,
shrunk, so the command cannot rot between the days a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import make_archive, write_image_tree

ROOT = Path(__file__).resolve().parents[1]
CHECK = ["-m", "lab.gpu_check"]


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    """200 images per class in each split: what the notebooks' smoke mode takes."""
    root = tmp_path_factory.mktemp("data")
    write_image_tree(root / "tree", per_class=(200, 200))
    return make_archive(root / "tree", root / "cifar10-small.tar.gz")


def test_the_gpu_check_runs_every_step_in_smoke_mode_and_keeps_what_it_measured(
        small_archive, tmp_path):
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, *CHECK, "--device", "cpu", "--smoke", "--data",
                           small_archive, "--out", out, "--jobs", "2"], cwd=ROOT,
                          capture_output=True, text=True, env={
                              **__import__("os").environ, "S8_CACHE_DIR": str(tmp_path / "c")})
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert all(s["status"] == "ok" for s in steps.values()), steps
    trains = [s for s in steps.values() if s["step"].startswith("train_")]
    assert trains and all(s["epochs"] == 1 and 0 <= s["final_test_acc"] <= 1 for s in trains)
    assert {"bench", "first_epoch", "tests_cuda", "notebook_S8_BatchNorm_fp32"} <= set(steps)
    assert "policy's precision" in (out / "bench.txt").read_text()
    assert "| default | fp32 |" in (out / "first_epoch.txt").read_text()  # a row per setting
    nb = nbformat.read(out / "notebooks" / "S8_BatchNorm_fp32.ipynb", as_version=4)
    config = next(c for c in nb.cells if c.cell_type == "code" and "PRECISION =" in c.source)
    assert 'PRECISION = "fp32"' in config.source  # the precision it was asked to run
    assert any("final test accuracy" in o.get("text", "") for c in nb.cells
               for o in c.get("outputs", []))  # executed to its results line
    assert "widgets" not in nb.metadata
    text = (out / "summary.md").read_text()
    assert text.startswith("# GPU check on ")
    assert all(f"| {step} | ok | " in text for step in steps)  # a table row per step
    recorded = (out / "summary.json").read_text() + (out / "bench.txt").read_text()
    assert str(ROOT) not in recorded and sys.executable not in recorded  # no machine's paths


def test_the_gpu_check_refuses_to_write_a_smoke_run_into_results():
    done = subprocess.run([sys.executable, *CHECK, "--device", "cpu", "--smoke", "--out",
                           ROOT / "results" / "gpu" / "smoke"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: smoke runs never write into results/; pass another --out"]
    assert not (ROOT / "results" / "gpu" / "smoke").exists()
