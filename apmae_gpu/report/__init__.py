"""Stage 8, the report: ``build`` writes RUN/report/ (figures, tables, the findings section
and the per-head explorer); ``findings`` tests the paper's claims."""

from apmae_gpu import lazy_exports

# the stage's entry points, imported on first use (importing one module of the stage does
# not load the others)
__getattr__, __all__ = lazy_exports(__name__, {"report": "apmae_gpu.report.build"})
