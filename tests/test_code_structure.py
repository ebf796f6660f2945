"""The code's shape, checked: no import cycles among the project's modules (imports inside
functions included: they are where cycles hide), DeepSpeed reached only through the strategy,
and short functions in training/ and utils/."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("training", "utils", "inference", "bench")
TOP_LEVEL = ("train.py", "chat.py")
# the strategy owns DeepSpeed; the tensor-parallel split is built on DeepSpeed's AutoTP
DEEPSPEED_HOMES = ("utils/strategy/", "inference/tensor_parallel.py")
MAX_FUNCTION_LINES = 60


def production_files() -> list[Path]:
    files = [ROOT / name for name in TOP_LEVEL]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, at any depth of the file."""
    names = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package upwards
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from utils import dist`
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports. A module's own ancestor packages are left out:
    Python has them imported before the module runs, whatever the module says."""
    modules = {module_name(p): p for p in production_files()}
    return {name: {m for m in imported_modules(path) if m in modules and m != name and not name.startswith(m + ".")}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, on_path = set(), []

    def visit(node):
        if node in on_path:
            return on_path[on_path.index(node):] + [node]
        if node in done:
            return None
        on_path.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle:
                return cycle
        on_path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_the_project_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_strategy_imports_deepspeed():
    offenders = []
    for path in production_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(DEEPSPEED_HOMES):
            continue
        if any(m == "deepspeed" or m.startswith("deepspeed.") for m in imported_modules(path)):
            offenders.append(rel)
    assert offenders == [], f"import deepspeed outside {DEEPSPEED_HOMES}: {offenders}"


def test_functions_in_training_and_utils_are_short():
    long = []
    for package in ("training", "utils"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {long}"
