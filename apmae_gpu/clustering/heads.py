"""Clustering: UMAP + HDBSCAN for every attention head, heads spread over dask workers.

For each head independently (the newer paper's per-head pipeline): read the head's embeddings
from ``RUN/embeddings.zarr`` (one contiguous chunk column), jitter exact duplicates by a seeded
1e-3 (UMAP fails on them), reduce with UMAP (8 dims, 20 neighbours, min_dist 0.05, cosine),
cluster with HDBSCAN (min_samples 20, min_cluster_size 25, allow_single_cluster).  The
estimators live in :mod:`apmae_gpu.clustering.backends` (``cpu``, ``cuml``, ``auto``).

Heads are independent jobs (:func:`cluster_head`, a plain function) that
:func:`apmae_gpu.clustering.dask_jobs.run_jobs` runs in-process with one worker, else on dask workers
(a ``LocalCluster``, a ``LocalCUDACluster`` or an existing scheduler, ``--scheduler
ADDRESS``).  Workers read their head from the zarr themselves.  Each head writes
``cluster/parts/L###_H###.parquet`` and then ``cluster/status/L###_H###.json`` (its commit
point; names in :mod:`apmae_gpu.core.layout`): a rerun skips finished heads and retries
failed ones.  A failing head is retried (``retries`` times, with the next seed), then recorded
as failed with its layer and head, never dropped.  The figures are drawn by
:mod:`apmae_gpu.clustering.figures`; the trustworthiness and stability studies live in
:mod:`apmae_gpu.clustering.studies`.

Outputs (``RUN/``)::

    clusters.parquet                  inference_id, layer, head, cluster (-1 noise),
                                      cluster_raw (before filtering), probability
    cluster/heads.parquet             per head: status, n_points, n_clusters, share_clustered,
                                      backend, seconds, error, attempts, notes, ...
    cluster/clusters_summary.parquet  per cluster: size, share, mean_probability,
                                      mean_distance, kept, n_correct, n_incorrect, top_task
    cluster/locations.parquet         (layer, head, cluster) x task x correct -> n
    cluster/pattern_locations.parquet Table 5 of the paper per task (see pattern_locations)
    cluster/*.png                     heatmaps, gallery, maps within one cluster
    cluster/trustworthiness.parquet   `apmae trust` (choose the UMAP dims)
    cluster/stability_*.parquet       `apmae stability` (ARI over seeds, Jaccard per cluster)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from apmae_gpu.clustering.backends import (
    check_cuml_settings,
    clusterer_class,
    jitter_duplicates,
    resolve_backend,
)
from apmae_gpu.clustering.dask_jobs import run_jobs
from apmae_gpu.clustering.figures import write_figures
from apmae_gpu.core import layout
from apmae_gpu.core.config import ClusterConfig, section
from apmae_gpu.core.devices import describe_machine, free_torch_cuda_cache
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import atomic_path, update_manifest, write_json, write_parquet
from apmae_gpu.core.layout import (
    CLUSTER_DIR,
    CLUSTERS_PARQUET as CLUSTERS,
    cluster_dirs,
    head_name,
    read_status,
)
from apmae_gpu.core.store import INFERENCES
from apmae_gpu.encoding.encoder import EMBEDDINGS, open_embeddings, read_head

__all__ = ["CLUSTERS", "CLUSTER_DIR", "ClusterParams", "assemble", "cluster", "cluster_head",
           "cluster_stats", "fit_head", "gpu_ready", "head_name", "head_record", "head_seed",
           "pattern_locations", "run_jobs", "select_heads"]

log = logging.getLogger("apmae_gpu.clustering.heads")

# Subsample of members for the mean pairwise intra-cluster distance.
DISTANCE_SAMPLE = 2000


JITTER = 1e-3   # scale of the noise that separates duplicate points (jitter_duplicates)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterParams:
    """What decides a head's clusters (recorded in ``cluster/params.json``; a rerun with
    other values needs ``--restart``): the cluster section's settings under the estimator's
    names (:meth:`from_config`), the run's seed, and two constants."""

    umap_dims: int
    n_neighbors: int
    min_dist: float
    metric: str
    min_samples: int
    min_cluster_size: int
    allow_single_cluster: bool = True
    seed: int
    jitter: float = JITTER
    knn: str
    n_epochs: int | None
    deterministic: bool = False     # cuML's UMAP seeded (always on the cpu backend)

    @classmethod
    def from_config(cls, cfg: ClusterConfig, seed: int, jitter: float = JITTER) -> ClusterParams:
        """The parameters of the ``cluster`` section (bounds checked there), metric checked."""
        return cls(umap_dims=cfg.umap_dims, n_neighbors=cfg.neighbors, min_dist=cfg.min_dist,
                   metric=cfg.metric, min_samples=cfg.min_samples,
                   min_cluster_size=cfg.min_cluster_size, seed=seed, jitter=jitter,
                   knn=cfg.knn, n_epochs=cfg.umap_epochs,
                   deterministic=cfg.deterministic).validate()

    def validate(self) -> ClusterParams:
        from sklearn.metrics.pairwise import _VALID_METRICS

        if self.metric not in set(_VALID_METRICS) | {"cosine", "correlation", "manhattan"}:
            raise ApmaeError(f"--metric {self.metric}: not a metric umap-learn knows "
                             f"(e.g. cosine, euclidean, manhattan, correlation)")
        return self

    def estimator_kwargs(self, random_state: int) -> dict:
        return dict(umap_dims=self.umap_dims, n_neighbors=self.n_neighbors,
                    min_dist=self.min_dist, metric=self.metric, min_samples=self.min_samples,
                    min_cluster_size=self.min_cluster_size,
                    allow_single_cluster=self.allow_single_cluster, random_state=random_state,
                    knn=self.knn, n_epochs=self.n_epochs, deterministic=self.deterministic)


def gpu_ready(backend, params: ClusterParams) -> None:
    """On cuML: refuse settings it does not take (before any work) and free torch's CUDA
    cache for it."""
    if backend == "cuml":
        check_cuml_settings(params.metric, params.min_samples)
        free_torch_cuda_cache()


def head_seed(seed: int, layer: int, head: int) -> int:
    """A head's own seed: independent of which worker runs it, or in which order."""
    return int(np.random.SeedSequence([int(seed), int(layer), int(head)]).generate_state(1)[0] >> 1)


# --------------------------------------------------------------------------- one head
def head_record(layer: int, head: int, backend: str, seed: int, params_hash: str,
                error: str = "", attempts: int = 0) -> dict:
    """A head's status record (``status/L###_H###.json``; a row of heads.parquet), failed
    until the head's part is written."""
    return {"layer": int(layer), "head": int(head), "status": "failed", "n_points": 0,
            "n_clusters": 0, "share_clustered": 0.0, "backend": backend, "seconds": 0.0,
            "umap_seconds": 0.0, "hdbscan_seconds": 0.0, "knn_seconds": 0.0, "error": error,
            "attempts": attempts, "notes": "", "n_jittered": 0, "n_dropped": 0, "seed": seed,
            "params_hash": params_hash, "clusters": []}


def cluster_stats(embedding: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                  seed: int = 0) -> list[dict]:
    """Per cluster of one head: ``size``, ``mean_probability`` and ``mean_distance`` (mean
    pairwise euclidean distance between members in the UMAP space, over at most
    :data:`DISTANCE_SAMPLE` seeded members) -- the earlier paper's filter statistic."""
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels[labels >= 0]):
        members = np.nonzero(labels == c)[0]
        sample = members if len(members) <= DISTANCE_SAMPLE else rng.choice(
            members, DISTANCE_SAMPLE, replace=False)
        dist = float(pdist(embedding[sample]).mean()) if len(sample) > 1 else 0.0
        out.append({"cluster": int(c), "size": int(len(members)),
                    "mean_probability": float(probabilities[members].mean()),
                    "mean_distance": dist})
    return out


def fit_head(X: np.ndarray, params: ClusterParams, backend, seed: int, retries: int = 1,
             where: str = "") -> tuple[object, int, int, list[str]]:
    """Jitter duplicates and fit a clusterer on ``X`` [n, d], retrying with ``seed + k``.

    Returns ``(fitted estimator or None, attempts, n_jittered, errors)``."""
    cls = clusterer_class(backend)
    errors: list[str] = []
    for attempt in range(retries + 1):
        s = seed + attempt
        try:
            Xj, n_jit = jitter_duplicates(X, params.jitter, s)
            est = cls(**params.estimator_kwargs(s)).fit(Xj)
            return est, attempt + 1, n_jit, errors
        except ApmaeError as exc:      # a setup problem (e.g. no cuML): retrying cannot help
            errors.append(str(exc))
            return None, attempt + 1, 0, errors
        except Exception as exc:  # noqa: BLE001 - any library failure is recorded per head
            errors.append(f"{type(exc).__name__}: {exc}")
            log.warning("%s: attempt %d failed: %s", where, attempt + 1, errors[-1])
    return None, retries + 1, 0, errors


def cluster_head(embeddings: str, layer: int, head: int, out_dir: str, params: dict,
                 backend="cpu", retries: int = 1, params_hash: str = "") -> dict:
    """Cluster one head and write its part and status; the plain function dask runs.

    Reads ``embeddings`` (the zarr directory) itself, writes
    ``out_dir/parts/L###_H###.parquet`` (``inference_id, layer, head, cluster,
    probability, umap_0..``) then ``out_dir/status/L###_H###.json``.  Never raises for a
    failing fit: returns the status record (``status`` ``ok`` or ``failed``).
    """
    t0 = time.perf_counter()
    p = ClusterParams(**params)
    name = head_name(layer, head)
    where = f"layer {layer} head {head}"
    base = Path(out_dir)
    rec = head_record(layer, head, clusterer_class(backend).backend,
                      head_seed(p.seed, layer, head), params_hash)
    try:
        ids, X = read_head(embeddings, layer, head)
        finite = np.isfinite(X).all(axis=1)
        rec["n_dropped"] = int((~finite).sum())
        ids, X = ids[finite], X[finite]
        rec["n_points"] = int(len(ids))
        est, attempts, n_jit, errors = fit_head(X, p, backend, rec["seed"], retries, where)
        rec.update(attempts=attempts, n_jittered=n_jit)
        if est is None:
            rec["error"] = f"{where}: " + " | ".join(errors)
        else:
            labels, probs = est.labels_, est.probabilities_
            part = pd.DataFrame({"inference_id": ids, "layer": np.int16(layer),
                                 "head": np.int16(head), "cluster": labels.astype(np.int32),
                                 "probability": probs.astype(np.float32)})
            for j in range(est.embedding_.shape[1]):
                part[f"umap_{j}"] = est.embedding_[:, j]
            write_parquet(part, base / "parts" / f"{name}.parquet")
            rec.update(status="ok", n_clusters=int(est.n_clusters_), backend=est.backend_,
                       share_clustered=float((labels >= 0).mean()) if len(labels) else 0.0,
                       umap_seconds=est.timings_["umap"], hdbscan_seconds=est.timings_["hdbscan"],
                       knn_seconds=est.timings_["knn"], notes="; ".join(est.notes_),
                       error=" | ".join(errors),
                       clusters=cluster_stats(est.embedding_, labels, probs, rec["seed"]))
    except Exception as exc:  # noqa: BLE001 - unreadable head etc.: record it, don't drop it
        rec["error"] = f"{where}: {type(exc).__name__}: {exc}"
    rec["seconds"] = time.perf_counter() - t0
    write_json(base / "status" / f"{name}.json", rec)
    return rec


def select_heads(spec: str | None, n_layers: int, n_heads: int,
                 seed: int = 0) -> list[tuple[int, int]]:
    """``all``, a number N (N heads spread over the model, seeded) or ``L:H,L:H``."""
    every = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    if spec is None or spec == "all":
        return every
    if ":" in spec:
        out = []
        for item in spec.split(","):
            try:
                l, h = (int(x) for x in item.strip().split(":"))
            except ValueError:
                raise ApmaeError(f"--heads {spec}: expected all, N or L:H,L:H") from None
            if not (0 <= l < n_layers and 0 <= h < n_heads):
                raise ApmaeError(f"--heads: {l}:{h} is outside {n_layers} layers x {n_heads} heads")
            out.append((l, h))
        return out
    try:
        k = int(spec)
    except ValueError:
        raise ApmaeError(f"--heads {spec}: expected all, N or L:H,L:H") from None
    if k < 1:
        raise ApmaeError("--heads N needs N >= 1")
    if k >= len(every):
        return every
    rng = np.random.default_rng(seed)
    return sorted(every[i] for i in rng.choice(len(every), k, replace=False))


def _params_hash(params: ClusterParams, group) -> str:
    fields = dataclasses.asdict(params)
    if not fields["deterministic"]:     # the hash of runs clustered before the setting existed
        del fields["deterministic"]
    key = json.dumps({**fields,
                      "embeddings": group.attrs.get("checkpoint_sha256", ""),
                      "pool": group.attrs.get("pool", ""),
                      "n": int(group.attrs.get("n_committed", 0))}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the stage
def cluster(run: str | os.PathLike, settings: ClusterConfig | None = None, *, seed: int = 0,
            restart: bool = False, jitter: float = JITTER, **overrides) -> Path:
    """UMAP + HDBSCAN for every head of ``RUN/embeddings.zarr``; writes
    ``RUN/clusters.parquet`` and ``RUN/cluster/``.  Resumable; returns the clusters path.

    ``settings``: the ``cluster`` section (:class:`~apmae_gpu.core.config.ClusterConfig`; default
    the paper's), with keyword ``overrides`` of its fields over it.  ``backend`` is
    ``auto``|``cuml``|``cpu``, or (as an override) a ``HeadClusterer`` subclass for custom
    estimators.  ``filter_max_distance`` / ``filter_min_size`` are the earlier paper's
    optional cluster filter (clusters failing it become noise in ``cluster``; the HDBSCAN
    label stays in ``cluster_raw``); they apply at assembly, so changing them reuses the
    per-head results.  ``heads`` limits the run to some heads (``all``, N or ``L:H,...``).
    ``umap_epochs`` overrides umap-learn's epochs (500 below 10k points, 200 above).
    """
    run = Path(run)
    backend = overrides.pop("backend") if not isinstance(overrides.get("backend", ""), str) \
        else None   # a HeadClusterer subclass
    cfg = section(ClusterConfig, settings, overrides)
    params = ClusterParams.from_config(cfg, seed, jitter)
    workers, scheduler, retries, heads = cfg.workers, cfg.scheduler, cfg.retries, cfg.heads
    if backend is None:
        backend = resolve_backend(cfg.backend)
    gpu_ready(backend, params)
    group = open_embeddings(run)
    L, H, N, D = group["embeddings"].shape
    dirs = cluster_dirs(run)
    phash = _params_hash(params, group)
    saved = dirs["base"] / layout.PARAMS_JSON
    if restart:
        for key in ("parts", "status"):
            shutil.rmtree(dirs[key], ignore_errors=True)
    elif saved.exists():
        old = json.loads(saved.read_text())
        if old.get("params_hash") != phash:
            new = dataclasses.asdict(params)
            diff = ", ".join(f"{k} {v} -> {new.get(k)}" for k, v in old.get("params", {}).items()
                             if new.get(k) != v) or "the embeddings changed"
            raise ApmaeError(f"{dirs['base']} holds clusters made otherwise ({diff}); pass "
                             f"--restart to discard them")
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    write_json(saved, {"params": dataclasses.asdict(params), "params_hash": phash,
                       "embeddings": str(run / EMBEDDINGS), "shape": [L, H, N, D]})

    chosen = select_heads(heads, L, H, seed)
    status = read_status(dirs["status"])
    done = {(r["layer"], r["head"]) for r in status.values()
            if r["status"] == "ok" and r.get("params_hash") == phash
            and (dirs["parts"] / f"{head_name(r['layer'], r['head'])}.parquet").exists()}
    todo = [lh for lh in chosen if lh not in done]
    bname = backend if isinstance(backend, str) else backend.backend
    log.info("clustering %d heads (%d already done) of %d x %d, %d points each, backend %s, "
             "%d worker(s)", len(todo), len(chosen) - len(todo), L, H, N, bname, workers)
    jobs = [dict(embeddings=str(run / EMBEDDINGS), layer=l, head=h, out_dir=str(dirs["base"]),
                 params=dataclasses.asdict(params), backend=backend, retries=retries,
                 params_hash=phash) for l, h in todo]
    t0 = time.perf_counter()
    n_done, next_log = 0, 0.1
    for job, result in run_jobs(cluster_head, jobs, workers, scheduler, bname, desc="cluster"):
        n_done += 1
        if n_done / max(1, len(jobs)) >= next_log:    # a line per 10% for batch logs
            el = time.perf_counter() - t0
            log.info("%d/%d heads in %.0f s (about %.0f s left)", n_done, len(jobs), el,
                     el / n_done * (len(jobs) - n_done))
            next_log += 0.1
        if isinstance(result, Exception):   # the job died outside cluster_head's own guard
            l, h = job["layer"], job["head"]
            result = head_record(l, h, bname, head_seed(seed, l, h), phash, attempts=retries + 1,
                                 error=f"layer {l} head {h}: worker failed: "
                                       f"{type(result).__name__}: {result}")
            write_json(dirs["status"] / f"{head_name(job['layer'], job['head'])}.json", result)
        if result["status"] != "ok":
            log.error("%s", result["error"])
    wall = time.perf_counter() - t0

    chosen_set = set(chosen)
    status = {k: v for k, v in read_status(dirs["status"]).items()
              if v.get("params_hash") == phash and k in chosen_set}
    heads_df, summary = assemble(run, status, cfg.filter_max_distance, cfg.filter_min_size)
    if cfg.figures:
        try:
            write_figures(run, heads_df, summary)
        except ApmaeError as exc:
            log.warning("figures skipped: %s", exc)
    failed = heads_df[heads_df["status"] != "ok"]
    update_manifest(run, "cluster", {
        "params": dataclasses.asdict(params), "backend": bname, "workers": workers,
        "scheduler": scheduler, "heads": len(heads_df), "heads_failed": len(failed),
        "clusters": int(summary["kept"].sum()) if len(summary) else 0,
        "share_clustered": float(np.average(heads_df["share_clustered"],
                                            weights=heads_df["n_points"].clip(lower=1)))
        if len(heads_df) else 0.0,
        "filter_max_distance": cfg.filter_max_distance, "filter_min_size": cfg.filter_min_size,
        "seconds": round(wall, 2), "machine": describe_machine()})
    _print_summary(run, heads_df, summary)
    if len(failed):
        names = ", ".join(f"L{r.layer}H{r.head}" for r in failed.head(10).itertuples())
        more = ", ..." if len(failed) > 10 else ""
        raise ApmaeError(f"{len(failed)} head(s) failed ({names}{more}); "
                         f"see {dirs['base'] / layout.HEADS_PARQUET}; rerun to retry them")
    return run / CLUSTERS


# --------------------------------------------------------------------------- assembly
def _inference_table(run: Path) -> pd.DataFrame:
    """inference_id -> task, correct (from the maps store when present)."""
    path = run / INFERENCES
    if not path.exists():
        return pd.DataFrame({"inference_id": pd.Series(dtype="int64"),
                             "task": pd.Series(dtype="object"),
                             "correct": pd.Series(dtype="object")})
    return pq.read_table(path, columns=["inference_id", "task", "correct"]).to_pandas()


def assemble(run: Path, status: dict, filter_max_distance: float | None = None,
             filter_min_size: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write clusters.parquet, heads.parquet, clusters_summary.parquet, locations.parquet
    and pattern_locations.parquet from the per-head parts and status records."""
    dirs = cluster_dirs(run)
    rows, crow = [], []
    for (l, h), r in sorted(status.items()):
        for c in r.get("clusters", []):
            crow.append({"layer": l, "head": h, **c})
        rows.append({k: v for k, v in r.items() if k != "clusters"})
    heads_df = pd.DataFrame(rows)
    summary = pd.DataFrame(crow, columns=["layer", "head", "cluster", "size", "mean_probability",
                                          "mean_distance"])
    kept = np.ones(len(summary), dtype=bool)
    if filter_max_distance is not None:
        kept &= summary["mean_distance"].to_numpy() <= filter_max_distance
    if filter_min_size is not None:
        kept &= summary["size"].to_numpy() >= filter_min_size
    summary["kept"] = kept
    if len(heads_df):
        n_pts = heads_df.set_index(["layer", "head"])["n_points"]
        summary["share"] = summary["size"] / n_pts.reindex(
            pd.MultiIndex.from_frame(summary[["layer", "head"]])).to_numpy().clip(min=1)
    dropped = set(map(tuple, summary.loc[~summary["kept"], ["layer", "head", "cluster"]]
                      .to_numpy().tolist()))
    inf = _inference_table(run)
    schema = pa.schema([("inference_id", pa.int64()), ("layer", pa.int16()), ("head", pa.int16()),
                        ("cluster", pa.int32()), ("cluster_raw", pa.int32()),
                        ("probability", pa.float32())])
    locations = []
    with atomic_path(run / CLUSTERS) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for (l, h), r in sorted(status.items()):
                if r["status"] != "ok":
                    continue
                part = pd.read_parquet(dirs["parts"] / f"{head_name(l, h)}.parquet",
                                       columns=["inference_id", "cluster", "probability"])
                raw = part["cluster"].to_numpy(np.int32)
                final = raw.copy()
                for c in {c for (dl, dh, c) in dropped if (dl, dh) == (l, h)}:
                    final[raw == c] = -1
                writer.write_table(pa.table({
                    "inference_id": part["inference_id"].to_numpy(np.int64),
                    "layer": np.full(len(part), l, np.int16),
                    "head": np.full(len(part), h, np.int16),
                    "cluster": final, "cluster_raw": raw,
                    "probability": part["probability"].to_numpy(np.float32)}, schema=schema))
                loc = pd.DataFrame({"inference_id": part["inference_id"], "cluster": final})
                loc = loc[loc["cluster"] >= 0].merge(inf, on="inference_id", how="left")
                loc["correct"] = loc["correct"].map(
                    {True: "correct", False: "incorrect"}).fillna("none")
                loc = loc.groupby(["cluster", "task", "correct"], dropna=False).size().rename("n")
                loc = loc.reset_index()
                loc.insert(0, "head", h)
                loc.insert(0, "layer", l)
                locations.append(loc)
    locations = (pd.concat(locations, ignore_index=True) if locations else
                 pd.DataFrame(columns=["layer", "head", "cluster", "task", "correct", "n"]))
    summary = _add_composition(summary, locations)
    if len(heads_df):
        k = summary[summary["kept"]].groupby(["layer", "head"]).agg(
            n_clusters=("cluster", "size"), clustered=("size", "sum"))
        idx = pd.MultiIndex.from_frame(heads_df[["layer", "head"]])
        heads_df["n_clusters_raw"] = heads_df["n_clusters"]
        heads_df["share_clustered_raw"] = heads_df["share_clustered"]
        heads_df["n_clusters"] = k["n_clusters"].reindex(idx).fillna(0).astype(int).to_numpy()
        heads_df["share_clustered"] = (k["clustered"].reindex(idx).fillna(0).to_numpy()
                                       / heads_df["n_points"].clip(lower=1).to_numpy())
        heads_df.loc[heads_df["status"] != "ok", ["n_clusters", "share_clustered"]] = 0
    write_parquet(heads_df, dirs["base"] / layout.HEADS_PARQUET)
    write_parquet(summary, dirs["base"] / layout.CLUSTERS_SUMMARY_PARQUET)
    write_parquet(locations.astype({"task": str, "correct": str}),
                  dirs["base"] / layout.LOCATIONS_PARQUET)
    write_parquet(pattern_locations(locations), dirs["base"] / layout.PATTERN_LOCATIONS_PARQUET)
    return heads_df, summary


def _add_composition(summary: pd.DataFrame, locations: pd.DataFrame) -> pd.DataFrame:
    """Per-cluster correctness counts and the task it is most common in."""
    key = ["layer", "head", "cluster"]
    for col in ("n_correct", "n_incorrect"):
        summary[col] = 0
    summary["top_task"] = None
    summary["top_task_share"] = np.nan
    if locations.empty or summary.empty:
        return summary
    corr = locations.pivot_table(index=key, columns="correct", values="n", aggfunc="sum",
                                 fill_value=0)
    task = locations.groupby(key + ["task"])["n"].sum().reset_index()
    total = task.groupby(key)["n"].transform("sum")
    task["share"] = task["n"] / total
    top = task.sort_values("n", ascending=False).drop_duplicates(key).set_index(key)
    idx = pd.MultiIndex.from_frame(summary[key])
    for col, name in (("n_correct", "correct"), ("n_incorrect", "incorrect")):
        if name in corr:
            summary[col] = corr[name].reindex(idx).fillna(0).astype(int).to_numpy()
    summary["top_task"] = top["task"].reindex(idx).to_numpy()
    summary["top_task_share"] = top["share"].reindex(idx).to_numpy()
    return summary


def pattern_locations(locations: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 5 per task, from ``locations`` ((layer, head, cluster), task,
    correct, n).

    A pattern location is a (layer, head, cluster) pair (noise excluded).  ``total``: the
    locations used by the task's inferences; ``unique``: those used by no other task;
    ``correct_only`` / ``incorrect_only`` / ``overlap``: the unique locations used only by
    correct, only by incorrect, or by both kinds of the task's inferences (so the three add
    up to ``unique`` for tasks with correctness; null for noise).  ``share_of_possible``:
    ``total`` over all locations of the run.
    """
    cols = ["task", "total", "unique", "correct_only", "incorrect_only", "overlap",
            "share_of_possible"]
    if locations.empty:
        return pd.DataFrame(columns=cols)
    key = ["layer", "head", "cluster"]
    loc = locations.assign(is_c=locations["correct"] == "correct",
                           is_i=locations["correct"] == "incorrect")
    per = loc.groupby(["task", *key]).agg(c=("is_c", "any"), i=("is_i", "any")).reset_index()
    per["unique"] = per.groupby(key)["task"].transform("size") == 1
    possible = len(per.drop_duplicates(key))
    out = []
    for task, g in per.groupby("task"):
        u = g[g["unique"]]
        known = bool(g["c"].any() or g["i"].any())   # the task has a notion of correctness
        out.append({"task": task, "total": len(g), "unique": len(u),
                    "correct_only": int((u["c"] & ~u["i"]).sum()) if known else None,
                    "incorrect_only": int((~u["c"] & u["i"]).sum()) if known else None,
                    "overlap": int((u["c"] & u["i"]).sum()) if known else None,
                    "share_of_possible": len(g) / possible})
    return pd.DataFrame(out, columns=cols).astype(
        {"total": "int64", "unique": "int64", "correct_only": "Int64", "incorrect_only": "Int64",
         "overlap": "Int64"})


def _print_summary(run: Path, heads_df: pd.DataFrame, summary: pd.DataFrame) -> None:
    ok = heads_df[heads_df["status"] == "ok"] if len(heads_df) else heads_df
    console = Console()
    t = Table(title=f"clusters per head ({len(ok)} ok, {len(heads_df) - len(ok)} failed)")
    for col in ("", "min", "median", "mean", "max"):
        t.add_column(col, justify="right")
    for col, fmt in (("n_clusters", "{:.0f}"), ("share_clustered", "{:.1%}"),
                     ("seconds", "{:.2f}")):
        if len(ok):
            v = ok[col].astype(float)
            t.add_row(col, *(fmt.format(x) for x in (v.min(), v.median(), v.mean(), v.max())))
    console.print(t)
    pl = pd.read_parquet(run / CLUSTER_DIR / layout.PATTERN_LOCATIONS_PARQUET)
    if len(pl):
        t = Table(title="pattern locations (layer, head, cluster) per task (paper Table 5)")
        for col in pl.columns[:-1]:
            t.add_column(col, justify="right" if col != "task" else "left")
        for r in pl.itertuples(index=False):
            t.add_row(*("-" if pd.isna(v) else str(v) for v in list(r)[:-1]))
        console.print(t)
    console.print(f"{len(summary[summary['kept']]) if len(summary) else 0} clusters -> "
                  f"{run / CLUSTERS}, summaries and figures in {run / CLUSTER_DIR}")
