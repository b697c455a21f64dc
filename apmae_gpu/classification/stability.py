"""Stability selection of the SHAP head rankings (beyond the paper): CatBoost refit on
stratified half-samples, in complementary pairs (Shah and Samworth 2013), and the heads ranked
in each refit as the intervention's positive and negative groups rank them (the mean of the
positive / negative parts of the SHAP values, ``classification.head_importance``).

Per head: ``p_top_pos`` / ``p_top_neg``, the share of refits that put it among the top
``top_k`` of the positive / negative ranking, and ``rank_pos_lo``/``rank_pos_hi``,
``rank_neg_lo``/``rank_neg_hi``, the 2.5% and 97.5% quantiles of its rank (1 = first); per
task: ``split_half_spearman``, the mean over complementary pairs of the Spearman correlation of
the two halves' rankings (positive and negative averaged).  The intervention takes its groups
in the order of ``p_top_*`` (consensus heads); the findings read claims 6/7 only on tasks whose
``split_half_spearman`` reaches ``classify.min_ranking_spearman``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.model_selection import train_test_split

from apmae_gpu.core.figures import pyplot, save_figure

COLUMNS = ["p_top_pos", "p_top_neg", "rank_pos_lo", "rank_pos_hi", "rank_neg_lo",
           "rank_neg_hi", "split_half_spearman"]


def ranks(values: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """[F] rank of each entry of ``values`` in descending order (1 = largest; ``tie`` breaks
    ties)."""
    order = np.lexsort((tie, -np.asarray(values, float)))
    out = np.empty(order.size, dtype=int)
    out[order] = np.arange(1, order.size + 1)
    return out


def _half_parts(fit_shap, X: pd.DataFrame, y: np.ndarray, idx: np.ndarray):
    shap = fit_shap(X.iloc[idx], y[idx])
    return np.maximum(shap, 0).mean(0), -np.minimum(shap, 0).mean(0)


def half_sample_ranks(fit_shap, X: pd.DataFrame, y: np.ndarray, refits: int, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Positive and negative ranks ``[refits, F]`` over ``refits`` half-sample fits (pairs of
    complementary stratified halves) and each pair's Spearman correlation.  ``fit_shap(X, y)``
    fits a model and returns its [n, F] SHAP values on ``X``."""
    y = np.asarray(y, int)
    tie = np.random.default_rng(seed).random(X.shape[1])
    pos_r, neg_r, rho = [], [], []
    for r in range(max(1, refits // 2)):
        a, b = train_test_split(np.arange(len(y)), test_size=0.5, stratify=y,
                                random_state=seed + r)
        (pa, na), (pb, nb) = _half_parts(fit_shap, X, y, a), _half_parts(fit_shap, X, y, b)
        pos_r += [ranks(pa, tie), ranks(pb, tie)]
        neg_r += [ranks(na, tie), ranks(nb, tie)]
        rho.append(float(np.nanmean([_spearman(pa, pb), _spearman(na, nb)])))
    return np.array(pos_r), np.array(neg_r), rho


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(stats.spearmanr(a, b).statistic)


def stability_frame(pos: np.ndarray, neg: np.ndarray, rho: list[float], top_k: int,
                    n_heads: int) -> pd.DataFrame:
    """Per head (column ``layer * n_heads + head``): the :data:`COLUMNS`."""
    F = pos.shape[1]
    layer, head = np.divmod(np.arange(F), n_heads)
    q = lambda r, p: np.quantile(r, p, axis=0)     # noqa: E731
    return pd.DataFrame({
        "layer": layer.astype(np.int16), "head": head.astype(np.int16),
        "p_top_pos": (pos <= top_k).mean(0), "p_top_neg": (neg <= top_k).mean(0),
        "rank_pos_lo": q(pos, 0.025), "rank_pos_hi": q(pos, 0.975),
        "rank_neg_lo": q(neg, 0.025), "rank_neg_hi": q(neg, 0.975),
        "split_half_spearman": float(np.mean(rho)) if rho else float("nan")})


def empty_frame(heads: pd.DataFrame) -> pd.DataFrame:
    """The :data:`COLUMNS` as NaN (stability selection off)."""
    return heads[["layer", "head"]].assign(**{c: np.nan for c in COLUMNS})


def plot_stability(importance: pd.DataFrame, out: Path, top_k: int = 20,
                   top: int = 15) -> list[str]:
    """``classify/stability.png``: per task, the ``top`` heads of the positive ranking by
    ``p_top_pos`` (in the labels; the bar's colour) with their 95% rank intervals, the top-k
    boundary dotted, and the split-half Spearman in the title."""
    done = importance.dropna(subset=["p_top_pos"])
    if done.empty:
        return []
    plt = pyplot()
    tasks = list(done["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        g = done[done["task"] == task].nlargest(top, "p_top_pos").iloc[::-1]
        colours = pyplot().get_cmap("viridis")(g["p_top_pos"].to_numpy())
        ax.hlines(np.arange(len(g)), g["rank_pos_lo"], g["rank_pos_hi"], colors=colours, lw=3)
        ax.axvline(top_k + 0.5, color="k", lw=0.6, ls=":")
        ax.set_yticks(np.arange(len(g)), [f"L{a}H{b} {p:.2f}" for a, b, p in
                                          zip(g["layer"], g["head"], g["p_top_pos"])],
                      fontsize=6)
        ax.set_xlabel("rank (95% interval over half-sample refits)", fontsize=7)
        ax.set_title(f"{task}\nsplit-half Spearman {g['split_half_spearman'].iloc[0]:.2f}",
                     fontsize=8)
    fig.tight_layout()
    path = save_figure(fig, out / "stability.png", dpi=110, format="png")
    return [str(path.relative_to(out.parent))]


def stability_selection(fit_shap, X: pd.DataFrame, y: np.ndarray, heads: pd.DataFrame,
                        refits: int, top_k: int, n_heads: int, seed: int = 0) -> pd.DataFrame:
    """``heads`` (one task's head importance) with the :data:`COLUMNS` added: NaN when
    ``refits`` is 0 or a half-sample could not hold 2 of each class."""
    if refits < 2 or np.bincount(np.asarray(y, int), minlength=2).min() < 4:
        return heads.merge(empty_frame(heads), on=["layer", "head"])
    pos, neg, rho = half_sample_ranks(fit_shap, X, y, refits, seed)
    return heads.merge(stability_frame(pos, neg, rho, top_k, n_heads), on=["layer", "head"])
