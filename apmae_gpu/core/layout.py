"""The layout of a run directory: the one module that knows every path under ``RUN/``.

One run is one directory (``RUN``); each stage reads what the stages before it wrote there
and adds its own files.  Files are contracts (docs/contracts.md, checked against
:func:`run_files` by a test): stages add to them, never rename them.  No other module spells
a run file's name (tests/test_structure.py)::

    RUN/manifest.json            versions, corpus, model, seeds, counts; one section per stage
    RUN/tasks.parquet            mined completion tasks                          (mining)
    RUN/inferences.parquet/      one row per prompted inference (parquet parts)  (capture)
    RUN/maps.zarr                float16 maps [n, window, window]                (capture)
    RUN/maps_index.parquet/      map_id -> inference_id, layer, head             (capture)
    RUN/shards/K-of-N/           one rank's capture before the merge             (capture)
    RUN/apmae/                   AP-MAE checkpoints and metrics                  (model)
    RUN/evaluate/                evaluation.parquet and figures                  (model)
    RUN/embeddings.zarr          [layers, heads, inferences, dim] float16        (encoding)
    RUN/clusters.parquet         inference_id, layer, head, cluster              (clustering)
    RUN/cluster/                 heads, summaries, locations, studies, figures   (clustering)
    RUN/classify/                metrics, head_importance, predictions           (classification)
    RUN/intervene/               results.parquet and figures                     (intervention)
    RUN/report/index.html        the report, findings.parquet, explorer.html     (report)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from apmae_gpu.core.errors import ApmaeError

# --------------------------------------------------------------------------- RUN/
# every file and folder a stage writes under RUN/ (docs/contracts.md is checked against these)
MANIFEST_JSON = "manifest.json"           # versions, settings, counts; a section per stage
LOCK_FILE = ".apmae.lock"                 # one writer per run (core.locks)
PIPELINE_JSON = "pipeline.json"           # `apmae pipeline`: stage status and timings
PIPELINE_CONFIG_JSON = "pipeline_config.json"
CRASH_LOG_DIR = "logs"                    # crash logs (core.logs)
# mining
TASKS_PARQUET = "tasks.parquet"
# capture
INFERENCES_PARQUET = "inferences.parquet"
MAPS_ZARR = "maps.zarr"
MAPS_INDEX_PARQUET = "maps_index.parquet"
SHARDS_DIR = "shards"                     # shards/K-of-N: one capture rank's or --shard's run
ENCODE_SHARDS_DIR = "shards-encode"       # shards-encode/K-of-N: one encode rank's embeddings
REQUOTA_JSON = "requota.json"             # requota-<split>/requota.json: a quota raise staged
# model: training and evaluation
APMAE_DIR = "apmae"                       # apmae/checkpoints/step-*, apmae/final
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
METRICS_JSONL = "metrics.jsonl"
EVALUATE_DIR = "evaluate"
EVALUATION_PARQUET = "evaluation.parquet"
EVALUATION_MAPS_PARQUET = "evaluation_maps.parquet"
# encoding
EMBEDDINGS_ZARR = "embeddings.zarr"
# clustering
CLUSTER_DIR = "cluster"
CLUSTERS_PARQUET = "clusters.parquet"
HEADS_PARQUET = "heads.parquet"
CLUSTERS_SUMMARY_PARQUET = "clusters_summary.parquet"
LOCATIONS_PARQUET = "locations.parquet"
PATTERN_LOCATIONS_PARQUET = "pattern_locations.parquet"
PARAMS_JSON = "params.json"
TRUSTWORTHINESS_PARQUET = "trustworthiness.parquet"
STABILITY_HEADS_PARQUET = "stability_heads.parquet"
STABILITY_CLUSTERS_PARQUET = "stability_clusters.parquet"
# classification
CLASSIFY_DIR = "classify"
METRICS_PARQUET = "metrics.parquet"
HEAD_IMPORTANCE_PARQUET = "head_importance.parquet"
PREDICTIONS_PARQUET = "predictions.parquet"
CATEGORY_SHAP_PARQUET = "category_shap.parquet"
RESULT_JSON = "result.json"               # classify/tasks/<task>/result.json: one task done
# intervention
INTERVENE_DIR = "intervene"
RESULTS_PARQUET = "results.parquet"
HELDOUT_PARQUET = "heldout.parquet"
HELDOUT_JSON = "heldout.json"
# report
REPORT_DIR = "report"
INDEX_HTML = "index.html"
FINDINGS_PARQUET = "findings.parquet"
EXPLORER_HTML = "explorer.html"
EXPLORER_JSON = "explorer.json"

# a run's captures: mining refuses to replace the tasks they point at
CAPTURED = (MAPS_ZARR, INFERENCES_PARQUET, MAPS_INDEX_PARQUET, EMBEDDINGS_ZARR, SHARDS_DIR)


def run_files() -> dict[str, str]:
    """Every name above: constant -> file or folder name (docs/contracts.md's test reads it)."""
    return {k: v for k, v in globals().items() if k.isupper() and isinstance(v, str)}


def contracts_table() -> str:
    """The run layout as the markdown table docs/contracts.md holds between its
    ``<!-- layout -->`` markers (tests/test_structure.py compares them)."""
    rows = ["| constant (`apmae_gpu.core.layout`) | name under RUN/ |", "|---|---|"]
    rows += [f"| `{k}` | `{v}` |" for k, v in run_files().items()]
    return "\n".join(rows)


def shard_name(k: int, n: int) -> str:
    """The folder of shard K of N (``K-of-N``) under :data:`SHARDS_DIR` or
    :data:`ENCODE_SHARDS_DIR`."""
    return f"{int(k)}-of-{int(n)}"


def shard_dir(run: str | os.PathLike, k: int, n: int, encode: bool = False) -> Path:
    return Path(run) / (ENCODE_SHARDS_DIR if encode else SHARDS_DIR) / shard_name(k, n)


def shard_dirs(run: str | os.PathLike, encode: bool = False) -> list[Path]:
    """The run's shard folders in shard order (K, then N)."""
    return sorted((Path(run) / (ENCODE_SHARDS_DIR if encode else SHARDS_DIR)).glob("*-of-*"),
                  key=lambda p: tuple(int(x) for x in p.name.split("-of-")[::-1]))


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``--shard K/N`` -> (K, N); None for none."""
    if not shard:
        return None
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError:
        k, n = -1, 0
    if not (n >= 1 and 0 <= k < n):
        raise ApmaeError(f"--shard {shard}: expected K/N with 0 <= K < N")
    return k, n


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


# --------------------------------------------------------------------------- run directories
def check_out_dir(out: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse an output run directory that cannot be one: a file, or not writable (one
    line, before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ApmaeError(f"{what} {out} is a file, not a run directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ApmaeError(f"{what} {out}: {probe} is not writable")
    return out


def check_mine_out(out: str | os.PathLike) -> Path:
    """Refuse to mine into ``out`` when it cannot be a run directory or already holds
    captures (a new tasks.parquet would leave them pointing at task ids that are gone)."""
    out = check_out_dir(out)
    held = [name for name in CAPTURED if (out / name).exists()]
    if held:
        raise ApmaeError(f"{out} already holds captures ({', '.join(held)}); mining again would "
                         f"replace the tasks they point at: use a new --out")
    return out


@contextlib.contextmanager
def new_run_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Create ``out`` if needed; when the block fails and ``out`` was created here, remove
    it again if it holds nothing but the lock file (a failed mine leaves no empty run)."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if created and out.is_dir():
            left = [p for p in out.iterdir() if p.name != LOCK_FILE]
            if not left:
                with contextlib.suppress(OSError):
                    (out / LOCK_FILE).unlink(missing_ok=True)
                    out.rmdir()
        raise
