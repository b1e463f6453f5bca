"""The shape of the tree: dependencies point one way, no import circles, files and functions a reader can hold.

Every import counts, the ones inside functions too: an import moved into a function to dodge a circle is
still a circle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sdtex_contract", "backend", "blender_sd_addon")
FILE_LINES_MAX, FUNCTION_LINES_MAX = 500, 60
# What each side may import besides the standard library and itself.
ALLOWED = {
    "sdtex_contract": set(),  # imports neither side, nor anything outside the standard library
    "blender_sd_addon": {"sdtex_contract", "bpy", "bmesh", "mathutils", "gpu", "gpu_extras", "blf", "bl_ui"},
}
# worker_launcher.py is the backend's entry script, run by the backend's Python (never imported by the add-on); it
# lives in the add-on folder only so that the add-on can find it.
LAUNCHER = "blender_sd_addon.worker_launcher"


def modules(package: str) -> dict[str, Path]:
    """Module name -> file, for every .py of a package (blender_sd_addon/contract is the link to sdtex_contract)."""
    root = REPO / package
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if package == "blender_sd_addon" and parts[1] == "contract":
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(name: str, path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved; `from p import m` counts as p.m
    when p.m is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def graph(package: str) -> dict[str, set[str]]:
    found = modules(package)
    # the add-on reaches the contract as blender_sd_addon.contract: the same package
    rename = lambda n: n.replace("blender_sd_addon.contract", "sdtex_contract", 1)  # noqa: E731
    return {name: {rename(n) for n in imported(name, path)} for name, path in found.items()}


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package", ["sdtex_contract", "blender_sd_addon"])
def test_each_side_imports_only_what_it_may(package):
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    wrong = {
        f"{module} imports {name}"
        for module, names in graph(package).items()
        for name in names
        if top(name) not in stdlib | ALLOWED[package] | {package} and module != LAUNCHER
    }
    assert not wrong, sorted(wrong)


def test_the_backend_imports_nothing_of_the_addon():
    wrong = {f"{m} imports {n}" for m, names in graph("backend").items() for n in names if top(n) == "blender_sd_addon"}
    assert not wrong, sorted(wrong)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package):
    edges = graph(package)
    # `from . import x` inside a package's own __init__ is how a package exposes its modules, not a circle back
    inner = {m: {n for n in names if n in edges and n != m and not m.startswith(n + ".")} for m, names in edges.items()}
    assert cycles(inner) == []


def product_files():
    for package in PACKAGES:
        yield from modules(package).values()


# Written by a generator (typed_gen.py: one field per parameter per task) for editors, not read by people.
GENERATED = {"sdtex_contract/typed.py"}


def test_no_file_is_too_long():
    files = [p for p in product_files() if str(p.relative_to(REPO)) not in GENERATED]
    lines = {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines()) for p in files}
    assert not {name: n for name, n in lines.items() if n > FILE_LINES_MAX}


def test_no_function_is_too_long():
    long = {}
    for path in product_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LINES_MAX:
                    long[f"{path.relative_to(REPO)}:{node.lineno} {node.name}"] = length
    assert not long, long
