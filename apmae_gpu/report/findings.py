"""Findings against the paper: one row per claim, with this run's estimate, a test and a verdict.

``findings(run)`` reads the stages' files (``docs/contracts.md``) and returns a frame with the
columns of :data:`COLUMNS`; ``apmae report`` writes it to ``report/findings.parquet`` and shows
it first on the page.  The claims (numbers as in the paper, ``../shared/docs/paper-facts.md``):

1. ``reconstruction``: AP-MAE reconstructs masked patches better than the best trivial
   predictor, paired over the same maps and masks (``evaluate/evaluation_maps.parquet``).
2. ``log_scaling``: a checkpoint trained on raw probabilities reconstructs worse (common
   log-min-max space), where the run evaluated one.
3. ``clustered_share`` / ``clusters_per_head``: heads show recurring patterns.
4. ``predictable/<all|task>``: attention patterns carry information about correctness:
   balanced accuracy of ``classify``'s out-of-fold predictions above 0.5 (one-sided Fisher per
   task, Holm over tasks; ``predictable/all``, the primary row: Cochran-Mantel-Haenszel
   stratified by task).  ROC AUC (Mann-Whitney) and the majority (class prior) are in
   ``detail``.
5. ``end_of_line_best``: end of line is the most predictable task.
6. ``few_heads/<all|task>``: zeroing a few SHAP-selected heads raises accuracy more than
   zeroing as many random heads, at the one pre-registered k (``intervene.few_heads_k``).
7. ``many_heads/<all|task>``: zeroing many SHAP-selected heads lowers accuracy more than as
   many random heads (``intervene.many_heads_k``).  Claims 6/7 read only tasks that pass
   claim 4; the others' rows are inconclusive and say why.
8. ``stability``: clusters are stable across seeds (mean ARI > 0.5), beyond the paper.

Every test is one-sided in the paper's direction; its interval inverts it and is adjusted over
the same family (:mod:`apmae_gpu.report.findings_stats`).  The verdict (:func:`verdict`) is one
symmetric rule over four values: ``reproduced``, ``weaker than the paper``, ``not
reproduced``, ``inconclusive`` (an inconclusive row's ``detail`` gives the N a test would need
for 80% power, simulated for the test that was run).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from apmae_gpu import TASKS
from apmae_gpu.core import layout
from apmae_gpu.core.config import ClassifyConfig, InterveneConfig
from apmae_gpu.core.frames import read_manifest
from apmae_gpu.intervention.stats import holm
from apmae_gpu.report import findings_stats as S

COLUMNS = ["claim", "statement", "paper", "estimate", "ci_low", "ci_high", "p_value", "n",
           "test", "verdict", "detail", "paper_value", "direction", "null", "family"]
VERDICTS = ("reproduced", "weaker than the paper", "not reproduced", "inconclusive")
ALPHA, POWER = 0.05, 0.8
MIN_GAIN = 0.05     # smallest accuracy gain the paper reports (55% against 50%)
MIN_REL = 0.05      # smallest relative MSE difference counted as an effect (claims 1, 2)
MIN_HEADS = 0.10    # claim 3: "heads show recurring patterns" = at least a tenth of the heads
N_PERM = 199        # permutations per head (claim 3): p >= 0.005, enough for BH over heads


# --------------------------------------------------------------------------- the rule
def verdict(estimate: float, ci_low: float, ci_high: float, p_value: float, paper_value: float,
            direction: int = 1, null: float = 0.0, alpha: float = ALPHA,
            comparable: bool = True) -> str:
    """The verdict of one claim from its test, one rule for every row.

    ``direction`` +1: the paper claims the estimate lies above ``null``, at about
    ``paper_value``; -1: below.  ``p_value`` is the family-adjusted one-sided p-value in the
    paper's direction and ``[ci_low, ci_high]`` the interval that inverts the same test,
    adjusted over the same family.  ``reproduced``: significant in the paper's direction and
    the interval reaches ``paper_value`` (NaN: the paper gives no magnitude); ``weaker than the
    paper``: significant, but the interval lies wholly short of ``paper_value``, or the run's
    setting is not ``comparable`` with the paper's; ``not reproduced``: not significant and the
    interval excludes ``paper_value``, or the interval lies wholly on the other side of
    ``null`` (significant the other way); ``inconclusive`` otherwise, and when a number is
    missing.
    """
    if not np.isfinite([estimate, ci_low, ci_high, p_value]).all():
        return "inconclusive"
    d = 1 if direction > 0 else -1
    reach = d * (ci_high if d > 0 else ci_low)         # the interval's far end, signed
    if p_value < alpha and d * (estimate - null) > 0:
        short = np.isfinite(paper_value) and reach < d * paper_value
        return "weaker than the paper" if short or not comparable else "reproduced"
    if reach < d * null or (np.isfinite(paper_value) and reach < d * paper_value):
        return "not reproduced"
    return "inconclusive"


# --------------------------------------------------------------------------- power
def _z(alpha: float = ALPHA, power: float = POWER) -> tuple[float, float]:
    return float(stats.norm.ppf(1 - alpha / 2)), float(stats.norm.ppf(power))


def n_one_sample(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """N for a two-sided one-sample (or paired) test at ``alpha`` (a one-sided test at
    ``alpha / 2``) of a mean shift ``effect`` with standard deviation ``sd`` per unit."""
    za, zb = _z(alpha, power)
    if not (effect and np.isfinite(sd) and sd > 0):
        return 0
    return int(math.ceil(((za + zb) * sd / abs(effect)) ** 2))


# --------------------------------------------------------------------------- rows
@dataclass
class Claim:
    """What the paper says: the row's id, words and figure, and where its effect lies."""

    claim: str
    statement: str
    paper: str
    paper_value: float
    direction: int = 1
    null: float = 0.0


def _row(c: Claim, estimate=np.nan, lo=np.nan, hi=np.nan, p=np.nan, n=0, test="",
         detail: str = "", needed: str = "", verdict_: str | None = None,
         family: str = "", comparable: bool = True) -> dict:
    v = verdict_ or verdict(estimate, lo, hi, p, c.paper_value, c.direction, c.null,
                            comparable=comparable)
    if v == "inconclusive" and needed:
        detail = f"{detail}; {needed}" if detail else needed
    return dict(claim=c.claim, statement=c.statement, paper=c.paper, estimate=float(estimate),
                ci_low=float(lo), ci_high=float(hi), p_value=float(p), n=int(n), test=test,
                verdict=v, detail=detail.strip("; "), paper_value=float(c.paper_value),
                direction=int(c.direction), null=float(c.null), family=family or c.claim)


def _not_run(c: Claim, why: str) -> dict:
    return _row(c, detail=why, verdict_="inconclusive")


def _t_test(d: np.ndarray, null: float = 0.0, direction: int = 1,
            m: int = 1) -> tuple[float, float, float, float, float]:
    """Mean of ``d``, its t-interval two-sided at ``1 - 2 alpha / m``, the one-sided t-test's
    p-value against ``null`` in ``direction`` (the test the interval inverts), and the sd."""
    d = np.asarray(d, dtype=float)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        p = 0.0 if direction * (mean - null) > 0 else 1.0
        return mean, mean, mean, p, sd
    se = sd / math.sqrt(d.size)
    half = float(stats.t.ppf(1 - ALPHA / m, d.size - 1)) * se
    p = float(stats.t.sf(direction * (mean - null) / se, d.size - 1))
    return mean, mean - half, mean + half, p, sd


def paired_diff_ci(b: int, c: int, n: int, z: float = 1.959964) -> tuple[float, float, float]:
    """Difference of two paired proportions, ``(b - c) / n`` from the discordant counts ``b``
    and ``c`` of ``n`` pairs, with Tango's score interval (inverts McNemar's score test; never
    zero-width when no pair is discordant)."""
    return S.tango_ci(b, c, n, z)


# --------------------------------------------------------------------------- AP-MAE (1, 2)
C_RECON = Claim("reconstruction", "AP-MAE reconstructs masked patches better than the best "
                "trivial predictor on the same maps and masks",
                "MSE 7.07-7.59e-3 on its own model (Table 2); baselines not reported", MIN_REL)
C_LOG = Claim("log_scaling", "log scaling is needed: a model trained on raw probabilities "
              "reconstructs worse", "raw input does not converge (Fig. 1)", MIN_REL)


def _evaluation(run: Path):
    path = run / layout.EVALUATE_DIR / layout.EVALUATION_MAPS_PARQUET
    summ = run / layout.EVALUATE_DIR / layout.EVALUATION_PARQUET
    if not (path.exists() and summ.exists()):
        return None, None
    return pd.read_parquet(summ), pd.read_parquet(path)


def _paired_rel(a: pd.DataFrame, b: pd.DataFrame, col: str):
    """Per-inference mean of b - a over the same maps, and b's mean (the scale)."""
    m = a[["map_id", "inference_id", col]].merge(b[["map_id", col]], on="map_id",
                                                 suffixes=("_a", "_b"))
    m["d"] = m[f"{col}_b"] - m[f"{col}_a"]
    per_inf = m.groupby("inference_id")["d"].mean().to_numpy()
    return per_inf, float(m[f"{col}_b"].mean()), len(m)


def _relative_row(c: Claim, d: np.ndarray, scale: float, n_maps: int, what: str) -> dict:
    if d.size < 2 or scale <= 0:
        return _not_run(c, f"{d.size} inference(s) evaluated: too few to test")
    m, lo, hi, p, sd = _t_test(d)
    need = n_one_sample(c.paper_value * scale, sd, alpha=2 * ALPHA)
    return _row(c, m / scale, lo / scale, hi / scale, p, d.size,
                "one-sided paired t-test on per-inference mean MSE differences (paired maps "
                "and masks); its 90% t-interval, relative to the baseline's mean MSE",
                f"{what}; {n_maps} maps of {d.size} inferences",
                f"N~{need} inferences for 80% power at a {c.paper_value:.0%} difference")


def apmae_claims(run: Path) -> list[dict]:
    summ, maps = _evaluation(run)
    if summ is None:
        return [_not_run(C_RECON, "not run: no evaluate/evaluation_maps.parquet (apmae evaluate)"),
                _not_run(C_LOG, "not run: no evaluation")]
    dataset = summ["dataset_name"].iloc[0]
    own = summ[(summ["dataset_name"] == dataset) & (summ["input_scaling"] != "raw")]
    rows = []
    if own.empty:
        rows.append(_not_run(C_RECON, "not run: no log-scaled checkpoint was evaluated"))
        ck = None
    else:
        ck = own["checkpoint_name"].iloc[0]
        sel = own[own["checkpoint_name"] == ck].set_index("method")["mse_mean"]
        if "apmae" not in sel or len(sel) < 2:
            return [_not_run(C_RECON, "not run: no baseline evaluated beside AP-MAE"),
                    _not_run(C_LOG, "not run: no baseline evaluation")]
        base = sel.drop("apmae").idxmin()
        pick = maps[(maps["dataset_name"] == dataset) & (maps["checkpoint_name"] == ck)]
        d, scale, n_maps = _paired_rel(pick[pick["method"] == "apmae"],
                                       pick[pick["method"] == base], "mse")
        rows.append(_relative_row(C_RECON, d, scale, n_maps,
                                  f"estimate: relative MSE reduction against {base} "
                                  f"({sel[base] * 1e3:.2f}e-3 -> {sel['apmae'] * 1e3:.2f}e-3)"))
    raw = summ[(summ["dataset_name"] == dataset) & (summ["input_scaling"] == "raw")]
    if raw.empty or ck is None:
        rows.append(_not_run(C_LOG, "not run: no raw-input checkpoint (apmae train --raw) "
                                    "evaluated beside a log-scaled one"))
    else:
        rk = raw["checkpoint_name"].iloc[0]
        sel = maps[(maps["dataset_name"] == dataset) & (maps["method"] == "apmae")]
        d, scale, n_maps = _paired_rel(sel[sel["checkpoint_name"] == ck],
                                       sel[sel["checkpoint_name"] == rk], "mse_log")
        rows.append(_relative_row(C_LOG, d, scale, n_maps,
                                  f"estimate: relative MSE increase of {rk} (raw) over {ck} "
                                  f"in the common log-min-max space"))
    return rows


# --------------------------------------------------------------------------- clusters (3, 8)
C_SHARE = Claim("clustered_share", "heads show recurring patterns: a share of the maps falls "
                "into clusters", "14.5-16.5% of maps clustered (global UMAP+HDBSCAN, Table 4)",
                0.145)
C_PER_HEAD = Claim("clusters_per_head", "heads show more than one recurring pattern",
                   "197/301/797 clusters in all (3B/7B/15B, global); per head not given",
                   2.0, null=1.0)
C_STABLE = Claim("stability", "beyond the paper: clusters are stable across seeds "
                 "(mean adjusted Rand index > 0.5)", "not in the paper", 0.5, null=0.5)


def _settings_note(run: Path, heads: pd.DataFrame) -> str:
    p = run / layout.CLUSTER_DIR / layout.PARAMS_JSON
    params = json.loads(p.read_text()).get("params", {}) if p.exists() else {}
    pts = float(heads["n_points"].median()) if "n_points" in heads else float("nan")
    return (f"settings that differ from the paper: per head, not global; ~{pts:.0f} maps per "
            f"head (paper ~110,000); UMAP {params.get('umap_dims', '?')} dims, "
            f"{params.get('n_neighbors', '?')} neighbours; HDBSCAN min_samples "
            f"{params.get('min_samples', '?')}, min_cluster_size "
            f"{params.get('min_cluster_size', '?')}")


C_TASK = Claim("clustered_by_task", "heads show recurring patterns: a head's cluster ids carry "
               "the task (the test behind claim 3: clusters of noise carry nothing)",
               "task-specific patterns in many heads (Table 5; global clustering)", MIN_HEADS)
T3 = ("per head: permutation chi-square of cluster ids (noise cluster included) against the "
      "code task (noise prompts left out), "
      "{n_perm} permutations, Benjamini-Hochberg over heads; p: Simes' global test (the "
      "smallest BH-adjusted p); 90% Clopper-Pearson interval of the share of heads at q < 0.05")


def _association_row(run: Path, note: str) -> dict:
    path = run / layout.CLUSTER_DIR / layout.LOCATIONS_PARQUET
    if not path.exists():
        return _not_run(C_TASK, "not run: no cluster/locations.parquet (apmae cluster)")
    loc = pd.read_parquet(path)
    loc = loc[loc["cluster"].notna() & (loc["task"] != "noise")]   # noise vs code is trivial
    if loc["task"].nunique() < 2:
        return _not_run(C_TASK, "fewer than two code tasks clustered: no association with the "
                                "task to test")
    assoc = S.head_association(loc, "task", N_PERM)
    k, n = int((assoc["q"] < ALPHA).sum()), len(assoc)
    lo, hi = S.clopper_pearson(k, n, S.z_of(ALPHA))
    return _row(C_TASK, k / n, lo, hi, float(assoc["q"].min()), n, T3.format(n_perm=N_PERM),
                f"estimate: share of heads whose cluster ids carry the task ({k} of {n}); "
                f"{note}", f"N~{math.ceil(math.log(ALPHA) / math.log(1 - MIN_HEADS))} heads to "
                f"bound the share below {MIN_HEADS:.0%} when none is associated",
                comparable=False)


def _descriptive(c: Claim, v: np.ndarray, note: str, base: dict) -> dict:
    """A share or count of clusters cannot fail on its own (noise gives clusters): described
    with its 90% t-interval, its verdict is that of :data:`C_TASK`'s test."""
    if v.size < 2:
        return _not_run(c, f"{v.size} head(s) clustered: too few to describe")
    m, lo, hi, _, _ = _t_test(v, c.null)
    return _row(c, m, lo, hi, base["p_value"], v.size,
                f"descriptive (mean over heads, 90% t-interval); p and verdict: "
                f"{C_TASK.claim}'s test", f"mean over {v.size} heads; {note}",
                verdict_=base["verdict"], family=C_TASK.claim)


def cluster_claims(run: Path) -> list[dict]:
    path = run / layout.CLUSTER_DIR / layout.HEADS_PARQUET
    if not path.exists():
        rows = [_not_run(C_SHARE, "not run: no cluster/heads.parquet (apmae cluster)"),
                _not_run(C_PER_HEAD, "not run: no clustering"),
                _not_run(C_TASK, "not run: no clustering")]
    else:
        heads = pd.read_parquet(path)
        ok = heads[heads["status"] == "ok"]
        note = _settings_note(run, heads)
        base = _association_row(run, note)
        rows = [_descriptive(c, ok[col].to_numpy(float), note, base)
                for c, col in ((C_SHARE, "share_clustered"), (C_PER_HEAD, "n_clusters"))]
        rows.append(base)
    rows.append(_stability_row(run, rows[-1]))
    return rows


def _stability_row(run: Path, base: dict) -> dict:
    stab = run / layout.CLUSTER_DIR / layout.STABILITY_HEADS_PARQUET
    if not stab.exists():
        return _not_run(C_STABLE, "not run: no cluster/stability_heads.parquet (apmae stability)")
    s = pd.read_parquet(stab).groupby(["layer", "head"])["ari"].mean().to_numpy(float)
    if s.size < 2:
        return _not_run(C_STABLE, f"{s.size} head(s) in the stability study: too few")
    m, lo, hi, p, sd = _t_test(s, 0.5)
    gate = base["verdict"] not in ("reproduced", "weaker than the paper")
    why = (f"; {C_TASK.claim} is {base['verdict']}: stable clusters without structure measure "
           "the clusterer's determinism, not patterns" if gate else "")
    return _row(C_STABLE, m, lo, hi, p, s.size,
                "one-sided one-sample t-test over heads of the mean ARI against 0.5; "
                "90% t-interval",
                f"ARI of reclustering with other seeds, mean over seeds, {s.size} heads{why}",
                f"N~{n_one_sample(0.1, sd, 2 * ALPHA)} heads to detect ARI 0.6 with 80% power",
                verdict_=base["verdict"] if gate else None)


# --------------------------------------------------------------------------- classify (4, 5)
PAPER_ACC = {t: "55-60% (majority 50%)" for t in ("identifiers", "boolean_literals",
                                                  "string_literals", "random_masking")}
PAPER_ACC["end_of_line"] = "just over 70% (15B; majority 50%)"


PAPER_BA = 0.5 + MIN_GAIN   # the paper's smallest per-task accuracy, 55%, against a 50% prior


@dataclass
class TaskFit:
    """One task's out-of-fold predictions, summarised for claim 4."""

    cm: tuple[int, int, int, int]       # TP, FN, FP, TN (correct = positive)
    ba: float
    p: float                            # one-sided Fisher
    auc: float
    auc_p: float
    n: int
    prior: float                        # share correct
    constant: bool                      # one class predicted everywhere


def task_fit(g: pd.DataFrame) -> TaskFit:
    y = g["correct"].to_numpy(bool)
    score = g["p_catboost"].to_numpy(float)
    pred = score >= 0.5
    cm = S.confusion(y, pred)
    auc, auc_p = S.auc_test(y, score)
    return TaskFit(cm, S.balanced_accuracy(*cm), S.fisher_p(*cm), auc, auc_p, int(y.size),
                   float(y.mean()), bool(pred.all() or not pred.any()))


def _fold_intervals(run: Path) -> dict[str, str]:
    """Per task, CatBoost's cross-validated accuracy interval as ``classify`` reports it."""
    path = run / layout.CLASSIFY_DIR / layout.METRICS_PARQUET
    if not path.exists():
        return {}
    m = pd.read_parquet(path)
    m = m[m["method"] == "catboost"]
    return {r.task: f"{r.accuracy_mean:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] over "
                    f"{int(r.n_folds)} folds" for r in m.itertuples() if np.isfinite(r.ci_low)}


T4 = ("one-sided Fisher exact test of the out-of-fold confusion matrix (= the label-permutation "
      "test of balanced accuracy at fixed predictions); Holm over {m} tasks; stratified "
      "bootstrap interval of balanced accuracy at 1 - 0.1/{m}")
T4_ALL = ("one-sided Cochran-Mantel-Haenszel test stratified by task (pooled Fisher); "
          "stratified bootstrap interval of the n-weighted balanced accuracy, 90%")


def _need_ba(prior: float, m: int) -> str:
    n = S.n_needed(lambda k: S.power_ba(k, prior, PAPER_BA, ALPHA, m, sims=1000))
    return (f"N~{n} inferences for 80% power at balanced accuracy {PAPER_BA:.2f} "
            f"(Fisher, alpha 0.05/{m}, {prior:.0%} correct; simulated)")


def _task_row(task: str, f: TaskFit, p_adj: float, m: int, folds: dict) -> dict:
    claim = Claim(f"predictable/{task}", f"{task}: attention patterns carry information about "
                  "correctness (balanced accuracy above 0.5)",
                  PAPER_ACC.get(task, "not given (majority 50%)"), PAPER_BA, null=0.5)
    lo, hi = S.ba_interval(*f.cm, z=S.z_of(ALPHA, m))
    power = S.power_ba(f.n, f.prior, PAPER_BA, ALPHA, m, sims=1000)
    tp, fn, fp, tn = f.cm
    detail = (f"estimate: balanced accuracy of CatBoost's out-of-fold predictions; TP {tp}, "
              f"FN {fn}, FP {fp}, TN {tn}; ROC AUC {f.auc:.3f} (Mann-Whitney p {f.auc_p:.3g}); "
              f"CatBoost accuracy {folds.get(task, f'{(tp + tn) / f.n:.3f}')}, majority "
              f"{max(f.prior, 1 - f.prior):.3f} (class prior); raw p {f.p:.3g}; power "
              f"{power:.0%} at {PAPER_BA:.2f}")
    v = None
    if f.constant:
        v = "inconclusive"
        detail += ("; CatBoost predicted one class everywhere: balanced accuracy 0.5 by "
                   "construction, no evidence either way")
    return _row(claim, f.ba, lo, hi, p_adj, f.n, T4.format(m=m), detail,
                _need_ba(f.prior, m), verdict_=v, family=f"predictable ({m} tasks)")


def _pooled_row(fits: dict[str, TaskFit]) -> dict:
    claim = Claim("predictable/all", "all tasks: attention patterns carry information about "
                  "correctness (primary test of claim 4)", "55-60%, end of line ~70%",
                  PAPER_BA, null=0.5)
    n = sum(f.n for f in fits.values())
    draws = sum(f.n * S.ba_draws(*f.cm, seed=i) for i, f in enumerate(fits.values())) / n
    est = sum(f.n * f.ba for f in fits.values()) / n
    lo, hi = S.percentile_ci(draws, S.z_of(ALPHA))
    p = S.cmh_p([f.cm for f in fits.values()])
    return _row(claim, est, lo, hi, p, n, T4_ALL,
                f"estimate: n-weighted mean balanced accuracy over {len(fits)} tasks",
                "more inferences per task", family="predictable/all")


def classify_claims(run: Path) -> list[dict]:
    path = run / layout.CLASSIFY_DIR / layout.PREDICTIONS_PARQUET
    c5 = Claim("end_of_line_best", "end of line is the most predictable task",
               "end of line best, just over 70% (15B)", MIN_GAIN)
    if not path.exists():
        c4 = Claim("predictable", "attention patterns carry information about correctness",
                   "55-60%", PAPER_BA, null=0.5)
        return [_not_run(c4, "not run: no classify/predictions.parquet (apmae classify)"),
                _not_run(c5, "not run: no classification")]
    pred = pd.read_parquet(path)
    fits = {t: task_fit(g) for t, g in pred.groupby("task", sort=False)}
    fits = {t: f for t, f in fits.items() if min(f.prior, 1 - f.prior) > 0}
    order = [t for t in TASKS if t in fits] + sorted(set(fits) - set(TASKS))
    if not order:
        return [_not_run(Claim("predictable", "attention patterns carry information about "
                               "correctness", "55-60%", PAPER_BA, null=0.5),
                         "no task has both correct and incorrect attempts"),
                _not_run(c5, "no task classified")]
    folds = _fold_intervals(run)
    adj = holm([fits[t].p for t in order])
    rows = [_pooled_row({t: fits[t] for t in order})]
    rows += [_task_row(t, fits[t], float(p), len(order), folds) for t, p in zip(order, adj)]
    rows.append(_eol_best(c5, fits))
    return rows


def _eol_best(c: Claim, fits: dict[str, TaskFit]) -> dict:
    others = [t for t in fits if t != "end_of_line"]
    if "end_of_line" not in fits or not others:
        return _not_run(c, "not run: end of line and another task must be classified")
    e = S.ba_draws(*fits["end_of_line"].cm, seed=101)
    # intersection-union test: end of line beats every other task -> p is the largest p
    diffs = {t: e - S.ba_draws(*fits[t].cm, seed=202 + i) for i, t in enumerate(others)}
    ps = {t: float(max((d <= 0).mean(), 1 / d.size)) for t, d in diffs.items()}
    rival = max(others, key=lambda t: fits[t].ba)
    lo, hi = S.percentile_ci(diffs[rival], S.z_of(ALPHA))
    est = fits["end_of_line"].ba - fits[rival].ba
    return _row(c, est, lo, hi, max(ps.values()), fits["end_of_line"].n + fits[rival].n,
                "bootstrap test of end of line's balanced accuracy against each other task's "
                "(intersection-union: p = the largest); 90% bootstrap interval",
                f"estimate: end of line's balanced accuracy minus the best other task's "
                f"({rival})", "more inferences per task")


# --------------------------------------------------------------------------- intervene (6, 7)
C_FEW = Claim("few_heads", "zeroing a few SHAP-selected heads raises accuracy more than zeroing "
              "as many random heads", "+13.6% at best; +112/2000 (string literals, 3B)",
              MIN_GAIN)
C_MANY = Claim("many_heads", "zeroing many SHAP-selected heads lowers accuracy more than as many "
               "random heads", "collapse beyond 100-400 heads, unlike random", -0.10,
               direction=-1)
T67 = ("one-sided McNemar score test against random heads at the same k (the pre-registered "
       "condition; discordant pairs{pooled}); Holm over {m} {what}; Tango score interval at "
       "1 - 0.1/{m}")


def preregistered(run: Path) -> dict[str, tuple[str, int]]:
    """The one condition per claim fixed before the run (``intervene`` section:
    ``few_heads_k``, ``many_heads_k``), as the run's manifest recorded it."""
    rec = read_manifest(run).get("intervene", {}).get("preregistered") or {}
    d = InterveneConfig()
    return {"few_heads": ("positive", int(rec.get("few_heads_k", d.few_heads_k))),
            "many_heads": ("negative", int(rec.get("many_heads_k", d.many_heads_k)))}


def _arm(r: pd.DataFrame, group: str, k: int) -> float:
    sel = r[(r["group"] == group) & (r["k"] == k)]
    if "accuracy_after" not in sel or sel.empty:
        return float("nan")
    return float((sel["accuracy_after"] * sel["n"]).sum() / sel["n"].sum())


def _ablation_row(c: Claim, r: pd.DataFrame, cond: tuple[str, int], m: int, p: float | None,
                  what: str, pooled: str = "") -> dict:
    """The pre-registered condition ``cond`` of ``r`` (pooled over its tasks); ``p``: the
    family-adjusted p-value (None: this row is its own family)."""
    g, k = cond
    sel = r[(r["group"] == g) & (r["k"] == k)]
    if sel.empty:
        return _not_run(c, f"the pre-registered condition ({g}, k={k}) was not run")
    b, w, n = (int(sel[x].sum()) for x in ("n_better_than_random", "n_worse_than_random", "n"))
    if c.direction < 0:
        b, w = w, b     # "better" = in the paper's direction
    est, lo, hi = S.tango_ci(b, w, n, S.z_of(ALPHA, m))
    raw = S.mcnemar_score_p(b, w)
    if c.direction < 0:
        est, lo, hi = -est, -hi, -lo
    disc = (b + w) / n
    power = S.power_paired(n, max(disc, abs(c.paper_value)), c.paper_value, ALPHA, m, 2000)
    need = S.n_needed(lambda x: S.power_paired(x, max(disc, abs(c.paper_value)),
                                               c.paper_value, ALPHA, m, 1000))
    return _row(c, est, lo, hi, raw if p is None else p, n,
                T67.format(pooled=pooled, m=m, what=what),
                f"condition {g} k={k}; accuracy {_arm(r, g, k):.3f} with the {g} heads zeroed, "
                f"{_arm(r, 'random', k):.3f} with random heads; discordant {b}:{w}; raw p "
                f"{raw:.3g}; power {power:.0%} at {c.paper_value:+.0%}",
                f"N~{need} held-out inferences for 80% power at {c.paper_value:+.0%} "
                f"(discordant share {disc:.2f}; simulated)", family=f"{c.claim} ({what})")


def _gate(run: Path) -> dict[str, str]:
    """Tasks whose intervention can be read -> "": claim 4 significant (Holm) and a stable head
    ranking (split-half Spearman >= ``classify.min_ranking_spearman``); else why not."""
    path = run / layout.CLASSIFY_DIR / layout.PREDICTIONS_PARQUET
    if not path.exists():
        return {}
    rows = {r["claim"].split("/", 1)[1]: r for r in classify_claims(run)
            if r["claim"].startswith("predictable/") and r["claim"] != "predictable/all"}
    rho, least = _ranking_stability(run)
    out = {}
    for t, r in rows.items():
        if r["verdict"] not in ("reproduced", "weaker than the paper"):
            out[t] = (f"claim 4 not established for {t} ({r['verdict']}): its SHAP ranking is "
                      "not evidence of anything")
        elif not np.isfinite(rho.get(t, np.nan)):
            out[t] = (f"the stability of {t}'s head ranking was not measured "
                      "(classify.stability_refits)")
        elif rho[t] < least:
            out[t] = (f"{t}'s head ranking is unstable: split-half Spearman {rho[t]:.2f} < "
                      f"{least:.2f} (classify.min_ranking_spearman)")
        else:
            out[t] = ""
    return out


def _ranking_stability(run: Path) -> tuple[dict[str, float], float]:
    """Per task, the split-half Spearman of its head ranking, and the threshold of the run."""
    least = float(read_manifest(run).get("classify", {}).get("stability", {}).get(
        "min_ranking_spearman", ClassifyConfig().min_ranking_spearman))
    path = run / layout.CLASSIFY_DIR / layout.HEAD_IMPORTANCE_PARQUET
    if not path.exists():
        return {}, least
    imp = pd.read_parquet(path)
    if "split_half_spearman" not in imp:
        return {}, least
    return imp.groupby("task")["split_half_spearman"].first().to_dict(), least


def intervene_claims(run: Path) -> list[dict]:
    path = run / layout.INTERVENE_DIR / layout.RESULTS_PARQUET
    if not path.exists():
        return [_not_run(C_FEW, "not run: no intervene/results.parquet (apmae intervene)"),
                _not_run(C_MANY, "not run: no intervention")]
    r = pd.read_parquet(path)
    if "n_better_than_random" not in r:
        why = "results.parquet predates the discordant counts: rerun apmae intervene"
        return [_not_run(C_FEW, why), _not_run(C_MANY, why)]
    # per-task rows only (an aggregate row over tasks would be counted twice when pooling)
    r = r[r["task"].isin(TASKS) & r["group"].isin(["positive", "negative", "random"])]
    conds, gate = preregistered(run), _gate(run)
    tasks = [t for t in TASKS if t in set(r["task"])]
    ok = [t for t in tasks if not gate.get(t, "")]
    out = []
    for c in (C_FEW, C_MANY):
        pooled = Claim(f"{c.claim}/all", f"all tasks: {c.statement}", c.paper, c.paper_value,
                       c.direction)
        out.append(_ablation_row(pooled, r[r["task"].isin(ok)], conds[c.claim], 1, None,
                                 f"(primary; {len(ok)} tasks)", " pooled over tasks")
                   if ok else _not_run(pooled, "no intervened task passed claim 4 with a "
                                       "stable head ranking: " + "; ".join(
                                           gate.get(t) or f"{t}: not in the gate"
                                           for t in tasks)))
        claims = [Claim(f"{c.claim}/{t}", f"{t}: {c.statement}", c.paper, c.paper_value,
                        c.direction) for t in ok]
        raw = [_ablation_row(cl, r[r["task"] == t], conds[c.claim], len(ok), None, "tasks")
               for cl, t in zip(claims, ok)]
        adj = holm([x["p_value"] for x in raw])
        out += [_ablation_row(cl, r[r["task"] == t], conds[c.claim], len(ok), float(p), "tasks")
                for cl, t, p in zip(claims, ok, adj)]
        out += [_not_run(Claim(f"{c.claim}/{t}", f"{t}: {c.statement}", c.paper,
                                     c.paper_value, c.direction), gate[t])
                      for t in tasks if gate.get(t, "")]
    return out


# --------------------------------------------------------------------------- the table
def findings(run) -> pd.DataFrame:
    """Every claim's row for the run ``run`` (columns :data:`COLUMNS`)."""
    run = Path(run)
    clusters = cluster_claims(run)
    rows = (apmae_claims(run) + clusters[:3] + classify_claims(run) + intervene_claims(run)
            + clusters[3:])
    return pd.DataFrame(rows, columns=COLUMNS)


def summary(table: pd.DataFrame) -> str:
    """One sentence: how many claims got which verdict."""
    counts = table["verdict"].value_counts()
    return ", ".join(f"{int(counts.get(v, 0))} {v}" for v in VERDICTS) + \
        f" (of {len(table)} rows; tests at {ALPHA}, Holm where tested together)"
