"""The repository's shape: the course at the top never imports the lab, no import circles, one
registry of the variants that every consumer reads, one builder of run names."""

import ast
import json
import re
from pathlib import Path

import pytest
import torch.nn as nn

import train
import variants
from conftest import ROOT
from lab import make_notebooks, report, sweep
from test_tools import fake_run

COURSE = sorted(p.stem for p in ROOT.glob("*.py"))
LAB = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for p in (ROOT / "lab").rglob("*.py") if p.relative_to(ROOT) != Path("lab/__init__.py"))
TESTS = sorted(p.stem for p in (ROOT / "tests").glob("*.py"))
TRAINING_NOTEBOOKS = [f"S8_{variants.REGISTRY[v].title}.ipynb" for v in variants.course_variants()]


def source_path(module):
    """The file of a module named as it is imported ("model", "lab.report") or of a test."""
    if module in TESTS:
        return ROOT / "tests" / f"{module}.py"
    package = ROOT / module.replace(".", "/") / "__init__.py"
    return package if package.exists() else ROOT / (module.replace(".", "/") + ".py")


def imported_names(tree_or_node):
    """[(dotted name, node)] of every import in an AST: "lab.report" for `from lab import
    report`, "lab.compare" for `from lab.compare import x`, "model" for `import model`."""
    found = []
    for node in ast.walk(tree_or_node):
        if isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, node))
            found += [(f"{node.module}.{a.name}", node) for a in node.names]
    return found


def local_imports(path, known):
    """{module: inside a function?} of the repository's own modules (`known`) that `path`
    imports."""
    found = {}
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f)}
    for name, node in imported_names(tree):
        if name in known:
            found[name] = found.get(name, False) or id(node) in nested
    return found


def test_no_module_imports_one_that_imports_it_back():
    known = set(COURSE) | set(LAB)
    graph = {m: set(local_imports(source_path(m), known)) for m in known}

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, graph) if c]
    assert not cycles, f"import circle: {' -> '.join(cycles[0])}"


@pytest.mark.parametrize("module", COURSE + LAB + TESTS)
def test_no_module_hides_an_import_of_the_repository_inside_a_function(module):
    known = set(COURSE) | set(LAB) | set(TESTS)
    hidden = [m for m, inside in local_imports(source_path(module), known).items() if inside]
    assert not hidden, f"{source_path(module).relative_to(ROOT)} imports {hidden} inside a function"


@pytest.mark.parametrize("module", COURSE)
def test_the_course_never_imports_the_lab(module):
    """The lab extends the course; a course module that imported it would pull the studies'
    switches back into what a student reads."""
    names = [name for name, _ in imported_names(ast.parse(source_path(module).read_text()))]
    assert not [n for n in names if n == "lab" or n.startswith("lab.")], \
        f"{module}.py imports the lab"


@pytest.mark.parametrize("name", TRAINING_NOTEBOOKS)
def test_the_training_notebooks_import_only_the_course(name):
    cells = json.loads((ROOT / name).read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", code, flags=re.M)
    assert imports and not [m for m in imports if m.split(".")[0] == "lab"], imports


def test_the_tools_run_as_modules_without_editing_sys_path():
    """`python -m lab.<tool>` from the root finds the course; only the tests' conftest may
    point the interpreter at it (pytest.ini's pythonpath does)."""
    edits = [str(p.relative_to(ROOT)) for p in [*ROOT.glob("*.py"), *(ROOT / "lab").rglob("*.py"),
                                                *ROOT.glob("tests/*.py")]
             if "sys.path.insert" in p.read_text() and p.name != "test_structure.py"]
    assert len(edits) <= 2, edits


def test_variant_names_are_spelled_out_only_in_the_registry():
    names = [n for n in variants.REGISTRY]
    pattern = re.compile("|".join(f'"{n}"' for n in names))  # the code's string literals
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in [*ROOT.glob("*.py"), *(ROOT / "lab").rglob("*.py")]
                 if p.name != "variants.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"variant names as literals outside variants.py: {offenders}"


@pytest.fixture
def dummy_variant(monkeypatch):
    """A fifth normalization added to the registry, and nowhere else."""
    dummy = variants.Variant("dummy", ("dm", "dummynorm"), "DummyNorm", "DM", "C5",
                             lambda c, groups, size: nn.GroupNorm(2, c), "per_group", 77.0,
                             description="DummyNorm normalizes each image over 2 groups.")
    monkeypatch.setitem(variants.REGISTRY, "dummy", dummy)
    return dummy


def test_a_variant_added_to_the_registry_reaches_every_consumer(dummy_variant):
    # the command line: an accepted name, a configuration, a model
    model_config, _ = train.configs_from(train.parse_args(["--norm", "dm"]))
    assert model_config.norm == "dummy"
    # a sweep plan and its run names
    assert [name for name, _ in sweep.plan(["dummynorm"], [0, 1])] == \
        ["dummy_seed0", "dummy_seed1"]
    # the results table, with its target
    runs = {"dummy": [fake_run("dummy", s, a) for s, a in ((0, 0.70), (1, 0.72), (2, 0.74))]}
    row = next(line for line in report.table(runs).splitlines() if line.startswith("| dummy"))
    assert "72.00 ± 2.00" in row and "≥ 77: not met (-5.00)" in row
    # the notebook generator
    notebooks = make_notebooks.all_notebooks()
    assert "S8_DummyNorm.ipynb" in notebooks
    sources = "\n".join(c.source for c in notebooks["S8_DummyNorm.ipynb"].cells)
    assert 'NORM = "dummy"' in sources and dummy_variant.description in sources


def test_every_tool_names_runs_through_the_one_builder():
    """Run names are built by results.run_name only: no tool formats `_seed{...}` itself."""
    builders = [f"{p.relative_to(ROOT)}:{i}"
                for p in [*ROOT.glob("*.py"), *ROOT.glob("lab/*.py")] if p.name != "results.py"
                for i, line in enumerate(p.read_text().splitlines(), 1)
                if re.search(r"_seed\{", line)]
    assert not builders, f"run names built by hand: {builders}"


# What a student reads stays small; the studies' switches live in lab/levers.py.
MODEL_LINES, FORWARD_BY_LINE, CONFIG_FIELDS, TRAIN_FIELDS, FIT_LINES, FILE_LINES = \
    200, 130, 8, 15, 60, 450
REPORT_LINES = 350  # each module of lab/report/, one per page or study


def definition(path, name):
    """The AST node of the top-level class or function `name` in `path`."""
    return next(n for n in ast.parse(path.read_text()).body if getattr(n, "name", None) == name)


def test_the_course_model_reads_top_to_bottom():
    """model.py under 200 lines, Net.forward within its first 130, at most 8 settings, and the
    three skip adds written out in forward rather than looked up."""
    path = ROOT / "model.py"
    assert len(path.read_text().splitlines()) < MODEL_LINES
    net = definition(path, "Net")
    forward = next(n for n in net.body if getattr(n, "name", None) == "forward")
    assert forward.end_lineno <= FORWARD_BY_LINE
    adds = [n for n in ast.walk(forward) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Add)]
    assert len(adds) == 3
    fields = [n for n in definition(path, "ModelConfig").body if isinstance(n, ast.AnnAssign)]
    assert len(fields) <= CONFIG_FIELDS


def test_the_training_loop_and_its_configuration_stay_small():
    path = ROOT / "utils.py"
    fields = [n for n in definition(path, "TrainConfig").body if isinstance(n, ast.AnnAssign)]
    assert len(fields) <= TRAIN_FIELDS
    fit = definition(path, "fit")
    assert fit.end_lineno - fit.lineno + 1 <= FIT_LINES


def test_no_source_file_outgrows_its_budget():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in [*ROOT.glob("*.py"), *(ROOT / "lab").rglob("*.py")]}
    assert all(n <= FILE_LINES for n in sizes.values()), sizes
    report = {f: n for f, n in sizes.items() if f.startswith("lab/report/")}
    assert len(report) > 1 and all(n <= REPORT_LINES for n in report.values()), report
