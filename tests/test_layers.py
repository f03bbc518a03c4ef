"""The layers import downward only: kernels < model < data < eval < train < scripts.

A module may import its own package and the packages below it, never one above (scripts/ is the
top: nothing imports from it). Every import statement counts, function-local ones included, so a
lazy import cannot hide an upward edge. Read with `ast`, nothing is executed.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["kernels", "model", "data", "eval", "train", "scripts"]


def imported_packages(file: Path) -> list[tuple[int, str]]:
    """(line, top-level project package) of every import in a file."""
    found = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in LAYERS]
    return found


def upward_imports() -> list[str]:
    bad = []
    for rank, package in enumerate(LAYERS):
        for file in sorted((ROOT / package).rglob("*.py")):
            for line, target in imported_packages(file):
                if LAYERS.index(target) > rank:
                    bad.append(f"{file.relative_to(ROOT)}:{line} ({package}) imports {target}")
    return bad


def test_no_layer_imports_a_layer_above_it():
    assert upward_imports() == []


def test_the_scan_sees_function_local_imports(tmp_path):
    # The checker itself: a lazy upward import inside a function is found, with its line.
    file = tmp_path / "m.py"
    file.write_text("import torch\n\ndef f():\n    from eval.common import x\n    import scripts.chat\n")
    assert imported_packages(file) == [(4, "eval"), (5, "scripts")]


def test_only_the_runner_calls_generate_outside_model():
    """Batched chat generation has one home (model/runner.py): no caller outside model/ calls
    model.generate.generate directly (benchmarks compare the raw decode loop and may)."""
    callers = []
    for package in ("data", "eval", "train", "scripts"):
        for file in sorted((ROOT / package).rglob("*.py")):
            if file.name.startswith("bench_"):
                continue
            tree = ast.parse(file.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "model.generate":
                    if any(alias.name == "generate" for alias in node.names):
                        callers.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert callers == []
