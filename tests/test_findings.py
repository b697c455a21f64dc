"""Findings against the paper: the verdict rule on synthetic tables (a clear effect is
reproduced, no effect with a large N is not, a small N is inconclusive with the N needed),
the power formulas against hand-computed values, and the table of a real pipeline run."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from apmae_gpu.report import findings as F
from apmae_gpu.report import findings_stats as S


# --------------------------------------------------------------------------- the rule
def test_verdict_rule_has_four_symmetric_branches():
    v = F.verdict
    # significant, interval reaches the paper's 0.05
    assert v(0.2, 0.15, 0.25, 1e-6, paper_value=0.05) == "reproduced"
    # significant, interval wholly short of the paper's magnitude
    assert v(0.02, 0.01, 0.03, 1e-6, paper_value=0.05) == "weaker than the paper"
    # significant but the setting is not the paper's: at most weaker
    assert v(0.2, 0.15, 0.25, 1e-6, 0.05, comparable=False) == "weaker than the paper"
    # significant the other way (interval below the null): not reproduced
    assert v(-0.2, -0.25, -0.15, 1e-6, paper_value=0.05) == "not reproduced"
    # not significant, interval excludes the paper's effect
    assert v(0.0, -0.01, 0.01, 0.9, paper_value=0.05) == "not reproduced"
    # not significant, interval reaches the paper's effect: cannot tell
    assert v(0.02, -0.3, 0.34, 0.8, paper_value=0.05) == "inconclusive"
    assert v(np.nan, np.nan, np.nan, np.nan, paper_value=0.05) == "inconclusive"
    # no magnitude in the paper: significant is reproduced
    assert v(0.02, 0.01, 0.03, 1e-6, paper_value=np.nan) == "reproduced"
    # the same rule mirrored for a claimed decrease (direction -1)
    for est, lo, hi, p, expect in ((0.2, 0.15, 0.25, 1e-6, "reproduced"),
                                   (0.02, 0.01, 0.03, 1e-6, "weaker than the paper"),
                                   (0.0, -0.01, 0.01, 0.9, "not reproduced"),
                                   (-0.2, -0.25, -0.15, 1e-6, "not reproduced"),
                                   (0.02, -0.3, 0.34, 0.8, "inconclusive")):
        assert v(est, lo, hi, p, 0.05) == expect
        assert v(-est, -hi, -lo, p, -0.05, direction=-1) == expect
    # a null other than 0 (ARI > 0.5): significantly below it
    assert v(0.45, 0.4, 0.49, 0.01, 0.5, null=0.5) == "not reproduced"
    assert set(F.VERDICTS) == {"reproduced", "weaker than the paper", "not reproduced",
                               "inconclusive"}


def test_holm_and_power():
    np.testing.assert_allclose(F.holm([0.01, 0.04, 0.03, np.nan]), [0.03, 0.06, 0.06, np.nan])
    # (1.96 + 0.8416)^2 * (1 / 0.5)^2 = 31.4
    assert F.n_one_sample(0.5, 1.0) == 32
    # one-sided at 0.05 = two-sided at 0.1: (1.645 + 0.8416)^2 * 4 = 24.7
    assert F.n_one_sample(0.5, 1.0, alpha=0.1) == 25


# --------------------------------------------------------------------------- claim 4
def _write_predictions(tmp_path, n: int, ba: float, seed: int = 0, tasks=("identifiers",),
                       prior: float = 0.5, constant: bool = False):
    """Out-of-fold predictions whose sensitivity and specificity are both ``ba``."""
    rng = np.random.default_rng(seed)
    frames = []
    for t in tasks:
        y = rng.permutation(np.arange(n) < round(n * prior))
        right = rng.random(n) < ba
        pred = np.ones(n, bool) if constant else np.where(right, y, ~y)
        score = np.clip(np.where(pred, 0.75, 0.25) + rng.normal(0, 0.05, n), 0, 1)
        frames.append(pd.DataFrame({"task": t, "inference_id": np.arange(n), "correct": y,
                                    "fold": np.arange(n) % 10, "p_catboost": score,
                                    "p_majority": 0.4, "p_logreg": 0.5}))
    (tmp_path / "classify").mkdir(parents=True, exist_ok=True)
    pd.concat(frames).to_parquet(tmp_path / "classify" / "predictions.parquet")


def _predictions(tmp_path, n, ba, **kw):
    _write_predictions(tmp_path, n, ba, **kw)
    return F.findings(tmp_path).set_index("claim")


@pytest.mark.parametrize("n, ba, expect", [(400, 0.75, "reproduced"),
                                           (20000, 0.52, "weaker than the paper"),
                                           (20000, 0.5, "not reproduced"),
                                           (12, 0.6, "inconclusive")])
def test_predictable_verdicts(tmp_path, n, ba, expect):
    row = _predictions(tmp_path, n, ba).loc["predictable/identifiers"]
    assert row["verdict"] == expect, row.to_dict()
    assert row["n"] == n
    tp, fn, fp, tn = (int(x) for x in re.search(r"TP (\d+), FN (\d+), FP (\d+), TN (\d+)",
                                                row["detail"]).groups())
    assert tp + fn + fp + tn == n
    assert row["estimate"] == pytest.approx(0.5 * (tp / (tp + fn) + tn / (tn + fp)))
    assert row["ci_low"] < row["estimate"] < row["ci_high"]
    if expect == "inconclusive":
        assert re.search(r"N~\d+ inferences for 80% power at balanced accuracy 0.55",
                         row["detail"])


def test_majority_is_the_class_prior_and_imbalance_is_not_skill(tmp_path):
    # 80% correct, predictions independent of the labels: accuracy near 0.8 * p + ..., but
    # balanced accuracy 0.5 and never significant; the majority is 0.800 from the prior
    t = _predictions(tmp_path, 500, 0.5, prior=0.8)
    row = t.loc["predictable/identifiers"]
    assert "majority 0.800 (class prior)" in row["detail"]
    assert row["verdict"] in ("not reproduced", "inconclusive")


def test_one_class_everywhere_is_inconclusive(tmp_path):
    row = _predictions(tmp_path, 2000, 0.5, constant=True).loc["predictable/identifiers"]
    assert row["estimate"] == 0.5 and row["verdict"] == "inconclusive"
    assert "one class everywhere" in row["detail"]


def test_independent_labels_reproduce_at_most_the_nominal_rate(tmp_path):
    """Negative control: over 60 seeds x 3 tasks with labels independent of the
    predictions, per-task rows (Holm over 3) and the pooled row each reject at most at ~5%."""
    tasks = ("identifiers", "end_of_line", "random_masking")
    hits_task = hits_all = 0
    for seed in range(60):
        _write_predictions(tmp_path / str(seed), 150, 0.5, seed=seed, tasks=tasks)
        rows = F.classify_claims(tmp_path / str(seed))
        sig = [r for r in rows if r["claim"].startswith("predictable/")
               and r["verdict"] in ("reproduced", "weaker than the paper")]
        hits_all += any(r["claim"] == "predictable/all" for r in sig)
        hits_task += any(r["claim"] != "predictable/all" for r in sig)
    # binomial(60, 0.05): P(X > 8) < 0.01
    assert hits_all <= 8 and hits_task <= 8, (hits_all, hits_task)


def test_pooled_row_and_end_of_line(tmp_path):
    t = _predictions(tmp_path, 300, 0.62, tasks=("identifiers", "end_of_line"))
    rows = t.loc[["predictable/identifiers", "predictable/end_of_line"]]
    assert rows["test"].str.contains("Holm over 2 tasks").all()
    pooled = t.loc["predictable/all"]
    assert pooled["n"] == 600 and pooled["verdict"] == "reproduced"
    assert pooled["estimate"] == pytest.approx(rows["estimate"].mean())
    assert pooled["p_value"] < rows["p_value"].min()      # pooling gains power
    eol = t.loc["end_of_line_best"]
    assert eol["verdict"] in F.VERDICTS and "identifiers" in eol["detail"]
    # nothing else ran: every other claim says so
    assert t.loc["reconstruction", "detail"].startswith("not run")
    assert t.loc["few_heads", "verdict"] == "inconclusive"


def test_issue_confusion_matrix():
    """End of line in the old study: TP 58, FN 7, FP 22, TN 16."""
    assert S.balanced_accuracy(58, 7, 22, 16) == pytest.approx(0.657, abs=5e-4)
    assert S.fisher_p(58, 7, 22, 16) == pytest.approx(3.4e-4, rel=0.02)
    lo, hi = S.ba_interval(58, 7, 22, 16)
    assert lo == pytest.approx(0.57, abs=0.01) and hi == pytest.approx(0.74, abs=0.01)


# --------------------------------------------------------------------------- claims 6, 7
def _intervention(tmp_path, n: int, better: float, worse: float, seed: int = 0,
                  k_few: int = 20, k_many: int = 100):
    rng = np.random.default_rng(seed)
    rows = []
    for task in ("identifiers", "end_of_line"):
        for g in ("positive", "negative", "zero", "random"):
            for k in (5, 20, 100, 150):
                b = rng.binomial(n, better if g == "positive" and k == k_few else 0.02)
                w = rng.binomial(n, worse if g == "negative" and k == k_many else 0.02)
                rows.append(dict(task=task, group=g, k=k, n=n, n_heads=k,
                                 accuracy_after=0.5 + (b - w) / n if g != "random" else 0.5,
                                 n_better_than_random=-1 if g == "random" else b,
                                 n_worse_than_random=-1 if g == "random" else w))
    (tmp_path / "intervene").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(tmp_path / "intervene" / "results.parquet")
    return F.findings(tmp_path).set_index("claim")


def test_ablation_verdicts(tmp_path):
    t = _intervention(tmp_path / "a", 1000, better=0.2, worse=0.4)
    assert t.loc["few_heads/all", "verdict"] == "reproduced"
    assert "positive k=20" in t.loc["few_heads/all", "detail"]
    assert "with random heads" in t.loc["few_heads/all", "detail"]
    assert t.loc["few_heads/end_of_line", "verdict"] == "reproduced"
    assert t.loc["many_heads/all", "verdict"] == "reproduced"
    assert t.loc["many_heads/all", "estimate"] < -0.3
    # no effect, large N: the interval excludes the paper's +5%
    t = _intervention(tmp_path / "b", 4000, better=0.02, worse=0.02)
    assert t.loc["few_heads/all", "verdict"] == "not reproduced"
    assert t.loc["many_heads/all", "verdict"] == "not reproduced"
    # a planted small effect (+2 points on 8000 pairs): weaker than the paper
    t = _intervention(tmp_path / "d", 4000, better=0.06, worse=0.02)
    assert t.loc["few_heads/all", "verdict"] == "weaker than the paper"
    # small N: inconclusive, with the N needed
    t = _intervention(tmp_path / "c", 6, better=0.2, worse=0.02)
    row = t.loc["few_heads/identifiers"]
    assert row["verdict"] == "inconclusive" and "N~" in row["detail"]
    assert "Holm over 2 tasks" in row["test"]


def test_no_best_of_selection(tmp_path):
    # a strong effect at k = 5 only: the pre-registered k = 20 shows none
    t = _intervention(tmp_path, 2000, better=0.3, worse=0.02, k_few=5)
    assert t.loc["few_heads/all", "verdict"] == "not reproduced"
    assert "positive k=20" in t.loc["few_heads/all", "detail"]


def test_no_effect_is_never_reproduced(tmp_path):
    """Negative control: ablation with no effect at n = 100 per task over 30 seeds."""
    hits = 0
    for seed in range(30):
        t = _intervention(tmp_path / str(seed), 100, 0.02, 0.02, seed=seed)
        hits += t.loc[["few_heads/all", "many_heads/all"], "verdict"].isin(
            ["reproduced", "weaker than the paper"]).sum()
    assert hits <= 6, hits      # 60 tests at 5%: P(X > 6) < 0.05


def test_interventions_read_only_where_claim_4_holds(tmp_path):
    _write_predictions(tmp_path, 400, 0.8, tasks=("identifiers",))
    _write_predictions(tmp_path / "tmp", 400, 0.5, tasks=("end_of_line",), seed=3)
    both = pd.concat([pd.read_parquet(tmp_path / "classify" / "predictions.parquet"),
                      pd.read_parquet(tmp_path / "tmp" / "classify" / "predictions.parquet")])
    both.to_parquet(tmp_path / "classify" / "predictions.parquet")
    imp = tmp_path / "classify" / "head_importance.parquet"
    pd.DataFrame({"task": ["identifiers", "end_of_line"], "layer": 0, "head": 0,
                  "split_half_spearman": [0.8, 0.8]}).to_parquet(imp)
    t = _intervention(tmp_path, 1000, better=0.2, worse=0.4)
    assert t.loc["few_heads/identifiers", "verdict"] == "reproduced"
    row = t.loc["few_heads/end_of_line"]
    assert row["verdict"] == "inconclusive" and "claim 4 not established" in row["detail"]
    assert "1 tasks" in t.loc["few_heads/all", "test"]
    # an unstable ranking (split-half Spearman below classify.min_ranking_spearman = 0.5)
    pd.DataFrame({"task": ["identifiers"], "layer": 0, "head": 0,
                  "split_half_spearman": [0.3]}).to_parquet(imp)
    t = F.findings(tmp_path).set_index("claim")
    row = t.loc["few_heads/identifiers"]
    assert row["verdict"] == "inconclusive" and "Spearman 0.30 < 0.50" in row["detail"]
    assert t.loc["few_heads/all", "verdict"] == "inconclusive"
    imp.unlink()
    t = F.findings(tmp_path).set_index("claim")
    assert "not measured" in t.loc["few_heads/identifiers", "detail"]


# --------------------------------------------------------------------------- claim 1
def test_reconstruction_paired(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    base = rng.uniform(0.02, 0.04, n)
    maps = []
    for meth, mse in (("apmae", base * 0.7 + rng.normal(0, 1e-3, n)),
                      ("visible_mean", base), ("dataset_mean", base * 1.5)):
        maps.append(pd.DataFrame({"checkpoint_name": "run", "dataset_name": "run",
                                  "method": meth, "map_id": np.arange(n),
                                  "inference_id": np.arange(n) // 4, "layer": 0, "head": 0,
                                  "mse": mse, "mse_log": mse}))
    summ = pd.DataFrame({"checkpoint_name": "run", "dataset_name": "run", "method":
                         ["apmae", "visible_mean", "dataset_mean"],
                         "mse_mean": [m["mse"].mean() for m in maps],
                         "input_scaling": "log_minmax"})
    (tmp_path / "evaluate").mkdir()
    pd.concat(maps).to_parquet(tmp_path / "evaluate" / "evaluation_maps.parquet")
    summ.to_parquet(tmp_path / "evaluate" / "evaluation.parquet")
    t = F.findings(tmp_path).set_index("claim")
    row = t.loc["reconstruction"]
    assert row["verdict"] == "reproduced" and row["n"] == n // 4     # inferences, not maps
    assert row["estimate"] == pytest.approx(0.3, abs=0.01) and "visible_mean" in row["detail"]
    assert t.loc["log_scaling", "detail"].startswith("not run")


# --------------------------------------------------------------------------- a real run
def test_findings_of_a_pipeline_run(e2e_run):
    path = e2e_run / "report" / "findings.parquet"
    assert path.exists(), "apmae report did not write report/findings.parquet"
    t = pd.read_parquet(path)
    assert list(t.columns) == F.COLUMNS
    assert set(t["verdict"]) <= set(F.VERDICTS)
    ids = set(t["claim"])
    for c in ("reconstruction", "log_scaling", "clustered_share", "clusters_per_head",
              "end_of_line_best", "stability"):
        assert c in ids, c
    assert any(c.startswith("predictable/") for c in ids)
    assert any(c.startswith("few_heads/") for c in ids)
    assert any(c.startswith("many_heads/") for c in ids)
    # the table equals a fresh computation from the run's files
    pd.testing.assert_frame_equal(t, F.findings(e2e_run))
    # classify rows count the run's labelled inferences with maps
    pred = pd.read_parquet(e2e_run / "classify" / "predictions.parquet")
    metrics = pd.read_parquet(e2e_run / "classify" / "metrics.parquet").set_index(
        ["task", "method"])
    for task, g in pred.groupby("task"):
        row = t.set_index("claim").loc[f"predictable/{task}"]
        assert row["n"] == len(g)
        cb = metrics.loc[(task, "catboost")]
        assert (f"CatBoost accuracy {cb.accuracy_mean:.3f} [{cb.ci_low:.3f}, {cb.ci_high:.3f}]"
                in row["detail"])
    inconclusive = t[t["verdict"] == "inconclusive"]
    assert (inconclusive["detail"].str.len() > 0).all()


def test_paired_interval_never_collapses():
    est, lo, hi = F.paired_diff_ci(0, 0, 8)          # no discordant pair among 8
    assert est == 0 and lo < -0.15 and hi > 0.15
    est, lo, hi = F.paired_diff_ci(30, 10, 200)
    assert est == pytest.approx(0.1) and lo < 0.1 < hi and hi - lo < 0.15
    # small N without discordance: inconclusive, not "not reproduced"
    assert F.verdict(est, *F.paired_diff_ci(0, 0, 8)[1:], 1.0, 0.05) == "inconclusive"


def test_aggregate_rows_are_not_pooled_twice(tmp_path):
    t = _intervention(tmp_path, 50, better=0.2, worse=0.4).loc["few_heads/all"]
    path = tmp_path / "intervene" / "results.parquet"
    r = pd.read_parquet(path)
    total = r[r["task"] == "identifiers"].assign(task="all", n=9999, n_better_than_random=999)
    pd.concat([r, total]).to_parquet(path)
    again = F.findings(tmp_path).set_index("claim").loc["few_heads/all"]
    assert again["n"] == t["n"] and again["estimate"] == t["estimate"]


# --------------------------------------------------------------------------- claims 3, 8
def _clusters(tmp_path, n_heads: int, strength: float, seed: int = 0, ari: float = 0.85):
    """Cluster ids per head over 4 tasks x 60 inferences: with probability ``strength`` an
    inference's cluster is its task's, otherwise drawn at random (strength 0: no structure)."""
    rng = np.random.default_rng(seed)
    tasks = np.repeat(["identifiers", "end_of_line", "string_literals", "random_masking"], 60)
    heads, locs = [], []
    for h in range(n_heads):
        cl = np.where(rng.random(tasks.size) < strength, np.unique(tasks, return_inverse=True)[1],
                      rng.integers(-1, 4, tasks.size))
        f = pd.DataFrame({"layer": h // 10, "head": h % 10, "cluster": cl, "task": tasks,
                          "correct": "True"})
        locs.append(f.groupby(["layer", "head", "cluster", "task", "correct"]).size()
                    .rename("n").reset_index())
        heads.append(dict(layer=h // 10, head=h % 10, status="ok", n_clusters=4,
                          share_clustered=float((cl >= 0).mean())))
    d = tmp_path / "cluster"
    d.mkdir(parents=True)
    pd.DataFrame(heads).to_parquet(d / "heads.parquet")
    pd.concat(locs).to_parquet(d / "locations.parquet")
    pd.DataFrame({"layer": [h // 10 for h in range(n_heads)], "head": [h % 10 for h in
                  range(n_heads)], "seed": 1, "ari": rng.normal(ari, 0.02, n_heads)}).to_parquet(
        d / "stability_heads.parquet")
    return F.findings(tmp_path).set_index("claim")


def test_clusters_without_structure_are_not_reproduced(tmp_path):
    t = _clusters(tmp_path, 60, strength=0.0)
    row = t.loc["clustered_by_task"]
    assert row["verdict"] == "not reproduced", row.to_dict()
    assert row["ci_high"] < F.MIN_HEADS
    # the share of maps clustered is high (noise gives clusters), yet cannot pass
    assert t.loc["clustered_share", "estimate"] > 0.7
    assert t.loc["clustered_share", "verdict"] == "not reproduced"
    assert t.loc["clusters_per_head", "verdict"] == "not reproduced"
    # stable clusters of nothing: the ARI's own test would pass; the gate says why not
    assert t.loc["stability", "verdict"] == "not reproduced"
    assert "determinism" in t.loc["stability", "detail"]


def test_clusters_with_structure_are_at_most_weaker_than_the_paper(tmp_path):
    t = _clusters(tmp_path, 30, strength=0.3)
    row = t.loc["clustered_by_task"]
    assert row["verdict"] == "weaker than the paper" and row["estimate"] > 0.8
    assert "permutation chi-square" in row["test"]
    assert t.loc["clustered_share", "verdict"] == "weaker than the paper"
    assert t.loc["stability", "verdict"] == "reproduced"
    t = _clusters(tmp_path / "low", 30, strength=0.3, ari=0.3)
    assert t.loc["stability", "verdict"] == "not reproduced"


def test_chi2_permutation_p_against_exact_enumeration():
    a = np.array([0, 0, 0, 1, 1, 1, 1])
    b = np.array([0, 0, 1, 1, 1, 1, 0])
    chi, p = S.chi2_permutation_p(a, b, n_perm=20000, seed=1)
    import itertools

    from scipy import stats
    table = lambda bb: np.histogram2d(a, bb, bins=[2, 2])[0]
    ref = stats.chi2_contingency(table(b), correction=False)[0]
    assert chi == pytest.approx(ref)
    alls = [np.isin(np.arange(7), c).astype(int) for c in itertools.combinations(range(7), 4)]
    exact = np.mean([stats.chi2_contingency(table(x), correction=False)[0] >= ref - 1e-9
                     for x in alls])
    assert p == pytest.approx(exact, abs=0.015)       # Monte Carlo SE ~0.0035


# --------------------------------------------------------------------------- the page
def test_forest_scale_and_compact_table(tmp_path):
    from apmae_gpu.report.findings_figure import compact, forest, scaled

    _write_predictions(tmp_path, 400, 0.75, tasks=("identifiers", "end_of_line"))
    t = F.findings(tmp_path)
    s = scaled(t).set_index("claim")
    row = t.set_index("claim").loc["predictable/identifiers"]
    # 0 = the null (0.5), 1 = the paper's 0.55
    assert s.loc["predictable/identifiers", "x"] == pytest.approx((row.estimate - 0.5) / 0.05)
    assert s.loc["predictable/identifiers", "lo"] == pytest.approx((row.ci_low - 0.5) / 0.05)
    assert "reconstruction" not in s.index           # no estimate: not plotted
    fig = forest(t)
    assert len(fig.axes[0].get_yticklabels()) == len(s)
    short, notes = compact(t)
    assert len(short) == len(t) and list(short["claim"]) == list(t["claim"])
    # each test once: the two per-task rows share one footnote
    assert len(notes) == t.loc[t["test"] != "", "test"].nunique()
    per_task = short.set_index("claim").loc[["predictable/identifiers",
                                             "predictable/end_of_line"], "test"]
    assert per_task.nunique() == 1 and per_task.iloc[0].startswith("[")


def test_catboost_on_cluster_ids_without_signal_is_not_predictable():
    """Negative control through the real classifier: CatBoost cross-validated on random
    cluster ids with independent labels (30 seeds); the Fisher test of its out-of-fold
    predictions rejects at most at the nominal rate, a planted head is found every time."""
    from apmae_gpu.classification import classifier as C

    settings = C.CatBoostSettings(iterations=15, depth=3, learning_rate=0.3,
                                  early_stopping_rounds=0, thread_count=1)
    rejected, found = 0, 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        X = pd.DataFrame(rng.integers(0, 4, size=(60, 6)).astype(np.int32))
        y = rng.random(60) < 0.5
        pred = _oof(C, X, y, settings, seed)
        rejected += S.fisher_p(*S.confusion(y, pred)) < 0.05
        if seed < 5:
            X[0] = np.where(rng.random(60) < 0.85, y, ~y).astype(np.int32)
            found += S.fisher_p(*S.confusion(y, _oof(C, X, y, settings, seed))) < 0.05
    assert rejected <= 5, rejected           # binomial(30, 0.05): P(X > 5) < 0.02
    assert found == 5


def _oof(C, X: pd.DataFrame, y: np.ndarray, settings, seed: int) -> np.ndarray:
    """Out-of-fold predictions of CatBoost as ``classify`` fits it (3 stratified folds)."""
    from catboost import Pool
    from sklearn.model_selection import StratifiedKFold

    out = np.zeros(len(y), bool)
    for tr, te in StratifiedKFold(3, shuffle=True, random_state=seed).split(X, y):
        model = C.fit_catboost(X.iloc[tr], y[tr].astype(int), settings, "CPU", seed)
        pool = Pool(X.iloc[te], cat_features=list(range(X.shape[1])))
        out[te] = model.predict_proba(pool)[:, 1] >= 0.5
    return out
