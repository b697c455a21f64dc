"""Classification: predict whether the target LLM was right from the pattern every head showed.

For each task (noise excluded) the features of one inference are the cluster ids of all its
heads (``clusters.parquet``; one categorical column per head, named ``L{layer}H{head}``), the
label is ``correct``.  CatBoost is cross-validated with stratified k folds beside two
baselines on the same folds (majority class, logistic regression on one-hot cluster ids), and
the target model's own accuracy on the task is reported with them (the paper's Fig. 4).

SHAP: CatBoost's own ``get_feature_importance(type="ShapValues")`` (exact TreeSHAP on its
oblivious trees, in log-odds units; shap's ``TreeExplainer`` calls the same code for CatBoost
models).  By default every inference gets its SHAP values from the fold model that did *not*
train on it (``shap_on="oof"``); ``shap_on="full"`` explains one extra model fitted on all
data instead, and ``shap_on="split"`` is the reference's: one model fitted on a stratified 90%
of the inferences explains the other 10% (the per-head summaries then use those 10% only).
Per head:

``importance``
    The largest difference between the mean SHAP values of the head's categories (the
    paper's Figs. 5-6): high when one pattern in this head pushes towards "correct" and
    another towards "incorrect".
``mean_shap``
    The head's mean signed SHAP value over all inferences (the paper's appendix A;
    ``apmae intervene --rank-by mean_shap`` ranks heads by it, the default ``shap_parts``
    ranks them by ``mean_shap_pos`` / ``mean_shap_neg`` as the reference does).  Note: TreeSHAP values of a feature average to almost
    zero over the data a model was fitted to, so for informative heads this sign is weak;
    ``extreme_shap`` (the signed mean SHAP of the head's most extreme category) is stored
    beside it and ``apmae intervene --rank-by extreme_shap`` can rank by it.

Outputs (``RUN/classify/``): ``metrics.parquet``, ``head_importance.parquet``,
``category_shap.parquet`` (mean SHAP per head and cluster), ``predictions.parquet``
(out-of-fold probabilities), ``heatmaps/<task>.png``, ``importance.png`` (all tasks) and
``accuracy.png``.  Each task's results are kept under ``tasks/<task>/`` with a fingerprint of
its data and settings, so a rerun after a kill redoes only the unfinished tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from rich import box
from rich.console import Console
from rich.table import Table
from scipy import stats
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder

from apmae_gpu import TASKS, task_rank
from apmae_gpu.classification.stability import plot_stability, stability_selection
from apmae_gpu.core import layout, tables
from apmae_gpu.core.config import ClassifyConfig, section
from apmae_gpu.core.devices import free_torch_cuda_cache
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.figures import pyplot, save_figure
from apmae_gpu.core.frames import load_frame, update_manifest, write_json, write_parquet

log = logging.getLogger("apmae_gpu.classification.classifier")

MISSING = -2   # a head without a cluster row for this inference (noise is -1, a real category)
METHODS = ("catboost", "majority", "logreg", "target_model")


_PAPER = ClassifyConfig()   # the classify section's defaults: the reference notebook's


@dataclass(frozen=True)
class CatBoostSettings:
    """The CatBoost settings of one fit: the ``classify`` section's (defaults from
    :class:`~apmae_gpu.core.config.ClassifyConfig`, see :meth:`from_config`) plus the loss and the
    thread count."""

    iterations: int = _PAPER.iterations
    depth: int = _PAPER.depth
    learning_rate: float = _PAPER.learning_rate
    loss_function: str = "Logloss"
    early_stopping_rounds: int = _PAPER.early_stopping_rounds
    eval_fraction: float = _PAPER.eval_fraction   # of each training fold, for early stopping
    thread_count: int = -1
    one_hot_max_size: int | None = _PAPER.one_hot_max_size
    max_ctr_complexity: int | None = _PAPER.max_ctr_complexity
    boosting_type: str | None = _PAPER.boosting_type

    @classmethod
    def from_config(cls, cfg: ClassifyConfig, thread_count: int = -1) -> CatBoostSettings:
        return cls(iterations=cfg.iterations, depth=cfg.depth, learning_rate=cfg.learning_rate,
                   early_stopping_rounds=cfg.early_stopping_rounds,
                   eval_fraction=cfg.eval_fraction, thread_count=thread_count,
                   one_hot_max_size=cfg.one_hot_max_size,
                   max_ctr_complexity=cfg.max_ctr_complexity, boosting_type=cfg.boosting_type)


@dataclass
class CVResult:
    """Cross-validation of one task; per-fold arrays are ``[n_folds]``, per-sample ``[n]``."""

    folds: int
    accuracy: dict[str, np.ndarray]
    roc_auc: dict[str, np.ndarray]
    seconds: dict[str, float]
    proba: dict[str, np.ndarray]          # out-of-fold P(correct) per method, [n]
    fold_of: np.ndarray                   # [n] fold each sample was tested in
    shap: np.ndarray                      # [n, F] SHAP values (log-odds)
    best_iterations: list[int] = field(default_factory=list)
    shap_rows: np.ndarray | None = None   # rows the SHAP values explain (None: all)


# --------------------------------------------------------------------------- data
def feature_names(n_layers: int, n_heads: int) -> list[str]:
    """``L{layer}H{head}`` for every head, layer-major (column ``layer * n_heads + head``)."""
    return [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]


def analysis_inferences(run: Path) -> pd.DataFrame:
    """All analysis-split inferences of the run (with and without maps)."""
    path = run / layout.INFERENCES_PARQUET
    if not path.exists():
        raise ApmaeError(f"{run}: no inferences.parquet (run `apmae capture` first)")
    inf = load_frame(path, prefer="pandas",
                     columns=["inference_id", "split", "task", "correct", "has_maps"])
    return inf[inf["split"] == "analysis"].reset_index(drop=True)


def cluster_matrix(path: Path, inference_ids: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Cluster id of every head for the given inferences, streamed from ``clusters.parquet``.

    Returns ``X`` int16 ``[len(inference_ids), n_layers * n_heads]`` (column
    ``layer * n_heads + head``; ``MISSING`` where a head has no row), ``n_layers``,
    ``n_heads``.  Rows of other inferences are ignored.
    """
    if not path.exists():
        raise ApmaeError(f"{path.parent}: no clusters.parquet (run `apmae cluster` first)")
    tables.require(path, layout.CLUSTERS_PARQUET, f"rerun `apmae cluster {path.parent} --restart`")
    dataset = ds.dataset(path, format="parquet")
    n_layers = n_heads = 0
    for batch in dataset.to_batches(columns=["layer", "head"]):
        if batch.num_rows:
            n_layers = max(n_layers, int(pc.max(batch["layer"]).as_py()) + 1)
            n_heads = max(n_heads, int(pc.max(batch["head"]).as_py()) + 1)
    if n_layers == 0:
        raise ApmaeError(f"{path} is empty")
    ids = np.asarray(inference_ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    X = np.full((ids.size, n_layers * n_heads), MISSING, dtype=np.int16)
    for batch in dataset.to_batches(columns=["inference_id", "layer", "head", "cluster"]):
        inf = batch["inference_id"].to_numpy(zero_copy_only=False).astype(np.int64)
        pos = np.searchsorted(sorted_ids, inf)
        pos = np.minimum(pos, max(ids.size - 1, 0))
        hit = (sorted_ids[pos] == inf) if ids.size else np.zeros(inf.size, bool)
        if not hit.any():
            continue
        rows = order[pos[hit]]
        cols = (batch["layer"].to_numpy(zero_copy_only=False).astype(np.int64)[hit] * n_heads
                + batch["head"].to_numpy(zero_copy_only=False).astype(np.int64)[hit])
        X[rows, cols] = batch["cluster"].to_numpy(zero_copy_only=False)[hit]
    return X, n_layers, n_heads


# --------------------------------------------------------------------------- statistics
def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided t confidence interval over folds (the paper's 95% CI).  Folds share
    training data, so this interval is narrower than the true uncertainty."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def choose_folds(y: np.ndarray, folds: int) -> tuple[int, str | None]:
    """Folds to use for ``y`` ([n] 0/1): ``folds``, fewer when a class is smaller (with a
    note), or 0 when a class has fewer than 2 samples (the task is skipped)."""
    counts = np.bincount(np.asarray(y, dtype=int), minlength=2)
    smallest = int(counts.min())
    if smallest < 2:
        return 0, (f"needs at least 2 correct and 2 incorrect inferences, has "
                   f"{int(counts[1])} correct and {int(counts[0])} incorrect")
    if smallest < folds:
        return smallest, (f"only {smallest} inferences in the smaller class: {smallest} folds "
                          f"instead of {folds}")
    return folds, None


# --------------------------------------------------------------------------- models
# CatBoost's GPU training pays off from tens of thousands of rows (its docs); a task has
# 10,000 at the paper's scale, so ``--gpu auto`` stays on the CPU below this.
CATBOOST_GPU_MIN_ROWS = 50_000
# CatBoost takes 95% of its GPU's memory by default; other stages (or workers) share it.
CATBOOST_GPU_RAM_PART = 0.5


def resolve_task_type(gpu: str, rows: int | None = None, deterministic: bool = False) -> str:
    """``--gpu auto|yes|no`` -> CatBoost ``task_type`` (``GPU`` or ``CPU``): ``auto`` takes
    the GPU only for at least :data:`CATBOOST_GPU_MIN_ROWS` rows (``rows``: the largest
    task's) and never with ``deterministic`` (CatBoost's GPU training is not)."""
    if gpu not in ("auto", "yes", "no"):
        raise ApmaeError(f"--gpu {gpu}: expected auto, yes or no")
    if gpu == "yes" and deterministic:
        raise ApmaeError("--gpu yes with --deterministic: CatBoost's GPU training is not "
                         "deterministic; use --gpu auto or no")
    small = gpu == "auto" and rows is not None and rows < CATBOOST_GPU_MIN_ROWS
    if gpu == "no" or deterministic or small:
        return "CPU"
    n = 0
    if torch.cuda.is_available():  # ask CatBoost only where a GPU may exist (it is loud)
        try:
            from catboost.utils import get_gpu_device_count

            n = int(get_gpu_device_count())
        except ImportError:  # pragma: no cover
            pass
    if n == 0 and gpu == "yes":
        raise ApmaeError("--gpu yes: CatBoost sees no CUDA GPU")
    return "GPU" if n else "CPU"


def _catboost(settings: CatBoostSettings, task_type: str, seed: int, early_stop: bool):
    from catboost import CatBoostClassifier

    kwargs = dict(iterations=settings.iterations, depth=settings.depth,
                  learning_rate=settings.learning_rate, loss_function=settings.loss_function,
                  random_seed=seed, task_type=task_type, verbose=False,
                  allow_writing_files=False)
    for name in ("one_hot_max_size", "max_ctr_complexity", "boosting_type"):
        if getattr(settings, name) is not None:
            kwargs[name] = getattr(settings, name)
    if task_type == "CPU":
        kwargs["thread_count"] = settings.thread_count
    else:   # this process's GPU (torchrun / dask-cuda set it), not always device 0
        kwargs.update(devices=str(torch.cuda.current_device()),
                      gpu_ram_part=CATBOOST_GPU_RAM_PART)
    if early_stop and settings.early_stopping_rounds > 0:
        kwargs.update(early_stopping_rounds=settings.early_stopping_rounds, use_best_model=True)
    return CatBoostClassifier(**kwargs)


def fit_catboost(X: pd.DataFrame, y: np.ndarray, settings: CatBoostSettings, task_type: str,
                 seed: int):
    """Fit CatBoost on ``X`` ([n, F] categorical ints) with early stopping on a stratified
    ``eval_fraction`` of it (skipped when too small to hold both classes)."""
    from catboost import Pool

    cat = list(range(X.shape[1]))
    n_eval = int(round(settings.eval_fraction * len(y)))
    counts = np.bincount(y, minlength=2)
    early = (settings.early_stopping_rounds > 0 and n_eval >= 2 and len(y) - n_eval >= 2
             and counts.min() >= 2)
    model = _catboost(settings, task_type, seed, early)
    if early:
        tr, ev = train_test_split(np.arange(len(y)), test_size=n_eval, stratify=y,
                                  random_state=seed)
        model.fit(Pool(X.iloc[tr], y[tr], cat_features=cat),
                  eval_set=Pool(X.iloc[ev], y[ev], cat_features=cat))
    else:
        model.fit(Pool(X, y, cat_features=cat))
    return model


def _finite(v) -> float | None:
    return float(v) if np.isfinite(v) else None


def _shap_fitter(settings: CatBoostSettings, task_type: str, seed: int):
    """``fit_shap(X, y)`` for :func:`~apmae_gpu.classification.stability.stability_selection`: CatBoost
    fit on ``X`` and its SHAP values there."""
    from catboost import Pool

    def fit_shap(X: pd.DataFrame, y: np.ndarray) -> np.ndarray:
        model = fit_catboost(X, y, settings, task_type, seed)
        F = X.shape[1]
        return model.get_feature_importance(Pool(X, cat_features=list(range(F))),
                                            type="ShapValues")[:, :F]

    return fit_shap


def _logreg(seed: int):
    return make_pipeline(OneHotEncoder(handle_unknown="ignore"),
                         LogisticRegression(max_iter=2000, random_state=seed))


def cross_validate(X: pd.DataFrame, y: np.ndarray, folds: int, settings: CatBoostSettings,
                   task_type: str = "CPU", seed: int = 0, shap_on: str = "oof") -> CVResult:
    """Stratified k-fold CV of CatBoost, majority class and one-hot logistic regression on the
    same folds.  ``X``: [n, F] categorical ints (one column per head); ``y``: [n] 0/1."""
    from catboost import Pool

    y = np.asarray(y, dtype=int)
    n, F = X.shape
    Xn = X.to_numpy()          # the baselines take arrays (sklearn encodes them faster)
    methods = ("catboost", "majority", "logreg")
    acc = {m: np.zeros(folds) for m in methods}
    auc = {m: np.zeros(folds) for m in methods}
    proba = {m: np.zeros(n) for m in methods}
    secs = {m: 0.0 for m in methods}
    fold_of = np.zeros(n, dtype=np.int16)
    shap = np.zeros((n, F))
    best: list[int] = []
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for f, (tr, te) in enumerate(skf.split(np.zeros(n), y)):
        fold_of[te] = f
        t0 = time.perf_counter()
        cb = fit_catboost(X.iloc[tr], y[tr], settings, task_type, seed + f)
        test_pool = Pool(X.iloc[te], cat_features=list(range(F)))
        proba["catboost"][te] = cb.predict_proba(test_pool)[:, 1]
        if shap_on == "oof":
            shap[te] = cb.get_feature_importance(test_pool, type="ShapValues")[:, :F]
        best.append(int(cb.get_best_iteration() if cb.get_best_iteration() is not None
                        else cb.tree_count_ - 1))
        secs["catboost"] += time.perf_counter() - t0
        for name, est in (("majority", DummyClassifier(strategy="most_frequent")),
                          ("logreg", _logreg(seed))):
            t0 = time.perf_counter()
            est.fit(Xn[tr], y[tr])
            proba[name][te] = est.predict_proba(Xn[te])[:, 1]
            secs[name] += time.perf_counter() - t0
        for name in methods:
            p = proba[name][te]
            acc[name][f] = float(((p >= 0.5).astype(int) == y[te]).mean())
            auc[name][f] = float(roc_auc_score(y[te], p))
    if shap_on == "full":
        t0 = time.perf_counter()
        cb = fit_catboost(X, y, settings, task_type, seed)
        shap = cb.get_feature_importance(Pool(X, cat_features=list(range(F))),
                                         type="ShapValues")[:, :F]
        secs["catboost"] += time.perf_counter() - t0
    elif shap_on == "split":
        shap_rows = _shap_split(X, y, shap, settings, task_type, seed)
        return CVResult(folds, acc, auc, secs, proba, fold_of, shap, best, shap_rows)
    elif shap_on != "oof":
        raise ApmaeError(f"--shap-on {shap_on}: expected oof, full or split")
    return CVResult(folds, acc, auc, secs, proba, fold_of, shap, best)


def _shap_split(X: pd.DataFrame, y: np.ndarray, shap: np.ndarray, settings: CatBoostSettings,
                task_type: str, seed: int) -> np.ndarray:
    """The reference's SHAP: one model on a stratified 90%, SHAP values (into ``shap``) of
    the held-out 10%, whose row numbers are returned."""
    from catboost import Pool

    tr, te = train_test_split(np.arange(len(y)), test_size=0.1, stratify=y, random_state=seed)
    cb = fit_catboost(X.iloc[tr], y[tr], settings, task_type, seed)
    F = X.shape[1]
    shap[te] = cb.get_feature_importance(Pool(X.iloc[te], cat_features=list(range(F))),
                                         type="ShapValues")[:, :F]
    return np.sort(te)


def head_importance(shap: np.ndarray, X: np.ndarray, n_layers: int, n_heads: int
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-head SHAP summaries.  ``shap``, ``X``: [n, L*H] (column ``layer * H + head``).

    Returns ``(heads, categories)``: ``heads`` has one row per head with ``importance`` (max
    minus min of the mean SHAP of its categories), ``mean_shap`` (signed mean over samples),
    ``extreme_shap`` (signed mean of the category with the largest |mean|), ``mean_abs_shap``,
    ``mean_shap_pos`` / ``mean_shap_neg`` (mean over samples of the positive / negative part
    of the SHAP values: the reference ranks the positive and negative intervention groups by
    them) and ``n_categories``; ``categories`` has ``layer, head, cluster, n, mean_shap``.
    """
    X = np.asarray(X)
    rows, cats = [], []
    for col in range(X.shape[1]):
        layer, head = divmod(col, n_heads)
        values, inverse = np.unique(X[:, col], return_inverse=True)
        counts = np.bincount(inverse, minlength=values.size)
        means = np.bincount(inverse, weights=shap[:, col], minlength=values.size) / counts
        extreme = float(means[np.argmax(np.abs(means))])
        sv = shap[:, col]
        rows.append((layer, head, float(means.max() - means.min()), float(sv.mean()),
                     extreme, float(np.abs(sv).mean()), float(np.maximum(sv, 0).mean()),
                     float(np.minimum(sv, 0).mean()), int(values.size)))
        cats += [(layer, head, int(v), int(c), float(m)) for v, c, m in zip(values, counts, means)]
    heads = pd.DataFrame(rows, columns=["layer", "head", "importance", "mean_shap", "extreme_shap",
                                        "mean_abs_shap", "mean_shap_pos", "mean_shap_neg",
                                        "n_categories"])
    categories = pd.DataFrame(cats, columns=["layer", "head", "cluster", "n", "mean_shap"])
    for frame in (heads, categories):
        frame["layer"] = frame["layer"].astype(np.int16)
        frame["head"] = frame["head"].astype(np.int16)
    return heads, categories


# --------------------------------------------------------------------------- one task
def _fingerprint(X: np.ndarray, y: np.ndarray, config: dict) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    h.update(np.ascontiguousarray(X).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.int8).tobytes())
    return h.hexdigest()[:16]


def classify_task(task: str, X: np.ndarray, y: np.ndarray, inference_ids: np.ndarray,
                  n_layers: int, n_heads: int, folds: int, settings: CatBoostSettings,
                  task_type: str, seed: int, shap_on: str, out: Path,
                  stability: tuple[int, int] = (0, 20)) -> dict:
    """Cross-validate one task and write its results under ``out`` (``RUN/classify/tasks/T``).

    Returns the task's record (``status`` ``done`` | ``cached`` | ``skipped``, ``folds``,
    ``n``, ``note``, ``seconds``).  Raises ApmaeError for a task that cannot be classified.
    """
    from catboost import CatBoostError

    config = dict(settings=asdict(settings), folds=folds, task_type=task_type, seed=seed,
                  shap_on=shap_on, stability=list(stability))
    fp = _fingerprint(X, y, config)
    done = out / layout.RESULT_JSON
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("fingerprint") == fp:
            log.info("%s: unchanged since the last run, kept", task)
            return {**record["record"], "status": "cached"}
    used, note = choose_folds(y, folds)
    if used == 0:
        raise ApmaeError(note)
    if note:
        log.warning("%s: %s", task, note)
    if (X == X[:1]).all():
        raise ApmaeError("every head has the same cluster in every inference: nothing to learn")
    cols = feature_names(n_layers, n_heads)
    frame = pd.DataFrame(X.astype(np.int32), columns=cols)
    t0 = time.perf_counter()
    try:
        cv = cross_validate(frame, y, used, settings, task_type, seed, shap_on)
    except CatBoostError as exc:
        raise ApmaeError(f"CatBoost failed: {str(exc).splitlines()[0]}") from None
    rows_ = cv.shap_rows if cv.shap_rows is not None else slice(None)
    heads, categories = head_importance(cv.shap[rows_], X[rows_], n_layers, n_heads)
    heads = stability_selection(_shap_fitter(settings, task_type, seed), frame, y, heads,
                                *stability, n_heads, seed)
    rows = []
    for m in ("catboost", "majority", "logreg"):
        mean, lo, hi = t_interval(cv.accuracy[m])
        lo, hi = max(lo, 0.0), min(hi, 1.0)   # an accuracy interval stays inside [0, 1]
        auc_mean = float(np.nanmean(cv.roc_auc[m]))
        rows.append(dict(task=task, method=m, accuracy_mean=mean, ci_low=lo, ci_high=hi,
                         roc_auc_mean=auc_mean, accuracy_std=float(cv.accuracy[m].std(ddof=1)),
                         n_samples=int(len(y)), n_folds=used, seconds=cv.seconds[m]))
    write_parquet(pd.DataFrame(rows), out / layout.METRICS_PARQUET)
    write_parquet(heads.assign(task=task), out / layout.HEAD_IMPORTANCE_PARQUET)
    write_parquet(categories.assign(task=task), out / layout.CATEGORY_SHAP_PARQUET)
    write_parquet(pd.DataFrame({"task": task, "inference_id": inference_ids, "correct": y.astype(bool),
                                "fold": cv.fold_of, **{f"p_{m}": cv.proba[m] for m in cv.proba}}),
                  out / layout.PREDICTIONS_PARQUET)
    record = dict(folds=used, n=int(len(y)), n_correct=int(y.sum()), note=note,
                  split_half_spearman=_finite(heads["split_half_spearman"].iloc[0]),
                  seconds=round(time.perf_counter() - t0, 3),
                  best_iterations=cv.best_iterations)
    write_json(done, {"fingerprint": fp, "config": config, "record": record})
    return {**record, "status": "done"}


# --------------------------------------------------------------------------- the stage
def classify(run: str | os.PathLike, settings: ClassifyConfig | None = None, *, seed: int = 0,
             thread_count: int = -1, **overrides) -> pd.DataFrame:
    """Classify correctness per task from per-head cluster ids; write ``RUN/classify/``.

    ``settings``: the ``classify`` section (:class:`~apmae_gpu.core.config.ClassifyConfig`;
    default the reference's), with keyword ``overrides`` of its fields over it.  Returns the
    metrics frame (one row per task and method).
    """
    run = Path(run)
    cfg = section(ClassifyConfig, settings, overrides)
    folds, gpu, tasks, shap_on = cfg.folds, cfg.gpu, cfg.tasks, cfg.shap_on
    catboost = CatBoostSettings.from_config(cfg, thread_count)
    t_start = time.perf_counter()
    inf = analysis_inferences(run)
    if inf.empty:
        raise ApmaeError(f"{run}: no analysis inferences (run `apmae capture --split analysis`)")
    inf["correct"] = inf["correct"].astype("boolean")
    labelled = inf[(inf["task"] != "noise") & inf["correct"].notna()]
    present = [t for t in TASKS if t in set(labelled["task"])] + \
        sorted(set(labelled["task"]) - set(TASKS))
    if tasks:
        unknown = [t for t in tasks if t not in present]
        if unknown:
            raise ApmaeError(f"--tasks: no labelled analysis inferences for {', '.join(unknown)} "
                             f"(have: {', '.join(present) or 'none'})")
        present = [t for t in present if t in tasks]
    with_maps = labelled[labelled["has_maps"].astype(bool)].sort_values("inference_id")
    rows = int(with_maps["task"].value_counts().max()) if len(with_maps) else 0
    task_type = resolve_task_type(gpu, rows, cfg.deterministic)
    if task_type == "GPU":
        free_torch_cuda_cache()   # CatBoost allocates GPU memory outside torch's cache
    ids = with_maps["inference_id"].to_numpy(np.int64)
    X_all, n_layers, n_heads = cluster_matrix(run / layout.CLUSTERS_PARQUET, ids)
    no_rows = (X_all == MISSING).all(axis=1)
    if no_rows.any():
        log.warning("%d analysis inferences with maps have no cluster rows; left out",
                    int(no_rows.sum()))
    log.info("classifying %d tasks on %d heads (%d layers x %d), CatBoost on %s",
             len(present), n_layers * n_heads, n_layers, n_heads, task_type)

    out = run / layout.CLASSIFY_DIR
    metrics, importance, categories, predictions = [], [], [], []
    records: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for task in present:
        sel = (with_maps["task"].to_numpy() == task) & ~no_rows
        y = with_maps["correct"].to_numpy()[sel].astype(int)
        try:
            rec = classify_task(task, X_all[sel], y, ids[sel], n_layers, n_heads, folds,
                                catboost, task_type, seed, shap_on, out / "tasks" / task,
                                (cfg.stability_refits, cfg.stability_top_k))
        except ApmaeError as exc:
            log.error("%s: skipped: %s", task, exc)
            skipped[task] = str(exc)
            continue
        records[task] = rec
        d = out / "tasks" / task
        metrics.append(pd.read_parquet(d / layout.METRICS_PARQUET))
        importance.append(pd.read_parquet(d / layout.HEAD_IMPORTANCE_PARQUET))
        categories.append(pd.read_parquet(d / layout.CATEGORY_SHAP_PARQUET))
        predictions.append(pd.read_parquet(d / layout.PREDICTIONS_PARQUET))
        log.info("%s: CatBoost accuracy %.3f (%d folds, %d inferences, %.1f s)", task,
                 metrics[-1].loc[metrics[-1]["method"] == "catboost", "accuracy_mean"].iloc[0],
                 rec["folds"], rec["n"], rec["seconds"])
    if not records:
        update_manifest(run, "classify", {"status": "failed", "skipped": skipped})
        raise ApmaeError("no task could be classified: " +
                         "; ".join(f"{t}: {r}" for t, r in skipped.items()))
    for task in records:  # the target model's own accuracy on ALL analysis attempts
        rows = inf[(inf["task"] == task) & inf["correct"].notna()]
        k, n = int(rows["correct"].sum()), len(rows)
        lo, hi = wilson_interval(k, n)
        metrics.append(pd.DataFrame([dict(task=task, method="target_model", accuracy_mean=k / n,
                                          ci_low=lo, ci_high=hi, roc_auc_mean=float("nan"),
                                          accuracy_std=float("nan"), n_samples=n, n_folds=0,
                                          seconds=0.0)]))
    metrics_df = pd.concat(metrics, ignore_index=True)
    metrics_df["method"] = pd.Categorical(metrics_df["method"], METHODS)
    metrics_df = metrics_df.sort_values(["task", "method"], key=task_rank).reset_index(drop=True)
    metrics_df["method"] = metrics_df["method"].astype(str)
    importance_df = pd.concat(importance, ignore_index=True)
    importance_df = importance_df[["task"] + [c for c in importance_df if c != "task"]]
    write_parquet(metrics_df, out / layout.METRICS_PARQUET)
    write_parquet(importance_df, out / layout.HEAD_IMPORTANCE_PARQUET)
    write_parquet(pd.concat(categories, ignore_index=True), out / layout.CATEGORY_SHAP_PARQUET)
    write_parquet(pd.concat(predictions, ignore_index=True), out / layout.PREDICTIONS_PARQUET)
    figures = plot_classification(metrics_df, importance_df, n_layers, n_heads, out)
    figures += plot_stability(importance_df, out, cfg.stability_top_k)
    seconds = round(time.perf_counter() - t_start, 2)
    update_manifest(run, "classify", {
        "status": "done", "task_type": task_type, "folds": folds, "seed": seed,
        "catboost": asdict(catboost),
        "shap": f"catboost ShapValues, {'out-of-fold' if shap_on == 'oof' else 'full-data model'}",
        "features": f"{n_layers} layers x {n_heads} heads, cluster ids as categories "
                    f"(-1 noise, {MISSING} missing)",
        "ci": "95% t-interval over folds (target_model: Wilson over all analysis attempts)",
        "stability": {"refits": cfg.stability_refits, "top_k": cfg.stability_top_k,
                      "min_ranking_spearman": cfg.min_ranking_spearman},
        "tasks": records, "skipped": skipped, "seconds": seconds,
        "files": ["classify/metrics.parquet", "classify/head_importance.parquet",
                  "classify/category_shap.parquet", "classify/predictions.parquet", *figures],
    })
    _echo_table(metrics_df)
    return metrics_df


def _echo_table(metrics: pd.DataFrame) -> None:
    table = Table(title="correctness classification: accuracy ± 95% CI half-width",
                  box=box.SIMPLE, pad_edge=False)
    for c in ("task", "catboost", "logreg", "majority", "LLM", "AUC", "n", "folds"):
        table.add_column(c, justify="left" if c == "task" else "right", no_wrap=True)
    for task, g in metrics.groupby("task", sort=False):
        m = g.set_index("method")

        def fmt(method: str) -> str:
            if method not in m.index:
                return "-"
            r = m.loc[method]
            half = max(r.accuracy_mean - r.ci_low, r.ci_high - r.accuracy_mean)
            return f"{r.accuracy_mean:.3f}" + (f"±{half:.2f}" if np.isfinite(half) else "")

        cb = m.loc["catboost"]
        table.add_row(task, fmt("catboost"), fmt("logreg"), fmt("majority"), fmt("target_model"),
                      f"{cb.roc_auc_mean:.3f}", str(int(cb.n_samples)), str(int(cb.n_folds)))
    Console(width=max(Console().width, 110)).print(table)


# --------------------------------------------------------------------------- figures
def _grid(frame: pd.DataFrame, value: str, n_layers: int, n_heads: int) -> np.ndarray:
    grid = np.full((n_layers, n_heads), np.nan)
    grid[frame["layer"].to_numpy(int), frame["head"].to_numpy(int)] = frame[value].to_numpy(float)
    return grid


def plot_classification(metrics: pd.DataFrame, importance: pd.DataFrame, n_layers: int,
                        n_heads: int, out: Path) -> list[str]:
    """Layer x head heatmaps per task (importance and mean SHAP, Figs. 5-6 and appendix A),
    all tasks' importance side by side, and the accuracy chart (Fig. 4).  Returns the files
    written, relative to the run."""
    plt = pyplot()
    written = []
    aspect = max(0.25, min(4.0, n_heads / max(n_layers, 1)))
    for task, g in importance.groupby("task", sort=False):
        fig, axes = plt.subplots(1, 2, figsize=(2 * (3 + 3 * aspect), 0.6 + 4), squeeze=False)
        imp = _grid(g, "importance", n_layers, n_heads)
        ms = _grid(g, "mean_shap", n_layers, n_heads)
        lim = float(np.nanmax(np.abs(ms))) or 1.0
        for ax, grid, title, kw in (
                (axes[0, 0], imp, "importance (max diff. of category mean SHAP)",
                 dict(cmap="viridis", vmin=0)),
                (axes[0, 1], ms, "mean SHAP (signed)", dict(cmap="RdBu_r", vmin=-lim, vmax=lim))):
            im = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", **kw)
            _integer_ticks(ax)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.85)
        fig.suptitle(task)
        fig.tight_layout()
        written.append(save_figure(fig, out / "heatmaps" / f"{task}.png", dpi=110, format="png"))

    tasks = list(importance["task"].unique())
    cols = min(5, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, task in zip(axes.flat, tasks):
        ax.axis("on")
        im = ax.imshow(_grid(importance[importance["task"] == task], "importance", n_layers,
                             n_heads), aspect="auto", origin="lower", cmap="viridis", vmin=0,
                       interpolation="nearest")
        _integer_ticks(ax)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("head importance per task (max difference of mean SHAP per cluster)")
    fig.tight_layout()
    written.append(save_figure(fig, out / "importance.png", dpi=110, format="png"))

    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 * metrics["task"].nunique() + 3.5), 4))
    order = list(metrics["task"].unique())
    width = 0.2
    for i, (method, color) in enumerate((("target_model", "0.55"), ("catboost", "C0"),
                                         ("logreg", "C1"), ("majority", "C2"))):
        m = metrics[metrics["method"] == method].set_index("task").reindex(order)
        x = np.arange(len(order)) + (i - 1.5) * width
        err = np.vstack([m["accuracy_mean"] - m["ci_low"], m["ci_high"] - m["accuracy_mean"]])
        ax.bar(x, m["accuracy_mean"], width, color=color, label=method.replace("_", " "),
               yerr=np.nan_to_num(err), capsize=2)
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set_xticks(np.arange(len(order)))
    ax.set_xticklabels(order, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("target model accuracy and correctness classifiers")
    fig.tight_layout()
    written.append(save_figure(fig, out / "accuracy.png", dpi=110, format="png"))
    return [str(Path(p).relative_to(out.parent)) for p in written]


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
