"""Stage 8, the report: ``build`` writes RUN/report/ (figures, tables, the findings section
and the per-head explorer); ``findings`` tests the paper's claims."""

from importlib import import_module

# the stage's entry points, imported on first use (a light package: importing one module of
# the stage does not load the others)
_EXPORTS = {"report": "apmae_gpu.report.build"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
