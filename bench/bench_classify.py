"""Classification time per task: stratified 10-fold CatBoost (+ majority and one-hot logistic
regression baselines on the same folds) and out-of-fold SHAP, on synthetic cluster ids shaped
like the embedded model (30 layers x 9 heads) and StarCoder2-3B (30 x 24).

    python bench/bench_classify.py            # ~10 minutes on 2 busy cores
    python bench/bench_classify.py --quick    # smaller, for a smoke run

Synthetic data: each head has 4 clusters + noise (-1); 5 heads carry the label (their
cluster follows correctness 70% of the time).  Prints a table and writes
bench/results/classify.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from apmae_gpu.classification import CatBoostSettings, cross_validate, fit_catboost, head_importance
from apmae_gpu.runs import describe_machine, versions

OUT = Path(__file__).parent / "results"


def synthetic(n: int, n_layers: int, n_heads: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat([1, 0], n // 2)
    X = rng.integers(-1, 4, (n, n_layers * n_heads))
    informative = rng.choice(X.shape[1], 5, replace=False)
    for j in informative:
        follow = rng.random(n) < 0.7
        X[:, j] = np.where(follow, y, rng.integers(0, 2, n)) + 10
    return pd.DataFrame(X.astype(np.int32)), y, informative


def run_case(name, n, n_layers, n_heads, folds, settings, task_type="CPU"):
    X, y, informative = synthetic(n, n_layers, n_heads)
    t0 = time.perf_counter()
    cv = cross_validate(X, y, folds, settings, task_type, seed=0)
    seconds = time.perf_counter() - t0
    heads, _ = head_importance(cv.shap, X.to_numpy(), n_layers, n_heads)
    top = set(heads.sort_values("importance", ascending=False).index[:5])
    return dict(case=name, task_type=task_type, n=n, features=n_layers * n_heads, folds=folds,
                one_hot_max_size=settings.one_hot_max_size, iterations=settings.iterations,
                seconds_per_task=round(seconds, 1),
                seconds_catboost=round(cv.seconds["catboost"], 1),
                seconds_logreg=round(cv.seconds["logreg"], 2),
                mean_trees=round(float(np.mean(cv.best_iterations)) + 1, 1),
                accuracy_catboost=round(float(cv.accuracy["catboost"].mean()), 3),
                accuracy_logreg=round(float(cv.accuracy["logreg"].mean()), 3),
                informative_heads_in_top5=len(top & set(int(i) for i in informative)))


def ms_per_tree(n, n_layers, n_heads, settings, trees=20):
    X, y, _ = synthetic(n, n_layers, n_heads)
    s = CatBoostSettings(**{**settings.__dict__, "iterations": trees, "early_stopping_rounds": 0})
    t0 = time.perf_counter()
    model = fit_catboost(X, y, s, "CPU", 0)
    return round((time.perf_counter() - t0) / model.tree_count_ * 1000, 1)


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    ref = CatBoostSettings()
    fast = CatBoostSettings(one_hot_max_size=16)
    if args.quick:
        cases = [("smollm2 shape, one-hot 16", 100, 30, 9, 5, fast)]
        trees = []
    else:
        cases = [("smollm2 shape, one-hot 16", 200, 30, 9, 10, fast),
                 ("smollm2 shape, reference", 200, 30, 9, 10, ref),
                 ("smollm2 shape, one-hot 16", 1000, 30, 9, 10, fast),
                 ("SC2-3B shape, one-hot 16", 1000, 30, 24, 10, fast)]
        trees = [("smollm2 shape, reference", 1000, 30, 9, ref),
                 ("smollm2 shape, one-hot 16", 1000, 30, 9, fast),
                 ("SC2-3B shape, reference", 1000, 30, 24, ref),
                 ("SC2-3B shape, one-hot 16", 1000, 30, 24, fast)]
    from apmae_gpu.classification import resolve_task_type

    gpu = resolve_task_type("auto") == "GPU"
    if not gpu:
        print("GPU cases skipped: CatBoost sees no CUDA GPU", flush=True)
    rows = []
    for case in cases:
        for task_type in ("CPU", "GPU") if gpu else ("CPU",):
            rows.append(run_case(*case, task_type=task_type))
            print(rows[-1], flush=True)
    tree_rows = []
    for name, n, L, H, s in trees:
        tree_rows.append(dict(case=name, n=n, features=L * H, ms_per_tree=ms_per_tree(n, L, H, s)))
        print(tree_rows[-1], flush=True)
    result = dict(machine=describe_machine(), versions=versions(), cases=rows, per_tree=tree_rows,
                  notes="10-fold CV per task = CatBoost (early stopping 25 on a stratified 10% "
                        "of each training fold, at most 1000 trees, depth 6, LR 0.1) + majority + "
                        "one-hot logistic regression + out-of-fold SHAP. Machine shared with "
                        "other jobs: timings are upper bounds.")
    OUT.mkdir(parents=True, exist_ok=True)
    name = "classify_quick" if args.quick else "classify"
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    gpu_name = result["machine"].get("gpu")
    md = [f"# Classification time per task ({'CPU and GPU' if gpu else 'CPU'})", "",
          f"Machine: {result['machine'].get('cpu', '?')}, {result['machine']['cpu_count']} cores, "
          f"shared; {'GPU ' + gpu_name if gpu_name else 'no GPU'}.", "", markdown(rows), ""]
    if tree_rows:
        md += ["CatBoost time per tree (no early stopping, 20 trees):", "",
               markdown(tree_rows), ""]
    md += [result["notes"], ""]
    (OUT / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
