"""The clustering studies: trustworthiness per UMAP dims (``apmae trust``) and stability
over seeds (``apmae stability``), on the clustered run of test_clustering.py."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from apmae_gpu.clustering import backends as cb
from apmae_gpu.clustering import heads as clustering
from apmae_gpu.clustering import studies as cluster_studies
from apmae_gpu.core.errors import ApmaeError
from tests import test_clustering

# the clustered run of test_clustering.py (its module-scoped fixture, built once here too)
embedded_run = test_clustering.embedded_run
clustered_run = test_clustering.clustered_run


def test_jaccard_best_match():
    ref = np.array([0, 0, 0, 1, 1, -1])
    other = np.array([2, 2, -1, 1, 1, 1])
    assert cluster_studies.jaccard_best_match(ref, other) == {0: pytest.approx(2 / 3),
                                                              1: pytest.approx(2 / 3)}
    assert cluster_studies.jaccard_best_match(ref, np.full(6, -1)) == {0: 0.0, 1: 0.0}


def test_trustworthiness_study(clustered_run, tmp_path):
    from sklearn.manifold import trustworthiness

    from apmae_gpu.encoding.encoder import read_head

    run = tmp_path / "run"
    shutil.copytree(clustered_run, run)
    summary = cluster_studies.trust(run, dims=(2, 4), heads="0:2", trials=1, neighbors=10,
                                    backend="cpu")
    rows = pd.read_parquet(run / "cluster" / "trustworthiness.parquet")
    assert len(rows) == 2 and rows["trustworthiness"].between(0, 1).all()
    assert summary["suggested"].sum() == 1
    # same number from sklearn on a refit with the same seed
    s = clustering.head_seed(0, 0, 2)
    X, _ = cb.jitter_duplicates(read_head(run / "embeddings.zarr", 0, 2)[1], 1e-3, s)
    Y = cb.CpuClusterer(umap_dims=2, n_neighbors=10, random_state=s).reduce(X)
    ref = trustworthiness(X, Y, n_neighbors=10, metric="cosine")
    assert rows.loc[rows["dims"] == 2, "trustworthiness"].item() == pytest.approx(ref, abs=1e-6)
    assert (run / "cluster" / "trustworthiness.png").exists()


def test_stability_study(clustered_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(clustered_run, run)
    heads_df, clusters_df = cluster_studies.stability(run, seeds=(0, 7), heads="1:1",
                                                      backend="cpu")
    assert heads_df["seed"].tolist() == [7]                 # the reference seed is skipped
    ref = pd.read_parquet(run / "cluster" / "parts" / "L001_H001.parquet")
    assert heads_df["n_clusters_ref"].item() == ref["cluster"].max() + 1
    assert -1 <= heads_df["ari"].item() <= 1
    assert len(clusters_df) == heads_df["n_clusters_ref"].item()
    assert clusters_df["jaccard_mean"].between(0, 1).all()
    assert (clusters_df["stable"] == (clusters_df["jaccard_mean"] >= 0.75)).all()
    with pytest.raises(ApmaeError, match="other than the reference seed"):
        cluster_studies.stability(run, seeds=(0,), heads="1:1", backend="cpu")
