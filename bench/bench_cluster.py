"""Per-head clustering cost on the CPU backend (the only one this machine can run).

    python bench/bench_cluster.py                         # every section (long: 110k points)
    python bench/bench_cluster.py --sections jit,demo     # cold start and the demo-sized run
    python bench/bench_cluster.py --sizes 5000,20000 --sections umap,knn,hdbscan

Sections (results merge into bench/results/cluster.{json,md}, so sections can be run apart):

``jit``      umap-learn's cold start (numba JIT) in a fresh process, then a warm fit, at the
             demo's head size (150 points).
``umap``     seconds of seeded UMAP (8 dims, 20 neighbours, min_dist 0.05, cosine) per head
             of N x 512 synthetic embeddings, N in --sizes; with NN-descent (umap-learn's
             own search) and with an exact kNN computed by torch and handed over through
             ``precomputed_knn`` (the GPU middle path, run here on CPU torch).
``knn``      the k-nearest-neighbour step alone: pynndescent (as umap-learn calls it) vs
             exact torch kNN, with NN-descent's recall against the exact neighbours.
``hdbscan``  the ``hdbscan`` package vs scikit-learn's HDBSCAN (min_samples 20,
             min_cluster_size 25) on the 8-d UMAP output of the ``umap`` section.
``demo``     end to end: ``apmae cluster`` in a fresh process over a synthetic run shaped
             like the embedded demo (30 layers x 9 heads, --demo-points per head, 128 dims),
             with 1 and 2 workers; includes process start, JIT and assembly.

Synthetic embeddings: a mixture of 40 gaussian clusters of uneven sizes on top of a broad
background (30% of the points), unit-normalised like transformer CLS vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# bench/ and the repository on the path: the scripts run without installing the package
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import warnings  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from common import child_env  # noqa: E402

from apmae_gpu.clustering.backends import CumlClusterer, cuml_available, torch_knn  # noqa: E402
from apmae_gpu.core.devices import (
    describe_machine,  # noqa: E402
    free_torch_cuda_cache,  # noqa: E402
)
from apmae_gpu.core.logs import versions  # noqa: E402
from apmae_gpu.encoding.encoder import EmbeddingWriter  # noqa: E402

OUT = Path(__file__).parent / "results"
UMAP_KW = dict(n_neighbors=20, n_components=8, min_dist=0.05, metric="cosine")


def embeddings(n: int, dim: int = 512, seed: int = 0, k: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim))
    weights = rng.dirichlet(np.full(k, 0.7))
    n_bg = int(0.3 * n)
    labels = rng.choice(k, n - n_bg, p=weights)
    X = np.concatenate([centers[labels] + 0.6 * rng.normal(size=(n - n_bg, dim)),
                        rng.normal(size=(n_bg, dim)) * 1.5])
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X[rng.permutation(n)].astype(np.float32)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------- sections
def bench_jit(points: int, dim: int) -> list[dict]:
    code = f"""
import time, json, numpy as np
t0 = time.perf_counter()
from apmae_gpu.clustering.backends import CpuClusterer
import umap, hdbscan
t_import = time.perf_counter() - t0
rng = np.random.default_rng(0)
X = rng.normal(size=({points}, {dim})).astype(np.float32)
X[: {points} // 2] += 3
est = CpuClusterer(random_state=0)
t0 = time.perf_counter(); est.fit(X); cold = time.perf_counter() - t0
t0 = time.perf_counter(); CpuClusterer(random_state=1).fit(X); warm = time.perf_counter() - t0
print(json.dumps(dict(import_s=t_import, first_fit_s=cold, warm_fit_s=warm,
                      hdbscan_s=est.timings_["hdbscan"])))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=child_env())
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return [dict(section="jit", n=points, dim=dim, **{k: round(v, 3) for k, v in r.items()},
                 jit_s=round(r["first_fit_s"] - r["warm_fit_s"], 2), load=load_avg())]


def _warm_umap():
    import umap

    X = embeddings(300, 64)
    umap.UMAP(**UMAP_KW, random_state=0, n_jobs=1).fit_transform(X)
    X2 = embeddings(5000, 64)   # NN-descent path (>= 4096 points) and precomputed path

    umap.UMAP(**UMAP_KW, random_state=0, n_jobs=1).fit_transform(X2)
    umap.UMAP(**UMAP_KW, random_state=0, n_jobs=1,
              precomputed_knn=torch_knn(X2, 20, "cosine")).fit_transform(X2)


def bench_umap(sizes: list[int], dim: int, with_torch: bool, store: dict) -> list[dict]:

    import umap


    warnings.filterwarnings("ignore")
    _warm_umap()
    rows = []
    for n in sizes:
        X = embeddings(n, dim)
        t0 = time.perf_counter()
        Y = umap.UMAP(**UMAP_KW, random_state=0, n_jobs=1).fit_transform(X)
        t_nnd = time.perf_counter() - t0
        store[n] = Y
        row = dict(section="umap", n=n, dim=dim, umap_nndescent_s=round(t_nnd, 1), load=load_avg())
        if with_torch:
            t0 = time.perf_counter()
            knn = torch_knn(X, 20, "cosine", "cpu")
            t_knn = time.perf_counter() - t0
            umap.UMAP(**UMAP_KW, random_state=0, n_jobs=1, precomputed_knn=knn).fit_transform(X)
            row.update(umap_torch_knn_s=round(time.perf_counter() - t0, 1),
                       of_which_torch_knn_s=round(t_knn, 1))
        rows.append(row)
        print(row, flush=True)
    return rows


def bench_knn(sizes: list[int], dim: int, torch_max: int) -> list[dict]:
    from pynndescent import NNDescent


    rows = []
    NNDescent(embeddings(5000, 64), n_neighbors=20, metric="cosine", random_state=0, n_jobs=1)
    for n in sizes:
        X = embeddings(n, dim)
        # umap-learn's own call: n_trees and n_iters as in umap.umap_.nearest_neighbors
        n_trees = min(64, 5 + int(round((n ** 0.5) / 20.0)))
        n_iters = max(5, int(round(np.log2(n))))
        t0 = time.perf_counter()
        nnd = NNDescent(X, n_neighbors=20, metric="cosine", n_trees=n_trees, n_iters=n_iters,
                        max_candidates=60, low_memory=True, random_state=0, n_jobs=1,
                        compressed=False)
        idx_a, _ = nnd.neighbor_graph
        t_nnd = time.perf_counter() - t0
        row = dict(section="knn", n=n, dim=dim, nndescent_s=round(t_nnd, 1))
        if n <= torch_max:
            t0 = time.perf_counter()
            idx_e, _ = torch_knn(X, 20, "cosine", "cpu")
            t_torch = time.perf_counter() - t0
            recall = float(np.mean([len(set(a) & set(e)) / 20 for a, e in zip(idx_a, idx_e)]))
            row.update(torch_exact_cpu_s=round(t_torch, 1), nndescent_recall=round(recall, 4))
        row.update(torch_threads=torch.get_num_threads(), load=load_avg())
        rows.append(row)
        print(row, flush=True)
    return rows


def bench_gpu(sizes: list[int], dim: int) -> list[dict]:
    """The GPU paths, where present: exact torch kNN on CUDA (recall against CPU NN-descent's
    graph is not needed: it is exact) and cuML UMAP + HDBSCAN per head.  Prints one line and
    returns nothing for each path this machine cannot run."""


    rows = []
    if not torch.cuda.is_available():
        print("gpu section: skipped torch kNN on CUDA (torch sees no CUDA GPU)", flush=True)
    else:
        torch_knn(embeddings(2000, dim), 20, "cosine", "cuda")          # warm-up
        for n in sizes:
            X = embeddings(n, dim)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch_knn(X, 20, "cosine", "cuda")
            torch.cuda.synchronize()
            rows.append(dict(section="gpu_knn", n=n, dim=dim, torch_cuda_s=round(
                time.perf_counter() - t0, 2), gpu=torch.cuda.get_device_name(0)))
            print(rows[-1], flush=True)
    ok, why = cuml_available()
    if not ok:
        print(f"gpu section: skipped cuML UMAP + HDBSCAN ({why})", flush=True)
        return rows

    free_torch_cuda_cache()
    CumlClusterer(random_state=0).fit(embeddings(2000, dim))                # warm-up
    for n in sizes:
        X = embeddings(n, dim)
        t0 = time.perf_counter()
        est = CumlClusterer(random_state=0).fit(X)
        rows.append(dict(section="gpu_cuml", n=n, dim=dim,
                         cuml_umap_hdbscan_s=round(time.perf_counter() - t0, 2),
                         clusters=int(est.labels_.max()) + 1))
        print(rows[-1], flush=True)
    return rows


def bench_hdbscan(sizes: list[int], store: dict, sklearn_max: int) -> list[dict]:

    import hdbscan
    from sklearn.cluster import HDBSCAN as SkHDBSCAN
    from sklearn.metrics import adjusted_rand_score

    warnings.filterwarnings("ignore")
    rows = []
    warm = np.random.default_rng(0).normal(size=(500, 8))
    hdbscan.HDBSCAN(min_samples=20, min_cluster_size=25).fit(warm)
    for n in sizes:
        Y = store.get(n)
        if Y is None:
            continue
        kw = dict(min_samples=20, min_cluster_size=25, allow_single_cluster=True)
        t0 = time.perf_counter()
        a = hdbscan.HDBSCAN(**kw, core_dist_n_jobs=1).fit(Y)
        t_pkg = time.perf_counter() - t0
        row = dict(section="hdbscan", n=n, dims=Y.shape[1], hdbscan_pkg_s=round(t_pkg, 2),
                   clusters=int(a.labels_.max() + 1),
                   share_clustered=round(float((a.labels_ >= 0).mean()), 3), load=load_avg())
        if n <= sklearn_max:
            t0 = time.perf_counter()
            b = SkHDBSCAN(**kw).fit(Y)
            row.update(sklearn_s=round(time.perf_counter() - t0, 2),
                       ari_pkg_vs_sklearn=round(float(
                           adjusted_rand_score(a.labels_, b.labels_)), 4))
        rows.append(row)
        print(row, flush=True)
    return rows


def demo_run(root: Path, layers: int, heads: int, points: int, dim: int) -> Path:

    run = root / "demo"
    rng = np.random.default_rng(0)
    emb = np.empty((points, layers, heads, dim), np.float32)
    for l in range(layers):
        for h in range(heads):
            k = int(rng.integers(1, 5))
            centers = rng.normal(size=(k, dim))
            noise = 0.4 * rng.normal(size=(points, dim))
            emb[:, l, h] = centers[rng.integers(0, k, points)] + noise
    w = EmbeddingWriter(run, layers, heads, dim, block=256)
    w.append(np.arange(points), emb)
    w.close()
    return run


def bench_demo(points: int, dim: int, workers_list: list[int],
               epochs: int | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = demo_run(Path(tmp), 30, 9, points, dim)
        for workers in workers_list:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "apmae_gpu.cli", "cluster", str(run),
                            "--backend", "cpu", "--workers", str(workers), "--restart",
                            "--no-figures", *(["--umap-epochs", str(epochs)] if epochs else [])],
                           check=True, capture_output=True, text=True, env=child_env())
            wall = time.perf_counter() - t0

            heads = pd.read_parquet(run / "cluster" / "heads.parquet")
            ok = heads[heads["status"] == "ok"]
            rows.append(dict(section="demo", heads=len(heads), points=points, dim=dim,
                             workers=workers, epochs=epochs or "default", wall_s=round(wall, 1),
                             median_head_s=round(float(ok["seconds"].median()), 3),
                             max_head_s=round(float(ok["seconds"].max()), 2),
                             mean_clusters=round(float(ok["n_clusters"].mean()), 2),
                             failed=int((heads["status"] != "ok").sum()), load=load_avg()))
            print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- report
def to_markdown(results: dict) -> str:
    lines = ["# Clustering benchmark (CPU backend only: umap-learn + hdbscan)", "",
             f"Machine: {results['machine']}", "",
             "Backends exercised: cpu (umap-learn, hdbscan, scikit-learn HDBSCAN, torch kNN on "
             "CPU). cuML and the GPU torch-kNN path were NOT run (no GPU, no cuML here).", ""]
    for section in ("jit", "umap", "knn", "hdbscan", "demo"):
        rows = [r for r in results["rows"] if r["section"] == section]
        if not rows:
            continue
        cols = [c for c in rows[0] if c != "section"]
        for r in rows[1:]:
            cols += [c for c in r if c not in cols and c != "section"]
        lines += [f"## {section}", "", "| " + " | ".join(cols) + " |",
                  "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="jit,umap,knn,hdbscan,demo,gpu",
                    help="gpu: torch kNN on CUDA and cuML, each skipped with a line when absent")
    ap.add_argument("--sizes", default="5000,20000,50000,110000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--torch-knn-max", type=int, default=110000,
                    help="largest N for the torch kNN runs (UMAP and knn sections)")
    ap.add_argument("--sklearn-max", type=int, default=110000,
                    help="largest N for scikit-learn's HDBSCAN")
    ap.add_argument("--demo-points", type=int, default=150)
    ap.add_argument("--demo-dim", type=int, default=128)
    ap.add_argument("--demo-workers", default="1,2")
    ap.add_argument("--demo-epochs", type=int, default=None,
                    help="--umap-epochs for the demo run (default: umap-learn's, 500 here)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    sizes = [int(s) for s in args.sizes.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "cluster.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": []}
    results.update(machine=describe_machine(), versions=versions())
    new = []
    if "jit" in sections:
        new += bench_jit(args.demo_points, args.demo_dim)
    store: dict = {}
    if "umap" in sections or "hdbscan" in sections:
        for n in sizes:
            new += bench_umap([n], args.dim, n <= args.torch_knn_max and "umap" in sections, store)
            if "hdbscan" in sections:
                new += bench_hdbscan([n], store, args.sklearn_max)
    if "knn" in sections:
        new += bench_knn(sizes, args.dim, args.torch_knn_max)
    if "gpu" in sections:
        new += bench_gpu(sizes, args.dim)
    if "demo" in sections:
        new += bench_demo(args.demo_points, args.demo_dim,
                          [int(w) for w in args.demo_workers.split(",")], args.demo_epochs)
    # replace rows of the same section and size
    def key(r):
        return (r["section"], r.get("n"), r.get("workers"), r.get("points"),
                r.get("epochs", "default"))

    fresh = {key(r) for r in new}
    results["rows"] = [r for r in results["rows"] if key(r) not in fresh] + new
    path.write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "cluster.md").write_text(to_markdown(results) + "\n")
    print(to_markdown({"machine": results["machine"], "rows": new}))


if __name__ == "__main__":
    main()
