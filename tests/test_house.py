"""The package's house: imports point down, each module on its floor, the engine in short functions.

Read from the modules' source with ``ast`` (nothing is imported), so a violation names the file,
the line and the import. ``FLOORS`` is the house as README.md's "The library" describes it, from
the ground up; a new module gets a floor here.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "trm_utils"

#: Floors from the ground up. A module may import from its own floor or a lower one, never a higher
#: one, and the imports must form no circle (within a floor too).
FLOORS = [
    ("helpers and the paper's equations 2-3", {"utils", "unet", "metrics", "leep"}),
    ("data, and a model on slices", {"datasets", "phantom", "slices", "data", "sources", "colab", "viz", "predict"}),
    ("maps and losses (equations 4-7)", {"maps", "losses"}),
    ("settings and training", {"presets", "memory", "train", "batched"}),
    ("tables of runs and the budget rule", {"tables", "budget", "findings"}),
    ("the transfer grid and its checks", {"experiments", "checks"}),
    ("reports, notebooks' helpers and commands", {"report", "notebook", "exercises", "run_all", "units", "sweep", "book"}),
]
FLOOR = {m: i for i, (_, ms) in enumerate(FLOORS) for m in ms}
#: Functions in the training path may be at most this many lines, docstring not counted.
MAX_FUNCTION_LINES = 80


def modules() -> list:
    return sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")


def package_imports(module: str):
    """``(line, imported module, inside a function)`` for every import of a package module."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif node.level == 0 and node.module and node.module.split(".")[0] == "trm_utils":
                rest = node.module.split(".")[1:]
                names = rest[:1] if rest else [a.name for a in node.names]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("trm_utils.")]
        else:
            continue
        out += [(node.lineno, n, id(node) in inside) for n in names if (PKG / f"{n}.py").exists()]
    return out


def test_every_module_has_a_floor():
    missing = [m for m in modules() if m not in FLOOR]
    gone = [m for m in FLOOR if m not in modules()]
    assert not missing, f"modules without a floor in tests/test_house.py FLOORS: {missing}"
    assert not gone, f"FLOORS names modules that no longer exist: {gone}"


def test_no_function_local_import_of_the_package():
    bad = [f"trm_utils/{m}.py:{line} imports {n} inside a function" for m in modules()
           for line, n, local in package_imports(m) if local]
    assert not bad, "\n".join(bad)


def test_no_import_climbs_a_floor():
    bad = [f"trm_utils/{m}.py:{line} ({FLOORS[FLOOR[m]][0]}) imports {n} ({FLOORS[FLOOR[n]][0]}), a higher floor"
           for m in modules() for line, n, _ in package_imports(m) if FLOOR[n] > FLOOR[m]]
    assert not bad, "\n".join(bad)


def test_no_circle():
    graph = {m: {n for _, n, _ in package_imports(m)} for m in modules()}
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("a circle of imports: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == "done":
            return
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"

    for m in modules():
        visit(m, [])


def test_function_local_imports_are_optional_dependencies_with_a_reason():
    """Outside the package, an import inside a function is for an optional or heavy dependency a
    command needs and a notebook does not; it says why on its line. The standard library is
    imported at the top."""
    bad = []
    for m in modules():
        text = (PKG / f"{m}.py").read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        for f in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(f):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "level", 0):
                    continue
                top = (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
                where = f"trm_utils/{m}.py:{node.lineno} ({top})"
                if top in sys.stdlib_module_names:
                    bad.append(f"{where}: the standard library is imported at the top of the module")
                elif "#" not in lines[node.lineno - 1] and "#" not in lines[node.end_lineno - 1]:
                    bad.append(f"{where}: say on the line why it is imported here (an optional dependency?)")
    assert not bad, "\n".join(bad)


def _function_lengths(module: str):
    tree = ast.parse((PKG / f"{module}.py").read_text())
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = f.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body = body[1:]
            n = (body[-1].end_lineno - body[0].lineno + 1) if body else 0
            yield f.name, f.lineno, n


@pytest.mark.parametrize("module", ["train", "batched", "experiments", "checks"])
def test_training_path_functions_are_short(module):
    long = [f"trm_utils/{module}.py:{line} {name}: {n} lines" for name, line, n in _function_lengths(module)
            if n > MAX_FUNCTION_LINES]
    assert not long, f"over {MAX_FUNCTION_LINES} lines (docstring not counted): " + "; ".join(long)


def test_the_checks_see_a_violation(tmp_path, monkeypatch):
    """The checks above can fail: a module that imports a higher floor inside a function, and a
    long function, are caught."""
    (tmp_path / "utils.py").write_text("def f():\n    from .train import finetune  # x\n    return finetune\n")
    (tmp_path / "train.py").write_text("def g():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES + 1))
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path)
    assert package_imports("utils") == [(2, "train", True)]
    assert [n for _, _, n in _function_lengths("train")] == [MAX_FUNCTION_LINES + 1]
