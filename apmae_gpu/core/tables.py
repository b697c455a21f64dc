"""The columns and types the stages read from a run's tables and its manifest
(``docs/contracts.md``), checked by ``apmae check`` and by the stages that read them.

A hand-edited or damaged table (a column gone, cluster ids that are text or NaN) would
otherwise be used silently or end in a traceback deep inside a stage.  :func:`problems` lists
what is wrong with one table; :func:`require` turns the first problem into a one-line
:class:`ApmaeError` naming the file and the command that rebuilds it.  :func:`manifest_problems`
does the same for ``manifest.json``'s structure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from apmae_gpu import TASKS
from apmae_gpu.core import layout
from apmae_gpu.core.errors import ApmaeError

# table (relative to RUN) -> {column: kind}; kinds: int, float (int accepted), bool, str, list.
# "int!" columns must also hold no nulls.
TABLES: dict[str, dict[str, str]] = {
    layout.TASKS_PARQUET: {"task_id": "int!", "task": "str", "source": "str", "input_ids": "list",
                      "target_token_id": "int!"},
    layout.CLUSTERS_PARQUET: {"inference_id": "int!", "layer": "int!", "head": "int!",
                         "cluster": "int!"},
    "cluster/heads.parquet": {"layer": "int!", "head": "int!", "status": "str"},
    "classify/metrics.parquet": {"task": "str", "method": "str", "accuracy_mean": "float"},
    "classify/head_importance.parquet": {"task": "str", "layer": "int!", "head": "int!",
                                         "importance": "float"},
    "intervene/results.parquet": {"task": "str", "group": "str", "k": "int!"},
}

_KIND = {
    "int": pa.types.is_integer,
    "float": lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
    "bool": pa.types.is_boolean,
    "str": lambda t: (pa.types.is_string(t) or pa.types.is_large_string(t)
                      or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type))),
    "list": lambda t: pa.types.is_list(t) or pa.types.is_large_list(t),
}


def _described(typ) -> str:
    """A type's kind in words (text whatever pyarrow's string width)."""
    if _KIND["str"](typ):
        return "text"
    return "floating point" if pa.types.is_floating(typ) else str(typ)


def problems(path: Path, rel: str | None = None) -> list[str]:
    """What is wrong with the table at ``path`` (``rel``: its name in :data:`TABLES`, default
    its file name): missing columns, columns of another type, nulls where ids must be."""
    want = TABLES.get(rel or path.name)
    if want is None:
        return []
    try:
        dataset = ds.dataset(path, format="parquet")
        schema = dataset.schema
    except (OSError, ValueError) as exc:
        return [f"not readable parquet ({str(exc).strip().splitlines()[0][:200]})"]
    out = []
    missing = [c for c in want if c not in schema.names]
    if missing:
        out.append(f"missing column(s) {', '.join(missing)}")
    strict = []
    for col, kind in want.items():
        if col in missing:
            continue
        base = kind.rstrip("!")
        typ = schema.field(col).type
        if not _KIND[base](typ):
            what = "an integer" if base == "int" else f"a {base}"
            out.append(f"column {col} is {_described(typ)}, not {what} type")
        elif kind.endswith("!"):
            strict.append(col)
    if strict:
        nulls = dict.fromkeys(strict, 0)
        for batch in dataset.to_batches(columns=strict):
            for col in strict:
                nulls[col] += batch[col].null_count
        out += [f"column {col} has {n} null value(s)" for col, n in nulls.items() if n]
    return out


def require(path: Path, rel: str, rerun: str) -> None:
    """Raise a one-line :class:`ApmaeError` when the table at ``path`` has a problem."""
    found = problems(path, rel)
    if found:
        raise ApmaeError(f"{path}: {found[0]} (see docs/contracts.md): {rerun}")


def manifest_problems(manifest) -> list[str]:
    """What is wrong with a parsed ``manifest.json``'s structure: not an object, a stage
    section that is not an object, a capture split's counts that are not integers."""
    if not isinstance(manifest, dict):
        return [f"is a JSON {type(manifest).__name__}, not an object"]
    out = [f"section {key!r} is a {type(value).__name__}, not an object"
           for key, value in manifest.items() if key != "updated" and not isinstance(value, dict)]
    splits = manifest.get("capture", {}).get("splits", {}) if not out else {}
    if not isinstance(splits, dict):
        return out + ["capture.splits is not an object"]
    for split, info in splits.items():
        tasks = info.get("tasks", {}) if isinstance(info, dict) else None
        if not isinstance(tasks, dict):
            out.append(f"capture.splits.{split} is not an object with a tasks object")
            continue
        for task, counts in tasks.items():
            if not (isinstance(counts, dict) and all(
                    isinstance(counts.get(k, 0), int) and not isinstance(counts.get(k, 0), bool)
                    for k in ("attempts", "kept"))):
                out.append(f"capture.splits.{split}.tasks.{task}: attempts and kept must be "
                           f"integers")
    return out


def validate_tasks(tasks, path: Path) -> None:
    """Refuse, in one line, a ``tasks.parquet`` capture would misread: unknown task names,
    repeated ids, prompts of other lengths than the window or with negative token ids,
    targets below -1 (noise's)."""
    fix = "mine into a new run (`apmae mine --out NEW ...`)"
    unknown = sorted(set(tasks["task"].astype(str)) - set(TASKS))
    if unknown:
        raise ApmaeError(f"{path}: unknown task name(s) {', '.join(unknown[:5])} (expected "
                         f"{', '.join(TASKS)}): {fix}")
    if tasks["task_id"].duplicated().any():
        raise ApmaeError(f"{path}: task_id {int(tasks.task_id[tasks.task_id.duplicated()].iloc[0])}"
                         f" is repeated: {fix}")
    lengths = tasks["input_ids"].map(lambda ids: 0 if ids is None else len(ids))
    if lengths.nunique() != 1 or int(lengths.iloc[0]) == 0:
        raise ApmaeError(f"{path}: prompts of {int(lengths.min())} to {int(lengths.max())} tokens;"
                         f" every prompt must be the window long: {fix}")
    if int(np.concatenate(tasks["input_ids"].to_numpy()).min()) < 0:
        raise ApmaeError(f"{path}: a prompt holds a negative token id: {fix}")
    if int(tasks["target_token_id"].min()) < -1:
        raise ApmaeError(f"{path}: a target_token_id is below -1: {fix}")
