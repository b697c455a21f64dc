"""The core under every stage: the run directory's layout, manifest and frames, writer locks,
logging, devices, the map store, configs, scaling, tables and ``apmae check``."""

from apmae_gpu import lazy_exports

# the stage's entry points, imported on first use (importing one module of the stage does
# not load the others)
__getattr__, __all__ = lazy_exports(__name__, {"load_frame": "apmae_gpu.core.frames",
            "read_manifest": "apmae_gpu.core.frames",
            "frame_backend": "apmae_gpu.core.frames",
            "ApmaeError": "apmae_gpu.core.errors",
            "MapStore": "apmae_gpu.core.store",
            "load_config": "apmae_gpu.core.config"})
