"""The clustering stage's figures, under ``RUN/cluster/``.

``heads_heatmap.png`` (clusters per head and share clustered, layer x head), ``gallery.png``
(the most central and most distant members of the largest clusters) and
``cluster_L###_H###_C#.png`` (maps spread over one cluster; ``apmae cluster-maps``).  They
read the stage's per-head parts (with their UMAP coordinates) and the maps store.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.figures import pyplot, save_figure
from apmae_gpu.core.layout import cluster_dirs, head_name
from apmae_gpu.core.store import INDEX, MAPS, MapStore

log = logging.getLogger("apmae_gpu.clustering.heads")


def plot_heads_heatmap(heads_df: pd.DataFrame, path: Path) -> Path:
    """Layer x head heatmaps of clusters per head and share clustered (failed heads grey)."""
    plt = pyplot()
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
    return save_figure(fig, path, dpi=110)


def _maps_for(run: Path, layer: int, head: int, inference_ids) -> np.ndarray:
    """Stored maps of (inference_ids, layer, head) in that order ([k, W, W] float16)."""
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
    part = pd.read_parquet(cluster_dirs(run)["parts"] / f"{head_name(layer, head)}.parquet")
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
    plt = pyplot()
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
    path = path or cluster_dirs(run)["base"] / "gallery.png"
    return save_figure(fig, path, dpi=100)


def plot_cluster_maps(run: str | os.PathLike, layer: int, head: int, cluster: int, n: int = 16,
                      path: Path | None = None) -> Path:
    """Maps within one cluster: ``n`` members spread over it (farthest-point sample in the
    UMAP space, as the paper's most distant points of a cluster)."""
    run = Path(run)
    plt = pyplot()
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
    path = path or cluster_dirs(run)["base"] / f"cluster_{head_name(layer, head)}_C{cluster}.png"
    return save_figure(fig, path, dpi=100)


def cluster_maps(run: str | os.PathLike, layer: int, head: int, cluster: int | None = None,
                 n: int = 16) -> list[Path]:
    """PNGs of the maps within one cluster (or every cluster) of a clustered head."""
    run = Path(run)
    part = cluster_dirs(run)["parts"] / f"{head_name(layer, head)}.parquet"
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
        out.append(plot_heads_heatmap(heads_df, cluster_dirs(run)["base"] / "heads_heatmap.png"))
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
