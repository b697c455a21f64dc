"""Stage 2, capture: prompt the target LLM on 256-token windows, judge its next token, store
every head's log-scaled attention map.

``maps`` runs it, ``llm`` loads the target model, ``ranks`` and ``merge`` split it over
torchrun ranks and merge their shards, ``requota`` raises a split's quota, ``identity``
refuses a capture under other settings."""

from apmae_gpu import lazy_exports

# the stage's entry points, imported on first use (importing one module of the stage does
# not load the others)
__getattr__, __all__ = lazy_exports(__name__, {"capture": "apmae_gpu.capture.maps",
            "forward_with_maps": "apmae_gpu.capture.maps",
            "merge_shards": "apmae_gpu.capture.maps"})
