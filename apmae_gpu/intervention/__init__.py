"""Stage 7, intervention: zero selected heads while generating (``ablation``) and measure what
flips; ``groups`` picks the heads, ``stats`` tests the change."""

from importlib import import_module

# the stage's entry points, imported on first use (a light package: importing one module of
# the stage does not load the others)
_EXPORTS = {"intervene": "apmae_gpu.intervention.ablation"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
