"""Findings against the paper: one row per claim, with this run's estimate, a test and a verdict.

``findings(run)`` reads the stages' files (``docs/contracts.md``) and returns a frame with the
columns of :data:`COLUMNS`; ``apmae report`` writes it to ``report/findings.parquet`` and shows
it first on the page.  The claims (numbers as in the paper, ``../shared/docs/paper-facts.md``):

1. ``reconstruction``: AP-MAE reconstructs masked patches better than the best trivial
   predictor, paired over the same maps and masks (``evaluate/evaluation_maps.parquet``).
2. ``log_scaling``: a checkpoint trained on raw probabilities reconstructs worse (common
   log-min-max space), where the run evaluated one.
3. ``clustered_share`` / ``clusters_per_head``: heads show recurring patterns.
4. ``predictable/<task>``: correctness is predicted above the majority baseline (out-of-fold
   predictions of ``classify``, paired; Holm over tasks).
5. ``end_of_line_best``: end of line is the most predictable task.
6. ``few_heads/<task|all>``: zeroing a few SHAP-selected heads raises accuracy more than
   zeroing as many random heads (exact McNemar on the discordant pairs; Holm).
7. ``many_heads/<task|all>``: zeroing many SHAP-selected heads lowers accuracy more than as
   many random heads.
8. ``stability``: clusters are stable across seeds (mean ARI > 0.5), beyond the paper.

The verdict comes from the test alone (:func:`verdict`): ``reproduced`` when the (adjusted)
p-value is below 0.05 and the estimate lies on the paper's side of the null, ``not
reproduced`` when the 95% interval excludes the paper's effect (``paper_value``, the smallest
effect the paper's claim implies, on the estimate's scale), ``inconclusive`` otherwise; an
inconclusive row's ``detail`` gives the N a test would need for 80% power (normal
approximations: :func:`n_one_sample`, :func:`n_proportion`, :func:`n_mcnemar`).
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
from apmae_gpu.intervention_stats import holm

COLUMNS = ["claim", "statement", "paper", "estimate", "ci_low", "ci_high", "p_value", "n",
           "test", "verdict", "detail"]
VERDICTS = ("reproduced", "not reproduced", "inconclusive")
ALPHA, POWER = 0.05, 0.8
FEW_K = 20          # "a few heads": k <= 20 (the paper's Fig. 7 rises at k = 1..20)
MANY_K = 100        # "many heads": k >= 100, or a third of the model's heads when fewer
MIN_GAIN = 0.05     # smallest accuracy gain the paper reports (55% against 50%)
MIN_REL = 0.05      # smallest relative MSE difference counted as an effect (claims 1, 2)


# --------------------------------------------------------------------------- the rule
def verdict(estimate: float, ci_low: float, ci_high: float, p_value: float, paper_value: float,
            direction: int = 1, null: float = 0.0, alpha: float = ALPHA) -> str:
    """The verdict of one claim from its test.

    ``direction`` +1: the paper claims the estimate lies above ``null``, at about
    ``paper_value`` (>= null); -1: below.  ``reproduced`` when ``p_value < alpha`` and the
    estimate is on the paper's side of ``null``; ``not reproduced`` when the interval lies
    wholly short of ``paper_value`` (which covers an effect in the opposite direction);
    ``inconclusive`` otherwise (also when any number is missing).
    """
    vals = np.array([estimate, ci_low, ci_high, p_value], dtype=float)
    if not np.isfinite(vals).all():
        return "inconclusive"
    if p_value < alpha and direction * (estimate - null) > 0:
        return "reproduced"
    if (ci_high < paper_value) if direction > 0 else (ci_low > paper_value):
        return "not reproduced"
    return "inconclusive"


# --------------------------------------------------------------------------- power
def _z(alpha: float = ALPHA, power: float = POWER) -> tuple[float, float]:
    return float(stats.norm.ppf(1 - alpha / 2)), float(stats.norm.ppf(power))


def n_one_sample(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """N for a two-sided one-sample (or paired) test of a mean shift ``effect`` with
    standard deviation ``sd`` per unit."""
    za, zb = _z(alpha, power)
    if not (effect and np.isfinite(sd) and sd > 0):
        return 0
    return int(math.ceil(((za + zb) * sd / abs(effect)) ** 2))


def n_proportion(p0: float, p1: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """N for a two-sided one-sample test of a proportion ``p1`` against ``p0``."""
    za, zb = _z(alpha, power)
    if p1 == p0:
        return 0
    num = za * math.sqrt(p0 * (1 - p0)) + zb * math.sqrt(p1 * (1 - p1))
    return int(math.ceil((num / (p1 - p0)) ** 2))


def n_mcnemar(discordant: float, diff: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """Pairs for McNemar's test (Connor 1987): ``discordant`` = expected share of discordant
    pairs, ``diff`` = expected difference of the two proportions."""
    za, zb = _z(alpha, power)
    diff = abs(diff)
    discordant = max(discordant, diff * 1.05)
    if diff == 0:
        return 0
    return int(math.ceil((za * math.sqrt(discordant)
                          + zb * math.sqrt(discordant - diff ** 2)) ** 2 / diff ** 2))


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
         detail: str = "", needed: str = "", verdict_: str | None = None) -> dict:
    v = verdict_ or verdict(estimate, lo, hi, p, c.paper_value, c.direction, c.null)
    if v == "inconclusive" and needed:
        detail = f"{detail}; {needed}" if detail else needed
    elif v == "reproduced" and (hi < c.paper_value if c.direction > 0 else lo > c.paper_value):
        detail += "; the effect is smaller than the paper's"
    return dict(claim=c.claim, statement=c.statement, paper=c.paper, estimate=float(estimate),
                ci_low=float(lo), ci_high=float(hi), p_value=float(p), n=int(n), test=test,
                verdict=v, detail=detail.strip("; "))


def _not_run(c: Claim, why: str) -> dict:
    return _row(c, detail=why, verdict_="inconclusive")


def _mean_ci(d: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, 95% t-interval and sd of ``d``."""
    d = np.asarray(d, dtype=float)
    m, sd = float(d.mean()), float(d.std(ddof=1)) if d.size > 1 else float("nan")
    half = float(stats.t.ppf(0.975, d.size - 1) * sd / math.sqrt(d.size)) if d.size > 1 \
        else float("nan")
    return m, m - half, m + half, sd


def paired_diff_ci(b: int, c: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """Difference of two paired proportions, ``(b - c) / n`` from the discordant counts ``b``
    and ``c`` of ``n`` pairs, with Agresti and Min's (2005) adjusted Wald interval (0.5 added
    to every cell: never a zero-width interval when no pair is discordant)."""
    if n < 1:
        return float("nan"), float("nan"), float("nan")
    b2, c2, n2 = b + 0.5, c + 0.5, n + 2.0
    d2 = (b2 - c2) / n2
    se = math.sqrt(max((b2 + c2) - (b2 - c2) ** 2 / n2, 0.0)) / n2
    return (b - c) / n, max(d2 - z * se, -1.0), min(d2 + z * se, 1.0)


def _wilcoxon(d: np.ndarray) -> float:
    d = np.asarray(d, dtype=float)
    if d.size < 2 or not np.any(d != 0):
        return 1.0 if d.size else float("nan")
    return float(stats.wilcoxon(d).pvalue)


# --------------------------------------------------------------------------- AP-MAE (1, 2)
C_RECON = Claim("reconstruction", "AP-MAE reconstructs masked patches better than the best "
                "trivial predictor on the same maps and masks",
                "MSE 7.07-7.59e-3 on its own model (Table 2); baselines not reported", MIN_REL)
C_LOG = Claim("log_scaling", "log scaling is needed: a model trained on raw probabilities "
              "reconstructs worse", "raw input does not converge (Fig. 1)", MIN_REL)


def _evaluation(run: Path):
    path = run / "evaluate" / "evaluation_maps.parquet"
    summ = run / "evaluate" / "evaluation.parquet"
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
    m, lo, hi, sd = _mean_ci(d)
    need = n_one_sample(c.paper_value * scale, sd)
    return _row(c, m / scale, lo / scale, hi / scale, _wilcoxon(d), d.size,
                "Wilcoxon signed-rank on per-inference mean MSE differences (paired maps and "
                "masks); 95% t-interval, relative to the baseline's mean MSE",
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
    p = run / "cluster" / "params.json"
    params = json.loads(p.read_text()).get("params", {}) if p.exists() else {}
    pts = float(heads["n_points"].median()) if "n_points" in heads else float("nan")
    return (f"settings that differ from the paper: per head, not global; ~{pts:.0f} maps per "
            f"head (paper ~110,000); UMAP {params.get('umap_dims', '?')} dims, "
            f"{params.get('n_neighbors', '?')} neighbours; HDBSCAN min_samples "
            f"{params.get('min_samples', '?')}, min_cluster_size "
            f"{params.get('min_cluster_size', '?')}")


def cluster_claims(run: Path) -> list[dict]:
    path = run / "cluster" / "heads.parquet"
    if not path.exists():
        rows = [_not_run(C_SHARE, "not run: no cluster/heads.parquet (apmae cluster)"),
                _not_run(C_PER_HEAD, "not run: no clustering")]
    else:
        heads = pd.read_parquet(path)
        ok = heads[heads["status"] == "ok"]
        note = _settings_note(run, heads)
        rows = []
        for c, col in ((C_SHARE, "share_clustered"), (C_PER_HEAD, "n_clusters")):
            v = ok[col].to_numpy(float)
            if v.size < 2:
                rows.append(_not_run(c, f"{v.size} head(s) clustered: too few to test"))
                continue
            m, lo, hi, sd = _mean_ci(v)
            p = float(stats.ttest_1samp(v, c.null).pvalue) if sd > 0 else \
                (0.0 if m != c.null else 1.0)
            rows.append(_row(c, m, lo, hi, p, v.size,
                             f"one-sample t-test over heads against {c.null:g}; 95% t-interval",
                             f"mean over {v.size} heads; {note}",
                             f"N~{n_one_sample(c.paper_value - c.null, sd)} heads for 80% power"))
    stab = run / "cluster" / "stability_heads.parquet"
    if not stab.exists():
        rows.append(_not_run(C_STABLE, "not run: no cluster/stability_heads.parquet "
                                       "(apmae stability)"))
        return rows
    s = pd.read_parquet(stab).groupby(["layer", "head"])["ari"].mean().to_numpy(float)
    if s.size < 2:
        rows.append(_not_run(C_STABLE, f"{s.size} head(s) in the stability study: too few"))
        return rows
    m, lo, hi, sd = _mean_ci(s)
    p = float(stats.ttest_1samp(s, 0.5, alternative="greater").pvalue) if sd > 0 else \
        (0.0 if m > 0.5 else 1.0)
    rows.append(_row(C_STABLE, m, lo, hi, p, s.size,
                     "one-sided one-sample t-test over heads of the mean ARI against 0.5",
                     f"ARI of reclustering with other seeds, mean over seeds, {s.size} heads",
                     f"N~{n_one_sample(0.1, sd)} heads to detect ARI 0.6 with 80% power"))
    return rows


# --------------------------------------------------------------------------- classify (4, 5)
PAPER_ACC = {t: "55-60% (majority 50%)" for t in ("identifiers", "boolean_literals",
                                                  "string_literals", "random_masking")}
PAPER_ACC["end_of_line"] = "just over 70% (15B; majority 50%)"


def _gains(pred: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task: correctness of CatBoost's and the majority's out-of-fold predictions."""
    out = {}
    for task, g in pred.groupby("task", sort=False):
        y = g["correct"].to_numpy(bool)
        out[task] = ((g["p_catboost"].to_numpy() >= 0.5) == y,
                     (g["p_majority"].to_numpy() >= 0.5) == y)
    return out


def _fold_intervals(run: Path) -> dict[str, str]:
    """Per task, CatBoost's cross-validated accuracy interval as ``classify`` reports it."""
    path = run / "classify" / "metrics.parquet"
    if not path.exists():
        return {}
    m = pd.read_parquet(path)
    m = m[m["method"] == "catboost"]
    return {r.task: f"{r.accuracy_mean:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] over "
                    f"{int(r.n_folds)} folds" for r in m.itertuples() if np.isfinite(r.ci_low)}


def classify_claims(run: Path) -> list[dict]:
    path = run / "classify" / "predictions.parquet"
    c5 = Claim("end_of_line_best", "end of line is the most predictable task",
               "end of line best, just over 70% (15B)", MIN_GAIN)
    if not path.exists():
        c4 = Claim("predictable", "correctness is predicted above the majority baseline",
                   "55-60%", MIN_GAIN)
        return [_not_run(c4, "not run: no classify/predictions.parquet (apmae classify)"),
                _not_run(c5, "not run: no classification")]
    gains = _gains(pd.read_parquet(path))
    folds = _fold_intervals(run)
    order = [t for t in TASKS if t in gains] + sorted(set(gains) - set(TASKS))
    rows, stat = [], {}
    for task in order:
        cb, mj = gains[task]
        n, b, c = cb.size, int((cb & ~mj).sum()), int((~cb & mj).sum())
        est, lo, hi = paired_diff_ci(b, c, n)
        se = (hi - lo) / (2 * 1.96)
        p = float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
        stat[task] = (est, se, n, p, b, c, cb.mean(), mj.mean(), lo, hi)
    adj = holm([stat[t][3] for t in order])
    for task, p_adj in zip(order, adj):
        est, se, n, p, b, c, acc, maj, lo, hi = stat[task]
        claim = Claim(f"predictable/{task}", f"{task}: correctness is predicted above the "
                      f"majority baseline", PAPER_ACC.get(task, "not given (majority 50%)"),
                      MIN_GAIN)
        need = n_proportion(0.5, 0.5 + MIN_GAIN, alpha=ALPHA / len(order))  # Holm's first step
        rows.append(_row(claim, est, lo, hi, p_adj, n,
                         "exact McNemar, CatBoost vs majority on the same out-of-fold "
                         f"predictions; Holm over {len(order)} tasks; Agresti-Min interval",
                         f"estimate: accuracy gain over the majority (CatBoost "
                         f"{folds.get(task, f'{acc:.3f}')}, majority {maj:.3f}); "
                         f"discordant {b}:{c}; "
                         f"raw p {p:.3g}",
                         f"N~{need} inferences per task for 80% power at "
                         f"+{MIN_GAIN:.0%} (0.55 against 0.50; alpha 0.05/{len(order)})"))
    rows.append(_eol_best(c5, stat))
    return rows


def _eol_best(c: Claim, stat: dict) -> dict:
    others = [t for t in stat if t != "end_of_line"]
    if "end_of_line" not in stat or not others:
        return _not_run(c, "not run: end of line and another task must be classified")
    e_est, e_se, e_n = stat["end_of_line"][:3]
    # intersection-union test: end of line beats every other task -> p is the largest p
    ps, diffs = [], []
    for t in others:
        est, se, n = stat[t][:3]
        s = math.sqrt(e_se ** 2 + se ** 2)
        z = (e_est - est) / s if s > 0 else 0.0
        ps.append(float(stats.norm.sf(z)))
        diffs.append((e_est - est, s, t, n))
    diff, s, rival, n = min(diffs)
    sd_unit = s * math.sqrt(min(e_n, n)) if s > 0 else float("nan")  # sd of a difference
    return _row(c, diff, diff - 1.96 * s, diff + 1.96 * s, max(ps), e_n + n,
                "one-sided z-tests of end of line's accuracy gain over the majority against "
                "each other task's (intersection-union: p = the largest)",
                f"estimate: end of line's gain minus the best other task's ({rival})",
                f"N~{n_one_sample(MIN_GAIN, sd_unit)} inferences per task for 80% power at "
                f"a {MIN_GAIN:.0%} margin")


# --------------------------------------------------------------------------- intervene (6, 7)
def _pooled(g: pd.DataFrame) -> tuple[int, int, int]:
    return int(g["n_better_than_random"].sum()), int(g["n_worse_than_random"].sum()), \
        int(g["n"].sum())


def _ablation_row(c: Claim, rows: pd.DataFrame, label: str, p_override: float | None = None,
                  note: str = "") -> dict:
    """The best (group, k) condition of ``rows`` (pooled over its tasks) in the paper's
    direction; p Holm-adjusted over the conditions (or ``p_override``, adjusted further)."""
    conds = []
    for (g, k), grp in rows.groupby(["group", "k"]):
        b, w, n = _pooled(grp)
        if c.direction < 0:
            b, w = w, b     # "better" = in the paper's direction
        p = float(stats.binomtest(b, b + w, 0.5).pvalue) if b + w else 1.0
        conds.append((g, int(k), b, w, n, p))
    if not conds:
        return _not_run(c, f"no condition with {label}")
    adj = holm([x[5] for x in conds])
    i = int(np.argmax([(x[2] - x[3]) / x[4] for x in conds]))
    g, k, b, w, n, p = conds[i]
    est, lo, hi = paired_diff_ci(b, w, n)
    if c.direction < 0:
        est, lo, hi = -est, -hi, -lo
    disc = (b + w) / n
    need = n_mcnemar(disc if disc > 0 else 2 * c.paper_value, c.paper_value,
                     alpha=ALPHA / len(conds))
    p_final = float(adj[i]) if p_override is None else p_override
    return _row(c, est, lo, hi, p_final, n,
                f"exact McNemar against random heads at the same k (discordant pairs pooled "
                f"over tasks); Holm over {len(conds)} conditions{note}; Agresti-Min interval",
                f"best condition: {g} k={k} ({label}); estimate: accuracy after ablation minus "
                f"after random ablation; discordant {b}:{w}",
                f"N~{need} held-out inferences for 80% power at {c.paper_value:+.0%} "
                f"(discordant share {disc:.2f}; alpha 0.05/{len(conds)})")


def intervene_claims(run: Path) -> list[dict]:
    few = Claim("few_heads", "zeroing a few SHAP-selected heads raises accuracy more than "
                "zeroing as many random heads", "+13.6% at best; +112/2000 (string literals, "
                "3B)", MIN_GAIN)
    many = Claim("many_heads", "zeroing many SHAP-selected heads collapses accuracy, more than "
                 "as many random heads", "collapse beyond 100-400 heads, unlike random", -0.10,
                 direction=-1)
    path = run / "intervene" / "results.parquet"
    if not path.exists():
        return [_not_run(few, "not run: no intervene/results.parquet (apmae intervene)"),
                _not_run(many, "not run: no intervention")]
    r = pd.read_parquet(path)
    if "n_better_than_random" not in r:
        why = "results.parquet predates the discordant counts: rerun apmae intervene"
        return [_not_run(few, why), _not_run(many, why)]
    # per-task rows only (an aggregate row over tasks would be counted twice when pooling)
    r = r[r["task"].isin(TASKS) & r["group"].isin(["positive", "negative"])
          & (r["n_better_than_random"] >= 0)]
    total = int(r["n_heads"].max()) if len(r) else 0
    imp = run / "classify" / "head_importance.parquet"
    if imp.exists():
        total = len(pd.read_parquet(imp, columns=["task", "layer", "head"])
                    .drop_duplicates(["layer", "head"]))
    many_k = min(MANY_K, max(1, total // 3))
    out = []
    for c, sel, label in ((few, r[r["k"] <= FEW_K], f"k <= {FEW_K}"),
                          (many, r[(r["k"] >= many_k) & (r["k"] < total)],
                           f"{many_k} <= k < {total}")):
        tasks = [t for t in TASKS if t in set(sel["task"])]
        claims = [Claim(f"{c.claim}/{t}", f"{t}: {c.statement}", c.paper, c.paper_value,
                        c.direction) for t in tasks]
        per_task = [_ablation_row(cl, sel[sel["task"] == t], label)
                    for cl, t in zip(claims, tasks)]
        if len(per_task) > 1:   # Holm over tasks on top of Holm over conditions
            adj = holm([x["p_value"] for x in per_task])
            per_task = [_ablation_row(cl, sel[sel["task"] == t], label, float(p),
                                      f"; Holm over {len(tasks)} tasks")
                        for cl, t, p in zip(claims, tasks, adj)]
        agg = _ablation_row(Claim(f"{c.claim}/all", f"all tasks: {c.statement}", c.paper,
                                  c.paper_value, c.direction), sel, label)
        out += [agg, *per_task] if len(tasks) else [_not_run(c, f"no condition with {label}")]
    return out


# --------------------------------------------------------------------------- the table
def findings(run) -> pd.DataFrame:
    """Every claim's row for the run ``run`` (columns :data:`COLUMNS`)."""
    run = Path(run)
    clusters = cluster_claims(run)
    rows = (apmae_claims(run) + clusters[:2] + classify_claims(run) + intervene_claims(run)
            + clusters[2:])
    return pd.DataFrame(rows, columns=COLUMNS)


def summary(table: pd.DataFrame) -> str:
    """One sentence: how many claims got which verdict."""
    counts = table["verdict"].value_counts()
    return ", ".join(f"{int(counts.get(v, 0))} {v}" for v in VERDICTS) + \
        f" (of {len(table)} rows; tests at {ALPHA}, Holm where tested together)"
