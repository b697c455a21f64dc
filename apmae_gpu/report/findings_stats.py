"""The tests behind the findings table (:mod:`apmae_gpu.report.findings`), each with the interval that
inverts it and its power by simulation of the same test.

Every test is one-sided in the paper's direction at level ``alpha / m`` for a family of ``m``
rows (Holm's first step); its interval is two-sided at ``1 - 2 alpha / m``, so the interval's
near bound lies beyond the null exactly when the Bonferroni-adjusted test rejects.

- Paired proportions (claims 6, 7): McNemar's score test ``z = (b - c) / sqrt(b + c)`` and
  Tango's (1998) score interval, which inverts the same score statistic (no zero-width interval
  at 0 discordant pairs: n = 20 gives +-0.161 at 95%).
- Information about correctness (claim 4): balanced accuracy of the out-of-fold predictions,
  one-sided Fisher exact test of the confusion matrix (the permutation distribution of the
  labels with the predictions held fixed: balanced accuracy is increasing in TP at fixed
  margins); ROC AUC with the one-sided Mann-Whitney test; pooled over tasks by the
  Cochran-Mantel-Haenszel test stratified by task.  The balanced-accuracy interval is a
  stratified bootstrap of the two class-wise rates (Jeffreys-smoothed: Beta draws, never a
  zero-width interval at a rate of 0 or 1).
- :func:`cv_permutation_p`: the label-permutation test of a whole cross-validation (labels
  permuted, the same folds refit), against which the tests check the Fisher test: Fisher's p
  is never notably below it (under the null the refits anti-correlate out-of-fold predictions
  with the labels), i.e. the analytic test is valid and conservative; refitting CatBoost
  hundreds of times per task is not affordable on the study's 2 cores.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd
from scipy import stats


def z_of(alpha: float, m: int = 1) -> float:
    """One-sided critical value at ``alpha / m``."""
    return float(stats.norm.ppf(1 - alpha / max(m, 1)))


# --------------------------------------------------------------------------- paired proportions
def mcnemar_score_p(b: int, c: int) -> float:
    """One-sided p-value of McNemar's score test that ``b`` (pairs better in the paper's
    direction) exceeds ``c``; 1.0 without discordant pairs."""
    if b + c == 0:
        return 1.0
    return float(stats.norm.sf((b - c) / math.sqrt(b + c)))


def _tango_z(b: int, c: int, n: int, delta: float) -> float:
    """Tango's score statistic for H0: p_b - p_c = ``delta``."""
    a_, b_ = 2.0 * n, -b - c + (2.0 * n - b + c) * delta
    c_ = -c * delta * (1.0 - delta)
    q = (math.sqrt(max(b_ * b_ - 4 * a_ * c_, 0.0)) - b_) / (2 * a_)
    var = n * (2 * q + delta * (1 - delta))
    num = b - c - n * delta
    if var <= 0:
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def tango_ci(b: int, c: int, n: int, z: float = 1.959964) -> tuple[float, float, float]:
    """``(b - c) / n`` and Tango's score interval: every ``delta`` whose score statistic lies
    within ``+-z`` (found by bisection; the statistic decreases in ``delta``)."""
    if n < 1:
        return float("nan"), float("nan"), float("nan")
    est = (b - c) / n

    def root(lo: float, hi: float, target: float) -> float:
        for _ in range(60):
            mid = (lo + hi) / 2
            if _tango_z(b, c, n, mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = -1.0 if _tango_z(b, c, n, -1.0 + 1e-12) <= z else root(-1.0 + 1e-12, est, z)
    high = 1.0 if _tango_z(b, c, n, 1.0 - 1e-12) >= -z else root(est, 1.0 - 1e-12, -z)
    return est, low, high


def power_paired(n: int, discordant: float, diff: float, alpha: float, m: int = 1,
                 sims: int = 4000, seed: int = 0) -> float:
    """Power of the one-sided McNemar score test at ``alpha / m`` with ``n`` pairs, a share
    ``discordant`` of discordant pairs and a true difference ``diff`` (simulated)."""
    diff = abs(diff)
    discordant = min(max(discordant, diff), 1.0)
    if n < 1 or diff == 0:
        return float(alpha / max(m, 1)) if n else 0.0
    p = [(discordant + diff) / 2, (discordant - diff) / 2, 1 - discordant]
    bc = np.random.default_rng(seed).multinomial(n, p, size=sims)[:, :2]
    s = bc.sum(1)
    z = np.where(s > 0, (bc[:, 0] - bc[:, 1]) / np.sqrt(np.maximum(s, 1)), 0.0)
    return float((z > z_of(alpha, m)).mean())


# --------------------------------------------------------------------------- classification
def confusion(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """``TP, FN, FP, TN`` of predictions ``pred`` against labels ``y`` (both [n] bool)."""
    y, pred = np.asarray(y, bool), np.asarray(pred, bool)
    return (int((y & pred).sum()), int((y & ~pred).sum()), int((~y & pred).sum()),
            int((~y & ~pred).sum()))


def balanced_accuracy(tp: int, fn: int, fp: int, tn: int) -> float:
    if not (tp + fn and fp + tn):
        return float("nan")
    return 0.5 * (tp / (tp + fn) + tn / (tn + fp))


def fisher_p(tp: int, fn: int, fp: int, tn: int) -> float:
    """One-sided Fisher exact p-value that predictions agree with the labels more than chance
    (hypergeometric upper tail of TP at fixed margins)."""
    n, pos, predpos = tp + fn + fp + tn, tp + fn, tp + fp
    return float(stats.hypergeom.sf(tp - 1, n, pos, predpos))


def ba_draws(tp: int, fn: int, fp: int, tn: int, draws: int = 20000,
             seed: int = 0) -> np.ndarray:
    """[draws] balanced accuracies from a stratified (Jeffreys-smoothed) bootstrap of
    sensitivity and specificity."""
    rng = np.random.default_rng(seed)
    return 0.5 * (rng.beta(tp + 0.5, fn + 0.5, draws) + rng.beta(tn + 0.5, fp + 0.5, draws))


def percentile_ci(draws: np.ndarray, z: float = 1.959964) -> tuple[float, float]:
    """Two-sided percentile interval of ``draws`` at ``2 * norm.sf(z)``."""
    q = float(stats.norm.sf(z))
    lo, hi = np.quantile(draws, [q, 1 - q])
    return float(lo), float(hi)


def ba_interval(tp: int, fn: int, fp: int, tn: int, z: float = 1.959964,
                seed: int = 0) -> tuple[float, float]:
    """Percentile interval of :func:`ba_draws` (never zero-width at a rate of 0 or 1)."""
    if not (tp + fn and fp + tn):
        return float("nan"), float("nan")
    return percentile_ci(ba_draws(tp, fn, fp, tn, seed=seed), z)


def auc_test(y: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """ROC AUC of ``score`` for labels ``y`` and its one-sided Mann-Whitney p-value."""
    y, score = np.asarray(y, bool), np.asarray(score, float)
    if y.all() or not y.any():
        return float("nan"), float("nan")
    u = stats.mannwhitneyu(score[y], score[~y], alternative="greater")
    return float(u.statistic / (y.sum() * (~y).sum())), float(u.pvalue)


def cmh_p(tables: list[tuple[int, int, int, int]]) -> float:
    """One-sided Cochran-Mantel-Haenszel p-value over 2x2 tables ``(TP, FN, FP, TN)``
    stratified by task (the pooled form of :func:`fisher_p`, continuity-uncorrected)."""
    obs = exp = var = 0.0
    for tp, fn, fp, tn in tables:
        n, pos, predpos = tp + fn + fp + tn, tp + fn, tp + fp
        if n < 2:
            continue
        obs += tp
        exp += pos * predpos / n
        var += pos * (n - pos) * predpos * (n - predpos) / (n * n * (n - 1))
    if var <= 0:
        return 1.0
    return float(stats.norm.sf((obs - exp) / math.sqrt(var)))


def power_ba(n: int, prevalence: float, ba: float, alpha: float, m: int = 1,
             sims: int = 4000, seed: int = 0) -> float:
    """Power of the one-sided Fisher test (its hypergeometric z) at ``alpha / m`` for ``n``
    inferences with a share ``prevalence`` correct, a classifier of balanced accuracy ``ba``
    (equal sensitivity and specificity; simulated)."""
    pos = int(round(n * prevalence))
    neg = n - pos
    if pos < 1 or neg < 1:
        return 0.0
    rng = np.random.default_rng(seed)
    tp, tn = rng.binomial(pos, ba, sims), rng.binomial(neg, ba, sims)
    pp = tp + neg - tn
    var = pos * neg * pp * (n - pp) / (n * n * (n - 1))
    z = np.where(var > 0, (tp - pos * pp / n) / np.sqrt(np.where(var > 0, var, 1)), 0.0)
    return float((z > z_of(alpha, m)).mean())


def power_cmh(n: int, priors: list[float], ba: float, alpha: float, sims: int = 4000,
              seed: int = 0) -> float:
    """Power of the one-sided Cochran-Mantel-Haenszel test (:func:`cmh_p`) over tasks of ``n``
    inferences each, with shares ``priors`` correct, at balanced accuracy ``ba`` (simulated)."""
    rng = np.random.default_rng(seed)
    obs, exp, var = np.zeros(sims), np.zeros(sims), np.zeros(sims)
    for prior in priors:
        pos = int(round(n * prior))
        neg = n - pos
        tp, tn = rng.binomial(pos, ba, sims), rng.binomial(neg, ba, sims)
        pp = tp + neg - tn
        obs += tp
        exp += pos * pp / n
        var += pos * neg * pp * (n - pp) / (n * n * (n - 1))
    z = (obs - exp) / np.sqrt(np.maximum(var, 1e-12))
    return float((z > z_of(alpha)).mean())


def n_needed(power: Callable[[int], float], target: float = 0.8, start: int = 10,
             cap: int = 1_000_000) -> int:
    """Smallest ``n`` on a 5%-step geometric grid with ``power(n) >= target`` (0 past ``cap``)."""
    n = start
    while n <= cap:
        if power(n) >= target:
            return n
        n = max(n + 1, int(n * 1.05))
    return 0


def cv_permutation_p(fit_predict: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                     X: np.ndarray, y: np.ndarray, fold_of: np.ndarray, n_perm: int,
                     seed: int = 0) -> tuple[float, float]:
    """Balanced accuracy of a cross-validation and its label-permutation p-value: the labels
    permuted ``n_perm`` times, the same folds refit.  ``fit_predict(X, y, fold_of)`` returns
    the [n] out-of-fold predictions."""
    y = np.asarray(y, bool)
    observed = balanced_accuracy(*confusion(y, fit_predict(X, y, fold_of)))
    rng = np.random.default_rng(seed)
    null = [balanced_accuracy(*confusion(yp, fit_predict(X, yp, fold_of)))
            for yp in (rng.permutation(y) for _ in range(n_perm))]
    return observed, (1 + sum(v >= observed - 1e-12 for v in null)) / (1 + n_perm)


# --------------------------------------------------------------------------- clusters
def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; the smallest is Simes' global p-value."""
    p = np.asarray(p, dtype=float)
    m = p.size
    if not m:
        return p
    order = np.argsort(p, kind="stable")
    adj = np.minimum.accumulate((p[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def chi2_permutation_p(a: np.ndarray, b: np.ndarray, n_perm: int = 199,
                       seed: int = 0) -> tuple[float, float]:
    """Pearson's chi-square of the table ``a x b`` (two [n] int label arrays) and its
    permutation p-value (``b`` permuted ``n_perm`` times; margins fixed, so the statistic is
    ``sum(obs^2 / expected) - n``)."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    ka, kb, n = int(a.max()) + 1, int(b.max()) + 1, a.size
    if ka < 2 or kb < 2:
        return 0.0, 1.0
    exp = np.outer(np.bincount(a, minlength=ka), np.bincount(b, minlength=kb)).ravel() / n
    rng = np.random.default_rng(seed)
    perm = np.vstack([b, rng.permuted(np.tile(b, (n_perm, 1)), axis=1)])
    codes = (a[None, :] * kb + perm) + np.arange(n_perm + 1)[:, None] * (ka * kb)
    obs = np.bincount(codes.ravel(), minlength=(n_perm + 1) * ka * kb).reshape(n_perm + 1, -1)
    chi = (obs ** 2 / exp).sum(1) - n
    return float(chi[0]), float((chi >= chi[0] - 1e-9).mean())


def head_association(locations: pd.DataFrame, by: str = "task", n_perm: int = 199,
                     seed: int = 0) -> pd.DataFrame:
    """Per head of ``cluster/locations.parquet`` ((layer, head, cluster) x task x correct ->
    n): the permutation p-value of cluster ids (noise included) against ``by``, and its
    Benjamini-Hochberg adjustment over heads."""
    rows = []
    for (layer, head), g in locations.groupby(["layer", "head"], sort=True):
        n = g["n"].to_numpy(int)
        chi, p = chi2_permutation_p(np.repeat(g["cluster"].to_numpy(), n),
                                    np.repeat(g[by].astype(str).to_numpy(), n), n_perm, seed)
        rows.append(dict(layer=int(layer), head=int(head), n=int(n.sum()), chi2=chi, p=p))
    out = pd.DataFrame(rows, columns=["layer", "head", "n", "chi2", "p"])
    out["q"] = bh(out["p"].to_numpy())
    return out


def clopper_pearson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Exact interval of a proportion ``k / n``, two-sided at ``2 * norm.sf(z)``."""
    q = float(stats.norm.sf(z))
    lo = float(stats.beta.ppf(q, k, n - k + 1)) if k else 0.0
    hi = float(stats.beta.ppf(1 - q, k + 1, n - k)) if k < n else 1.0
    return lo, hi
