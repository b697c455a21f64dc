"""Stage 1, mining: Java completion tasks (11 kinds) from real source files with tree-sitter.

``tasks`` mines, ``corpus`` reads corpora (folders, zips, jars), ``prompts`` cuts the
reference loaders' windows."""

from importlib import import_module

# the stage's entry points, imported on first use (a light package: importing one module of
# the stage does not load the others)
_EXPORTS = {"mine": "apmae_gpu.mining.tasks"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
