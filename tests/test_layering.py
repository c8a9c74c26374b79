"""Layering: every leantrain module imports on its own, module-level imports form no cycle, and the optimizer
core does not pull in the run config or the CLI.

Importing each module first in a fresh interpreter finds cycles that break some entry point; the static graph
also finds cycles Python happens to tolerate (``from . import x`` of a half-initialised module), which still
make the import order matter. Imports inside functions are lazy on purpose and are not edges.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import leantrain

PACKAGE = Path(leantrain.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """Every module of the package (``__main__`` runs the CLI on import, so it is left out)."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p.stem != "__main__"}


def _run_python(code: str, *args: str) -> str:
    """stdout of ``code`` run with ``args`` in a fresh interpreter (fails the test on a non-zero exit)."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# Imports each module as the first leantrain module of the interpreter: torch and friends are loaded once, the
# leantrain modules are dropped from sys.modules before each import, so every module is its own entry point.
IMPORT_EACH = """
import importlib, json, sys
errors = {}
for name in json.loads(sys.argv[1]):
    for key in [k for k in sys.modules if k == "leantrain" or k.startswith("leantrain.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(errors))
"""


def test_every_module_imports_as_the_first_leantrain_module():
    names = sorted(_modules())
    assert "leantrain.adapters.lora_conv" in names and "leantrain.optim.gradnorm" in names
    errors = json.loads(_run_python(IMPORT_EACH, json.dumps(names)).splitlines()[-1])
    assert errors == {}


def _target(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """Absolute name of the module an ``ast.ImportFrom`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: module body, if/try blocks, not ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try)):
            found += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> leantrain modules it imports at import time (``from pkg import sub`` counts as ``pkg.sub``)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
                continue
            source = _target(name, path.name == "__init__.py", node)
            deps |= {f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_follows_relative_and_package_imports():
    graph = import_graph(_modules())
    assert "leantrain.adapters.lora" in graph["leantrain.adapters.lora_conv"]
    assert "leantrain.adapters.registry" in graph["leantrain.adapters.lora"]
    assert "leantrain.config" in graph["leantrain.gradnormlorp"]


def test_optimizer_package_imports_no_upper_layer():
    """Statically too (lazy imports inside functions excepted): no module of leantrain.optim imports the run
    config, the method registry, the CLI or the trainer at import time."""
    graph = import_graph(_modules())
    upper = {"leantrain.config", "leantrain.methods", "leantrain.cli", "leantrain.train", "leantrain.run"}
    offenders = {m: sorted(graph[m] & upper) for m in graph if m.startswith("leantrain.optim") and graph[m] & upper}
    assert offenders == {}


def test_module_level_imports_have_no_cycle():
    assert find_cycle(import_graph(_modules())) is None


def test_optim_does_not_import_config_or_cli():
    """``leantrain.optim`` is a bottom layer: importing it, and building every registered optimizer's spec table,
    loads neither the run config nor the CLI."""
    code = ("import json, sys, leantrain.optim as o; o.specs(); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('leantrain'))))")
    loaded = json.loads(_run_python(code).splitlines()[-1])
    assert "leantrain.optim.adam" in loaded
    assert not {"leantrain.config", "leantrain.cli", "leantrain.methods"} & set(loaded)
