"""Stage 6, classification: correctness from the per-head cluster ids with CatBoost, heads
ranked by SHAP (``classifier``), with stability selection (``stability``)."""

from apmae_gpu import lazy_exports

# the stage's entry points, imported on first use (importing one module of the stage does
# not load the others)
__getattr__, __all__ = lazy_exports(__name__, {"classify": "apmae_gpu.classification.classifier"})
