"""Studies of the clustering settings, beyond the stage itself (run on a clustered run).

* ``apmae trust`` (:func:`trust`): the trustworthiness of UMAP per number of dimensions, to
  choose ``--umap-dims``; writes ``cluster/trustworthiness.parquet`` and ``.png``.
* ``apmae stability`` (:func:`stability`): recluster heads with other seeds; the adjusted
  Rand index per head and the best Jaccard match per cluster; writes
  ``cluster/stability_heads.parquet`` and ``cluster/stability_clusters.parquet``.

Heads are independent jobs, run like the stage's (:func:`apmae_gpu.clustering.dask_jobs.run_jobs`),
with the stage's per-head seeds and fits (:mod:`apmae_gpu.clustering.heads`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from apmae_gpu.clustering.backends import clusterer_class, jitter_duplicates, resolve_backend
from apmae_gpu.clustering.dask_jobs import run_jobs
from apmae_gpu.clustering.heads import ClusterParams, fit_head, gpu_ready, head_seed, select_heads
from apmae_gpu.core import layout
from apmae_gpu.core.config import (
    ClusterConfig,
    StabilityConfig,
    TrustConfig,
    section,
    split_settings,
)
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.figures import pyplot, save_figure
from apmae_gpu.core.frames import update_manifest, write_parquet
from apmae_gpu.core.layout import cluster_dirs, head_name
from apmae_gpu.encoding.encoder import EMBEDDINGS, open_embeddings, read_head


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


def trust(run: str | os.PathLike, study: TrustConfig | None = None,
          clusters: ClusterConfig | None = None, *, seed: int = 0, tolerance: float = 0.01,
          **overrides) -> pd.DataFrame:
    """The trustworthiness study behind the choice of UMAP dimensions (earlier paper: 4 dims
    from 1,000 neighbours over 5 trials x 10 subsets).  ``study``: the ``trust`` section,
    ``clusters``: the ``cluster`` section (UMAP's settings, backend, workers); keyword
    ``overrides`` of either's fields go over them.

    For each selected head and trial, UMAP to every ``dims`` and score how well the
    ``trust_neighbors`` nearest neighbours survive.  Writes ``cluster/trustworthiness.parquet``
    (one row per head x dims x trial) and ``cluster/trustworthiness.png``; returns the
    summary per dims (mean, std, min).  The suggested dims is the smallest whose mean is
    within ``tolerance`` of the best mean.
    """
    run = Path(run)
    own, umap = split_settings(overrides, TrustConfig, ClusterConfig)
    study = section(TrustConfig, study, own)
    clusters = section(ClusterConfig, clusters, umap)
    dims = sorted(set(study.dims))
    trials, max_points, neighbors = study.trials, study.max_points, clusters.neighbors
    trust_neighbors, heads = study.trust_neighbors, study.heads
    params = ClusterParams.from_config(clusters, seed)
    workers, scheduler = clusters.workers, clusters.scheduler
    backend = resolve_backend(clusters.backend)
    gpu_ready(backend, params)
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
    base = cluster_dirs(run)["base"]
    base.mkdir(parents=True, exist_ok=True)
    write_parquet(df, base / layout.TRUSTWORTHINESS_PARQUET)
    summary = df.groupby("dims")["trustworthiness"].agg(["mean", "std", "min"]).reset_index()
    best = summary["mean"].max()
    suggested = int(summary.loc[summary["mean"] >= best - tolerance, "dims"].min())
    _plot_trust(df, summary, base / "trustworthiness.png")
    update_manifest(run, "cluster_trust", {
        "dims": dims, "heads": [list(x) for x in chosen], "trials": trials,
        "max_points": max_points, "trust_neighbors": trust_neighbors or neighbors,
        "params": dataclasses.asdict(params), "suggested_dims": suggested,
        "mean": {int(r.dims): round(float(r.mean), 5) for r in summary.itertuples()}})
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
                  f"mean); rows in {base / layout.TRUSTWORTHINESS_PARQUET}")
    return summary.assign(suggested=summary["dims"] == suggested)


def _plot_trust(df: pd.DataFrame, summary: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
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
    save_figure(fig, path, dpi=110)


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


def stability(run: str | os.PathLike, study: StabilityConfig | None = None,
              clusters: ClusterConfig | None = None, **overrides
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cluster stability over seeds (beyond the paper): recluster heads with other seeds and
    report the adjusted Rand index against the reference clustering, per head, and the best
    Jaccard match of every reference cluster (Hennig's clusterwise stability: a mean Jaccard
    >= ``stable_at`` marks a cluster as stable, <= 0.5 as one that dissolves).

    ``study``: the ``stability`` section; ``clusters``: the ``cluster`` section, of which the
    backend, workers and scheduler count; keyword ``overrides`` of either's fields go over
    them.  Uses the clustering settings of ``RUN/cluster/params.json`` (the cluster section's
    if absent).  Writes ``cluster/stability_heads.parquet`` and
    ``cluster/stability_clusters.parquet``.
    """
    run = Path(run)
    own, rest = split_settings(overrides, StabilityConfig, ClusterConfig)
    study = section(StabilityConfig, study, own)
    clusters = section(ClusterConfig, clusters, rest)
    heads, stable_at = study.heads, study.stable_at
    workers, scheduler = clusters.workers, clusters.scheduler
    dirs = cluster_dirs(run)
    saved = dirs["base"] / layout.PARAMS_JSON
    params = ClusterParams(**json.loads(saved.read_text())["params"]) if saved.exists() \
        else ClusterParams.from_config(clusters, seed=0)
    seeds = [int(s) for s in study.seeds if int(s) != params.seed]
    if not seeds:
        raise ApmaeError(f"--seeds must include seeds other than the reference seed {params.seed}")
    backend = resolve_backend(clusters.backend)
    gpu_ready(backend, params)
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
    write_parquet(heads_df, dirs["base"] / layout.STABILITY_HEADS_PARQUET)
    write_parquet(clusters_df, dirs["base"] / layout.STABILITY_CLUSTERS_PARQUET)
    per_head = heads_df.groupby(["layer", "head"]).agg(ari=("ari", "mean"),
                                                       ari_min=("ari", "min"),
                                                       n_clusters_ref=("n_clusters_ref", "first"))
    update_manifest(run, "cluster_stability", {
        "seeds": seeds, "reference_seed": params.seed, "heads": [list(x) for x in chosen],
        "ari_mean": float(heads_df["ari"].mean()),
        "clusters": len(clusters_df), "clusters_stable": int(clusters_df["stable"].sum())})
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
