"""Findings against the paper: the verdict rule on synthetic tables (a clear effect is
reproduced, no effect with a large N is not, a small N is inconclusive with the N needed),
the power formulas against hand-computed values, and the table of a real pipeline run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apmae_gpu import findings as F


# --------------------------------------------------------------------------- the rule
def test_verdict_rule():
    # clear effect: rejects in the paper's direction
    assert F.verdict(0.2, 0.15, 0.25, 1e-6, paper_value=0.05) == "reproduced"
    # significant but the wrong way: the interval excludes the paper's effect
    assert F.verdict(-0.2, -0.25, -0.15, 1e-6, paper_value=0.05) == "not reproduced"
    # no effect, narrow interval short of the paper's effect
    assert F.verdict(0.0, -0.01, 0.01, 0.9, paper_value=0.05) == "not reproduced"
    # wide interval: cannot tell
    assert F.verdict(0.02, -0.3, 0.34, 0.8, paper_value=0.05) == "inconclusive"
    assert F.verdict(np.nan, np.nan, np.nan, np.nan, paper_value=0.05) == "inconclusive"
    # a claimed decrease (direction -1)
    assert F.verdict(-0.3, -0.4, -0.2, 1e-4, -0.1, direction=-1) == "reproduced"
    assert F.verdict(0.0, -0.02, 0.02, 0.7, -0.1, direction=-1) == "not reproduced"
    # a null other than 0 (ARI > 0.5)
    assert F.verdict(0.45, 0.4, 0.49, 0.01, 0.5, null=0.5) == "not reproduced"


def test_holm_and_power():
    np.testing.assert_allclose(F.holm([0.01, 0.04, 0.03, np.nan]), [0.03, 0.06, 0.06, np.nan])
    # one-sample proportion 0.55 vs 0.5: ((1.96*0.5 + 0.8416*0.4975) / 0.05)^2 = 782.5
    assert F.n_proportion(0.5, 0.55) == 783
    assert F.n_proportion(0.5, 0.65) == 85
    # (1.96 + 0.8416)^2 * (1 / 0.5)^2 = 31.4
    assert F.n_one_sample(0.5, 1.0) == 32
    # Connor: (1.96*sqrt(.2) + 0.8416*sqrt(.2 - .05^2))^2 / .05^2 = 625.5
    assert F.n_mcnemar(0.2, 0.05) == 626


# --------------------------------------------------------------------------- claim 4
def _predictions(tmp_path, n: int, acc: float, seed: int = 0, tasks=("identifiers",)):
    rng = np.random.default_rng(seed)
    frames = []
    for t in tasks:
        y = np.arange(n) % 2 == 0                         # balanced: majority is 50%
        right = rng.random(n) < acc
        frames.append(pd.DataFrame({"task": t, "inference_id": np.arange(n), "correct": y,
                                    "fold": np.arange(n) % 10,
                                    "p_catboost": np.where(right == y, 0.9, 0.1),
                                    "p_majority": np.full(n, 0.6), "p_logreg": 0.5}))
    (tmp_path / "classify").mkdir(parents=True)
    pd.concat(frames).to_parquet(tmp_path / "classify" / "predictions.parquet")
    return F.findings(tmp_path).set_index("claim")


@pytest.mark.parametrize("n, acc, expect", [(400, 0.75, "reproduced"),
                                            (20000, 0.5, "not reproduced"),
                                            (12, 0.6, "inconclusive")])
def test_predictable_verdicts(tmp_path, n, acc, expect):
    row = _predictions(tmp_path, n, acc).loc["predictable/identifiers"]
    assert row["verdict"] == expect, row.to_dict()
    assert row["n"] == n
    assert set(F.COLUMNS) <= set(row.index.tolist() + ["claim"])
    if expect == "inconclusive":
        assert "N~783 inferences per task" in row["detail"]


def test_predictable_holm_and_end_of_line(tmp_path):
    t = _predictions(tmp_path, 300, 0.8, tasks=("identifiers", "end_of_line"))
    rows = t.loc[["predictable/identifiers", "predictable/end_of_line"]]
    assert rows["test"].str.contains("Holm over 2 tasks").all()
    eol = t.loc["end_of_line_best"]
    assert eol["verdict"] in F.VERDICTS and "identifiers" in eol["detail"]
    # nothing else ran: every other claim says so
    assert t.loc["reconstruction", "detail"].startswith("not run")
    assert t.loc["few_heads", "verdict"] == "inconclusive"


# --------------------------------------------------------------------------- claims 6, 7
def _intervention(tmp_path, n: int, better: float, worse: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for task in ("identifiers", "end_of_line"):
        for g in ("positive", "negative", "zero", "random"):
            for k in (1, 5, 100, 150):
                b = rng.binomial(n, better if g == "positive" and k <= 5 else 0.02)
                w = rng.binomial(n, worse if g == "negative" and k >= 100 else 0.02)
                rows.append(dict(task=task, group=g, k=k, n=n, n_heads=k,
                                 n_better_than_random=-1 if g == "random" else b,
                                 n_worse_than_random=-1 if g == "random" else w))
    (tmp_path / "intervene").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(tmp_path / "intervene" / "results.parquet")
    return F.findings(tmp_path).set_index("claim")


def test_ablation_verdicts(tmp_path):
    t = _intervention(tmp_path / "a", 1000, better=0.2, worse=0.4)
    assert t.loc["few_heads/all", "verdict"] == "reproduced"
    assert "positive k=" in t.loc["few_heads/all", "detail"]
    assert t.loc["few_heads/end_of_line", "verdict"] == "reproduced"
    assert t.loc["many_heads/all", "verdict"] == "reproduced"
    assert t.loc["many_heads/all", "estimate"] < -0.3
    # no effect, large N: the interval excludes the paper's +5%
    t = _intervention(tmp_path / "b", 4000, better=0.02, worse=0.02)
    assert t.loc["few_heads/all", "verdict"] == "not reproduced"
    # small N: inconclusive, with the N needed
    t = _intervention(tmp_path / "c", 6, better=0.2, worse=0.02)
    row = t.loc["few_heads/identifiers"]
    assert row["verdict"] == "inconclusive" and "N~" in row["detail"]
    assert "Holm over 2 tasks" in row["test"]


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
        assert (f"CatBoost {cb.accuracy_mean:.3f} [{cb.ci_low:.3f}, {cb.ci_high:.3f}]"
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
