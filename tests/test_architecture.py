"""The layout of `runner/` is what docs/architecture.md says: every module imports, the folder graph matches, no cycles.

Read with `ast` (every import, also those inside functions and under
TYPE_CHECKING: a lazy import is still a dependency), and every module is
really imported once, so a broken import path fails here first.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "runner"
DOC = ROOT / "docs" / "architecture.md"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_NOTE = "Why it is long:"  # the note at the top of a module allowed to exceed the limits
# Modules another piece of work owns right now; listed here with the reason rather than left unchecked.
NOT_OURS_YET = {"runner/storage/store.py": "storage/ is being changed by the second-S3 work; split it after"}
# What the supervisor may read of checkpoint/: snapshots, never the torch side or the Checkpointer.
SUPERVISOR_READS = {"runner.checkpoint", "runner.checkpoint.manifest", "runner.checkpoint.reader",
                    "runner.checkpoint.layout", "runner.checkpoint.retention"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _resolve(module: str, name: str | None) -> str:
    """`from module import name`: the submodule when `name` is one, else the module."""
    if name is not None and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module


def _imports(name: str, path: Path, top_level_only: bool = False) -> set[str]:
    """The runner modules `name` imports (at import time only, with `top_level_only`)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.update(_resolve(base, a.name) for a in node.names)
    return {m for m in found if m == "runner" or m.startswith("runner.")}


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "runner"


def _documented_graph() -> dict[str, set[str]]:
    text = DOC.read_text()
    block = re.search(r"<!-- import-graph:begin -->\s*```\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md lost its import-graph block"
    graph = {}
    for line in block.group(1).strip().splitlines():
        source, _, targets = line.partition("->")
        graph[source.strip()] = {t.strip() for t in targets.split(",") if t.strip()}
    return graph


@pytest.mark.parametrize("name", [m for m in MODULES if not m.endswith("__main__")])
def test_every_module_imports(name):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:  # an optional framework (transformers, lightning) is not installed
        if exc.name and exc.name.split(".")[0] == "runner":
            raise
        pytest.skip(f"{name} needs {exc.name}")


def test_the_folder_graph_is_the_documented_one():
    actual: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        for target in _imports(name, path):
            if _folder(target) != _folder(name):
                actual.setdefault(_folder(name), set()).add(_folder(target))
    assert actual == _documented_graph(), "update the picture and the table in docs/architecture.md"


def _assert_acyclic(graph: dict[str, set[str]], what: str) -> None:
    """Depth-first; an edge from a module to its own package (an __init__ re-exporting it) is not a cycle."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if node.startswith(nxt + "."):  # importing a submodule imports its package first: already under way
                continue
            assert state.get(nxt) != 1, f"import cycle between {what}: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in list(graph):
        if node not in state:
            visit(node, [node])


def test_no_folder_cycle():
    _assert_acyclic(_documented_graph(), "folders")  # equal to the real one (the test above)


def test_no_module_cycle_at_import_time():
    _assert_acyclic({name: _imports(name, path, top_level_only=True) & MODULES.keys()
                     for name, path in MODULES.items()}, "modules")


def test_supervisor_reads_snapshots_only_and_checkpoint_never_imports_the_supervisor():
    for name, path in MODULES.items():
        targets = _imports(name, path)
        if _folder(name) == "supervisor":
            extra = {t for t in targets if _folder(t) == "checkpoint"} - SUPERVISOR_READS
            assert not extra, f"{name} imports {extra}: the supervisor reads snapshots, it does not make them"
        if _folder(name) in ("checkpoint", "control", "storage", "errors"):
            assert not {t for t in targets if _folder(t) in ("supervisor", "cli", "sim")}, name


def _long_note(path: Path) -> bool:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return LONG_NOTE in doc


def test_no_module_over_400_lines_and_no_function_over_60_without_a_note():
    too_long = []
    for name, path in MODULES.items():
        rel = str(path.relative_to(ROOT))
        if rel in NOT_OURS_YET or _long_note(path):
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}: {node.name}() is {length} lines")
    assert not too_long, f"split these, or say at the top of the module why not ({LONG_NOTE!r}): {too_long}"
