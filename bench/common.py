"""Shared helpers for the benchmark scripts: machine description, result files, timing."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# bench/ and the repository on the path: the scripts run without installing the package
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402

from apmae_gpu.core.devices import describe_machine  # noqa: E402
from apmae_gpu.core.logs import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child ``python -m apmae_gpu...``: the repository first on its
    path, so that it runs like the bench itself without an installed package."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def machine_tag() -> str:
    info = describe_machine()
    if "gpu" in info:
        return info["gpu"].replace("NVIDIA ", "").replace(" ", "-").lower()
    return f"cpu{info.get('cpu_count', '')}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def timer():
    box = {}
    t0 = time.perf_counter()
    yield box
    box["seconds"] = time.perf_counter() - t0


def sync(device: str) -> None:
    if str(device).startswith("cuda"):

        torch.cuda.synchronize()


def save(name: str, figures: dict, table: list[dict], notes: list[str] | None = None,
         tag: str | None = None, machine: dict | None = None) -> Path:
    """Write bench/results/<name>-<machine>.json and .md and print the table.  ``tag`` and
    ``machine``: a record about another machine's results (a summary written elsewhere)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = tag or machine_tag()
    record = {"benchmark": name, "machine": machine or describe_machine(),
              "python": platform.python_version(),
              "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M"), "figures": figures,
              "table": table, "notes": notes or []}
    path = RESULTS / f"{name}-{tag}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    md = [f"# {name} on {record['machine'].get('gpu') or record['machine'].get('cpu', 'cpu')}"
          f" ({record['machine'].get('cpu_count')} cores), {record['date']}", ""]
    if table:
        cols = list(table[0])
        md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in table:
            md.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    md += [""] + [f"- {n}" for n in notes or []]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nsaved {path} and {path.with_suffix('.md')}")
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)
