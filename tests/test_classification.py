"""Classification: cluster matrix, SHAP head importance, CV statistics and the classify stage
on a seeded synthetic run in which a few heads' cluster ids really depend on correctness."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apmae_gpu.classification import classifier as C
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import read_manifest

N_LAYERS, N_HEADS = 3, 4
FAST = dict(iterations=40, early_stopping_rounds=10, thread_count=2, stability_refits=10,
            stability_top_k=1)


def write_cluster_run(run: Path, seed: int = 0) -> Path:
    """A run with inferences.parquet and clusters.parquet only.

    - identifiers: 40+40 with maps (+60 surplus, 12 correct); L1H2 shows cluster 0 when correct
      and cluster 1 when incorrect (90% of the time); every other head is random.
    - end_of_line: 30+30; L0H1 is cluster 2 for half of the incorrect ones, else noise (-1) or 0.
    - boolean_literals: 20 correct, 3 incorrect (fewer samples than folds).
    - string_literals: 20 correct only (one class).
    - noise: no correctness (never classified).
    """
    rng = np.random.default_rng(seed)
    plan = {"identifiers": (40, 40, 60, 12), "end_of_line": (30, 30, 0, 0),
            "boolean_literals": (20, 3, 0, 0), "string_literals": (20, 0, 0, 0)}
    inf_rows, cl_rows = [], []
    iid = 0
    for task, (n_ok, n_bad, n_surplus, n_surplus_ok) in plan.items():
        labels = [True] * n_ok + [False] * n_bad
        for correct in labels:
            clusters = rng.integers(-1, 3, size=(N_LAYERS, N_HEADS))
            if task == "identifiers":
                signal = correct if rng.random() < 0.9 else not correct
                clusters[1, 2] = 0 if signal else 1
            if task == "end_of_line":
                clusters[0, 1] = 2 if (not correct and rng.random() < 0.5) else rng.integers(-1, 1)
            inf_rows.append((iid, "analysis", task, correct, True))
            for layer in range(N_LAYERS):
                for head in range(N_HEADS):
                    cl_rows.append((iid, layer, head, int(clusters[layer, head])))
            iid += 1
        for s in range(n_surplus):
            inf_rows.append((iid, "analysis", task, s < n_surplus_ok, False))
            iid += 1
    for _ in range(10):
        inf_rows.append((iid, "analysis", "noise", None, True))
        cl_rows += [(iid, layer, head, 0) for layer in range(N_LAYERS) for head in range(N_HEADS)]
        iid += 1
    inf = pd.DataFrame(inf_rows, columns=["inference_id", "split", "task", "correct", "has_maps"])
    inf["correct"] = inf["correct"].astype("boolean")
    run.mkdir(parents=True, exist_ok=True)
    (run / "inferences.parquet").mkdir()
    inf.to_parquet(run / "inferences.parquet" / "part-000000.parquet", index=False)
    cl = pd.DataFrame(cl_rows, columns=["inference_id", "layer", "head", "cluster"]).astype(
        {"inference_id": "int64", "layer": "int16", "head": "int16", "cluster": "int32"})
    cl.to_parquet(run / "clusters.parquet", index=False, row_group_size=100)
    return run


@pytest.fixture(scope="module")
def classified(tmp_path_factory):
    run = write_cluster_run(tmp_path_factory.mktemp("classify") / "run")
    metrics = C.classify(run, folds=5, gpu="no", seed=0, **FAST)
    return run, metrics


# --------------------------------------------------------------------------- pieces
def test_cluster_matrix_matches_a_pivot(tmp_path):
    run = write_cluster_run(tmp_path / "run")
    cl = pd.read_parquet(run / "clusters.parquet")
    ids = np.array([5, 0, 3, 99999])        # unsorted, and one id without cluster rows
    cl = cl[~((cl["inference_id"] == 3) & (cl["layer"] == 2) & (cl["head"] == 1))]
    cl.to_parquet(run / "clusters.parquet", index=False, row_group_size=7)
    X, n_layers, n_heads = C.cluster_matrix(run / "clusters.parquet", ids)
    assert (n_layers, n_heads) == (N_LAYERS, N_HEADS)
    assert X.shape == (4, N_LAYERS * N_HEADS) and X.dtype == np.int16
    for row, iid in enumerate(ids[:3]):
        sub = cl[cl["inference_id"] == iid]
        expect = np.full(N_LAYERS * N_HEADS, C.MISSING)
        expect[sub["layer"].to_numpy() * N_HEADS + sub["head"].to_numpy()] = sub["cluster"]
        np.testing.assert_array_equal(X[row], expect)
    assert X[2, 2 * N_HEADS + 1] == C.MISSING
    assert (X[3] == C.MISSING).all()
    assert C.feature_names(2, 3) == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]


def test_head_importance_by_hand():
    # 2 heads (1 layer x 2). Head 0: categories 0 (shap 1, 3) and 5 (shap -2) -> means 2, -2.
    X = np.array([[0, 7], [0, 7], [5, 7]])
    shap = np.array([[1.0, 0.0], [3.0, 0.0], [-2.0, 0.0]])
    heads, cats = C.head_importance(shap, X, 1, 2)
    h0 = heads.iloc[0]
    assert h0.importance == pytest.approx(4.0)
    assert h0.mean_shap == pytest.approx(2 / 3)
    assert h0.extreme_shap == pytest.approx(2.0)      # |2| == |-2|: the first category
    assert h0.mean_abs_shap == pytest.approx(2.0)
    assert h0.n_categories == 2
    assert heads.iloc[1].importance == 0 and heads.iloc[1].n_categories == 1
    c0 = cats[(cats["head"] == 0)].set_index("cluster")
    assert c0.loc[0, "n"] == 2 and c0.loc[0, "mean_shap"] == pytest.approx(2.0)
    assert c0.loc[5, "mean_shap"] == pytest.approx(-2.0)


def test_statistics():
    mean, lo, hi = C.t_interval(np.array([0.5, 0.6, 0.7]))
    half = 4.302652729911275 * 0.1 / np.sqrt(3)      # t(0.975, df=2) from any t table
    assert mean == pytest.approx(0.6) and lo == pytest.approx(0.6 - half)
    assert hi == pytest.approx(0.6 + half)
    lo, hi = C.wilson_interval(40, 100)
    assert lo < 0.4 < hi and lo == pytest.approx(0.3094, abs=1e-3)
    assert C.choose_folds(np.array([1] * 20 + [0] * 20), 10) == (10, None)
    folds, note = C.choose_folds(np.array([1] * 20 + [0] * 3), 10)
    assert folds == 3 and "3 folds instead of 10" in note
    folds, note = C.choose_folds(np.array([1] * 20), 10)
    assert folds == 0 and "0 incorrect" in note


def test_task_type():
    assert C.resolve_task_type("no") == "CPU"
    import torch

    if not torch.cuda.is_available():
        assert C.resolve_task_type("auto") == "CPU"
        with pytest.raises(ApmaeError, match="no CUDA GPU"):
            C.resolve_task_type("yes")
    with pytest.raises(ApmaeError, match="auto, yes or no"):
        C.resolve_task_type("maybe")


# --------------------------------------------------------------------------- the stage
def test_classify_finds_the_informative_head(classified):
    run, metrics = classified
    m = metrics.set_index(["task", "method"])
    assert set(metrics["task"]) == {"identifiers", "end_of_line", "boolean_literals"}
    assert list(metrics["method"].unique()) == ["catboost", "majority", "logreg", "target_model"]
    cb = m.loc[("identifiers", "catboost")]
    assert cb.accuracy_mean > 0.8 and cb.roc_auc_mean > 0.8 and cb.n_folds == 5
    assert cb.ci_low < cb.accuracy_mean < cb.ci_high and cb.n_samples == 80
    maj = m.loc[("identifiers", "majority")]
    assert maj.accuracy_mean == pytest.approx(0.5) and maj.roc_auc_mean == pytest.approx(0.5)
    assert m.loc[("identifiers", "logreg"), "accuracy_mean"] > 0.75
    # Target model: ALL analysis attempts (40 + 12 correct of 140), not the balanced set.
    tm = m.loc[("identifiers", "target_model")]
    assert tm.accuracy_mean == pytest.approx(52 / 140) and tm.n_samples == 140
    assert tm.ci_low < 52 / 140 < tm.ci_high
    assert m.loc[("boolean_literals", "catboost"), "n_folds"] == 3

    imp = pd.read_parquet(run / "classify" / "head_importance.parquet")
    assert list(imp.columns[:5]) == ["task", "layer", "head", "importance", "mean_shap"]
    assert len(imp) == 3 * N_LAYERS * N_HEADS
    ident = imp[imp["task"] == "identifiers"].sort_values("importance", ascending=False)
    assert (ident.iloc[0]["layer"], ident.iloc[0]["head"]) == (1, 2)
    assert ident.iloc[0].importance > 3 * ident.iloc[1].importance
    eol = imp[imp["task"] == "end_of_line"].sort_values("importance", ascending=False)
    assert (eol.iloc[0]["layer"], eol.iloc[0]["head"]) == (0, 1)
    # Stability selection: the informative head tops both rankings in (nearly) every
    # half-sample refit; the others rarely do; the task's split-half Spearman is recorded.
    top = ident.set_index(["layer", "head"])
    assert top.loc[(1, 2), "p_top_pos"] >= 0.9 and top.loc[(1, 2), "p_top_neg"] >= 0.9
    assert top.drop(index=(1, 2))["p_top_pos"].max() <= 0.1
    assert top.loc[(1, 2), "rank_pos_lo"] == 1 and (top["rank_pos_lo"] <= top["rank_pos_hi"]).all()
    for t, g in imp[imp["task"] != "boolean_literals"].groupby("task"):
        assert g["p_top_pos"].sum() == pytest.approx(1.0)        # top 1 of each refit
        assert g["split_half_spearman"].nunique() == 1
    # 3 incorrect: a half-sample cannot hold 2 of each class, the columns are NaN
    assert imp[imp["task"] == "boolean_literals"]["p_top_pos"].isna().all()
    # Category SHAP of the informative head: cluster 0 (correct) pushes up, 1 pushes down.
    cats = pd.read_parquet(run / "classify" / "category_shap.parquet")
    c = cats[(cats.task == "identifiers") & (cats.layer == 1) & (cats["head"] == 2)]
    c = c.set_index("cluster")["mean_shap"]
    assert c.loc[0] > 0 > c.loc[1]
    assert c.loc[0] - c.loc[1] == pytest.approx(ident.iloc[0].importance)
    preds = pd.read_parquet(run / "classify" / "predictions.parquet")
    assert len(preds) == 80 + 60 + 23 and preds["p_catboost"].between(0, 1).all()
    assert set(preds[preds.task == "identifiers"]["fold"]) == set(range(5))


def test_classify_outputs_and_manifest(classified):
    run, _ = classified
    out = run / "classify"
    for name in ("heatmaps/identifiers.png", "heatmaps/end_of_line.png", "importance.png",
                 "accuracy.png", "stability.png"):
        assert (out / name).stat().st_size > 1000, name
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    section = read_manifest(run)["classify"]
    assert section["task_type"] == "CPU" and section["catboost"]["iterations"] == 40
    assert section["tasks"]["boolean_literals"]["folds"] == 3
    assert section["stability"] == {"refits": 10, "top_k": 1, "min_ranking_spearman": 0.5}
    assert -1 <= section["tasks"]["identifiers"]["split_half_spearman"] <= 1
    assert "3 folds instead of 5" in section["tasks"]["boolean_literals"]["note"]
    assert "string_literals" in section["skipped"]
    assert "0 incorrect" in section["skipped"]["string_literals"]
    assert "noise" not in section["tasks"] and "noise" not in section["skipped"]


def test_classify_rerun_keeps_finished_tasks(classified, tmp_path):
    import shutil

    src, first = classified
    run = tmp_path / "run"
    shutil.copytree(src, run)
    again = C.classify(run, folds=5, gpu="no", seed=0, **FAST)
    assert {r["status"] for r in read_manifest(run)["classify"]["tasks"].values()} == {"cached"}
    pd.testing.assert_frame_equal(first.drop(columns="seconds"), again.drop(columns="seconds"))
    # Other settings: redone.
    C.classify(run, folds=4, gpu="no", seed=0, tasks=["end_of_line"], **FAST)
    section = read_manifest(run)["classify"]
    assert section["tasks"]["end_of_line"]["status"] == "done"
    assert json.loads((run / "classify/tasks/end_of_line/result.json").read_text())[
        "config"]["folds"] == 4


def test_classify_cli_and_bad_input(tmp_path, capsys):
    from apmae_gpu.cli import main

    run = write_cluster_run(tmp_path / "run")
    with pytest.raises(SystemExit) as exc:
        main(["classify", str(run), "--gpu", "no", "--tasks", "end_of_line,noise"])
    assert exc.value.code == 2
    assert "error: --tasks: no labelled analysis inferences for noise" in capsys.readouterr().err
    main(["classify", str(run), "--gpu", "no", "--folds", "3", "--iterations", "20",
          "--tasks", "end_of_line,string_literals", "--shap-on", "full",
          "--one-hot-max-size", "8", "--boosting-type", "Plain"])
    assert "end_of_line" in capsys.readouterr().out
    section = read_manifest(run)["classify"]
    assert section["shap"].endswith("full-data model") and section["folds"] == 3
    assert section["catboost"]["one_hot_max_size"] == 8
    assert section["catboost"]["boosting_type"] == "Plain"
    with pytest.raises(ApmaeError, match=re.escape("classify: boosting_type: input should be "
                                                   "'Plain' or 'Ordered' (got 'Fast')")):
        C.classify(run, gpu="no", boosting_type="Fast")
    assert list(section["tasks"]) == ["end_of_line"] and list(section["skipped"]) == [
        "string_literals"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ApmaeError, match="no inferences.parquet"):
        C.classify(empty, gpu="no")
    (run / "clusters.parquet").unlink()
    with pytest.raises(ApmaeError, match="run `apmae cluster` first"):
        C.classify(run, gpu="no")


def test_all_tasks_bad_is_one_clear_error(tmp_path):
    run = write_cluster_run(tmp_path / "run")
    with pytest.raises(ApmaeError, match="no task could be classified: string_literals: needs"):
        C.classify(run, gpu="no", tasks=["string_literals"], **FAST)
    assert read_manifest(run)["classify"]["status"] == "failed"
    # A task whose heads never vary: CatBoost has nothing to split on.
    cl = pd.read_parquet(run / "clusters.parquet")
    cl["cluster"] = 0
    cl.to_parquet(run / "clusters.parquet", index=False)
    with pytest.raises(ApmaeError, match="end_of_line: every head has the same cluster"):
        C.classify(run, gpu="no", tasks=["end_of_line"], **FAST)


def test_shap_split_is_the_references_90_10():
    """shap_on="split": one model on a stratified 90%, SHAP of the other 10% only; the
    informative head still ranks first."""
    rng = np.random.default_rng(0)
    n = 300
    X = pd.DataFrame(rng.integers(0, 3, size=(n, 4)), columns=["a", "b", "c", "d"])
    y = (X["b"].to_numpy() == 1).astype(int)
    settings = C.CatBoostSettings(iterations=30, depth=2, learning_rate=0.3,
                                  early_stopping_rounds=0, eval_fraction=0.1)
    cv = C.cross_validate(X, y, 3, settings, seed=1, shap_on="split")
    rows = cv.shap_rows
    assert len(rows) == 30 and len(np.unique(rows)) == 30
    assert abs(y[rows].mean() - y.mean()) < 0.05                # stratified
    outside = np.setdiff1d(np.arange(n), rows)
    assert (cv.shap[outside] == 0).all() and (cv.shap[rows] != 0).any()
    assert np.abs(cv.shap[rows]).mean(0).argmax() == 1
    oof = C.cross_validate(X, y, 3, settings, seed=1)
    assert oof.shap_rows is None and (oof.shap != 0).any(1).mean() > 0.9
