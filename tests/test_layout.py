"""The package's layout, checked from its source: imports go one way (down the stages), with no cycle
anywhere, lazy and type-checking imports included, and functions within the size limits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "abstract_tagger"
# Bottom to top: a module may import its own stage and the stages listed before it, never a later one.
MAX_LINES, MAX_PARAMS = 60, 8
STAGES = ("common", "metrics", "data", "labeling", "training", "checkpoint", "inference", "pipeline", "publish")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Every package module `name` imports, wherever the import statement stands (function bodies and
    `if TYPE_CHECKING:` blocks too). `from a import b` counts as importing a.b where that is a module."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            # The package imports absolutely (checked below), so `node.module` is the full name.
            base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, tree, known) for name, tree in modules.items()}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_lazy_cycle():
    """The checker itself: a cycle closed by an import inside a function is found."""
    a = ast.parse("import abstract_tagger.b\n")
    b = ast.parse("def f():\n    from abstract_tagger.a import x\n")
    known = {"abstract_tagger.a", "abstract_tagger.b"}
    graph = {"abstract_tagger.a": _imports("abstract_tagger.a", a, known),
             "abstract_tagger.b": _imports("abstract_tagger.b", b, known)}
    assert find_cycle(graph) == ["abstract_tagger.a", "abstract_tagger.b", "abstract_tagger.a"]


def test_imports_are_absolute():
    relative = [name for name, tree in _modules().items() for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, f"relative imports (write them absolute): {relative}"


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_every_stage_is_declared():
    stages = {_stage(m) for m in import_graph()} - {None}
    assert stages <= set(STAGES), f"modules outside the declared stages: {stages - set(STAGES)}"


def test_imports_go_down_the_stages():
    upward = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps
              if _stage(m) and _stage(d) and STAGES.index(_stage(d)) > STAGES.index(_stage(m))]
    assert not upward, "imports up the stages: " + "; ".join(sorted(upward))


def test_common_imports_nothing_of_the_package():
    inward = [f"{m} -> {d}" for m, deps in import_graph().items() if _stage(m) == "common" for d in deps
              if _stage(d) != "common"]
    assert not inward, inward


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
    return len([n for n in names if n.arg not in ("self", "cls")])


def test_functions_within_size_limits():
    too_big = []
    for name, tree in _modules().items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = fn.end_lineno - fn.lineno + 1
                if lines > MAX_LINES or _params(fn) > MAX_PARAMS:
                    too_big.append(f"{name}.{fn.name}: {lines} lines, {_params(fn)} parameters")
    assert not too_big, f"over {MAX_LINES} lines or {MAX_PARAMS} parameters: {too_big}"


@pytest.mark.parametrize("stage", [s for s in STAGES if (SRC / PACKAGE / s).is_dir()])
def test_stage_init_says_what_it_is_for(stage):
    doc = ast.get_docstring(ast.parse((SRC / PACKAGE / stage / "__init__.py").read_text()))
    assert doc and "import" in doc.lower(), f"{stage}/__init__.py: say what the stage is for and what it may import"


def test_tests_mirror_the_stages():
    """tests/<stage>/ for a stage's own tests; cross-stage ones (bad input, bad runs, layout, wheel) at the top."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert folders and folders <= set(STAGES), f"test folders that are not stages: {folders - set(STAGES)}"
