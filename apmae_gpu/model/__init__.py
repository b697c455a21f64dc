"""Stage 3, the AP-MAE model with its training and evaluation.

``network`` is the ViT masked autoencoder, ``training`` its loop (``engine``,
``checkpoints``, ``loader``), ``evaluation`` the reconstruction checks, ``baselines`` the
reference points they are read against."""

from importlib import import_module

# the stage's entry points, imported on first use (a light package: importing one module of
# the stage does not load the others)
_EXPORTS = {"train": "apmae_gpu.model.training",
            "evaluate": "apmae_gpu.model.evaluation",
            "APMAEModel": "apmae_gpu.model.network",
            "preset_config": "apmae_gpu.model.network"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
