"""The folders' import rules (docs/architecture.md), checked on the code as it is.

Every import is read from the source, function-level imports included, since a
lazy import crosses a side as surely as a top-level one. Imports under
`if TYPE_CHECKING:` are for type checkers only and do not count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fsdp_nb"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str) -> set[str]:
    """The fsdp_nb modules that module `name` imports (`from pkg import mod` resolves to the module)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            submodules = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(submodules)  # `from pkg import mod` needs mod; `from pkg import name` needs pkg
            if len(submodules) < len(node.names):
                found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != name}


def _in(name: str, folder: str) -> bool:
    return name == f"fsdp_nb.{folder}" or name.startswith(f"fsdp_nb.{folder}.")


def test_the_reader_finds_imports_at_every_depth():
    """Guard the guard: a function-level import must count, or the rules below check nothing."""
    assert "fsdp_nb.layout.rules" in _imports("fsdp_nb.rank.errors")  # imported inside _explain()
    assert "fsdp_nb.session.protocol" in _imports("fsdp_nb.rank.worker")  # `from fsdp_nb.session import protocol`
    assert len([m for m in MODULES if _in(m, "rank")]) >= 4 and len([m for m in MODULES if _in(m, "session")]) >= 10


@pytest.mark.parametrize("name", [m for m in MODULES if _in(m, "rank")])
def test_rank_side_never_imports_the_kernel_side(name):
    allowed = {"fsdp_nb.session", "fsdp_nb.session.protocol"}  # the package face is lazy; protocol is shared
    kernel = {m for m in _imports(name) if _in(m, "session")} - allowed
    assert not kernel, f"{name} (rank side) imports kernel-side {sorted(kernel)}"


@pytest.mark.parametrize("name", [m for m in MODULES if _in(m, "layout")])
def test_layout_core_imports_neither_side(name):
    sides = {m for m in _imports(name) if _in(m, "session") or _in(m, "rank")}
    assert not sides, f"{name} (layout core) imports {sorted(sides)}"


@pytest.mark.parametrize("name", ["fsdp_nb.config", "fsdp_nb.accelerate", "fsdp_nb.validate", "fsdp_nb.precision"])
def test_config_modules_do_not_import_the_converter(name):
    assert "fsdp_nb.convert" not in _imports(name)


def test_shared_layout_types_live_in_a_leaf():
    inside = {m for m in _imports("fsdp_nb.layout.specs") if m.startswith("fsdp_nb.")}
    assert inside <= {"fsdp_nb.validate"}, inside


def test_no_import_cycles():
    graph = {name: _imports(name) - {"fsdp_nb"} for name in MODULES}  # the root face only re-exports lazily
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [name])


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()


def test_a_rank_loads_no_kernel_machinery():
    """What a spawned rank really imports at start: the worker, the protocol, nothing else of the kernel side."""
    loaded = _loaded_after("import fsdp_nb.rank.worker")
    kernel = [m for m in loaded if _in(m, "session")]
    assert kernel == ["fsdp_nb.session", "fsdp_nb.session.protocol"], kernel
    assert not [m for m in ("torch", "matplotlib", "IPython", "ipywidgets") if m in loaded]


def test_the_layout_core_loads_no_side():
    loaded = _loaded_after("import fsdp_nb.layout, fsdp_nb.layout.inspect")
    assert not [m for m in loaded if _in(m, "session") or _in(m, "rank")]
