"""Clustering: the per-head estimator, the stage (resume, retries, filtering, outputs) and
dask workers.  Small seeded data; few UMAP fits.  The studies are in test_cluster_studies.py,
the figures' helpers in test_cluster_figures.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from apmae_gpu.clustering import backends as cb
from apmae_gpu.clustering import dask_jobs
from apmae_gpu.clustering import heads as clustering
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import load_frame

FAST = dict(neighbors=10, min_samples=5, min_cluster_size=10)   # 126 points per head


def blobs(n_per=60, k=3, dim=32, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (k, dim))
    X = np.concatenate([c + spread * rng.normal(size=(n_per, dim)) for c in centers])
    return X.astype(np.float32), np.repeat(np.arange(k), n_per)


def write_embeddings(run, dim=32, seed=0, block=32):
    """Embeddings from the run's own maps (8x8 average pooling, a fixed random projection),
    written with the real EmbeddingWriter: heads with different patterns separate."""
    from apmae_gpu.core.store import MapStore
    from apmae_gpu.encoding.encoder import EmbeddingWriter

    store = MapStore(run)
    inf = store.inferences()
    ids = np.sort(inf.loc[inf["split"] == "analysis", "inference_id"].to_numpy())
    idx = store.index()
    idx = idx[idx["inference_id"].isin(ids)]
    L, H = int(idx["layer"].max()) + 1, int(idx["head"].max()) + 1
    maps = store.read(idx["map_id"].to_numpy()).astype(np.float32)
    W = maps.shape[-1]
    pooled = maps.reshape(len(maps), 8, W // 8, 8, W // 8).mean(axis=(2, 4)).reshape(len(maps), 64)
    proj = np.random.default_rng(seed).normal(size=(64, dim)).astype(np.float32) / 8
    emb = np.zeros((len(ids), L, H, dim), np.float32)
    pos = np.searchsorted(ids, idx["inference_id"].to_numpy())
    emb[pos, idx["layer"].to_numpy(), idx["head"].to_numpy()] = pooled @ proj
    w = EmbeddingWriter(run, L, H, dim, block=block)
    w.append(ids, emb)
    w.close()
    return ids, emb


@pytest.fixture(scope="module")
def embedded_run(synthetic_run_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("clu") / "run"
    shutil.copytree(synthetic_run_dir, run)
    write_embeddings(run)
    return run


@pytest.fixture(scope="module")
def clustered_run(embedded_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("clustered") / "run"
    shutil.copytree(embedded_run, run)
    clustering.cluster(run, backend="cpu", **FAST)
    return run


# --------------------------------------------------------------------------- estimator
def test_jitter_duplicates_only_repeats_and_seeded():
    X = np.array([[1, 2], [1, 2], [3, 4], [1, 2]], np.float32)
    out, n = cb.jitter_duplicates(X, 1e-3, seed=5)
    assert n == 2
    np.testing.assert_array_equal(out[0], X[0])
    np.testing.assert_array_equal(out[2], X[2])
    assert len(np.unique(out, axis=0)) == 4
    assert np.abs(out - X).max() < 1e-2
    again, _ = cb.jitter_duplicates(X, 1e-3, seed=5)
    np.testing.assert_array_equal(out, again)
    same, n0 = cb.jitter_duplicates(X[1:3], 1e-3)
    assert n0 == 0 and same is X[1:3] or np.array_equal(same, X[1:3])


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "manhattan"])
def test_torch_knn_matches_sklearn(metric):
    from sklearn.neighbors import NearestNeighbors

    X, _ = blobs(40, 3, 16, seed=1)
    idx, dist = cb.torch_knn(X, 7, metric, "cpu", batch=50)
    assert idx.shape == dist.shape == (120, 7)
    np.testing.assert_array_equal(idx[:, 0], np.arange(120))      # self first, at distance 0
    assert np.all(dist[:, 0] == 0)
    nn = NearestNeighbors(n_neighbors=7, metric=metric, algorithm="brute").fit(X)
    ref_d, ref_i = nn.kneighbors(X)
    np.testing.assert_allclose(dist[:, 1:], ref_d[:, 1:], rtol=1e-4, atol=1e-4)
    assert np.mean(idx[:, 1:] == ref_i[:, 1:]) > 0.99


def test_cpu_clusterer_recovers_blobs_and_estimator_api():
    X, y = blobs()
    est = cb.CpuClusterer(n_neighbors=15, min_samples=5, min_cluster_size=10, random_state=3,
                          device="cpu")
    assert not hasattr(est, "labels_")                       # __init__ only stores
    assert est.fit(X) is est
    assert est.embedding_.shape == (180, 8) and est.embedding_.dtype == np.float32
    assert est.labels_.shape == est.probabilities_.shape == (180,)
    assert est.n_clusters_ == 3
    assert adjusted_rand_score(y, est.labels_) > 0.95
    # auto: the exact torch kNN graph replaces umap-learn's slow small-data path
    assert est.backend_ == "cpu+torch-knn" and est.timings_["knn"] > 0
    assert est.timings_["umap"] > 0 and est.timings_["hdbscan"] > 0
    assert cb.CpuClusterer(knn="nndescent")._use_torch_knn(100) is False
    assert cb.CpuClusterer(device="cpu")._use_torch_knn(5000) is False    # NN-descent on CPU
    assert cb.CpuClusterer(device="cuda")._use_torch_knn(50000) is True
    assert cb.CpuClusterer(metric="chebyshev")._use_torch_knn(100) is False


def test_small_heads_degrade_with_notes():
    X, _ = blobs(4, 3, 16)                                    # 12 points
    est = cb.CpuClusterer(random_state=0).fit(X)              # defaults: 20 nbrs, min size 25
    assert est.effective_params_["n_neighbors"] == 11
    assert est.effective_params_["min_samples"] == 11
    assert (est.labels_ == -1).all() and est.n_clusters_ == 0
    assert any("min_cluster_size" in n for n in est.notes_)
    tiny = cb.CpuClusterer().fit(X[:3])
    assert tiny.embedding_.shape == (3, 8) and (tiny.labels_ == -1).all()
    with pytest.raises(ValueError, match="NaN"):
        cb.CpuClusterer().fit(np.full((10, 4), np.nan))


def test_backend_resolution_without_cuml():
    if cb.cuml_available()[0]:
        pytest.skip("cuML present")
    assert cb.resolve_backend("auto") == "cpu"
    with pytest.raises(ApmaeError, match="--backend cuml: cuML cannot be imported"):
        cb.resolve_backend("cuml")
    with pytest.raises(ApmaeError, match="expected one of"):
        cb.resolve_backend("gpu")
    with pytest.raises(ApmaeError, match="cuml backend"):
        cb.CumlClusterer().fit(np.zeros((10, 4)))


# --------------------------------------------------------------------------- pure helpers
def test_pattern_locations_matches_hand_count():
    rows = [  # layer, head, cluster, task, correct, n
        (0, 0, 0, "a", "correct", 3), (0, 0, 0, "b", "correct", 1),   # shared by a and b
        (0, 0, 1, "a", "correct", 2),                                  # a only, correct only
        (0, 1, 0, "a", "incorrect", 1),                                # a only, incorrect only
        (0, 1, 1, "a", "correct", 1), (0, 1, 1, "a", "incorrect", 4),  # a only, both
        (1, 0, 0, "b", "incorrect", 2),                                # b only, incorrect
        (1, 0, 1, "noise", "none", 5), (0, 0, 0, "noise", "none", 1),
    ]
    loc = pd.DataFrame(rows, columns=["layer", "head", "cluster", "task", "correct", "n"])
    t = clustering.pattern_locations(loc).set_index("task")
    cols = ["total", "unique", "correct_only", "incorrect_only", "overlap"]
    assert t.loc["a", cols].tolist() == [4, 3, 1, 1, 1]
    assert t.loc["b", cols].tolist() == [2, 1, 0, 1, 0]
    assert t.loc["noise", "total"] == 2 and t.loc["noise", "unique"] == 1
    assert pd.isna(t.loc["noise", "correct_only"])
    assert t.loc["a", "share_of_possible"] == pytest.approx(4 / 6)


def test_select_heads():
    assert clustering.select_heads("all", 2, 3) == [(l, h) for l in range(2) for h in range(3)]
    assert clustering.select_heads("1:2,0:0", 2, 3) == [(1, 2), (0, 0)]
    four = clustering.select_heads("4", 2, 3, seed=1)
    assert len(set(four)) == 4 and four == clustering.select_heads("4", 2, 3, seed=1)
    with pytest.raises(ApmaeError, match="outside"):
        clustering.select_heads("5:0", 2, 3)
    with pytest.raises(ApmaeError, match="expected all"):
        clustering.select_heads("x", 2, 3)


# --------------------------------------------------------------------------- the stage
def test_cluster_outputs(clustered_run):
    run = clustered_run
    from apmae_gpu.encoding.encoder import read_head

    clusters = load_frame(run / "clusters.parquet", prefer="pandas")
    assert list(clusters.columns[:4]) == ["inference_id", "layer", "head", "cluster"]
    assert len(clusters) == 6 * 126
    assert (clusters["cluster"] == clusters["cluster_raw"]).all()          # no filter
    ids, _ = read_head(run / "embeddings.zarr", 0, 0)
    for (l, h), g in clusters.groupby(["layer", "head"]):
        np.testing.assert_array_equal(np.sort(g["inference_id"].to_numpy()), ids)
    heads = pd.read_parquet(run / "cluster" / "heads.parquet")
    assert len(heads) == 6 and (heads["status"] == "ok").all()
    per = clusters.groupby(["layer", "head"])["cluster"]
    ref_n = per.apply(lambda c: c[c >= 0].nunique())
    ref_share = per.apply(lambda c: (c >= 0).mean())
    h = heads.set_index(["layer", "head"])
    np.testing.assert_array_equal(h["n_clusters"].to_numpy(), ref_n.reindex(h.index).to_numpy())
    np.testing.assert_allclose(h["share_clustered"], ref_share.reindex(h.index).to_numpy())
    assert (heads["n_clusters"] >= 1).all() and heads["seconds"].gt(0).all()

    # Table 5 against a direct set computation from clusters.parquet + inferences
    inf = pd.read_parquet(run / "inferences.parquet", columns=["inference_id", "task", "correct"])
    df = clusters[clusters["cluster"] >= 0].merge(inf, on="inference_id")
    sets = {t: set(zip(g["layer"], g["head"], g["cluster"])) for t, g in df.groupby("task")}
    table = pd.read_parquet(run / "cluster" / "pattern_locations.parquet").set_index("task")
    for task, locs in sets.items():
        others = set().union(*(s for t, s in sets.items() if t != task))
        assert table.loc[task, "total"] == len(locs)
        assert table.loc[task, "unique"] == len(locs - others)
    summary = pd.read_parquet(run / "cluster" / "clusters_summary.parquet")
    assert summary["size"].sum() == (clusters["cluster"] >= 0).sum()
    assert (summary["n_correct"] + summary["n_incorrect"] <= summary["size"]).all()
    for name in ("heads_heatmap.png", "gallery.png"):
        assert (run / "cluster" / name).stat().st_size > 1000
    assert list((run / "cluster").glob("cluster_L*_C*.png"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["cluster"]["heads"] == 6 and manifest["cluster"]["heads_failed"] == 0


def test_filter_applies_at_assembly(clustered_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(clustered_run, run)
    before = pd.read_parquet(run / "clusters.parquet")
    clustering.cluster(run, backend="cpu", filter_min_size=40, figures=False, **FAST)
    after = pd.read_parquet(run / "clusters.parquet")
    pd.testing.assert_series_equal(before["cluster_raw"], after["cluster_raw"])
    sizes = after[after["cluster_raw"] >= 0].groupby(["layer", "head", "cluster_raw"]).size()
    small = {k for k, v in sizes.items() if v < 40}
    key = list(zip(after["layer"], after["head"], after["cluster_raw"]))
    dropped = np.array([k in small for k in key])
    assert (after.loc[dropped, "cluster"] == -1).all()
    kept = after.loc[~dropped]
    np.testing.assert_array_equal(kept["cluster"], kept["cluster_raw"])
    summary = pd.read_parquet(run / "cluster" / "clusters_summary.parquet")
    assert (summary["kept"] == (summary["size"] >= 40)).all()


def test_resume_recomputes_only_missing_heads_identically(clustered_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(clustered_run, run)
    before = pd.read_parquet(run / "clusters.parquet")
    status = run / "cluster" / "status"
    (status / "L001_H000.json").unlink()                 # as if killed before its commit
    kept_mtime = (status / "L000_H000.json").stat().st_mtime_ns
    clustering.cluster(run, backend="cpu", figures=False, **FAST)
    assert (status / "L000_H000.json").stat().st_mtime_ns == kept_mtime
    assert (status / "L001_H000.json").exists()
    pd.testing.assert_frame_equal(before, pd.read_parquet(run / "clusters.parquet"))
    with pytest.raises(ApmaeError, match="n_neighbors 10 -> 12"):
        clustering.cluster(run, backend="cpu", neighbors=12, min_samples=5, min_cluster_size=10)


class FlakyClusterer(cb.CpuClusterer):
    """Fails the fits whose seed is listed (attempt k of a head uses its seed + k)."""

    fail_seeds: set = set()

    def fit(self, X, y=None):
        if self.random_state in FlakyClusterer.fail_seeds:
            raise RuntimeError("simulated failure")
        return super().fit(X, y)


def test_failed_head_is_retried_then_recorded_and_rerun_fixes_it(embedded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(embedded_run, run)
    seed = clustering.head_seed
    # layer 0 head 1 fails once (the retry succeeds); layer 1 head 2 fails both attempts
    FlakyClusterer.fail_seeds = {seed(0, 0, 1), seed(0, 1, 2), seed(0, 1, 2) + 1}
    with pytest.raises(ApmaeError, match=r"1 head\(s\) failed \(L1H2\)"):
        clustering.cluster(run, backend=FlakyClusterer, heads="0:1,1:2,0:0", figures=False, **FAST)
    heads = pd.read_parquet(run / "cluster" / "heads.parquet").set_index(["layer", "head"])
    assert heads.loc[(1, 2), "status"] == "failed" and heads.loc[(1, 2), "attempts"] == 2
    assert "layer 1 head 2" in heads.loc[(1, 2), "error"]
    assert "simulated failure" in heads.loc[(1, 2), "error"]
    assert heads.loc[(0, 1), "status"] == "ok" and heads.loc[(0, 1), "attempts"] == 2
    clusters = pd.read_parquet(run / "clusters.parquet")
    assert set(zip(clusters["layer"], clusters["head"])) == {(0, 0), (0, 1)}
    clustering.cluster(run, backend="cpu", heads="0:1,1:2,0:0", figures=False, **FAST)
    heads = pd.read_parquet(run / "cluster" / "heads.parquet")
    assert (heads["status"] == "ok").all() and len(heads) == 3


def test_dask_workers_read_heads_and_match_in_process(clustered_run, tmp_path):
    """Two worker processes read heads from the zarr themselves; then a real scheduler
    address runs cluster_head and gives the same labels as the in-process run."""
    from distributed import LocalCluster

    from apmae_gpu.encoding.encoder import read_head

    emb = str(clustered_run / "embeddings.zarr")
    jobs = [dict(path=emb, layer=l, head=h) for l in range(2) for h in range(3)]
    got = dict()
    for job, result in dask_jobs.run_jobs(read_head, jobs, workers=2):
        assert not isinstance(result, Exception), result
        got[(job["layer"], job["head"])] = result
    for (l, h), (ids, X) in got.items():
        ref_ids, ref_X = read_head(emb, l, h)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(X, ref_X)

    run = tmp_path / "run"
    shutil.copytree(clustered_run, run)
    for name in ("L000_H002", "L001_H001"):
        (run / "cluster" / "status" / f"{name}.json").unlink()
    before = pd.read_parquet(run / "clusters.parquet")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as lc:
        clustering.cluster(run, backend="cpu", scheduler=lc.scheduler_address, workers=2,
                           figures=False, **FAST)
    pd.testing.assert_frame_equal(before, pd.read_parquet(run / "clusters.parquet"))


def test_cli_errors_are_one_line(clustered_run, capsys):
    from apmae_gpu.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["trust", str(clustered_run), "--dims", "2,x"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("error: --dims: input should be a valid integer, unable to "
                                       "parse string as an integer (got 'x')\n")
    with pytest.raises(SystemExit) as exc:
        main(["cluster-maps", str(clustered_run), "--layer", "0", "--head", "0", "--cluster", "99"])
    assert exc.value.code == 2
    assert "has no cluster 99" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["cluster", str(clustered_run.parent / "nope")])
    assert exc.value.code == 2
    assert "no embeddings.zarr" in capsys.readouterr().err


def test_job_dying_outside_the_head_guard_is_recorded(embedded_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(embedded_run, run)

    def dies(**job):
        raise MemoryError("worker killed")

    monkeypatch.setattr(clustering, "cluster_head", dies)
    with pytest.raises(ApmaeError, match=r"6 head\(s\) failed \(L0H0, L0H1"):
        clustering.cluster(run, backend="cpu", **FAST)
    heads = pd.read_parquet(run / "cluster" / "heads.parquet")
    assert len(heads) == 6 and (heads["status"] == "failed").all()
    assert heads["error"].str.contains("worker failed: MemoryError: worker killed").all()
    assert (heads["attempts"] == 2).all()
    assert len(pd.read_parquet(run / "clusters.parquet")) == 0


@pytest.mark.gpu
def test_torch_knn_on_cuda_matches_cpu():
    X, _ = blobs(400, 3, 64, seed=4)
    idx_c, dist_c = cb.torch_knn(X, 20, "cosine", "cpu")
    idx_g, dist_g = cb.torch_knn(X, 20, "cosine", "cuda", batch=256)
    np.testing.assert_allclose(dist_g, dist_c, atol=1e-4)
    assert np.mean(idx_g == idx_c) > 0.99
