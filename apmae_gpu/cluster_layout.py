"""Where the clustering stage keeps its files under ``RUN/`` (one source for their names).

Shared by the stage (:mod:`apmae_gpu.clustering`), its figures
(:mod:`apmae_gpu.cluster_figures`) and its studies (:mod:`apmae_gpu.cluster_studies`), so
that none of them imports another only for a path.
"""

from __future__ import annotations

import json
from pathlib import Path

CLUSTERS = "clusters.parquet"
CLUSTER_DIR = "cluster"


def head_name(layer: int, head: int) -> str:
    return f"L{int(layer):03d}_H{int(head):03d}"


def cluster_dirs(run: Path) -> dict[str, Path]:
    """``RUN/cluster/`` (``base``), its per-head ``parts/`` and ``status/`` folders."""
    base = run / CLUSTER_DIR
    return {"base": base, "parts": base / "parts", "status": base / "status"}


def read_status(d: Path) -> dict[tuple[int, int], dict]:
    """Every head's status record in ``d`` (``status/L###_H###.json``), by (layer, head)."""
    out = {}
    if d.is_dir():
        for f in sorted(d.glob("L*_H*.json")):
            rec = json.loads(f.read_text())
            out[(rec["layer"], rec["head"])] = rec
    return out
