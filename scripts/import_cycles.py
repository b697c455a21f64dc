"""Import cycles between the modules of apmae_gpu, counting top-level and lazy (in-function)
imports alike.

    python scripts/import_cycles.py                    # every cycle; exit 1 if there is one
    python scripts/import_cycles.py training evaluation  # only cycles through these modules
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "apmae_gpu"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``apmae_gpu/capture/maps.py`` -> ``capture.maps``; a package's ``__init__`` -> its name."""
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module (dotted, below the package) -> the package's modules it imports anywhere in its
    file.  ``from apmae_gpu.stage import name`` counts the submodule ``stage.name`` when
    there is one, else the stage's ``__init__``."""
    paths = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    mods = {module_name(p, package) for p in paths}
    graph = {}
    for path in paths:
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == package.name:
                    deps |= {a.name for a in node.names if a.name in mods}
                elif node.module.startswith(package.name + "."):
                    base = node.module[len(package.name) + 1:]
                    subs = {f"{base}.{a.name}" for a in node.names} & mods
                    deps |= subs or {base}
            elif isinstance(node, ast.Import):
                deps |= {a.name[len(package.name) + 1:] for a in node.names
                         if a.name.startswith(package.name + ".")}
        me = module_name(path, package)
        graph[me] = deps - {me, "__init__"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Every elementary cycle, each listed once, from its smallest module name."""
    found = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for dep in graph.get(node, ()):
            if dep == start:
                found.add(tuple(path))
            elif dep not in path and dep > start:
                walk(start, dep, path + [dep])

    for mod in graph:
        walk(mod, mod, [mod])
    return sorted(found, key=lambda c: (len(c), c))


def main(argv: list[str]) -> int:
    want = set(argv)
    hits = [c for c in cycles(import_graph()) if not want or want & set(c)]
    for c in hits:
        print(" -> ".join(c + (c[0],)))
    print(f"{len(hits)} import cycle(s)" + (f" through {', '.join(sorted(want))}" if want else ""))
    return 1 if hits else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
