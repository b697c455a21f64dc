"""Stage 4, encoding: maps to AP-MAE embeddings (``encoder``); ``merge`` joins the ranks'
embedding shards."""

from importlib import import_module

# the stage's entry points, imported on first use (a light package: importing one module of
# the stage does not load the others)
_EXPORTS = {"encode": "apmae_gpu.encoding.encoder",
            "StreamingEncoder": "apmae_gpu.encoding.encoder"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
