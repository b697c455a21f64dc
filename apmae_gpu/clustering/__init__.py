"""Stage 5, clustering: UMAP + HDBSCAN per head (``heads``) on a cuML or CPU backend
(``backends``), heads spread over dask workers (``dask_jobs``), with its studies and
figures."""

from importlib import import_module

# the stage's entry points, imported on first use (a light package: importing one module of
# the stage does not load the others)
_EXPORTS = {"cluster": "apmae_gpu.clustering.heads"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
