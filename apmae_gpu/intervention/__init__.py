"""Stage 7, intervention: zero selected heads while generating (``ablation``) and measure what
flips; ``groups`` picks the heads, ``stats`` tests the change."""

from apmae_gpu import lazy_exports

# the stage's entry points, imported on first use (importing one module of the stage does
# not load the others)
__getattr__, __all__ = lazy_exports(__name__, {"intervene": "apmae_gpu.intervention.ablation"})
