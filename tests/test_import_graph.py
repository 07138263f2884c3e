"""The package's import structure: no module imports itself back through its top-level imports (a cycle
makes import order matter and hides which layer depends on which), and no module imports a private
name (`_name`) from another package. Read from the source with ast, nothing imported."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "loop_ray"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module):
    """Import statements run when the module is imported: at module level, in its try/if blocks,
    not under `if TYPE_CHECKING` and not inside functions or classes."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _type_checking(node):
            stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]


def _targets(module: str, node) -> list[tuple[str, list[str]]]:
    """(imported loop_ray module, names imported from it) for one import statement."""
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith("loop_ray"):
                out.append((alias.name, []))
        return out
    source = _absolute(module, node)
    if not source.startswith("loop_ray"):
        return out
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.append((sub, []) if sub in MODULES else (source, [alias.name]))
    return out


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and then a/b/c."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts)) if ".".join(parts[: i + 1]) in MODULES]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            for target, _ in _targets(module, node):
                edges.update(t for t in _with_parents(target) if t != module and not module.startswith(t + "."))
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
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


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_package_imports_have_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["loop_ray.cli.train"] >= {"loop_ray.system.run.driver"}  # the walk sees them
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _package(module: str) -> str:
    return module if _is_package(module) else module.rpartition(".")[0]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_is_imported_from_another_package(module):
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):  # every import, at any depth
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for target, names in _targets(module, node):
            private = [n for n in names + [target.rpartition(".")[2]] if n.startswith("_") and not n.startswith("__")]
            if private and _package(target) != _package(module):
                pytest.fail(f"{module} imports {private} from {target}, another package")
