"""Stage 4, encoding: maps to AP-MAE embeddings (``encoder``); ``merge`` joins the ranks'
embedding shards."""

from apmae_gpu import lazy_exports

# the stage's entry points, imported on first use (importing one module of the stage does
# not load the others)
__getattr__, __all__ = lazy_exports(__name__, {"encode": "apmae_gpu.encoding.encoder",
            "StreamingEncoder": "apmae_gpu.encoding.encoder"})
