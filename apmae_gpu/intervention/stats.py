"""Intervention statistics: flip counts per (group, k), McNemar's exact test against the
unablated model and against the random group, Holm's correction, the pooled ``task == "all"``
rows, and the summary table printed at the end (see :mod:`apmae_gpu.intervention.ablation`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from scipy.stats import binomtest

from apmae_gpu.core.config import EXTRA_GROUPS, GROUPS


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c``."""
    return 1.0 if b + c == 0 else float(binomtest(int(b), int(b + c), 0.5).pvalue)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN entries stay NaN)."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m:
        order = ok[np.argsort(p[ok], kind="stable")]
        adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
        out[order] = np.minimum(adj, 1.0)
    return out


def summarize(task: str, samples: pd.DataFrame, outcomes: pd.DataFrame, conditions: dict,
              mode: str) -> pd.DataFrame:
    """One row per (group, k): flip counts, net change and the tests (see module doc)."""
    before = samples.set_index("sample_id")
    rows = []
    after_by = {}
    for (g, k), grp in outcomes.groupby(["group", "k"], sort=False):
        grp = grp.set_index("sample_id").loc[before.index]
        after_by[(g, k)] = grp["correct"].to_numpy(bool)
    cb = before["correct_before"].to_numpy(bool)
    pb = [tuple(p) for p in before["predicted_before"]]
    for (g, k), ca in after_by.items():
        grp = outcomes[(outcomes["group"] == g) & (outcomes["k"] == k)].set_index(
            "sample_id").loc[before.index]
        changed = np.array([tuple(p) != q for p, q in zip(grp["predicted"], pb)])
        c2i, i2c = int((cb & ~ca).sum()), int((~cb & ca).sum())
        other = int((changed & (cb == ca)).sum())
        rand = after_by.get(("random", k))
        p_rand, better, worse = float("nan"), -1, -1
        if rand is not None and g != "random":
            better, worse = int((ca & ~rand).sum()), int((~ca & rand).sum())
            p_rand = mcnemar_exact(better, worse)
        cond = conditions[(g, k)]
        heads = (" ".join(f"L{a}H{b}" for a, b in cond["heads"]) if cond["heads"] is not None
                 else f"{k} drawn per inference from {len(cond['pool'])} heads"
                      + (" (with replacement)" if cond["replace"] else ""))
        rows.append(dict(task=task, mode=mode, group=g, k=int(k),
                         n_heads=len(cond["heads"]) if cond["heads"] is not None else int(k),
                         n_in_group=cond["n_in_group"], n=int(len(cb)),
                         n_correct_before=int(cb.sum()), n_correct_to_incorrect=c2i,
                         n_incorrect_to_correct=i2c, n_other_changes=other,
                         n_unchanged=int((~changed).sum()), net_change=i2c - c2i,
                         accuracy_before=float(cb.mean()), accuracy_after=float(ca.mean()),
                         p_vs_baseline=mcnemar_exact(i2c, c2i), p_vs_random=p_rand,
                         n_better_than_random=better, n_worse_than_random=worse, heads=heads))
    out = pd.DataFrame(rows)
    if not out.empty:
        rank = {g: i for i, g in enumerate(GROUPS + EXTRA_GROUPS)}
        out = out.sort_values(["group", "k"], key=lambda c: c.map(rank) if c.name == "group"
                              else c, kind="stable").reset_index(drop=True)
        out["p_vs_random_holm"] = holm(out["p_vs_random"].to_numpy())
    return out


def aggregate(results: pd.DataFrame) -> pd.DataFrame:
    """Rows ``task == "all"``: every (group, k) summed over the tasks that have it (the
    paper's figure over tasks); McNemar's exact test on the pooled discordant pairs, Holm over
    the aggregate rows."""
    if results.empty:
        return results
    sums = ["n", "n_correct_before", "n_correct_to_incorrect", "n_incorrect_to_correct",
            "n_other_changes", "n_unchanged", "net_change"]
    rows = []
    for (g, k), grp in results.groupby(["group", "k"], sort=False):
        row = {"task": "all", "mode": grp["mode"].iloc[0], "group": g, "k": int(k),
               "n_heads": int(k), "n_in_group": int(grp["n_in_group"].sum()),
               "n_tasks": int(len(grp)), **{c: int(grp[c].sum()) for c in sums}}
        row["accuracy_before"] = row["n_correct_before"] / max(row["n"], 1)
        row["accuracy_after"] = (row["n_correct_before"] + row["net_change"]) / max(row["n"], 1)
        row["p_vs_baseline"] = mcnemar_exact(row["n_incorrect_to_correct"],
                                             row["n_correct_to_incorrect"])
        paired = grp[grp["n_better_than_random"] >= 0]
        if len(paired) and g != "random":
            row["n_better_than_random"] = int(paired["n_better_than_random"].sum())
            row["n_worse_than_random"] = int(paired["n_worse_than_random"].sum())
            row["p_vs_random"] = mcnemar_exact(row["n_better_than_random"],
                                               row["n_worse_than_random"])
        else:
            row.update(n_better_than_random=-1, n_worse_than_random=-1, p_vs_random=float("nan"))
        row["heads"] = f"per task ({len(grp)} tasks)"
        rows.append(row)
    out = pd.DataFrame(rows)
    out["p_vs_random_holm"] = holm(out["p_vs_random"].to_numpy())
    return out


def echo_summary(results: pd.DataFrame) -> None:
    table = Table(title="net change per k (incorrect->correct minus correct->incorrect)",
                  box=box.SIMPLE, pad_edge=False)
    ks = sorted(results["k"].unique())
    table.add_column("task")
    table.add_column("group")
    for k in ks:
        table.add_column(f"k={k}", justify="right")
    for (task, group), g in results.groupby(["task", "group"], sort=False):
        g = g.set_index("k")
        cells = []
        for k in ks:
            if k not in g.index:
                cells.append("-")
                continue
            r = g.loc[k]
            star = "*" if np.isfinite(r.p_vs_random) and r.p_vs_random < 0.05 else ""
            cells.append(f"{int(r.net_change):+d}{star}")
        table.add_row(task, group, *cells)
    Console(width=max(Console().width, 110)).print(table)
    Console().print("* p < 0.05 against the random group (exact McNemar, unadjusted)")
