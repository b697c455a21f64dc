"""Intervention head groups: which heads each (group, k) condition ablates, ranked from a
task's SHAP head importance or drawn per inference (see :mod:`apmae_gpu.intervention.ablation`)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np
import pandas as pd

from apmae_gpu.core.errors import ApmaeError

ZERO_TOL = 1e-5


def task_rng(seed: int, task: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and the task's name."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


RANKINGS = {"shap_parts": ("mean_shap_pos", "mean_shap_neg"), "mean_shap": ("mean_shap",) * 2,
            "extreme_shap": ("extreme_shap",) * 2}
SAMPLED = ("zero", "random")      # groups drawn anew for every inference


def head_groups(importance: pd.DataFrame, n_layers: int, n_heads: int, ks: list[int],
                groups: Iterable[str], seed: int, task: str, rank_by: str = "shap_parts"
                ) -> dict[tuple[str, int], dict]:
    """The heads to ablate for every (group, k).  Ranked groups: ``{"heads": [(l, h), ...],
    "n_in_group": int}``; sampled groups (:data:`SAMPLED`): ``{"heads": None, "pool": flat
    head indices to draw from, "replace": bool, "n_in_group": k}``, drawn per inference by
    :func:`sampled_mask`.  ``importance``: one task's rows of ``head_importance.parquet``
    (heads without a row count as 0).  A ``zero`` group with an empty pool is left out."""
    cols = RANKINGS[rank_by]
    missing = sorted({*cols, "mean_shap"} - set(importance.columns))
    if missing:
        raise ApmaeError(f"head importance has no {', '.join(missing)} column (written by an "
                         f"older `apmae classify`): rerun classify, or pass --rank-by mean_shap")
    layer, head = importance["layer"].to_numpy(int), importance["head"].to_numpy(int)

    def flat(col: str) -> np.ndarray:
        out = np.zeros((n_layers, n_heads))
        out[layer, head] = importance[col]
        return out.ravel()

    pos, neg, mean, imp = flat(cols[0]), flat(cols[1]), flat("mean_shap"), flat("importance")
    tie = task_rng(seed, task).random(pos.size)
    # consensus heads first: the stability selection's top-k probability, where classify ran it
    sel_pos, sel_neg = (flat(c) if c in importance and importance[c].notna().all()
                        and rank_by == "shap_parts" else np.zeros(pos.size)
                        for c in ("p_top_pos", "p_top_neg"))
    order = {
        "positive": (np.lexsort((tie, -pos, -sel_pos)), pos > 0),
        "negative": (np.lexsort((tie, neg, -sel_neg)), neg < 0),
        "importance": (np.lexsort((tie, -imp)), imp > 0),
    }
    pools = {"zero": (np.flatnonzero(np.abs(mean) <= ZERO_TOL), True),
             "random": (np.arange(pos.size), False)}
    out = {}
    for g in groups:
        for k in ks:
            if g in pools:
                pool, replace = pools[g]
                if pool.size:
                    out[(g, k)] = {"heads": None, "pool": pool, "replace": replace,
                                   "n_in_group": k}
                continue
            ranking, member = order[g]
            chosen = ranking[:k]
            out[(g, k)] = {"heads": [divmod(int(i), n_heads) for i in chosen],
                           "n_in_group": int(member[chosen].sum())}
    return out


def sampled_mask(cond: dict, k: int, sample_ids: np.ndarray, n_layers: int, n_heads: int,
                 seed: int, task: str, group: str) -> np.ndarray:
    """Bool ``[n, L, H]``: for each sample its own draw of ``k`` heads from ``cond["pool"]``
    (seeded by seed, task, group, k and the sample, so reruns draw the same heads)."""
    out = np.zeros((len(sample_ids), n_layers * n_heads), bool)
    pool = cond["pool"]
    for i, sid in enumerate(sample_ids):
        rng = np.random.default_rng([seed, zlib.crc32(f"{task}/{group}".encode()), int(k), int(sid)])
        out[i, rng.choice(pool, size=k, replace=cond["replace"])] = True
    return out.reshape(len(sample_ids), n_layers, n_heads)
