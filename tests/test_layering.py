"""The layers import only downward: no import circle anywhere in ``magcache/``, and the library (``magcache/`` minus
the studio backend ``magcache/studio/`` and the command line ``magcache/__main__.py``, which sits above both like
the app) never imports ``magcache.studio`` nor ``ui``. Imports are read with ``ast``, inside functions too: an
import deferred to call time is still a dependency."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "magcache"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` imports (``from . import x`` counts as ``package.x`` when that is
    a module, else as the package)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "magcache.policy.Settings" -> "magcache.policy"
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files) | {"ui"}
    graph = {}
    for name, path in files.items():
        # a package's __init__ is imported by its own modules; only edges between modules make circles
        graph[name] = {m for m in _imports(path, modules) if not name.startswith(m + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _is_library(name: str) -> bool:
    return not (name.startswith("magcache.studio") or name == "magcache.__main__")


def test_no_import_circle_in_magcache():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_studio_or_the_ui():
    wrong = {name: sorted(m for m in deps if not _is_library(m) or m == "ui")
             for name, deps in _graph().items() if _is_library(name)}
    assert not {k: v for k, v in wrong.items() if v}


def test_the_walk_sees_circles_and_upward_imports():
    """The checks can fail: a circle and a library -> studio edge put into the real graph are found."""
    graph = _graph()
    assert "magcache.calibration" in graph["magcache.runtime"]  # the walk reads imports inside functions
    graph["magcache.policy"] = graph["magcache.policy"] | {"magcache.runtime"}
    assert _cycle(graph) is not None
    assert any(not _is_library(m) for m in graph["magcache.__main__"])  # the CLI may use the tiny pipelines
