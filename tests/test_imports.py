"""The package imports cleanly, one module at a time: every module of hubprune (subpackages, server/ and
space/ included) imports first in a fresh interpreter, so no module depends on another having been
imported before it and no import cycle hides behind the order in which the test suite happens to load
them; and no module imports a private name from another module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"hubprune": ROOT / "hubprune", "hubprune.server": ROOT / "server", "hubprune.space": ROOT / "space"}


def _sources() -> list[tuple[str, Path]]:
    """(dotted module name, file) of every module of the installed package."""
    found = []
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts or path.name == "__main__.py":
                continue
            found.append((".".join((package, *(parts[:-1] if parts[-1] == "__init__" else parts))), path))
    return found


def modules() -> list[str]:
    return [name for name, _ in _sources()]


def test_every_module_imports_first_in_a_fresh_interpreter():
    def first(name: str) -> str | None:
        result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=ROOT)
        return f"{name}: {(result.stderr.strip().splitlines() or ['?'])[-1]}" if result.returncode else None

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        failed = [line for line in pool.map(first, modules()) if line]
    assert not failed, "\n".join(failed)


def test_no_import_cycle_between_modules():
    """Module-level imports (those a module runs when it is imported, not inside functions) form no cycle:
    a function-level import that only dodges one is a shared piece that wants its own module."""
    graph: dict[str, set[str]] = {}
    for name, path in _sources():
        graph[name] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hubprune"):
                graph[name].add(node.module)  # type: ignore[arg-type]
            elif isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name.startswith("hubprune")}
    graph.pop("hubprune", None)  # the package's public names: it imports the API, nothing imports it back
    for edges in graph.values():
        edges.discard("hubprune")
    cycles: list[str] = []
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node) :] + [node]))
            return
        if node in done or node not in graph:
            return
        stack.append(node)
        for target in sorted(graph[node]):
            visit(target)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_imports_a_private_name_of_another():
    found = []
    for _, path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hubprune"):
                found += [
                    f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("name", ["hubprune", "hubprune.cli"])
def test_importing_the_package_loads_no_optional_dependency(name):
    """`import hubprune` (the public API) and `hubprune --help` stay light: peft, lm_eval, gradio, vllm,
    bitsandbytes and fastapi are imported only by the code that uses them."""
    optional = ["peft", "lm_eval", "gradio", "vllm", "bitsandbytes", "fastapi"]
    code = f"import sys, {name}; print(' '.join(m for m in {optional!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
