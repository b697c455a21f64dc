"""Stage 3, the AP-MAE model with its training and evaluation.

``network`` is the ViT masked autoencoder, ``training`` its loop (``engine``,
``checkpoints``, ``loader``), ``evaluation`` the reconstruction checks, ``baselines`` the
reference points they are read against."""

from apmae_gpu import lazy_exports

# the stage's entry points, imported on first use (importing one module of the stage does
# not load the others)
__getattr__, __all__ = lazy_exports(__name__, {"train": "apmae_gpu.model.training",
            "evaluate": "apmae_gpu.model.evaluation",
            "APMAEModel": "apmae_gpu.model.network",
            "preset_config": "apmae_gpu.model.network"})
