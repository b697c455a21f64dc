"""The core under every stage: the run directory's layout, manifest and frames, writer locks,
logging, devices, the map store, configs, scaling, tables and ``apmae check``."""

from importlib import import_module

# the stage's entry points, imported on first use (a light package: importing one module of
# the stage does not load the others)
_EXPORTS = {"load_frame": "apmae_gpu.core.frames",
            "read_manifest": "apmae_gpu.core.frames",
            "frame_backend": "apmae_gpu.core.frames",
            "ApmaeError": "apmae_gpu.core.errors",
            "MapStore": "apmae_gpu.core.store",
            "load_config": "apmae_gpu.core.config"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
