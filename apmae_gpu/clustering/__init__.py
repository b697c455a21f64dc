"""Stage 5, clustering: UMAP + HDBSCAN per head (``heads``) on a cuML or CPU backend
(``backends``), heads spread over dask workers (``dask_jobs``), with its studies and
figures."""

from apmae_gpu import lazy_exports

# the stage's entry points, imported on first use (importing one module of the stage does
# not load the others)
__getattr__, __all__ = lazy_exports(__name__, {"cluster": "apmae_gpu.clustering.heads"})
