"""Small Java sources written for the tests: every task occurs in code, and the same
characters also occur inside comments and string literals, where they must never be targets."""

from __future__ import annotations

from pathlib import Path

_METHOD = """
    /* block comment with operators a + b, x == y, i += 2 and brackets ) ] } */
    // line comment: if (a && b || !c) { return x % 3; }
    public int compute{n}(int a, int b, boolean flag) {
        String s = "text with ( ] } + - == && ; inside";
        char c = '}';
        int total = a * {n} + b - 0x1F;
        total += a % 7;
        total -= b / 2;
        total <<= 1;
        if (a != b && flag || !flag) {
            total++;
        }
        for (int i = 0; i < b; i++) {
            total = total >= 100 ? total - 1 : total + {n};
        }
        double ratio = 1.5e3 * 0b101 + 017;
        boolean ok = a == b ? true : false;
        return total;
    }
"""


def java_source(name: str, n_methods: int = 6, seed: int = 0) -> str:
    body = "".join(_METHOD.replace("{n}", str(seed * 100 + i)) for i in range(n_methods))
    return f"package demo.pkg;\n\nimport java.util.List;\n\npublic class {name} {{\n{body}}}\n"


def write_java_tree(root: Path, n_files: int = 6) -> dict[str, bytes]:
    """Write ``n_files`` Java files under ``root`` (two directory levels); return their bytes
    keyed by path relative to ``root``."""
    files = {}
    for i in range(n_files):
        rel = f"pkg{i % 2}/sub/Demo{i}.java"
        data = java_source(f"Demo{i}", n_methods=5 + i % 3, seed=i).encode()
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = data
    return files
