"""No function longer than 80 lines anywhere in leantrain/.

Long functions with nested closures and shared mutable state are how leantrain/train.py grew to do fifteen
jobs at once; this keeps every module from drifting back.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

MAX_LINES = 80
ROOT = Path(__file__).resolve().parents[1] / "leantrain"
CHECKED = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py"))  # every module of the package


def long_functions(path: Path, limit: int = MAX_LINES) -> list[str]:
    """``name (N lines)`` for every function or method in ``path`` longer than ``limit`` lines."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


@pytest.mark.parametrize("name", CHECKED)
def test_no_function_longer_than_limit(name: str) -> None:
    assert long_functions(ROOT / name) == [], f"leantrain/{name}: split these into smaller functions"


def test_detects_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    source = tmp_path / "long.py"
    source.write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert [f.split(" ")[0] for f in long_functions(source)] == ["long"]
