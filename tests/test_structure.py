"""The repository's shape: no import circles, one registry of the variants that every consumer
reads, one builder of run names."""

import ast
import re
import sys

import pytest
import torch.nn as nn

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))

import make_notebooks  # noqa: E402
import report  # noqa: E402
import sweep  # noqa: E402
import train  # noqa: E402
import variants  # noqa: E402
from test_tools import fake_run  # noqa: E402

MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py"))
TESTS = sorted(p.stem for p in (ROOT / "tests").glob("*.py"))


def local_imports(path, known):
    """{module: inside a function?} of the repository's own modules that `path` imports."""
    found = {}
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            top = name.split(".")[0]
            if top in known:
                found[top] = found.get(top, False) or id(node) in nested
    return found


def test_no_module_imports_one_that_imports_it_back():
    known = set(MODULES) | set(TOOLS)
    graph = {m: set(local_imports(ROOT / f"{m}.py", known)) for m in MODULES}
    graph |= {m: set(local_imports(ROOT / "tools" / f"{m}.py", known)) for m in TOOLS}

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


@pytest.mark.parametrize("module", MODULES + [f"tools/{t}" for t in TOOLS] +
                         [f"tests/{t}" for t in TESTS])
def test_no_module_hides_an_import_of_the_repository_inside_a_function(module):
    known = set(MODULES) | set(TOOLS) | set(TESTS)
    hidden = [m for m, inside in local_imports(ROOT / f"{module}.py", known).items() if inside]
    assert not hidden, f"{module}.py imports {hidden} inside a function"


def test_variant_names_are_spelled_out_only_in_the_registry():
    names = [n for n in variants.REGISTRY]
    pattern = re.compile("|".join(f'"{n}"' for n in names))  # the code's string literals
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in [*ROOT.glob("*.py"), *ROOT.glob("tools/*.py")]
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
                for p in [*ROOT.glob("*.py"), *ROOT.glob("tools/*.py")] if p.name != "results.py"
                for i, line in enumerate(p.read_text().splitlines(), 1)
                if re.search(r"_seed\{", line)]
    assert not builders, f"run names built by hand: {builders}"
