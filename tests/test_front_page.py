"""The course as a student meets it: a front page read top to bottom (short, the idea before the
numbers, every variant's figures, no lab vocabulary, generated sentences that stay true of the
files) and notebooks whose configuration is what a student changes, which say what to notice
and end with exercises whose promises hold."""

import ast
import re
from pathlib import Path

import nbformat
import pytest
import torch
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient

from conftest import ROOT
from model import build_model
from results import notebook_run
from test_tools import fake_run
from variants import REGISTRY, course_variants

from lab import front_page

README = (ROOT / "README.md").read_text()


def prose(text):
    """The page's words a reader reads: code blocks, markers and link targets left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return text


def test_the_front_page_has_at_most_1500_words():
    words = re.findall(r"[A-Za-z0-9][\w.,%'’-]*", prose(README))
    assert len(words) <= 1500, len(words)


@pytest.mark.parametrize("jargon", [r"recipe v\d", r"\blevers?\b", r"\barithmetic\b", r"\bISA\b",
                                    r"\bAVX", r"\bissue \d", r"#\d+\b"])
def test_the_front_page_keeps_the_labs_vocabulary_off(jargon):
    assert not re.search(jargon, prose(README), flags=re.I), jargon


def test_the_idea_comes_before_any_table_and_the_results_table_is_small():
    assert README.index("images/norm_axes.png") < README.index("\n|")
    start, end = README.index("<!-- front-results:start -->"), README.index("<!-- front-results:end -->")
    header = README[start:end].splitlines()[1]
    assert header.count("|") - 1 <= 6, header


def test_the_front_page_shows_every_variants_curves_and_misclassified_images():
    for variant in course_variants():
        assert f"images/{variant}_seed0_curves.png" in README
        assert f"images/{variant}_seed0_misclassified.png" in README
    assert "images/batch_size_study.png" in README
    assert "docs/contributing.md" in README


def runs_of(accs_by_variant, **changes):
    return {v: [fake_run(v, seed, acc, **changes) for seed, acc in enumerate(accs)]
            for v, accs in accs_by_variant.items()}


def test_what_to_notice_says_who_leads_only_when_every_run_is_ahead():
    ahead = runs_of({"batch": [0.86, 0.85], "layer": [0.84, 0.83], "group": [0.845, 0.835]})
    text = front_page.notice(ahead)
    assert "Every one of its 2 runs scores above every LayerNorm and GroupNorm run" in text
    assert "mean is 1.50 to 2.00 points higher" in text
    overlap = runs_of({"batch": [0.86, 0.83], "layer": [0.84, 0.835], "group": [0.84, 0.83]})
    assert "not every run is above every" in front_page.notice(overlap)


def test_what_to_notice_explains_the_train_loss_only_where_the_files_show_it():
    runs = runs_of({"batch": [0.86, 0.85], "layer": [0.84, 0.83], "group": [0.845, 0.835]})
    assert "Train loss ends above test loss in every run" in front_page.notice(runs)
    assert "keeps 90% of its probability" in front_page.notice(runs)
    runs["batch"][0]["history"]["train_loss"][-1] = 0.5  # below its test loss of 1.0
    assert "Train loss ends above test loss" not in front_page.notice(runs)


def test_the_results_table_and_run_time_come_from_the_files():
    runs = runs_of({"batch": [0.86, 0.85, 0.84]})
    for run, minutes in zip(runs["batch"], (30, 45, 50)):
        run["wall_time_s"] = 60 * minutes
        run["hardware"]["device"] = "cpu"
    table = front_page.results_table(runs)
    assert f"| {REGISTRY['batch'].title} | 85.00 ± 1.00 | 84.00 – 86.00 | 3 | 46,538 | 3 |" in table
    assert "took 30 to 50 minutes (3 runs, 2026-11-20 to 2026-11-22)" in \
        front_page.run_time(runs, [])
    assert front_page.results_table({}).startswith("No results yet")


def code_cells(name):
    return [c["source"] for c in nbformat.read(ROOT / name, as_version=4).cells
            if c["cell_type"] == "code"]


TRAINING = [f"S8_{REGISTRY[v].title}.ipynb" for v in course_variants()]


@pytest.mark.parametrize("name", TRAINING)
def test_a_training_notebooks_configuration_is_what_a_student_changes(name):
    config = next(c for c in code_cells(name) if c.startswith("# Configuration"))
    lines = [line for line in config.splitlines() if line.strip()]
    assert len(lines) <= 12, config
    for setting in ("NORM =", "SEED =", "EPOCHS =", "LR =", "BATCH_SIZE ="):
        assert any(line.startswith(setting) for line in lines), setting
    assert ("NUM_GROUPS =" in config) == ("GroupNorm" in name)


@pytest.mark.parametrize("name", TRAINING)
def test_a_training_notebook_says_what_to_notice_and_ends_with_exercises(name):
    cells = nbformat.read(ROOT / name, as_version=4).cells
    kinds = [(c.cell_type, c.source) for c in cells]
    curves = next(i for i, (k, s) in enumerate(kinds) if k == "code" and "plot_history(" in s)
    grid = next(i for i, (k, s) in enumerate(kinds) if k == "code" and "plot_misclassified(" in s)
    for after in (curves, grid):
        assert kinds[after + 1][0] == "markdown" and "What to notice" in kinds[after + 1][1]
    exercises = cells[-1].source
    assert exercises.startswith("## Exercises") and exercises.count("\n1. ") == 1
    assert len(re.findall(r"^\d\. \*\*", exercises, flags=re.M)) == 3
    assert "Flip-TTA" in "".join(s for k, s in kinds if k == "markdown")


def test_the_exercise_groupnorm_with_one_group_is_layernorm_to_the_last_digit():
    """Exercise 2's promise: the same seed gives the same weights and the same steps."""
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses = {}
    for norm, groups in (("layer", 4), ("group", 1)):
        model = build_model(norm, seed=0, num_groups=groups)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses[norm] = []
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[norm].append(loss.item())
        state = model.state_dict()
        losses[f"{norm} state"] = state
    assert losses["layer"] == losses["group"]
    assert all(torch.equal(losses["layer state"][k], losses["group state"][k])
               for k in losses["layer state"])


def test_a_notebooks_plumbing_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "smoke_batch").mkdir(parents=True)
    (tmp_path / "runs" / "smoke_batch" / "old.json").write_text("{}")
    smoke = notebook_run("bn", 20, environ={"S8_SMOKE": "1", "CIFAR10_DATA": "c.tar.gz"})
    assert (smoke.epochs, smoke.subset, smoke.data) == (1, 200, "c.tar.gz")
    assert smoke.results_dir == Path("runs/smoke_batch/runs")  # never results/
    assert not (tmp_path / "runs" / "smoke_batch" / "old.json").exists()  # emptied first
    mine = notebook_run("group", 5, environ={})
    assert (mine.epochs, mine.subset, mine.results_dir, mine.images_dir) == \
        (5, None, Path("runs"), Path("runs"))
    published = notebook_run("layer", 20, environ={"S8_PUBLISH": "1"})
    assert (published.results_dir, published.images_dir) == (Path("results"), Path("images"))


def test_the_compare_notebook_assigns_no_name_it_imports():
    """A name both imported and assigned breaks re-running an earlier cell after Run all."""
    imported, assigned = set(), set()
    for source in code_cells("S8_Compare.ipynb"):
        tree = ast.parse(TransformerManager().transform_cell(source))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                assigned.add(node.id)
    assert not imported & assigned, imported & assigned


def test_the_compare_notebook_runs_again_after_run_all(tmp_path):
    """Run all, then every cell once more in the same kernel, as a student re-running cells."""
    nb = nbformat.read(ROOT / "S8_Compare.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and "google.colab" not in c.source]
    nb.cells = [nbformat.v4.new_code_cell("import matplotlib; matplotlib.use('Agg')")] + \
        [nbformat.v4.new_code_cell(c.source) for c in code * 2]
    NotebookClient(nb, timeout=600, resources={"metadata": {"path": str(ROOT)}}).execute()
