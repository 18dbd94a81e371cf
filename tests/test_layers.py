"""The house reads top to bottom, as the pipeline runs: entry points -> serving (the API, which
reads a version directory) -> training / export (a run directory in, a version directory out) ->
towers -> sequential -> recdata, with no import arrow back up, none between training and export
or from serving to training, and no circle."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower layers may not import higher ones; training and export share a layer and may not import
# each other (the run directory is their contract); serving reads what export wrote (export's
# contract, its index ops) and never training.
LAYERS = {"recdata": 0, "sequential": 1, "towers": 2, "training": 3, "export": 3, "serving": 4}
FORBIDDEN = {("serving", "training")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports included)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in LAYERS}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            graph[_module_name(path)] = _imports(path, _module_name(path))
    modules = set(graph)
    # "from towers import run_dir" names a module; "from towers.model import X" names a symbol.
    return {m: {t if t in modules else t.rpartition(".")[0] for t in targets} - {m}
            for m, targets in graph.items()}


def test_imports_only_point_down():
    wrong = []
    for module, targets in _graph().items():
        here = module.split(".")[0]
        for target in targets:
            there = target.split(".")[0]
            if there != here and (LAYERS[there] >= LAYERS[here]
                                  or (here, there) in FORBIDDEN):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering: " + ", ".join(sorted(wrong))


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(target):]
                                                             + [target]))
            if target in graph and not state.get(target):
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [module])


@pytest.mark.parametrize("module, forbidden", [
    ("towers.model", ("training", "export", "serving")),
    ("export.build", ("training", "serving")),
    ("training.trainer", ("export", "serving")),
    ("serving.app", ("training",)),
])
def test_package_imports_alone(module, forbidden):
    """Importing a module in a fresh interpreter loads nothing from the layers it must not use."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {module}; import json; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert not loaded & set(forbidden), f"{module} loaded {loaded & set(forbidden)}"
