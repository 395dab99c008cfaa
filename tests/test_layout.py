"""The package's shape: a flat core that a single training run needs and that never reaches into the wings
(sweep/: Ray Tune and Optuna; analysis/: the numbers and the report), and functions that fit on a screen."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "asl_tune"
CORE = ("alphabet", "api", "cli", "config", "data", "errors", "evaluate", "files", "model", "results", "synth", "train", "workers")
WINGS = ("asl_tune.sweep", "asl_tune.analysis")
MAX_LINES = 60  # a function longer than this says why in its docstring, starting a line with "Long:"


def imports(tree: ast.AST, top_level_only: bool) -> list[str]:
    """Modules a file imports (asl_tune's own included), at its top level only or anywhere."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return found


def test_the_layout_shows_the_stages():
    assert sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")) == sorted(CORE)
    assert {p.stem for p in (PACKAGE / "sweep").glob("*.py")} >= {
        "space",
        "request",
        "run",
        "trainable",
        "recorder",
        "cluster",
        "study",
        "mirror",
    }
    assert {p.stem for p in (PACKAGE / "analysis").glob("*.py")} >= {"compute", "figures", "report"}


@pytest.mark.parametrize("module", CORE)
def test_the_core_never_imports_a_wing(module):
    """The Python API reaches the wings from inside its functions only, and the command line through the API; nothing else in the core does."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    reached = imports(tree, top_level_only=(module in ("api", "cli")))
    assert not [m for m in reached if m.startswith(WINGS) or m.split(".")[0] in ("ray", "optuna")], module


def test_the_core_imports_and_trains_with_ray_and_optuna_made_unimportable(tiny_dataset, tmp_path):
    script = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ray", "optuna"):
            raise ImportError(f"{{name}} is made unimportable for this test")
sys.meta_path.insert(0, Refuse())
for module in {CORE!r}:
    importlib.import_module(f"asl_tune.{{module}}")
from asl_tune.cli import main
sys.exit(main(["train", "--data", {str(tiny_dataset)!r}, "--image-size", "32", "--head-width", "16", "--epochs", "1", "--out", {str(tmp_path / "out")!r}]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "out").glob("*/checkpoint.pt"))


def wing_imports(wing: str) -> dict[str, set[str]]:
    """Module -> the modules of the same wing it imports (anywhere in the file, inside functions too)."""
    names = {p.stem for p in (PACKAGE / wing).glob("*.py")} - {"__init__"}
    graph = {}
    for name in sorted(names):
        reached = imports(ast.parse((PACKAGE / wing / f"{name}.py").read_text()), top_level_only=False)
        prefix = f"asl_tune.{wing}."
        graph[name] = {m[len(prefix) :].split(".")[0] for m in reached if m.startswith(prefix)} & names - {name}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as the modules along it (the first back to itself), or None when it has none."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for after in sorted(graph[node]):
            if (cycle := visit(after, path + [node])) is not None:
                return cycle
        done.add(node)
        return None

    return next((c for node in sorted(graph) if (c := visit(node, [])) is not None), None)


@pytest.mark.parametrize("wing", ["sweep", "analysis"])
def test_a_wings_modules_import_each_other_in_one_order(wing):
    """No import circle inside a wing (recorder -> request -> tracking -> recorder was one): each shared name lives in
    one module, and the wing's files read in an order, each importing only those before it."""
    graph = wing_imports(wing)
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check finds one
    assert any(graph.values())  # the graph sees the wing's imports
    assert import_cycle(graph) is None, f"{wing}/: an import circle: {' -> '.join(import_cycle(graph))}"


def test_no_function_is_longer_than_a_screen_unless_it_says_why():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES:
                doc = ast.get_docstring(node) or ""
                if not any(line.strip().startswith("Long:") for line in doc.splitlines()):
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
