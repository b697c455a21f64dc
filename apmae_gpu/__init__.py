
"""apmae_gpu: automated attention pattern discovery at scale (AP-MAE).

The package's folders are the pipeline's stages, in the order one run's data flows through
them: ``mining`` -> ``capture`` -> ``model`` (AP-MAE, its training and evaluation) ->
``encoding`` -> ``clustering`` -> ``classification`` -> ``intervention`` -> ``report`` (with
the findings).  ``core`` sits below them all (the run directory's layout, manifest and frames,
locks, logs, devices, the map store, configs); ``cli`` is the command line and ``pipeline``
runs every stage from one config.  Each stage's entry point is importable from its folder
(``from apmae_gpu.clustering import cluster``); those whose name is not a folder's
(``mine``, ``train``, ``cluster``, ...) also from here.
"""

from importlib import import_module

__version__ = "0.1.0"

TASKS = (
    "identifiers",
    "boolean_literals",
    "string_literals",
    "numeric_literals",
    "boolean_operators",
    "mathematical_operators",
    "assignment_operators",
    "closing_brackets",
    "end_of_line",
    "random_masking",
    "noise",
)


def task_rank(col):
    """Sort key for a pandas column: tasks in the order of ``TASKS`` (unknown names last);
    any other column unchanged.  ``df.sort_values("task", key=task_rank)``."""
    if getattr(col, "name", None) != "task":
        return col
    rank = {t: i for i, t in enumerate(TASKS)}
    return col.map(lambda t: rank.get(t, len(TASKS)))


# the stages' entry points and the frame helpers the notebooks use, imported on first use
_EXPORTS = {
    "mine": "apmae_gpu.mining.tasks",
    "train": "apmae_gpu.model.training", "evaluate": "apmae_gpu.model.evaluation",
    "encode": "apmae_gpu.encoding.encoder", "cluster": "apmae_gpu.clustering.heads",
    "classify": "apmae_gpu.classification.classifier",
    "intervene": "apmae_gpu.intervention.ablation",
    "findings": "apmae_gpu.report.findings",
    "run_pipeline": "apmae_gpu.pipeline",
    "load_frame": "apmae_gpu.core.frames", "read_manifest": "apmae_gpu.core.frames",
    "frame_backend": "apmae_gpu.core.frames", "ApmaeError": "apmae_gpu.core.errors",
}


def lazy_exports(package: str, exports: dict[str, str]):
    """A package's ``__getattr__`` and ``__all__`` for ``exports`` (name -> module), each
    imported on first use: importing a package stays light and cycle-free."""
    def __getattr__(name: str):
        if name in exports:
            return getattr(import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(exports)


__getattr__, _ = lazy_exports(__name__, _EXPORTS)
