"""Clustering: UMAP + HDBSCAN for every attention head, heads spread over dask workers.

For each head independently (the newer paper's per-head pipeline): read the head's embeddings
from ``RUN/embeddings.zarr`` (one contiguous chunk column), jitter exact duplicates by a seeded
1e-3 (UMAP fails on them), reduce with UMAP (8 dims, 20 neighbours, min_dist 0.05, cosine),
cluster with HDBSCAN (min_samples 20, min_cluster_size 25, allow_single_cluster).  The
estimators live in :mod:`apmae_gpu.cluster_backends` (``cpu``, ``cuml``, ``auto``).

Heads are independent jobs (:func:`cluster_head`, a plain function): run in-process with one
worker, else on a ``dask.distributed.LocalCluster`` (CPU: one single-threaded process per
worker), a ``dask_cuda.LocalCUDACluster`` (cuml: one worker per GPU) or an existing scheduler
(``--scheduler ADDRESS``).  Workers read their head from the zarr themselves.  Each head
writes ``cluster/parts/L###_H###.parquet`` and then ``cluster/status/L###_H###.json`` (its
commit point): a rerun skips finished heads and retries failed ones.  A failing head is
retried (``retries`` times, with the next seed), then recorded as failed with its layer and
head, never dropped.

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

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from apmae_gpu.cluster_backends import (
    BACKENDS,
    KNN_METHODS,
    check_cuml_settings,
    clusterer_class,
    free_torch_cuda_cache,
    jitter_duplicates,
    resolve_backend,
)
from apmae_gpu.encoding import EMBEDDINGS, open_embeddings, read_head
from apmae_gpu.runs import (
    ApmaeError,
    atomic_path,
    describe_machine,
    progress,
    update_manifest,
    write_json,
    write_parquet,
)

log = logging.getLogger("apmae_gpu.clustering")

CLUSTERS = "clusters.parquet"
CLUSTER_DIR = "cluster"
# Subsample of members for the mean pairwise intra-cluster distance.
DISTANCE_SAMPLE = 2000


@dataclasses.dataclass(frozen=True)
class ClusterParams:
    """What decides a head's clusters (recorded in ``cluster/params.json``; a rerun with
    other values needs ``--restart``)."""

    umap_dims: int = 8
    n_neighbors: int = 20
    min_dist: float = 0.05
    metric: str = "cosine"
    min_samples: int = 20
    min_cluster_size: int = 25
    allow_single_cluster: bool = True
    seed: int = 0
    jitter: float = 1e-3
    knn: str = "auto"
    n_epochs: int | None = None

    def validate(self) -> ClusterParams:
        if self.umap_dims < 1:
            raise ApmaeError("--umap-dims must be >= 1")
        if self.n_neighbors < 2:
            raise ApmaeError("--neighbors must be >= 2")
        if not 0.0 <= self.min_dist <= 1.0:
            raise ApmaeError("--min-dist must lie in [0, 1]")
        if self.min_samples < 1 or self.min_cluster_size < 2:
            raise ApmaeError("--min-samples must be >= 1 and --min-cluster-size >= 2")
        if self.n_epochs is not None and self.n_epochs < 1:
            raise ApmaeError("--umap-epochs must be >= 1")
        if self.knn not in KNN_METHODS:
            raise ApmaeError(f"--knn {self.knn}: expected one of {', '.join(KNN_METHODS)}")
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
                    knn=self.knn, n_epochs=self.n_epochs)


def _gpu_ready(backend, params: ClusterParams) -> None:
    """On cuML: refuse settings it does not take (before any work) and free torch's CUDA
    cache for it."""
    if backend == "cuml":
        check_cuml_settings(params.metric, params.min_samples)
        free_torch_cuda_cache()


def head_seed(seed: int, layer: int, head: int) -> int:
    """A head's own seed: independent of which worker runs it, or in which order."""
    return int(np.random.SeedSequence([int(seed), int(layer), int(head)]).generate_state(1)[0] >> 1)


def head_name(layer: int, head: int) -> str:
    return f"L{int(layer):03d}_H{int(head):03d}"


def _dirs(run: Path) -> dict[str, Path]:
    base = run / CLUSTER_DIR
    return {"base": base, "parts": base / "parts", "status": base / "status"}


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


# --------------------------------------------------------------------------- workers
@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None = None, backend: str = "cpu"):
    """A dask ``Client``: to ``scheduler`` if given, else a ``LocalCUDACluster`` (cuml, one
    worker per GPU) or a process ``LocalCluster`` with single-threaded workers (seeded
    umap-learn runs on one thread; heads are the parallel unit)."""
    from distributed import Client, LocalCluster

    if scheduler:
        client = Client(scheduler)
        cluster = None
    elif backend == "cuml":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise ApmaeError("--backend cuml with --workers > 1 needs dask-cuda "
                             "(pip install 'apmae_gpu[gpu]')") from None
        import cupy

        n_gpu = cupy.cuda.runtime.getDeviceCount()
        if workers > n_gpu:
            log.info("one worker per GPU: %d workers instead of %d", n_gpu, workers)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(n_gpu)]
        cluster = LocalCUDACluster(CUDA_VISIBLE_DEVICES=ids[:min(workers, n_gpu)],
                                   dashboard_address=None)
        client = Client(cluster)
    else:
        cores = os.cpu_count() or 1
        if workers > cores:
            log.warning("%d workers on %d cores: heads will share cores", workers, cores)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
    try:
        log.info("dask: %d workers (%s)", len(client.scheduler_info().get("workers", {})),
                 scheduler or ("LocalCUDACluster" if backend == "cuml" else "LocalCluster"))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def call_job(fn: Callable, job: dict):
    """``fn(**job)``: what a dask worker runs for one job."""
    return fn(**job)


def run_jobs(fn: Callable, jobs: list[dict], workers: int = 1, scheduler: str | None = None,
             backend: str = "cpu", desc: str = "heads") -> Iterator[tuple[dict, object]]:
    """Run ``fn(**job)`` for every job: in-process when ``workers == 1`` and no scheduler is
    given, else on dask.  Yields ``(job, result)`` as they finish; ``result`` is the
    exception when the job itself died (e.g. a killed worker)."""
    bar = progress(total=len(jobs), desc=desc, unit="head")
    try:
        if workers <= 1 and not scheduler:
            for job in jobs:
                try:
                    result = fn(**job)
                except Exception as exc:  # noqa: BLE001
                    result = exc
                bar.update(1)
                yield job, result
            return
        from distributed import as_completed

        with dask_client(workers, scheduler, backend) as client:
            # the job travels as one argument: its own keys (``retries``, ...) must reach fn,
            # not client.submit's keywords of the same name
            futures = {client.submit(call_job, fn, job, pure=False): job for job in jobs}
            for future in as_completed(futures):
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001 - KilledWorker, lost data...
                    result = exc
                bar.update(1)
                yield futures.pop(future), result
    finally:
        bar.close()


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
    import hashlib

    key = json.dumps({**dataclasses.asdict(params),
                      "embeddings": group.attrs.get("checkpoint_sha256", ""),
                      "pool": group.attrs.get("pool", ""),
                      "n": int(group.attrs.get("n_committed", 0))}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the stage
def cluster(run: str | os.PathLike, backend: str = "auto", workers: int = 1, umap_dims: int = 8,
            neighbors: int = 20, min_dist: float = 0.05, metric: str = "cosine",
            min_samples: int = 20, min_cluster_size: int = 25, scheduler: str | None = None,
            seed: int = 0, retries: int = 1, knn: str = "auto", jitter: float = 1e-3,
            filter_max_distance: float | None = None, filter_min_size: int | None = None,
            restart: bool = False, figures: bool = True, heads: str | None = None,
            umap_epochs: int | None = None) -> Path:
    """UMAP + HDBSCAN for every head of ``RUN/embeddings.zarr``; writes
    ``RUN/clusters.parquet`` and ``RUN/cluster/``.  Resumable; returns the clusters path.

    ``backend`` is ``auto``|``cuml``|``cpu`` (or a ``HeadClusterer`` subclass, for custom
    estimators).  ``filter_max_distance`` / ``filter_min_size`` are the earlier paper's
    optional cluster filter (clusters failing it become noise in ``cluster``; the HDBSCAN
    label stays in ``cluster_raw``); they apply at assembly, so changing them reuses the
    per-head results.  ``heads`` limits the run to some heads (``all``, N or ``L:H,...``).
    ``umap_epochs`` overrides umap-learn's epochs (500 below 10k points, 200 above).
    """
    run = Path(run)
    params = ClusterParams(umap_dims=umap_dims, n_neighbors=neighbors, min_dist=min_dist,
                           metric=metric, min_samples=min_samples,
                           min_cluster_size=min_cluster_size, seed=seed, jitter=jitter,
                           knn=knn, n_epochs=umap_epochs).validate()
    if workers < 1:
        raise ApmaeError("--workers must be >= 1")
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise ApmaeError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
        backend = resolve_backend(backend)
    _gpu_ready(backend, params)
    group = open_embeddings(run)
    L, H, N, D = group["embeddings"].shape
    dirs = _dirs(run)
    phash = _params_hash(params, group)
    saved = dirs["base"] / "params.json"
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
    status = _read_status(dirs["status"])
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
    status = {k: v for k, v in _read_status(dirs["status"]).items()
              if v.get("params_hash") == phash and k in chosen_set}
    heads_df, summary = assemble(run, status, filter_max_distance, filter_min_size)
    if figures:
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
        "filter_max_distance": filter_max_distance, "filter_min_size": filter_min_size,
        "seconds": round(wall, 2), "machine": describe_machine()})
    _print_summary(run, heads_df, summary)
    if len(failed):
        names = ", ".join(f"L{r.layer}H{r.head}" for r in failed.head(10).itertuples())
        more = ", ..." if len(failed) > 10 else ""
        raise ApmaeError(f"{len(failed)} head(s) failed ({names}{more}); "
                         f"see {dirs['base'] / 'heads.parquet'}; rerun to retry them")
    return run / CLUSTERS


def _read_status(d: Path) -> dict[tuple[int, int], dict]:
    out = {}
    if d.is_dir():
        for f in sorted(d.glob("L*_H*.json")):
            rec = json.loads(f.read_text())
            out[(rec["layer"], rec["head"])] = rec
    return out


# --------------------------------------------------------------------------- assembly
def _inference_table(run: Path) -> pd.DataFrame:
    """inference_id -> task, correct (from the maps store when present)."""
    from apmae_gpu.store import INFERENCES

    path = run / INFERENCES
    if not path.exists():
        return pd.DataFrame({"inference_id": pd.Series(dtype="int64"),
                             "task": pd.Series(dtype="object"),
                             "correct": pd.Series(dtype="object")})
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["inference_id", "task", "correct"]).to_pandas()


def assemble(run: Path, status: dict, filter_max_distance: float | None = None,
             filter_min_size: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write clusters.parquet, heads.parquet, clusters_summary.parquet, locations.parquet
    and pattern_locations.parquet from the per-head parts and status records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dirs = _dirs(run)
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
    write_parquet(heads_df, dirs["base"] / "heads.parquet")
    write_parquet(summary, dirs["base"] / "clusters_summary.parquet")
    write_parquet(locations.astype({"task": str, "correct": str}),
                  dirs["base"] / "locations.parquet")
    write_parquet(pattern_locations(locations), dirs["base"] / "pattern_locations.parquet")
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
    from rich.console import Console
    from rich.table import Table

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
    pl = pd.read_parquet(run / CLUSTER_DIR / "pattern_locations.parquet")
    if len(pl):
        t = Table(title="pattern locations (layer, head, cluster) per task (paper Table 5)")
        for col in pl.columns[:-1]:
            t.add_column(col, justify="right" if col != "task" else "left")
        for r in pl.itertuples(index=False):
            t.add_row(*("-" if pd.isna(v) else str(v) for v in list(r)[:-1]))
        console.print(t)
    console.print(f"{len(summary[summary['kept']]) if len(summary) else 0} clusters -> "
                  f"{run / CLUSTERS}, summaries and figures in {run / CLUSTER_DIR}")


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heads_heatmap(heads_df: pd.DataFrame, path: Path) -> Path:
    """Layer x head heatmaps of clusters per head and share clustered (failed heads grey)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    L, H = int(heads_df["layer"].max()) + 1, int(heads_df["head"].max()) + 1
    fig, axes = plt.subplots(1, 2, figsize=(min(4 + 0.35 * H, 20) * 2, min(2 + 0.3 * L, 16)))
    for ax, col, title in ((axes[0], "n_clusters", "clusters per head"),
                           (axes[1], "share_clustered", "share of maps clustered")):
        grid = np.full((L, H), np.nan)
        ok = heads_df[heads_df["status"] == "ok"]
        grid[ok["layer"].to_numpy(), ok["head"].to_numpy()] = ok[col].to_numpy(float)
        cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, origin="lower",
                       vmin=0, vmax=1 if col == "share_clustered" else None)
        ax.set(xlabel="head", ylabel="layer", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if L * H <= 400:   # small models: print the values
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.0%}" if col == "share_clustered" else f"{v:.0f}",
                            ha="center", va="center", fontsize=6, color="white")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _maps_for(run: Path, layer: int, head: int, inference_ids) -> np.ndarray:
    """Stored maps of (inference_ids, layer, head) in that order ([k, W, W] float16)."""
    import pyarrow.parquet as pq

    from apmae_gpu.store import INDEX, MAPS, MapStore

    if not (run / MAPS).exists():
        raise ApmaeError(f"{run} keeps no maps ({MAPS}); galleries need them")
    store = MapStore(run)
    idx = pq.read_table(run / INDEX, columns=["map_id", "inference_id", "layer", "head"],
                        filters=[("layer", "=", layer), ("head", "=", head)]).to_pandas()
    mid = idx.set_index("inference_id")["map_id"].reindex(np.asarray(inference_ids))
    if mid.isna().any():
        raise ApmaeError(f"layer {layer} head {head}: some maps are missing from {INDEX}")
    return store.read(mid.to_numpy(np.int64))


def _members(run: Path, layer: int, head: int, cluster: int) -> pd.DataFrame:
    part = pd.read_parquet(_dirs(run)["parts"] / f"{head_name(layer, head)}.parquet")
    m = part[part["cluster"] == cluster].reset_index(drop=True)
    if m.empty:
        raise ApmaeError(f"layer {layer} head {head} has no cluster {cluster}")
    coords = m[[c for c in m.columns if c.startswith("umap_")]].to_numpy()
    m["dist"] = np.linalg.norm(coords - coords.mean(axis=0), axis=1)
    return m


def _spread(coords: np.ndarray, k: int) -> list[int]:
    """Farthest-point sample of ``k`` rows (spread over the cluster, like its hull)."""
    chosen = [int(np.argmax(np.linalg.norm(coords - coords.mean(0), axis=1)))]
    d = np.linalg.norm(coords - coords[chosen[0]], axis=1)
    while len(chosen) < min(k, len(coords)):
        chosen.append(int(np.argmax(d)))
        d = np.minimum(d, np.linalg.norm(coords - coords[chosen[-1]], axis=1))
    return chosen


def _showcase(summary: pd.DataFrame, n: int, max_share: float = 0.5) -> pd.DataFrame:
    """The clusters worth showing: the largest kept cluster per head, largest first, among
    those holding at most ``max_share`` of their head's maps (a cluster of a whole head shows
    no pattern that tells inferences apart); the others fill up when too few qualify."""
    kept = summary[summary["kept"]].sort_values(["size", "layer", "head", "cluster"],
                                                ascending=[False, True, True, True])
    kept = kept.drop_duplicates(["layer", "head"])
    narrow = kept["share"] <= max_share
    return pd.concat([kept[narrow], kept[~narrow]]).head(n)


def plot_gallery(run: str | os.PathLike, summary: pd.DataFrame, path: Path | None = None,
                 n_clusters: int = 12, per_side: int = 3) -> Path:
    """A gallery: one row per cluster (:func:`_showcase`: the largest kept cluster of a head,
    one per head, preferring clusters of at most half the head's maps), ``per_side`` most
    central members (closest to the cluster's UMAP centroid) then ``per_side`` most distant
    ones."""
    run = Path(run)
    plt = _plt()
    pick = _showcase(summary, n_clusters)
    if pick.empty:
        raise ApmaeError("no clusters to show")
    ncol = 2 * per_side
    fig, axes = plt.subplots(len(pick), ncol, figsize=(1.6 * ncol, 1.7 * len(pick)), squeeze=False)
    for row, r in enumerate(pick.itertuples()):
        m = _members(run, r.layer, r.head, r.cluster).sort_values("dist")
        ids = list(m["inference_id"].head(per_side)) + list(m["inference_id"].tail(per_side))
        maps = _maps_for(run, r.layer, r.head, ids)
        for j in range(ncol):
            ax = axes[row, j]
            ax.axis("off")
            if j < len(maps):
                ax.imshow(maps[j].astype(np.float32), cmap="magma")
        axes[row, 0].set_title(f"L{r.layer} H{r.head} C{r.cluster} (n={r.size})", fontsize=7,
                               loc="left")
    fig.suptitle(f"clusters: {per_side} most central | {per_side} most distant members", fontsize=9)
    fig.tight_layout()
    path = path or _dirs(run)["base"] / "gallery.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_cluster_maps(run: str | os.PathLike, layer: int, head: int, cluster: int, n: int = 16,
                      path: Path | None = None) -> Path:
    """Maps within one cluster: ``n`` members spread over it (farthest-point sample in the
    UMAP space, as the paper's most distant points of a cluster)."""
    run = Path(run)
    plt = _plt()
    m = _members(run, layer, head, cluster)
    coords = m[[c for c in m.columns if c.startswith("umap_")]].to_numpy()
    rows = _spread(coords, n)
    maps = _maps_for(run, layer, head, m["inference_id"].to_numpy()[rows])
    ncol = min(len(maps), 8)
    nrow = int(np.ceil(len(maps) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.6 * ncol, 1.7 * nrow), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(maps):
            ax.imshow(maps[k].astype(np.float32), cmap="magma")
            ax.set_title(f"#{int(m['inference_id'].iloc[rows[k]])}", fontsize=6)
    fig.suptitle(f"layer {layer} head {head} cluster {cluster}: {len(m)} maps, "
                 f"{len(maps)} spread over it", fontsize=9)
    fig.tight_layout()
    path = path or _dirs(run)["base"] / f"cluster_{head_name(layer, head)}_C{cluster}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cluster_maps(run: str | os.PathLike, layer: int, head: int, cluster: int | None = None,
                 n: int = 16) -> list[Path]:
    """PNGs of the maps within one cluster (or every cluster) of a clustered head."""
    run = Path(run)
    part = _dirs(run)["parts"] / f"{head_name(layer, head)}.parquet"
    if not part.exists():
        raise ApmaeError(f"layer {layer} head {head} is not clustered in {run} "
                         f"(run `apmae cluster` first)")
    labels = pd.read_parquet(part, columns=["cluster"])["cluster"]
    ids = sorted(int(c) for c in labels.unique() if c >= 0)
    if cluster is not None:
        if cluster not in ids:
            raise ApmaeError(f"layer {layer} head {head} has no cluster {cluster} "
                             f"(clusters: {', '.join(map(str, ids)) or 'none'})")
        ids = [cluster]
    return [plot_cluster_maps(run, layer, head, c, n=n) for c in ids]


def write_figures(run: Path, heads_df: pd.DataFrame, summary: pd.DataFrame) -> list[Path]:
    """Heatmaps, the gallery and the maps of the largest cluster."""
    out = []
    if len(heads_df):
        out.append(plot_heads_heatmap(heads_df, _dirs(run)["base"] / "heads_heatmap.png"))
    kept = summary[summary["kept"]] if len(summary) else summary
    if len(kept):
        try:
            out.append(plot_gallery(run, summary))
            top = _showcase(summary, 1).iloc[0]
            out.append(plot_cluster_maps(run, int(top["layer"]), int(top["head"]),
                                         int(top["cluster"])))
        except ApmaeError as exc:  # e.g. captured with --encode-with: no analysis maps kept
            log.warning("cluster gallery skipped: %s", exc)
    return out


# --------------------------------------------------------------------------- trustworthiness
def trust_head(embeddings: str, layer: int, head: int, dims: list[int], trials: int,
               params: dict, backend="cpu", max_points: int = 5000,
               trust_neighbors: int = 20, seed: int = 0) -> list[dict]:
    """Trustworthiness (sklearn.manifold.trustworthiness) of UMAP to each of ``dims`` on one
    head, ``trials`` times (a new subsample of ``max_points`` and a new UMAP seed each)."""
    from sklearn.manifold import trustworthiness

    p = ClusterParams(**params)
    _, X = read_head(embeddings, layer, head)
    X = X[np.isfinite(X).all(axis=1)]
    cls = clusterer_class(backend)
    out = []
    for t in range(trials):
        s = head_seed(seed + t, layer, head)
        rng = np.random.default_rng(s)
        if len(X) > max_points:
            sub = X[np.sort(rng.choice(len(X), max_points, replace=False))]
        else:
            sub = X
        sub, _ = jitter_duplicates(sub, p.jitter, s)
        k = int(min(trust_neighbors, max(1, len(sub) // 2 - 1)))
        for d in dims:
            t0 = time.perf_counter()
            if len(sub) < 2 * d + 4:
                continue
            est = cls(**{**p.estimator_kwargs(s), "umap_dims": d})
            Y = est.reduce(sub)
            tw = trustworthiness(sub, Y, n_neighbors=k, metric=p.metric)
            out.append({"layer": layer, "head": head, "dims": int(d), "trial": t,
                        "n_points": len(sub), "n_neighbors": k, "trustworthiness": float(tw),
                        "seconds": time.perf_counter() - t0})
    return out


def trust(run: str | os.PathLike, dims: tuple[int, ...] = (2, 4, 8, 16), heads: str = "8",
          trials: int = 3, max_points: int = 5000, neighbors: int = 20, min_dist: float = 0.05,
          metric: str = "cosine", trust_neighbors: int | None = None, backend: str = "auto",
          workers: int = 1, scheduler: str | None = None, seed: int = 0,
          tolerance: float = 0.01) -> pd.DataFrame:
    """The trustworthiness study behind the choice of UMAP dimensions (earlier paper: 4 dims
    from 1,000 neighbours over 5 trials x 10 subsets).

    For each selected head and trial, UMAP to every ``dims`` and score how well the
    ``trust_neighbors`` nearest neighbours survive.  Writes ``cluster/trustworthiness.parquet``
    (one row per head x dims x trial) and ``cluster/trustworthiness.png``; returns the
    summary per dims (mean, std, min).  The suggested dims is the smallest whose mean is
    within ``tolerance`` of the best mean.
    """
    run = Path(run)
    dims = sorted({int(d) for d in dims})
    if not dims or dims[0] < 1:
        raise ApmaeError("--dims needs positive integers, e.g. 2,4,8,16")
    if trials < 1 or max_points < 10:
        raise ApmaeError("--trials must be >= 1 and --max-points >= 10")
    params = ClusterParams(n_neighbors=neighbors, min_dist=min_dist, metric=metric,
                           seed=seed).validate()
    backend = resolve_backend(backend)
    _gpu_ready(backend, params)
    group = open_embeddings(run)
    L, H = group["embeddings"].shape[:2]
    chosen = select_heads(heads, L, H, seed)
    jobs = [dict(embeddings=str(run / EMBEDDINGS), layer=l, head=h, dims=dims, trials=trials,
                 params=dataclasses.asdict(params), backend=backend, max_points=max_points,
                 trust_neighbors=trust_neighbors or neighbors, seed=seed) for l, h in chosen]
    rows = []
    for job, result in run_jobs(trust_head, jobs, workers, scheduler, backend, desc="trust"):
        if isinstance(result, Exception):
            raise ApmaeError(f"trustworthiness of layer {job['layer']} head {job['head']} failed: "
                             f"{type(result).__name__}: {result}")
        rows += result
    if not rows:
        raise ApmaeError("no head had enough points for the trustworthiness study")
    df = pd.DataFrame(rows).sort_values(["layer", "head", "dims", "trial"])
    base = _dirs(run)["base"]
    base.mkdir(parents=True, exist_ok=True)
    write_parquet(df, base / "trustworthiness.parquet")
    summary = df.groupby("dims")["trustworthiness"].agg(["mean", "std", "min"]).reset_index()
    best = summary["mean"].max()
    suggested = int(summary.loc[summary["mean"] >= best - tolerance, "dims"].min())
    _plot_trust(df, summary, base / "trustworthiness.png")
    update_manifest(run, "cluster_trust", {
        "dims": dims, "heads": [list(x) for x in chosen], "trials": trials,
        "max_points": max_points, "trust_neighbors": trust_neighbors or neighbors,
        "params": dataclasses.asdict(params), "suggested_dims": suggested,
        "mean": {int(r.dims): round(float(r.mean), 5) for r in summary.itertuples()}})
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"trustworthiness over {len(chosen)} heads x {trials} trials "
                    f"({trust_neighbors or neighbors} neighbours)")
    for col in ("dims", "mean", "std", "min"):
        t.add_column(col, justify="right")
    for r in summary.itertuples():
        t.add_row(str(r.dims), f"{r.mean:.4f}", f"{0 if np.isnan(r.std) else r.std:.4f}",
                  f"{r.min:.4f}")
    console = Console()
    console.print(t)
    console.print(f"suggested --umap-dims {suggested} (smallest within {tolerance} of the best "
                  f"mean); rows in {base / 'trustworthiness.parquet'}")
    return summary.assign(suggested=summary["dims"] == suggested)


def _plot_trust(df: pd.DataFrame, summary: pd.DataFrame, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for _, g in df.groupby(["layer", "head"]):
        m = g.groupby("dims")["trustworthiness"].mean()
        ax.plot(m.index, m.values, color="grey", alpha=0.3, lw=0.8)
    ax.errorbar(summary["dims"], summary["mean"], yerr=summary["std"].fillna(0), color="C0",
                marker="o", capsize=3, label="mean over heads and trials")
    ax.set(xscale="log", xlabel="UMAP dimensions", ylabel="trustworthiness",
           title="trustworthiness per head (grey) and mean")
    ax.set_xticks(summary["dims"], [str(d) for d in summary["dims"]])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- stability
def jaccard_best_match(ref: np.ndarray, other: np.ndarray) -> dict[int, float]:
    """For every cluster ``c`` of ``ref`` (noise excluded), the best Jaccard index
    |A & B| / |A | B| with any cluster ``B`` of ``other`` (0 when ``other`` has none)."""
    out = {}
    other_ids = np.unique(other[other >= 0])
    for c in np.unique(ref[ref >= 0]):
        a = ref == c
        best = 0.0
        for j in other_ids:
            b = other == j
            inter = np.count_nonzero(a & b)
            if inter:
                best = max(best, inter / np.count_nonzero(a | b))
        out[int(c)] = best
    return out


def stability_head(embeddings: str, layer: int, head: int, params: dict, backend="cpu",
                   seeds: list[int] = (1, 2, 3), parts_dir: str | None = None) -> dict:
    """Recluster one head with other seeds; compare with its reference clustering (its part
    from ``apmae cluster`` when present, else a fit with the reference seed)."""
    from sklearn.metrics import adjusted_rand_score

    p = ClusterParams(**params)
    ids, X = read_head(embeddings, layer, head)
    keep = np.isfinite(X).all(axis=1)
    ids, X = ids[keep], X[keep]
    where = f"layer {layer} head {head}"
    part = Path(parts_dir or "") / f"{head_name(layer, head)}.parquet"
    if parts_dir and part.exists():
        ref_df = pd.read_parquet(part, columns=["inference_id", "cluster"])
        ref_df = ref_df.set_index("inference_id")
        ref = ref_df["cluster"].reindex(ids).fillna(-1).to_numpy(np.int32)
    else:
        est, _, _, errors = fit_head(X, p, backend, head_seed(p.seed, layer, head), 0, where)
        if est is None:
            raise RuntimeError(f"{where}: reference fit failed: {' | '.join(errors)}")
        ref = est.labels_
    heads_rows, jac = [], {}
    for s in seeds:
        est, _, _, errors = fit_head(X, p, backend, head_seed(s, layer, head), 0, where)
        if est is None:
            raise RuntimeError(f"{where} seed {s}: {' | '.join(errors)}")
        lab = est.labels_
        both = (ref >= 0) & (lab >= 0)
        heads_rows.append({
            "layer": layer, "head": head, "seed": int(s), "n_points": len(ids),
            "ari": float(adjusted_rand_score(ref, lab)),
            "ari_clustered": float(adjusted_rand_score(ref[both], lab[both]))
            if both.sum() > 1 else float("nan"),
            "n_clusters_ref": int(ref.max() + 1) if len(ref) else 0,
            "n_clusters": int(est.n_clusters_)})
        for c, v in jaccard_best_match(ref, lab).items():
            jac.setdefault(c, []).append(v)
    clusters = [{"layer": layer, "head": head, "cluster": c, "size": int((ref == c).sum()),
                 "jaccard_mean": float(np.mean(v)), "jaccard_min": float(np.min(v))}
                for c, v in sorted(jac.items())]
    return {"heads": heads_rows, "clusters": clusters}


def stability(run: str | os.PathLike, seeds: tuple[int, ...] = (1, 2, 3), heads: str = "16",
              backend: str = "auto", workers: int = 1, scheduler: str | None = None,
              stable_at: float = 0.75) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cluster stability over seeds (beyond the paper): recluster heads with other seeds and
    report the adjusted Rand index against the reference clustering, per head, and the best
    Jaccard match of every reference cluster (Hennig's clusterwise stability: a mean Jaccard
    >= ``stable_at`` marks a cluster as stable, <= 0.5 as one that dissolves).

    Uses the settings of ``RUN/cluster/params.json`` (defaults if absent).  Writes
    ``cluster/stability_heads.parquet`` and ``cluster/stability_clusters.parquet``.
    """
    run = Path(run)
    dirs = _dirs(run)
    saved = dirs["base"] / "params.json"
    params = ClusterParams(**json.loads(saved.read_text())["params"]) if saved.exists() \
        else ClusterParams()
    seeds = [int(s) for s in seeds if int(s) != params.seed]
    if not seeds:
        raise ApmaeError(f"--seeds must include seeds other than the reference seed {params.seed}")
    backend = resolve_backend(backend)
    _gpu_ready(backend, params)
    group = open_embeddings(run)
    L, H = group["embeddings"].shape[:2]
    chosen = select_heads(heads, L, H, params.seed)
    jobs = [dict(embeddings=str(run / EMBEDDINGS), layer=l, head=h,
                 params=dataclasses.asdict(params), backend=backend, seeds=seeds,
                 parts_dir=str(dirs["parts"])) for l, h in chosen]
    hrows, crows = [], []
    for job, result in run_jobs(stability_head, jobs, workers, scheduler, backend,
                                desc="stability"):
        if isinstance(result, Exception):
            raise ApmaeError(f"stability of layer {job['layer']} head {job['head']} failed: "
                             f"{type(result).__name__}: {result}")
        hrows += result["heads"]
        crows += result["clusters"]
    heads_df = pd.DataFrame(hrows).sort_values(["layer", "head", "seed"])
    clusters_df = pd.DataFrame(crows, columns=["layer", "head", "cluster", "size",
                                               "jaccard_mean", "jaccard_min"])
    clusters_df["stable"] = clusters_df["jaccard_mean"] >= stable_at
    dirs["base"].mkdir(parents=True, exist_ok=True)
    write_parquet(heads_df, dirs["base"] / "stability_heads.parquet")
    write_parquet(clusters_df, dirs["base"] / "stability_clusters.parquet")
    per_head = heads_df.groupby(["layer", "head"]).agg(ari=("ari", "mean"),
                                                       ari_min=("ari", "min"),
                                                       n_clusters_ref=("n_clusters_ref", "first"))
    update_manifest(run, "cluster_stability", {
        "seeds": seeds, "reference_seed": params.seed, "heads": [list(x) for x in chosen],
        "ari_mean": float(heads_df["ari"].mean()),
        "clusters": len(clusters_df), "clusters_stable": int(clusters_df["stable"].sum())})
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"stability over seeds {seeds} (reference seed {params.seed})")
    for col in ("layer", "head", "clusters", "ARI mean", "ARI min", "stable clusters"):
        t.add_column(col, justify="right")
    for (l, h), r in per_head.iterrows():
        c = clusters_df[(clusters_df["layer"] == l) & (clusters_df["head"] == h)]
        t.add_row(str(l), str(h), str(int(r.n_clusters_ref)), f"{r.ari:.3f}", f"{r.ari_min:.3f}",
                  f"{int(c['stable'].sum())}/{len(c)}")
    console = Console()
    console.print(t)
    console.print(f"mean ARI {heads_df['ari'].mean():.3f}; {int(clusters_df['stable'].sum())} of "
                  f"{len(clusters_df)} clusters stable (mean Jaccard >= {stable_at})")
    return heads_df, clusters_df
