"""Stage 6, classification: correctness from the per-head cluster ids with CatBoost, heads
ranked by SHAP (``classifier``), with stability selection (``stability``)."""

from importlib import import_module

# the stage's entry points, imported on first use (a light package: importing one module of
# the stage does not load the others)
_EXPORTS = {"classify": "apmae_gpu.classification.classifier"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
