"""The rooms hold (docs/architecture.md): read from the sources with `ast`, nothing imported.

- the import graph of transferkit has no circle, function-level imports included
  (edges into package `__init__` files are left out: a package's own imports are lazy);
- the pieces import only pieces, `transferkit.errors` and `transferkit.figures`;
- no module is over 400 lines;
- no transferkit module is imported by a string (`importlib.import_module`) outside `transferkit/__init__.py`;
- no private name (`_x`) is imported from another module, or read off an imported one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "transferkit"
MAX_LINES = 400
PIECES_MAY_IMPORT = ("transferkit.pieces", "transferkit.errors", "transferkit.figures")
# Modules other engineers are splitting or editing right now (issue #16): a check that fails in these alone is an
# expected failure, which turns into a pass by itself once they land. Take a module out when it is done.
# Calls that import a module by a name known only at run time, and what they import (never a transferkit module).
NAMED_AT_RUN_TIME = {"transferkit.store.artifacts": "the packages an artifact's manifest requires (keras_hub)"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in SOURCES.items()}


def runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, at any depth (functions included), except under `if TYPE_CHECKING:`, which never runs."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def absolute(module: str, node: ast.ImportFrom) -> str:
    """The module an `ImportFrom` names, with relative imports resolved against `module`."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if module not in PACKAGES:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> Iterator[tuple[str, ast.AST, list[str]]]:
    """(imported transferkit module, the node, names taken from it) for each import in `module`'s source."""
    for node in runtime_nodes(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "transferkit":
                    yield alias.name, node, []
        elif isinstance(node, ast.ImportFrom):
            source = absolute(module, node)
            if source.split(".")[0] != "transferkit":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in SOURCES:  # `from transferkit.store import artifacts`: the module itself
                    yield submodule, node, []
                else:
                    yield source, node, [alias.name]


def edges(module: str) -> set[str]:
    """The transferkit modules `module` imports, leaving out package `__init__` files."""
    return {target for target, _, _ in imports(module) if target in SOURCES and target not in PACKAGES}


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), by Tarjan."""
    graph = {name: sorted(edges(name)) for name in SOURCES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    return found


def where(module: str, node: ast.AST) -> str:
    return f"{SOURCES[module].relative_to(PACKAGE.parent)}:{node.lineno}"


def test_the_import_graph_has_no_circles():
    assert cycles() == []


def pieces_reaching_out() -> list[str]:
    return [f"{where(module, node)} imports {target}"
            for module in SOURCES if module == "transferkit.pieces" or module.startswith("transferkit.pieces.")
            for target, node, _ in imports(module)
            if not any(target == allowed or target.startswith(allowed + ".") for allowed in PIECES_MAY_IMPORT)]


def test_the_pieces_import_only_pieces_errors_and_figures():
    assert pieces_reaching_out() == []


def modules_over_the_limit() -> dict[str, int]:
    lines = {name: len(path.read_text().splitlines()) for name, path in SOURCES.items()}
    return {name: count for name, count in sorted(lines.items()) if count > MAX_LINES}


def test_no_module_is_over_400_lines():
    over = modules_over_the_limit()
    assert not over, "over 400 lines: " + ", ".join(f"{name} ({count})" for name, count in over.items())


def imports_by_string(module: str) -> Iterator[ast.Call]:
    """Calls of `importlib.import_module` / `__import__` whose name is, or may be, a transferkit module."""
    for node in runtime_nodes(TREES[module]):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        called = ast.unparse(node.func)
        if called.split(".")[-1] not in ("import_module", "__import__"):
            continue
        name = node.args[0]
        known = name.value if isinstance(name, ast.Constant) else None
        if known is None or known.startswith(("transferkit", ".")):  # a name built at run time may be ours
            yield node


def string_imports() -> list[str]:
    return [f"{where(module, call)}: {ast.unparse(call)}" for module in SOURCES
            if module != "transferkit" for call in imports_by_string(module)
            if not (module in NAMED_AT_RUN_TIME and not isinstance(call.args[0], ast.Constant))]


def test_no_transferkit_module_is_imported_by_a_string_outside_the_package_init():
    assert string_imports() == []


def private_names_used(module: str) -> Iterator[str]:
    """`from transferkit.x import _y`, and `x._y` on a transferkit module bound to a name in `module`."""
    bound: dict[str, str] = {}  # local name -> transferkit module
    for target, node, names in imports(module):
        if target == module:
            continue
        for name in names:
            if name.startswith("_") and not name.startswith("__"):
                yield f"{where(module, node)} imports {name} from {target}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
        else:
            for alias in node.names:
                if f"{absolute(module, node)}.{alias.name}" == target:
                    bound[alias.asname or alias.name] = target
    for node in runtime_nodes(TREES[module]):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            yield f"{where(module, node)} reads {node.attr} of {bound[node.value.id]}"
        elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith("transferkit."):
            parts = ast.unparse(node).split(".")
            if any(p.startswith("_") and not p.startswith("__") for p in parts):
                yield f"{where(module, node)} reads {ast.unparse(node)}"


def private_imports() -> list[str]:
    return [use for module in SOURCES for use in private_names_used(module)]


def test_no_private_name_is_imported_across_modules():
    assert private_imports() == []


def test_the_checks_see_what_they_look_for():
    """The readers find a circle, a piece's reach, a string import and a private name when there is one."""
    assert "transferkit.pieces.layers" in edges("transferkit.pieces.setups")  # a function-level import
    tree = ast.parse("import transferkit.pieces.setups, transferkit.store.artifacts as a\n"
                     "def f():\n    from transferkit.training.runs import _x\n    import importlib\n"
                     "    importlib.import_module(f'transferkit.{name}')\n    return a._read\n")
    TREES["transferkit.pieces.layers"], saved = tree, TREES["transferkit.pieces.layers"]
    try:
        assert edges("transferkit.pieces.layers") == {"transferkit.pieces.setups", "transferkit.store.artifacts",
                                                      "transferkit.training.runs"}
        assert any({"transferkit.pieces.layers", "transferkit.pieces.setups"} <= set(c) for c in cycles())
        assert len(list(imports_by_string("transferkit.pieces.layers"))) == 1
        assert [use.split(" ", 1)[1] for use in private_names_used("transferkit.pieces.layers")] == [
            "imports _x from transferkit.training.runs", "reads _read of transferkit.store.artifacts"]
    finally:
        TREES["transferkit.pieces.layers"] = saved
