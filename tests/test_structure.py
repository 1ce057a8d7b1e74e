"""The shape of the code: no import cycles, and modules and functions a reader can hold in mind.

Read from the source with `ast` (nothing is imported), so a cycle hidden in a
function-level import counts as much as one at the top of a module.
"""

import ast
from pathlib import Path

from helpers import ROOT

PACKAGES = ("launch", "trainer", "data_pipeline")
# scripts/ is a folder of programs: each runs with scripts/ on sys.path, so a script's
# module name is its file name.
SCRIPTS = "scripts"
MAX_MODULE_LINES = 320
MAX_FUNCTION_LINES = 60


def source_files() -> dict[str, Path]:
    """{module name: file} for the packages and the scripts."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / SCRIPTS).glob("*.py")):
        files[path.stem] = path
    return files


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement anywhere in `tree` may refer to, absolute."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            # `from package import module` imports that module.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """{module: the modules of this tree it imports}, by the longest known prefix of each import."""
    files = source_files()
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            for n in range(len(parts), 0, -1):
                if ".".join(parts[:n]) in files:
                    targets.add(".".join(parts[:n]))
                    break
        targets.discard(module)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected part of more than one module."""
    index, low, on_stack, stack, parts = {}, {}, set(), [], []

    def strongconnect(v):  # Tarjan's algorithm; the graphs here are small enough for recursion.
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                parts.append(set(part))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(graph, part) for part in parts]


def _cycle_in(graph: dict[str, set[str]], part: set[str]) -> list[str]:
    """A shortest path from the part's first module back to itself, inside the part."""
    start = min(part)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & part):
            if w == start:
                return [*path, start]
            if w not in seen:
                seen.add(w)
                paths.append([*path, w])
    raise AssertionError(f"no cycle through {start} in {sorted(part)}")


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


# launch -> trainer -> data_pipeline: a layer imports only the layers after it, and the
# input pipeline no Horovod (it is given num_shards and shard_index instead).
FORBIDDEN = {"trainer": ("launch",), "data_pipeline": ("launch", "trainer", "horovod")}


def test_layers_import_only_downwards():
    files = source_files()
    found = []
    for module, path in files.items():
        layer = module.split(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name in sorted(_imported_names(tree, module, path.name == "__init__.py")):
            if name.split(".")[0] in FORBIDDEN.get(layer, ()):
                found.append(f"{module} imports {name}")
    assert not found, "imports against the layering:\n  " + "\n  ".join(found)


def test_find_cycles_names_each_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "x": {"y"}, "y": {"x"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["x", "y", "x"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_sees_function_level_and_relative_imports():
    tree = ast.parse("from . import sibling\nfrom .sub import thing\n\ndef f():\n    import other.mod\n")
    assert _imported_names(tree, "pkg.mod", False) == {
        "pkg", "pkg.sibling", "pkg.sub", "pkg.sub.thing", "other.mod",
    }


def _too_long() -> list[str]:
    found = []
    for path in source_files().values():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{path.relative_to(ROOT)}: {lines} lines (module)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name}() {length} lines")
    return found


def test_modules_and_functions_are_short():
    found = _too_long()
    limits = f"modules <= {MAX_MODULE_LINES} lines, functions <= {MAX_FUNCTION_LINES}"
    assert not found, f"over the limits ({limits}):\n  " + "\n  ".join(found)
