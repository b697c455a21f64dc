"""Classification time per task: stratified 10-fold CatBoost (+ majority and one-hot logistic
regression baselines on the same folds) and out-of-fold SHAP, on synthetic cluster ids shaped
like the embedded model (30 layers x 9 heads) and StarCoder2-3B (30 x 24).

    python bench/bench_classify.py            # ~10 minutes on 2 busy cores
    python bench/bench_classify.py --quick    # smaller, for a smoke run
    python bench/bench_classify.py --study    # the study's shape: n=300, 270 heads, 10
                                              # clusters per head, 10 folds; fast settings
    python bench/bench_classify.py --study --with-reference   # + the reference (~5 min)
    python bench/bench_classify.py --compare RUN [--tasks a,b]
        # a real run's data, same folds: reference vs fast settings (accuracy, out-of-fold
        # agreement, SHAP head ranking: Spearman and top-10 overlap); ~5 min per task for the
        # reference at n=300 on 2 cores

Synthetic data: each head has 4 (``--study``: 10) clusters + noise (-1); 5 heads carry the
label (their cluster follows correctness 70% of the time).  Prints a table and writes
bench/results/classify[_study|_compare].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

# bench/ and the repository on the path: the scripts run without installing the package
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from apmae_gpu import TASKS  # noqa: E402
from apmae_gpu.classification.classifier import (  # noqa: E402  # noqa: E402
    MISSING,
    CatBoostSettings,
    analysis_inferences,
    choose_folds,  # noqa: E402
    cluster_matrix,
    cross_validate,
    fit_catboost,
    head_importance,
    resolve_task_type,  # noqa: E402
)
from apmae_gpu.core.devices import describe_machine  # noqa: E402
from apmae_gpu.core.logs import versions  # noqa: E402

OUT = Path(__file__).parent / "results"


# The study's setting (configs/study.yaml): one-hot cluster ids, plain boosting, at most 300
# trees (early stopping 25 still decides); depth and learning rate as the reference.
FAST = CatBoostSettings(iterations=300, one_hot_max_size=16, boosting_type="Plain")


def synthetic(n: int, n_layers: int, n_heads: int, seed: int = 0, clusters: int = 4):
    rng = np.random.default_rng(seed)
    y = np.repeat([1, 0], n // 2)
    X = rng.integers(-1, clusters, (n, n_layers * n_heads))
    informative = rng.choice(X.shape[1], 5, replace=False)
    for j in informative:
        follow = rng.random(n) < 0.7
        X[:, j] = np.where(follow, y, rng.integers(0, 2, n)) + 10
    return pd.DataFrame(X.astype(np.int32)), y, informative


def run_case(name, n, n_layers, n_heads, folds, settings, clusters=4, task_type="CPU"):
    X, y, informative = synthetic(n, n_layers, n_heads, clusters=clusters)
    t0, c0 = time.perf_counter(), time.process_time()
    cv = cross_validate(X, y, folds, settings, task_type, seed=0)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    heads, _ = head_importance(cv.shap, X.to_numpy(), n_layers, n_heads)
    top = set(heads.sort_values("importance", ascending=False).index[:5])
    return dict(case=name, task_type=task_type, n=n, features=n_layers * n_heads, folds=folds,
                one_hot_max_size=settings.one_hot_max_size, iterations=settings.iterations,
                boosting=settings.boosting_type or "auto",
                seconds_per_task=round(seconds, 1),
                cpu_seconds=round(cpu, 1),   # all threads; ~2x the wall time on 2 idle cores
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


def run_tasks(run: Path, tasks: list[str] | None = None) -> dict:
    """Per task ``(X [n, L*H], y [n], n_layers, n_heads)`` exactly as ``apmae classify``
    builds them: labelled analysis inferences with maps and cluster rows, noise excluded."""

    inf = analysis_inferences(run)
    inf = inf[(inf["task"] != "noise") & inf["correct"].notna()
              & inf["has_maps"].astype(bool)].sort_values("inference_id")
    ids = inf["inference_id"].to_numpy(np.int64)
    X, L, H = cluster_matrix(run / "clusters.parquet", ids)
    keep = ~(X == MISSING).all(axis=1)
    out = {}
    for t in [t for t in TASKS if t in set(inf["task"])]:
        if tasks and t not in tasks:
            continue
        sel = (inf["task"].to_numpy() == t) & keep
        out[t] = (X[sel], inf["correct"].to_numpy()[sel].astype(int), L, H)
    return out


def compare_task(X: np.ndarray, y: np.ndarray, L: int, H: int, folds: int, seed: int,
                 settings: dict, top: int = 10) -> dict:
    """Reference vs fast settings on the same folds (same seed -> same StratifiedKFold)."""
    from scipy.stats import spearmanr


    used, _ = choose_folds(y, folds)
    frame = pd.DataFrame(X.astype(np.int32))
    res = {}
    for name, s in settings.items():
        t0 = time.perf_counter()
        cv = cross_validate(frame, y, used, s, "CPU", seed=seed)
        heads, _ = head_importance(cv.shap, X, L, H)
        res[name] = (cv, heads["importance"].to_numpy(), time.perf_counter() - t0)
    (ref, imp_r, sec_r), (fast, imp_f, sec_f) = res["reference"], res["fast"]
    d = fast.accuracy["catboost"] - ref.accuracy["catboost"]
    top_r, top_f = set(np.argsort(-imp_r)[:top]), set(np.argsort(-imp_f)[:top])
    agree = float(((ref.proba["catboost"] >= 0.5) == (fast.proba["catboost"] >= 0.5)).mean())
    return dict(n=len(y), folds=used,
                accuracy_reference=round(float(ref.accuracy["catboost"].mean()), 3),
                accuracy_fast=round(float(fast.accuracy["catboost"].mean()), 3),
                fold_diff_mean=round(float(d.mean()), 3),
                fold_diff_sd=round(float(d.std(ddof=1)), 3) if used > 1 else None,
                oof_agreement=round(agree, 3),
                importance_spearman=round(float(spearmanr(imp_r, imp_f)[0]), 3),
                **{f"top{top}_overlap": len(top_r & top_f)},
                seconds_reference=round(sec_r, 1), seconds_fast=round(sec_f, 1))


CV_NOTES = (
    "10-fold CV per task = CatBoost (early stopping 25 on a stratified 10% of each training "
    "fold, at most `iterations` trees, depth 6, LR 0.1) + majority + one-hot logistic "
    "regression + out-of-fold SHAP. Machine shared with other jobs: wall timings are upper "
    "bounds; cpu_seconds (CPU time of all threads) does not grow with the other jobs' load.")


COMPARE_NOTES = (
    "Same data and folds (StratifiedKFold with the same seed) for both settings. reference: "
    "CatBoost as the paper's notebook (1000 trees, depth 6, LR 0.1, early stopping 25, CatBoost's "
    "target statistics); fast: " + ", ".join(f"{k}={v}" for k, v in FAST.__dict__.items()
                                            if v != getattr(CatBoostSettings(), k)) +
    ". fold_diff: fast minus reference accuracy per fold; oof_agreement: share of inferences "
    "both predict alike; importance_spearman: rank correlation of the per-head SHAP importance "
    "(max difference of category mean SHAP, out-of-fold); top10_overlap: heads in both top 10s.")


def compare(run: Path, tasks: list[str] | None, folds: int, seed: int) -> list[dict]:
    settings = {"reference": CatBoostSettings(), "fast": FAST}
    rows = []
    for t, (X, y, L, H) in run_tasks(run, tasks).items():
        if min(np.bincount(y, minlength=2)) < 2:
            print(f"{t}: skipped (fewer than 2 inferences in a class)", flush=True)
            continue
        rows.append(dict(task=t, **compare_task(X, y, L, H, folds, seed, settings)))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--study", action="store_true", help="the study's shape (n=300, 270 heads)")
    ap.add_argument("--with-reference", action="store_true", help="--study: also the reference")
    ap.add_argument("--compare", type=Path, metavar="RUN", help="reference vs fast on a run")
    ap.add_argument("--tasks", help="--compare: comma list of tasks (default: all)")
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ref = CatBoostSettings()
    fast = CatBoostSettings(one_hot_max_size=16)
    trees: list = []
    if args.compare:
        rows = compare(args.compare, args.tasks.split(",") if args.tasks else None, args.folds,
                       args.seed)
        if not rows:
            raise SystemExit(f"{args.compare}: no task to compare")
        name, title = "classify_compare", f"Reference vs fast CatBoost settings on {args.compare}"
    else:
        if args.quick:
            cases = [("smollm2 shape, one-hot 16", 100, 30, 9, 5, fast)]
            name = "classify_quick"
        elif args.study:
            cases = [("study: one-hot 16", 300, 30, 9, 10, fast, 10),
                     ("study: one-hot 16, plain", 300, 30, 9, 10,
                      CatBoostSettings(one_hot_max_size=16, boosting_type="Plain"), 10),
                     ("study: fast (one-hot 16, plain, <=300 trees)", 300, 30, 9, 10, FAST, 10)]
            if args.with_reference:
                cases.append(("study: reference", 300, 30, 9, 10, ref, 10))
            name = "classify_study"
        else:
            cases = [("smollm2 shape, one-hot 16", 200, 30, 9, 10, fast),
                     ("smollm2 shape, reference", 200, 30, 9, 10, ref),
                     ("smollm2 shape, one-hot 16", 1000, 30, 9, 10, fast),
                     ("SC2-3B shape, one-hot 16", 1000, 30, 24, 10, fast)]
            trees = [("smollm2 shape, reference", 1000, 30, 9, ref),
                     ("smollm2 shape, one-hot 16", 1000, 30, 9, fast),
                     ("SC2-3B shape, reference", 1000, 30, 24, ref),
                     ("SC2-3B shape, one-hot 16", 1000, 30, 24, fast)]
            name = "classify"

        gpu = resolve_task_type("auto") == "GPU"
        if not gpu:
            print("GPU cases skipped: CatBoost sees no CUDA GPU", flush=True)
        title = f"Classification time per task ({'CPU and GPU' if gpu else 'CPU'})"
        rows = []
        for case in cases:
            for task_type in ("CPU", "GPU") if gpu else ("CPU",):
                rows.append(run_case(*case, task_type=task_type))
            print(rows[-1], flush=True)
    tree_rows = []
    for tname, n, L, H, s in trees:
        tree_rows.append(dict(case=tname, n=n, features=L * H,
                              ms_per_tree=ms_per_tree(n, L, H, s)))
        print(tree_rows[-1], flush=True)
    result = dict(machine=describe_machine(), versions=versions(), cases=rows, per_tree=tree_rows,
                  fast=FAST.__dict__,
                  notes=COMPARE_NOTES if args.compare else CV_NOTES)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    gpu_name = result["machine"].get("gpu")
    md = [f"# {title}", "",
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
