"""UMAP + HDBSCAN on one head's embeddings, behind one estimator interface.

The clustering stage (``apmae_gpu.clustering.heads``) reduces every head's embeddings with UMAP and
clusters the reduced points with HDBSCAN.  This module holds the per-head estimator in the
style of umap-learn / hdbscan / cuML: ``__init__`` only stores keyword arguments, ``fit(X)``
validates, sets fitted attributes ending in ``_`` and returns ``self``.

Backends (``make_clusterer(backend, **params)``):

``cpu``
    umap-learn, then the ``hdbscan`` package (faster than scikit-learn's HDBSCAN at per-head
    sizes: bench/results/cluster.md, section hdbscan).  scikit-learn's HDBSCAN is used only
    when the ``hdbscan`` package cannot be imported.  The k nearest neighbours can be computed
    exactly with torch and handed to umap-learn through ``precomputed_knn``.  ``knn="auto"``
    does so (a) below 4096 points on any device: umap-learn's own small-data path computes
    all pairwise distances through a Python-level callable (much slower than the torch
    graph; bench/bench_cluster.py times both), and (b) on a CUDA GPU at any size, replacing
    NN-descent.  Above 4096 points on a CPU it keeps NN-descent (bench/results/cluster.md,
    sections umap and knn).
``cuml``
    ``cuml.manifold.UMAP`` and ``cuml.cluster.hdbscan.HDBSCAN`` with the data kept on the GPU
    as a CuPy array.  cuML is imported lazily; asking for it without cuML or without a GPU is
    a one-line error.
``auto``
    ``cuml`` when cuML imports and a GPU is visible, else ``cpu``.

Small heads degrade gracefully instead of failing (decided here, recorded in ``notes_``):
``n_neighbors`` is clamped to ``n - 1``, ``min_samples`` to ``n - 1``; a head with fewer
points than ``min_cluster_size`` (or fewer than :data:`MIN_POINTS`) is all noise.
"""

from __future__ import annotations

import logging
import time
import typing
import warnings

import numpy as np
import torch

from apmae_gpu.core.config import ClusterConfig
from apmae_gpu.core.errors import ApmaeError

log = logging.getLogger("apmae_gpu.clustering.heads")

# the choices of the cluster section's `backend` and `knn` (apmae_gpu.core.config.ClusterConfig)
BACKENDS = typing.get_args(ClusterConfig.model_fields["backend"].annotation)
KNN_METHODS = typing.get_args(ClusterConfig.model_fields["knn"].annotation)
# Metrics the torch exact-kNN path computes itself; others fall back to umap-learn's search.
TORCH_KNN_METRICS = ("cosine", "euclidean", "manhattan", "l1", "l2")
# Below this many points a head is reported as all noise (UMAP's spectral layout and
# HDBSCAN's tree need a handful of points to mean anything).
MIN_POINTS = 5
# umap-learn computes all pairwise distances itself below this size (slowly, through a
# Python-level metric callable); an exact torch kNN graph replaces that.
UMAP_EXACT_BELOW = 4096



def config_defaults() -> dict:
    """The estimator's parameters at the ``cluster`` section's defaults (one source: the
    config model), under the estimator's names."""
    cfg = ClusterConfig()
    return dict(umap_dims=cfg.umap_dims, n_neighbors=cfg.neighbors, min_dist=cfg.min_dist,
                metric=cfg.metric, min_samples=cfg.min_samples,
                min_cluster_size=cfg.min_cluster_size, allow_single_cluster=True, random_state=0)


# --------------------------------------------------------------------------- helpers
def jitter_duplicates(X: np.ndarray, scale: float = 1e-3, seed: int = 0) -> tuple[np.ndarray, int]:
    """Add seeded gaussian noise (std ``scale``) to every repeat of a duplicated row.

    UMAP fails on exact duplicates (zero distances to several "nearest" neighbours); the
    reference notebook jitters them by 1e-3.  The first copy of each row stays unchanged.
    ``X`` is ``[n, d]``; returns ``(X', n_jittered)`` (a copy only when something changed).
    """
    if len(X) < 2:
        return X, 0
    _, first, inverse = np.unique(X, axis=0, return_index=True, return_inverse=True)
    repeat = np.ones(len(X), dtype=bool)
    repeat[first] = False
    n = int(repeat.sum())
    if n == 0:
        return X, 0
    out = np.array(X, dtype=np.float32, copy=True)
    rng = np.random.default_rng(seed)
    out[repeat] += rng.normal(0.0, scale, size=(n, X.shape[1])).astype(np.float32)
    return out, n


def torch_knn(X: np.ndarray, k: int, metric: str = "cosine", device: str = "cpu",
              batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row of ``X`` ([n, d]) with torch.

    Returns ``(indices [n, k] int64, distances [n, k] float32)``, each row starting with the
    point itself at distance 0 (what umap-learn's ``precomputed_knn`` expects).  Cosine
    distance is ``1 - cos``; ``manhattan``/``l1`` and ``euclidean``/``l2`` use ``torch.cdist``.
    Queries go in batches of ``batch`` rows so memory stays at ``batch x n`` distances.
    """
    if metric not in TORCH_KNN_METRICS:
        raise ValueError(f"torch kNN supports {', '.join(TORCH_KNN_METRICS)}, not {metric!r}")
    n = len(X)
    k = min(k, n)
    data = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=device)
    if metric == "cosine":
        data = torch.nn.functional.normalize(data, dim=1)
    p = 1.0 if metric in ("manhattan", "l1") else 2.0
    idx_out = np.empty((n, k), np.int64)
    dist_out = np.empty((n, k), np.float32)
    with torch.inference_mode():
        for start in range(0, n, batch):
            q = data[start:start + batch]
            if metric == "cosine":
                d = (1.0 - q @ data.T).clamp_(min=0.0)
            else:
                d = torch.cdist(q, data, p=p)
            rows = torch.arange(q.shape[0], device=d.device)
            d[rows, rows + start] = -1.0          # the point itself comes first
            dist, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
            dist[:, 0] = 0.0
            idx_out[start:start + len(q)] = idx.cpu().numpy()
            dist_out[start:start + len(q)] = dist.float().cpu().numpy()
    return idx_out, dist_out


def cuml_available() -> tuple[bool, str]:
    """Whether the cuml backend can run here, and why not."""
    try:
        import cuml  # noqa: F401
        import cupy
    except Exception as exc:  # ImportError, or CUDA runtime errors at import
        return False, f"cuML cannot be imported ({type(exc).__name__}: {exc})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "cuML is installed but no GPU is visible"
    except Exception as exc:
        return False, f"cuML is installed but no GPU is usable ({exc})"
    return True, "cuML and a GPU are present"


# cuML 26.x: UMAP's documented ``metric`` values (fewer than umap-learn's) and HDBSCAN's
# largest ``min_samples`` (its core-distance kNN is limited to 1024 neighbours).
CUML_UMAP_METRICS = ("l1", "cityblock", "taxicab", "manhattan", "euclidean", "l2",
                     "sqeuclidean", "canberra", "minkowski", "chebyshev", "linf", "cosine",
                     "correlation", "hellinger", "hamming", "jaccard")
# ... of which these take sparse input only (cuML raises on the dense embeddings)
CUML_SPARSE_ONLY_METRICS = ("jaccard",)
CUML_MAX_MIN_SAMPLES = 1023


def check_cuml_settings(metric: str, min_samples: int) -> None:
    """One-line errors, before any work, for settings cuML refuses (every head would fail)."""
    if metric not in CUML_UMAP_METRICS or metric in CUML_SPARSE_ONLY_METRICS:
        dense = [m for m in CUML_UMAP_METRICS if m not in CUML_SPARSE_ONLY_METRICS]
        raise ApmaeError(f"--metric {metric}: cuML's UMAP supports "
                         f"{', '.join(dense)} on dense embeddings (or use --backend cpu)")
    if min_samples > CUML_MAX_MIN_SAMPLES:
        raise ApmaeError(f"--min-samples {min_samples}: cuML's HDBSCAN allows at most "
                         f"{CUML_MAX_MIN_SAMPLES} (or use --backend cpu)")


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``cuml`` or ``cpu`` (logged); explicit names are validated."""
    if backend not in BACKENDS:
        raise ApmaeError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    ok, why = cuml_available() if backend in ("auto", "cuml") else (False, "")
    if backend == "cuml" and not ok:
        raise ApmaeError(f"--backend cuml: {why}; install the gpu extra "
                         f"(pip install 'apmae_gpu[gpu]') on a machine with an NVIDIA GPU, "
                         f"or use --backend cpu")
    if backend == "auto":
        backend = "cuml" if ok else "cpu"
        extra = ""
        if backend == "cpu":
            extra = ("; exact kNN on the GPU with torch feeds umap-learn"
                     if torch.cuda.is_available()
                     else "; umap-learn + hdbscan on the CPU")
        log.info("clustering backend: %s (%s%s)", backend, why, extra)
    return backend


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "get"):          # cupy
        return a.get()
    if hasattr(a, "to_numpy"):     # cudf / pandas
        return a.to_numpy()
    return np.asarray(a)


# --------------------------------------------------------------------------- estimator
_PAPER = ClusterConfig()   # the paper's clustering settings


class HeadClusterer:
    """UMAP to ``umap_dims`` dimensions, then HDBSCAN, on one head's embeddings.

    Parameters (keyword-only, stored as given): ``umap_dims``, ``n_neighbors``, ``min_dist``,
    ``metric`` (UMAP's input metric), ``min_samples``, ``min_cluster_size``,
    ``allow_single_cluster``, ``random_state``, ``knn`` (cpu: ``auto``|``nndescent``|
    ``torch``), ``device`` (torch device for the kNN; ``auto`` = cuda when visible),
    ``n_jobs`` (CPU threads for the HDBSCAN core distances), ``n_epochs`` (UMAP epochs;
    None = the library's default: 500 below 10,000 points, 200 above).

    Fitted attributes: ``embedding_`` [n, umap_dims] float32, ``labels_`` [n] int32 (-1
    noise), ``probabilities_`` [n] float32, ``n_clusters_``, ``effective_params_`` (after
    clamping for small heads), ``notes_`` (list of str), ``timings_`` (seconds per step),
    ``backend_``.
    """

    backend = "base"

    # defaults: the cluster section's (apmae_gpu.core.config.ClusterConfig), under umap's names
    def __init__(self, *, umap_dims=_PAPER.umap_dims, n_neighbors=_PAPER.neighbors,
                 min_dist=_PAPER.min_dist, metric=_PAPER.metric, min_samples=_PAPER.min_samples,
                 min_cluster_size=_PAPER.min_cluster_size, allow_single_cluster=True,
                 random_state=0, knn=_PAPER.knn, device="auto", n_jobs=1,
                 n_epochs=_PAPER.umap_epochs, deterministic=False):
        self.umap_dims = umap_dims
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.metric = metric
        self.min_samples = min_samples
        self.min_cluster_size = min_cluster_size
        self.allow_single_cluster = allow_single_cluster
        self.random_state = random_state
        self.knn = knn
        self.device = device
        self.n_jobs = n_jobs
        self.n_epochs = n_epochs
        self.deterministic = deterministic

    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in ("umap_dims", "n_neighbors", "min_dist", "metric",
                                              "min_samples", "min_cluster_size",
                                              "allow_single_cluster", "random_state", "knn",
                                              "device", "n_jobs", "n_epochs", "deterministic")}

    # ------------------------------------------------------------------ validation
    def _validate(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"expected embeddings [n, d], got shape {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError("embeddings contain NaN or infinite values")
        if int(self.umap_dims) < 1 or int(self.n_neighbors) < 2:
            raise ValueError("umap_dims must be >= 1 and n_neighbors >= 2")
        if int(self.min_cluster_size) < 2 or int(self.min_samples) < 1:
            raise ValueError("min_cluster_size must be >= 2 and min_samples >= 1")
        if self.knn not in KNN_METHODS:
            raise ValueError(f"knn must be one of {KNN_METHODS}, not {self.knn!r}")
        return X

    def _effective(self, n: int) -> tuple[dict, list[str]]:
        """Clamp the settings to a head of ``n`` points; notes say what changed."""
        notes = []
        eff = dict(n_neighbors=int(self.n_neighbors), min_samples=int(self.min_samples),
                   min_cluster_size=int(self.min_cluster_size), umap_dims=int(self.umap_dims))
        if eff["n_neighbors"] >= n:
            notes.append(f"n_neighbors {eff['n_neighbors']} -> {n - 1} ({n} points)")
            eff["n_neighbors"] = max(2, n - 1)
        if eff["min_samples"] >= n:
            notes.append(f"min_samples {eff['min_samples']} -> {n - 1} ({n} points)")
            eff["min_samples"] = max(1, n - 1)
        if eff["umap_dims"] >= n - 1:
            notes.append(f"umap_dims {eff['umap_dims']} -> {max(1, n - 2)} ({n} points)")
            eff["umap_dims"] = max(1, n - 2)
        return eff, notes

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None) -> HeadClusterer:
        """``X``: [n, d] embeddings of one head.  Sets the fitted attributes; returns self."""
        X = self._validate(X)
        n = len(X)
        eff, notes = self._effective(n)
        self.timings_ = {"umap": 0.0, "hdbscan": 0.0, "knn": 0.0}
        self.backend_ = self.backend
        if n < max(MIN_POINTS, 2):
            notes.append(f"only {n} points: all noise")
            self.embedding_ = np.zeros((n, int(self.umap_dims)), np.float32)
            labels = np.full(n, -1, np.int32)
            probs = np.zeros(n, np.float32)
        else:
            t0 = time.perf_counter()
            emb = self._reduce(X, eff)
            self.timings_["umap"] = time.perf_counter() - t0 - self.timings_["knn"]
            emb = np.asarray(emb, dtype=np.float32)
            if emb.shape[1] < int(self.umap_dims):  # clamped dims: pad so columns stay fixed
                emb = np.pad(emb, ((0, 0), (0, int(self.umap_dims) - emb.shape[1])))
            self.embedding_ = emb
            if n < eff["min_cluster_size"]:
                notes.append(f"{n} points < min_cluster_size {eff['min_cluster_size']}: all noise")
                labels = np.full(n, -1, np.int32)
                probs = np.zeros(n, np.float32)
            else:
                t0 = time.perf_counter()
                labels, probs = self._cluster(self.embedding_[:, :eff["umap_dims"]], eff)
                self.timings_["hdbscan"] = time.perf_counter() - t0
        self.labels_ = np.asarray(labels, dtype=np.int32)
        self.probabilities_ = np.asarray(probs, dtype=np.float32)
        self.n_clusters_ = int(self.labels_.max() + 1) if n else 0
        self.effective_params_ = eff
        self.notes_ = notes
        for note in notes:
            log.debug("%s", note)
        return self

    def fit_predict(self, X, y=None) -> np.ndarray:
        return self.fit(X).labels_

    def reduce(self, X) -> np.ndarray:
        """UMAP only (no clustering): [n, d] -> [n, umap_dims'] float32, with the same
        small-head clamping as ``fit`` (used by the trustworthiness study)."""
        X = self._validate(X)
        eff, _ = self._effective(len(X))
        self.timings_ = {"umap": 0.0, "hdbscan": 0.0, "knn": 0.0}
        self.backend_ = self.backend
        return np.asarray(self._reduce(X, eff), dtype=np.float32)

    def _reduce(self, X: np.ndarray, eff: dict) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _cluster(self, emb: np.ndarray, eff: dict):  # pragma: no cover - abstract
        raise NotImplementedError


class CpuClusterer(HeadClusterer):
    """umap-learn (optionally fed an exact torch kNN graph) + the ``hdbscan`` package."""

    backend = "cpu"

    def _knn_device(self) -> str:
        if self.device != "auto":
            return self.device
        if not torch.cuda.is_available():
            return "cpu"
        try:   # inside a dask worker: spread the workers over the GPUs
            from distributed import get_worker

            name = get_worker().name
            return f"cuda:{int(name) % torch.cuda.device_count()}"
        except (ImportError, ValueError, TypeError):
            return "cuda"

    def _use_torch_knn(self, n: int) -> bool:
        if self.knn == "torch":
            return True
        if self.knn == "nndescent":
            return False
        # auto: where it pays (bench/results/cluster.md): small heads anywhere, every head on
        # a GPU
        return self.metric in TORCH_KNN_METRICS and (
            n < UMAP_EXACT_BELOW or self._knn_device().startswith("cuda"))

    def _reduce(self, X: np.ndarray, eff: dict) -> np.ndarray:
        import umap

        kwargs = dict(n_neighbors=eff["n_neighbors"], n_components=eff["umap_dims"],
                      min_dist=float(self.min_dist), metric=self.metric,
                      n_epochs=None if self.n_epochs is None else int(self.n_epochs))
        if self.random_state is not None:
            # A seeded umap-learn runs single-threaded anyway; say so to silence its warning.
            kwargs.update(random_state=int(self.random_state), n_jobs=1)
        else:
            kwargs.update(n_jobs=int(self.n_jobs))
        if self._use_torch_knn(len(X)):
            t0 = time.perf_counter()
            idx, dist = torch_knn(X, eff["n_neighbors"], self.metric, self._knn_device())
            self.timings_["knn"] = time.perf_counter() - t0
            kwargs["precomputed_knn"] = (idx, dist)
            self.backend_ = "cpu+torch-knn"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*precomputed_knn.*")
            warnings.filterwarnings("ignore", message=".*n_jobs value.*")
            warnings.filterwarnings("ignore", message=".*n_neighbors is larger.*")
            warnings.filterwarnings("ignore", message=".*k >= N.*")
            warnings.filterwarnings("ignore", message=".*Graph is not fully connected.*")
            return umap.UMAP(**kwargs).fit_transform(X)

    def _cluster(self, emb: np.ndarray, eff: dict):
        try:
            import hdbscan

            model = hdbscan.HDBSCAN(min_samples=eff["min_samples"],
                                    min_cluster_size=eff["min_cluster_size"],
                                    allow_single_cluster=bool(self.allow_single_cluster),
                                    core_dist_n_jobs=max(1, int(self.n_jobs)))
        except ImportError:
            from sklearn.cluster import HDBSCAN

            self.backend_ = self.backend_ + "+sklearn-hdbscan"
            model = HDBSCAN(min_samples=eff["min_samples"],
                            min_cluster_size=eff["min_cluster_size"],
                            allow_single_cluster=bool(self.allow_single_cluster),
                            n_jobs=max(1, int(self.n_jobs)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            model.fit(emb)
        return model.labels_, model.probabilities_


class CumlClusterer(HeadClusterer):
    """cuml.manifold.UMAP + cuml.cluster.hdbscan.HDBSCAN, data on the GPU as CuPy."""

    backend = "cuml"

    def _validate(self, X):
        ok, why = cuml_available()
        if not ok:
            raise ApmaeError(f"cuml backend: {why}")
        return super()._validate(X)

    def umap_seed(self) -> int | None:
        """cuML's UMAP is seeded only with ``deterministic``: by its docs a seed makes it
        slower and take more memory."""
        if not self.deterministic or self.random_state is None:
            return None
        return int(self.random_state)

    def _reduce(self, X: np.ndarray, eff: dict):
        import cupy
        from cuml.manifold import UMAP

        self._X_gpu = cupy.asarray(X, dtype=cupy.float32)
        # Exact (brute force) kNN on the GPU: cheap at per-head sizes (110k x 512 is ~6
        # TFLOP) and it supports every metric, unlike NN-descent.
        umap_gpu = UMAP(n_neighbors=eff["n_neighbors"], n_components=eff["umap_dims"],
                        min_dist=float(self.min_dist), metric=self.metric,
                        n_epochs=None if self.n_epochs is None else int(self.n_epochs),
                        build_algo="brute_force_knn", random_state=self.umap_seed())
        self._emb_gpu = umap_gpu.fit_transform(self._X_gpu)
        del self._X_gpu
        return _to_numpy(self._emb_gpu)

    def _cluster(self, emb: np.ndarray, eff: dict):
        from cuml.cluster.hdbscan import HDBSCAN

        data = getattr(self, "_emb_gpu", None)
        if data is None:
            import cupy

            data = cupy.asarray(emb)
        data = data[:, :eff["umap_dims"]]
        model = HDBSCAN(min_samples=eff["min_samples"], min_cluster_size=eff["min_cluster_size"],
                        allow_single_cluster=bool(self.allow_single_cluster))
        model.fit(data)
        self._emb_gpu = None
        return _to_numpy(model.labels_), _to_numpy(model.probabilities_)


_CLASSES = {"cpu": CpuClusterer, "cuml": CumlClusterer}


def clusterer_class(backend) -> type[HeadClusterer]:
    """The estimator class of a resolved backend name, or a HeadClusterer subclass as is."""
    if isinstance(backend, type) and issubclass(backend, HeadClusterer):
        return backend
    try:
        return _CLASSES[backend]
    except KeyError:
        raise ApmaeError(f"unknown clustering backend {backend!r}") from None


def make_clusterer(backend="auto", **params) -> HeadClusterer:
    """An unfitted estimator for ``backend`` (``auto`` resolved here) with ``params``."""
    if isinstance(backend, str):
        backend = resolve_backend(backend)
    return clusterer_class(backend)(**{**config_defaults(), **params})
