"""Stage 2, capture: prompt the target LLM on 256-token windows, judge its next token, store
every head's log-scaled attention map.

``maps`` runs it, ``llm`` loads the target model, ``ranks`` and ``merge`` split it over
torchrun ranks and merge their shards, ``requota`` raises a split's quota, ``identity``
refuses a capture under other settings."""

from importlib import import_module

# the stage's entry points, imported on first use (a light package: importing one module of
# the stage does not load the others)
_EXPORTS = {"capture": "apmae_gpu.capture.maps",
            "forward_with_maps": "apmae_gpu.capture.maps",
            "merge_shards": "apmae_gpu.capture.maps"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
