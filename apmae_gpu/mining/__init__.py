"""Stage 1, mining: Java completion tasks (11 kinds) from real source files with tree-sitter.

``tasks`` mines, ``corpus`` reads corpora (folders, zips, jars), ``prompts`` cuts the
reference loaders' windows."""

from apmae_gpu import lazy_exports

# the stage's entry points, imported on first use (importing one module of the stage does
# not load the others)
__getattr__, __all__ = lazy_exports(__name__, {"mine": "apmae_gpu.mining.tasks"})
