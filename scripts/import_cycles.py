"""Print the import graph's cycles among devise/'s modules (module- and function-level imports)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx  # installed with torch


def import_graph(root: Path) -> nx.DiGraph:
    """devise module -> the devise modules it imports anywhere in its source."""
    mods = {}
    for p in (root / "devise").rglob("*.py"):
        name = ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = p
    g = nx.DiGraph()
    for name, p in mods.items():
        g.add_node(name)
        pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: up from this module's package
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "devise":
                    g.add_edge(name, t)
    return g


def main() -> int:
    g = import_graph(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
    cycles = sorted(nx.simple_cycles(g), key=len)
    print(
        f"{g.number_of_nodes()} modules, {g.number_of_edges()} import edges, {len(cycles)} cycles"
    )
    for c in cycles:
        print("  " + " -> ".join([*c, c[0]]))
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
