"""apmae_gpu: automated attention pattern discovery at scale (AP-MAE).

Stages, one module each, in the order one run's data flows through them:
``mining`` -> ``capture`` -> ``training`` (model in ``model``) -> ``evaluation`` ->
``encoding`` -> ``clustering`` -> ``classification`` -> ``intervention`` -> ``report``.
``findings`` tests the paper's claims on a run's outputs (the report's first section).
``cli`` is the command line, ``pipeline`` runs every stage from one config.
``training`` keeps its loop in ``train_engine`` and its checkpoints in ``checkpoints``;
``splits``, ``baselines``, ``scaling`` and ``devices`` sit below the stages that share them.
"""

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
