"""The code's shape: no import circle, argparse only in the commands, no oversized module."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def _import_cycles_module():
    spec = importlib.util.spec_from_file_location(
        "import_cycles", ROOT / "scripts" / "import_cycles.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("import_cycles", module)
    spec.loader.exec_module(module)
    return module


def test_the_import_graph_has_no_cycle():
    graph = _import_cycles_module().import_graph(ROOT)
    assert graph.number_of_nodes() > 40  # the walk found the package
    assert list(nx.simple_cycles(graph)) == []


def test_commands_do_not_import_the_library_at_the_top_and_the_library_no_commands():
    """A command module imports only light modules at its top (flags need no numpy); no library
    module imports a command module (the flags -> config step is the command's alone)."""
    graph = _import_cycles_module().import_graph(ROOT)
    library = [n for n in graph if not n.startswith("devise.commands") and n != "devise.cli"]
    for name in library:
        assert not any(t.startswith("devise.commands") for t in graph.successors(name)), name


def test_argparse_lives_in_the_commands_only():
    users = []
    for path in sorted((ROOT / "devise").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("devise/commands/") or rel == "devise/cli.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if "argparse" in names:
                users.append(rel)
            if isinstance(node, ast.FunctionDef) and node.name.startswith("run_cli"):
                users.append(f"{rel}:{node.name}")
    assert users == []


def test_no_module_is_over_600_lines():
    sizes = {
        p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
        for p in (ROOT / "devise").rglob("*.py")
    }
    assert len(sizes) > 40
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}
