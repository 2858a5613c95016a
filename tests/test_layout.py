"""The project's layout, read from the source: line processes apart from tooling, imports one way, no circles.

schemas/ -> pipeline/ -> workers/ is the data path; tools/ (developer tooling) may use all three, and of the
line's modules only the CLI's subcommands reach into tools/, from inside the functions that need it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "pipeline", "workers", "tools")
# Which of the project's packages each package may import (itself included).
MAY_IMPORT = {
    "schemas": {"schemas"},
    "pipeline": {"schemas", "pipeline"},
    "workers": {"schemas", "pipeline", "workers"},
    "tools": {"schemas", "pipeline", "workers", "tools"},
}
CLI = ROOT / "workers" / "cli.py"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The project modules one import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        # `from a import b` may name a submodule b: count both; unknown names fall out in _project_modules.
        return [stem] + [f"{stem}.{alias.name}" for alias in node.names]
    return []


def _imports(path: Path, module_level_only: bool) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    module, is_package = _module_name(path), path.name == "__init__.py"
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if module_level_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        found += [(name, node.lineno) for name in _imported(node, module, is_package)]
    return [(name, line) for name, line in found if name.split(".")[0] in PACKAGES]


def _project_modules() -> set[str]:
    return {_module_name(path) for package in PACKAGES for path in _sources(package)}


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_lies_upstream_of_it(package: str) -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in _sources(package) for name, line in _imports(path, module_level_only=False)
             if name.split(".")[0] not in MAY_IMPORT[package]
             and not (path == CLI and name.split(".")[0] == "tools")]
    assert not wrong, "\n".join(wrong)


def test_no_line_module_imports_tooling_and_the_cli_only_inside_its_subcommands() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in _sources("workers") for name, line in _imports(path, module_level_only=False)
             if name.split(".")[0] == "tools" and path != CLI]
    at_top = [f"workers/cli.py:{line} imports {name} at module level"
              for name, line in _imports(CLI, module_level_only=True) if name.split(".")[0] == "tools"]
    assert not wrong + at_top, "\n".join(wrong + at_top)
    # The check can fail: the CLI does reach into tools/, from inside functions.
    assert any(name.startswith("tools") for name, _ in _imports(CLI, module_level_only=False))


def test_module_level_imports_have_no_circles() -> None:
    modules = _project_modules()
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in _sources(package):
            names = {name for name, _ in _imports(path, module_level_only=True)}
            graph[_module_name(path)] = {name for name in names if name in modules} - {_module_name(path)}
    circles = []
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


# What a GPU box or a pure-evaluation environment may lack: the model path must import without them.
OPTIONAL_AT_IMPORT = ("faiss", "redis", "kafka", "segment_anything")
MODEL_PATH = ("pipeline.core.inspector", "pipeline.core.training", "pipeline.core.store", "pipeline.experts",
              "pipeline.evaluation.benchmark", "schemas.messages")


def test_the_model_path_imports_without_faiss_redis_kafka_or_segment_anything() -> None:
    code = f"""
import importlib, importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):  # as if these were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL_AT_IMPORT!r}:
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
for module in {MODEL_PATH!r}:
    importlib.import_module(module)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
