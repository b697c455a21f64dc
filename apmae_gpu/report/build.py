"""The report (``apmae report RUN``): one self-contained HTML page over a whole run.

``RUN/report/index.html`` reads every stage's outputs (see ``docs/contracts.md``) and shows,
one section each: the findings against the paper (``apmae_gpu.report.findings``, also written to
``RUN/report/findings.parquet``), the run (manifest: model, corpus, counts, timings,
versions), the tasks and the target model's accuracy with example maps, AP-MAE (training
curve, reconstructions, evaluation against the baselines), clusters (per-head heatmaps,
gallery, largest clusters), pattern locations (the paper's Table 5), correctness classifiers
(accuracy with confidence intervals beside the baselines and the target model), SHAP head
importance, and the intervention curves.  Numbers are HTML tables; figures are PNGs embedded
as base64 data URIs, so the page is one file that can be mailed or archived.  A section whose
inputs are missing says which stage has not run instead of disappearing.

Beside it, ``RUN/report/explorer.html`` (linked at the top of the page) is the interactive
per-head explorer, with its data in ``RUN/report/explorer.json`` (``apmae_gpu.report.explorer``,
``apmae_gpu.report.explorer_page``).

``report(run, notebook=True)`` also executes ``notebooks/findings.ipynb`` on the run and keeps
the executed copy as ``RUN/report/findings.ipynb``.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import typer
from markupsafe import escape

from apmae_gpu import TASKS, __version__, task_rank
from apmae_gpu.core import config, layout, tables
from apmae_gpu.core.config import ReportConfig
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.figures import png_bytes, pyplot
from apmae_gpu.core.frames import atomic_path, read_manifest, update_manifest, write_parquet
from apmae_gpu.core.store import MapStore
from apmae_gpu.report.explorer_page import EXPLORER, write_explorer
from apmae_gpu.report.findings import findings, summary
from apmae_gpu.report.findings_figure import compact, forest

log = logging.getLogger("apmae_gpu.report.build")

REPORT_DIR = "report"
INDEX = layout.INDEX_HTML
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "findings.ipynb"


@dataclass
class Section:
    """One part of the page: ``blocks`` are HTML fragments (already escaped)."""

    key: str
    title: str
    intro: str = ""
    blocks: list[str] = field(default_factory=list)
    missing: str | None = None   # "stage not run: ..." when its inputs are absent

    @property
    def status(self) -> str:
        return "ok" if self.missing is None else self.missing


# --------------------------------------------------------------------------- html pieces
def _esc(text) -> str:
    return str(escape(str(text)))


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)) or v is pd.NA:
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


_NUMBER = re.compile(r"^[+-]?\d[\d.,e+-]*\*?$")


def table(df: pd.DataFrame, caption: str = "") -> str:
    """An HTML table of ``df`` (values escaped; floats to 4 significant digits; numbers and
    number-like strings right-aligned)."""
    df = df.reset_index(drop=True)
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for v in rec:
            text = _fmt(v)
            num = not isinstance(v, bool) and bool(_NUMBER.match(text))
            cells.append(f'<td class="{"num" if num else "txt"}">{_esc(text)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return (f'<div class="tbl"><table>{cap}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def image(source, caption: str, max_width: int | None = None) -> str:
    """A figure from a PNG file or a matplotlib figure, embedded as a data URI (shown at
    most ``max_width`` CSS pixels wide when given)."""
    if isinstance(source, (str, Path)):
        data = Path(source).read_bytes()
    else:
        data = png_bytes(source, dpi=100)
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    style = f' style="max-width:min(100%,{max_width}px)"' if max_width else ""
    return (f'<figure><img src="{uri}" alt="{_esc(caption)}"{style}>'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def grid(blocks: list[str]) -> str:
    """Figures side by side (two per row on a wide screen)."""
    return f'<div class="grid">{"".join(blocks)}</div>' if blocks else ""


def para(text: str) -> str:
    return f"<p>{_esc(text)}</p>"


def _need(run: Path, *paths: str, stage: str) -> str | None:
    absent = [p for p in paths if not (run / p).exists()]
    if absent:
        return f"stage not run: {stage} (no {', '.join(absent)} in this run)"
    return None


def section(key: str, title: str, intro: str, *needs: str, stage: str):
    """Make ``fill(run, man, s)``, which adds the blocks of one section, a builder
    ``(run, man) -> Section`` of the section ``key, title, intro``: without any of the run's
    files ``needs`` (written by ``stage``) the section says which stage has not run, and
    ``fill`` is not called."""
    def decorate(fill):
        @functools.wraps(fill)
        def build(run: Path, man: dict) -> Section:
            s = Section(key, title, intro, missing=_need(run, *needs, stage=stage))
            if s.missing is None:
                fill(run, man, s)
            return s

        return build

    return decorate


# --------------------------------------------------------------------------- sections
def findings_section(run: Path, man: dict) -> Section:
    """The paper's claims against this run (``apmae_gpu.report.findings``); also writes
    ``report/findings.parquet``."""
    s = Section("findings", "Findings against the paper",
                "One row per claim of the paper: this run's estimate with the interval that "
                "inverts its one-sided test, adjusted over the same family as the p-value "
                "(Holm where claims are tested together). reproduced: significant in the "
                "paper's direction and the interval reaches the paper's magnitude; weaker than "
                "the paper: significant, but short of the paper's magnitude (or a setting not "
                "comparable with the paper's); not reproduced: the interval excludes the "
                "paper's magnitude without significance, or the effect is significant the "
                "other way; inconclusive: otherwise (the detail gives the N needed for 80% "
                "power).")
    tab = findings(run)
    write_parquet(tab, run / REPORT_DIR / layout.FINDINGS_PARQUET)
    s.blocks.append(para(summary(tab)))
    log.info("findings: %s", summary(tab))
    if (tab["verdict"] == "inconclusive").mean() > 0.5:
        s.blocks.append(para("Most claims are inconclusive here: this run has too few "
                             "inferences (or skipped stages) to tell; the detail column says "
                             "what is missing or how many would be needed."))
    s.blocks.insert(0, image(forest(tab), "every claim's estimate and interval on the paper's "
                                          "scale (0: no effect, 1: the paper's magnitude), "
                                          "coloured by verdict", max_width=900))
    short, notes = compact(tab)
    s.blocks.append(table(short, "claims, estimates, tests and verdicts "
                                 "(report/findings.parquet has every column)"))
    s.blocks.append("<ol class=\"notes\">" + "".join(
        f"<li>{_esc(n.split(' ', 1)[1])}</li>" for n in notes) + "</ol>")
    return s


def run_section(run: Path, man: dict) -> Section:
    s = Section("run", "Run", "What was run, on what, and how long each stage took.")
    if not man:
        s.missing = "stage not run: no stage has written to manifest.json yet"
        return s
    cap = man.get("capture", {})
    facts = {"run directory": str(run.resolve())}
    model = cap.get("model") or man.get("mine", {}).get("model")
    if model:
        facts["target model"] = model.get("spec", model) if isinstance(model, dict) else model
        if cap.get("n_layers"):
            facts["architecture"] = (f"{cap.get('model_type', '?')}: {cap['n_layers']} layers x "
                                     f"{cap['n_heads']} heads ({cap.get('n_kv_heads', '?')} kv)")
        if cap.get("model_revision"):
            facts["revision"] = cap["model_revision"]
    mine = man.get("mine", {})
    if mine:
        corpus = mine.get("corpus", "–")
        facts["corpus"] = (f"{corpus.get('spec')} ({corpus.get('kind')})"
                           if isinstance(corpus, dict) else corpus)
        facts["tasks mined"] = sum(mine.get("counts", {}).values())
    if cap:
        facts["window (tokens)"] = cap.get("window")
        facts["map scaler"] = f"{cap.get('scaler')} (floor {cap.get('floor')})"
        facts["capture device / dtype"] = f"{cap.get('device')} / {cap.get('dtype')}"
        for split, info in cap.get("splits", {}).items():
            tasks = info.get("tasks", {}).values()
            facts[f"{split} split: kept / prompted, maps"] = (
                f"{sum(t['kept'] for t in tasks)} / {sum(t['attempts'] for t in tasks)}, "
                f"{info.get('n_maps_total', '–')} maps")
    for key in ("train", "encode", "cluster", "classify", "intervene"):
        sec = man.get(key, {})
        for name in ("preset", "steps", "backend", "mode"):
            if isinstance(sec.get(name), (str, int, float)):
                facts[f"{key}: {name}"] = sec[name]
    if man.get("updated"):
        facts["last updated"] = man["updated"]
    s.blocks.append(table(pd.DataFrame({"": list(facts), "value": [str(v) for v in
                                                                    facts.values()]})))
    timing = _timings(run, man)
    if not timing.empty:
        s.blocks.append(table(timing, "wall time per stage"))
    vers = man.get("apmae_gpu", {})
    if vers:
        s.blocks.append("<details><summary>versions</summary>" + table(pd.DataFrame(
            {"package": list(vers), "version": list(vers.values())})) + "</details>")
    return s


def _timings(run: Path, man: dict) -> pd.DataFrame:
    state = run / layout.PIPELINE_JSON
    rows = []
    if state.exists():
        for stage, info in json.loads(state.read_text()).get("stages", {}).items():
            status = info.get("status")
            if stage == "report" and status == "running":
                status = "writing this page"
            rows.append({"stage": stage, "status": ("complete, skipped on the last run"
                                                    if info.get("skipped") else status),
                         "seconds": info.get("seconds")})
    else:
        for stage, sec in man.items():
            if (stage not in ("report", "pipeline") and isinstance(sec, dict)
                    and isinstance(sec.get("seconds"), (int, float))):
                rows.append({"stage": stage, "status": "done", "seconds": sec["seconds"]})
    return pd.DataFrame(rows)


def target_accuracy(inferences: pd.DataFrame) -> pd.DataFrame:
    """The target model's own accuracy per task over every prompted analysis inference
    (surplus attempts included), from ``inferences.parquet``."""
    inf = inferences[inferences["split"] == "analysis"]
    rows = []
    for task in [t for t in TASKS if t in set(inf["task"])]:
        g = inf[inf["task"] == task]
        judged = g["correct"].dropna().astype(bool)
        rows.append({"task": task, "prompted": len(g), "with maps": int(g["has_maps"].sum()),
                     "target accuracy": float(judged.mean()) if len(judged) else None})
    return pd.DataFrame(rows)


def tasks_section(run: Path, man: dict) -> Section:
    s = Section("tasks", "Tasks, target model and example maps",
                "The target model's accuracy on every prompted completion of each task, and "
                "example attention maps of one head (ln p; above the diagonal is masked).")
    s.missing = _need(run, layout.MAPS_ZARR, layout.INFERENCES_PARQUET, stage="capture")
    counts = man.get("mine", {}).get("counts", {})
    if s.missing:
        if counts:
            s.blocks.append(table(pd.DataFrame({"task": list(counts), "mined": list(
                counts.values())}), "tasks mined"))
        return s
    store = MapStore(run)
    inf = store.inferences(columns=["inference_id", "split", "task", "correct", "has_maps"])
    acc = target_accuracy(inf)
    if counts:
        acc.insert(1, "mined", [counts.get(t) for t in acc["task"]])
    s.blocks.append(table(acc, "target model accuracy (analysis split, every attempt)"))
    shown = example_maps(run, store, inf)
    if shown is not None:
        fig, why = shown
        s.blocks.append(image(fig, f"one correct (top) and one incorrect (bottom) inference per "
                                   f"task at {why}; noise has no correctness"))
    return s


def _example_head(run: Path, index: pd.DataFrame) -> tuple[int, int, str]:
    """The head whose patterns matter most to the classifiers (else a middle-layer head)."""
    imp = run / layout.CLASSIFY_DIR / layout.HEAD_IMPORTANCE_PARQUET
    if imp.exists():
        df = pd.read_parquet(imp, columns=["layer", "head", "importance"])
        if len(df):
            best = df.groupby(["layer", "head"])["importance"].mean().idxmax()
            return int(best[0]), int(best[1]), "the head most important to the classifiers"
    return int(index["layer"].max()) // 2, 0, "a middle-layer head"


def example_maps(run: Path, store, inf: pd.DataFrame):
    """A figure (tasks as columns, a correct and an incorrect map of one head as rows) and
    which head it shows; None without analysis maps."""
    index = store.index()
    if index.empty:
        return None
    layer, head, why = _example_head(run, index)
    at = index[(index["layer"] == layer) & (index["head"] == head)].set_index("inference_id")
    inf = inf[(inf["split"] == "analysis") & inf["has_maps"] & inf["inference_id"].isin(at.index)]
    tasks = [t for t in TASKS if t in set(inf["task"])]
    if not tasks:
        return None
    picks = {}
    for t in tasks:
        g = inf[inf["task"] == t]
        first = [g[g["correct"].eq(True)], g[g["correct"].eq(False)]]
        ids = [int(x["inference_id"].iloc[0]) for x in first if len(x)]
        picks[t] = (ids + [int(i) for i in g["inference_id"] if i not in ids])[:2]
    ids = [i for t in tasks for i in picks[t]]
    maps = dict(zip(ids, store.read(at.loc[ids, "map_id"].to_numpy(np.int64)).astype(np.float32)))
    plt = pyplot()
    from matplotlib.colors import LogNorm

    info = store.info
    w = info.window
    upper = ~np.tril(np.ones((w, w), bool))
    if info.scaler == "none":
        norm, label = LogNorm(vmin=1e-6, vmax=1.0), "p (log scale)"
    elif info.scaler == "log":
        lower = np.concatenate([m[~upper] for m in maps.values()])
        norm = plt.Normalize(vmin=max(float(np.percentile(lower, 1)), info.fill_value), vmax=0.0)
        label = "ln p"
    else:
        norm, label = plt.Normalize(0.0, 1.0), "min-max of ln p"
    cmap = plt.get_cmap("magma").with_extremes(bad="0.92")
    fig, axes = plt.subplots(2, len(tasks), figsize=(1.45 * len(tasks) + 0.8, 3.4), squeeze=False)
    for j, t in enumerate(tasks):
        for i in range(2):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i < len(picks[t]):
                img = maps[picks[t][i]]
                hide = upper | (img <= 0) if info.scaler == "none" else upper
                im = ax.imshow(np.ma.masked_where(hide, img), cmap=cmap, norm=norm,
                               interpolation="nearest")
            else:
                ax.axis("off")
        axes[0, j].set_title(t.replace("_", " "), fontsize=8)
    axes[0, 0].set_ylabel("correct", fontsize=8)
    axes[1, 0].set_ylabel("incorrect", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label=label)
    fig.suptitle(f"layer {layer}, head {head}", fontsize=9)
    return fig, f"layer {layer}, head {head} ({why})"


@section("apmae", "AP-MAE: training and reconstruction",
         "Masked-patch reconstruction loss over training, example reconstructions, and "
         "the evaluation against two trivial predictors on the same masks.",
         "apmae/metrics.jsonl", "evaluate/evaluation.parquet", stage="train / evaluate")
def apmae_section(run: Path, man: dict, s: Section) -> None:
    fig = training_curve(run / layout.APMAE_DIR / layout.METRICS_JSONL)
    if fig is not None:
        s.blocks.append(image(fig, "training loss (masked patches) and validation loss beside "
                                   "the baselines on the validation maps"))
    train = man.get("train", {})
    keep = {k: v for k, v in train.items() if isinstance(v, (str, int, float))}
    if keep:
        s.blocks.append("<details><summary>training settings and summary</summary>" + table(
            pd.DataFrame({"": list(keep), "value": [str(v) for v in keep.values()]})) + "</details>")
    ev = pd.read_parquet(run / layout.EVALUATE_DIR / layout.EVALUATION_PARQUET)
    cols = [c for c in ("checkpoint", "dataset", "method", "mse_mean", "mse_std", "n_maps")
            if c in ev.columns]
    ev = ev[cols].copy()
    ref = ev[ev["method"] == "apmae"].set_index(["checkpoint", "dataset"])["mse_mean"]
    ev["x AP-MAE"] = [r.mse_mean / ref.get((r.checkpoint, r.dataset), np.nan)
                      for r in ev.itertuples()]
    s.blocks.append(table(ev, "reconstruction MSE of masked patches (x AP-MAE: ratio of each "
                              "method's MSE to AP-MAE's; above 1, AP-MAE is better)"))
    for png in sorted((run / layout.EVALUATE_DIR).glob("reconstruction_*.png")):
        s.blocks.append(image(png, png.stem.replace("_", " ") + ": original, masked input, "
                                   "reconstruction, visible + reconstructed", max_width=820))


def training_curve(path: Path):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tr = pd.DataFrame([r for r in rows if r.get("kind") == "train"])
    va = pd.DataFrame([r for r in rows if r.get("kind") == "val"])
    if tr.empty:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.plot(tr["step"], tr["loss"], lw=1, color="C0", label="train loss")
    for col, style, name in (("val_loss", "o-", "validation loss"),
                             ("val_visible_mean", "s--", "visible-mean baseline"),
                             ("val_dataset_mean", "^--", "dataset-mean baseline")):
        if col in va:
            ax.plot(va["step"], va[col], style, ms=3, lw=1, label=name)
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="MSE (masked patches)")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


@section("clusters", "Clusters per head",
         "UMAP + HDBSCAN on each head's AP-MAE embeddings: how many patterns each head "
         "shows, example members of the largest clusters, and the largest clusters.",
         layout.CLUSTERS_PARQUET, "cluster/heads.parquet", stage="cluster")
def cluster_section(run: Path, man: dict, s: Section) -> None:
    heads = pd.read_parquet(run / layout.CLUSTER_DIR / layout.HEADS_PARQUET)
    ok = heads[heads["status"] == "ok"]
    s.blocks.append(table(pd.DataFrame([{
        "heads": len(heads), "clustered": len(ok), "failed": int((heads["status"] != "ok").sum()),
        "clusters per head (mean)": ok["n_clusters"].mean() if len(ok) else None,
        "clusters (total)": int(ok["n_clusters"].sum()),
        "share of maps clustered (mean)": ok["share_clustered"].mean() if len(ok) else None,
        "backend": ", ".join(sorted(map(str, heads["backend"].dropna().unique())))}])))
    failed = heads[heads["status"] != "ok"]
    if len(failed):
        s.blocks.append(table(failed[["layer", "head", "status", "error"]], "heads not clustered"))
    base = run / layout.CLUSTER_DIR
    for name, caption in (("heads_heatmap.png", "clusters per head and share of maps clustered"),
                          ("gallery.png", "one cluster per head (its largest holding at most half of its "
                           "maps, where there is one): most central | most distant members")):
        if (base / name).exists():
            s.blocks.append(image(base / name, caption))
    for png in sorted(base.glob("cluster_L*_C*.png"), key=lambda p: -p.stat().st_mtime)[:2]:
        s.blocks.append(image(png, f"maps within one cluster ({png.stem})"))
    summ = base / layout.CLUSTERS_SUMMARY_PARQUET
    if summ.exists():
        df = pd.read_parquet(summ)
        df = df[df["kept"]] if "kept" in df else df
        cols = [c for c in ("layer", "head", "cluster", "size", "share", "n_correct",
                            "n_incorrect", "top_task", "top_task_share") if c in df]
        s.blocks.append(table(df.sort_values("size", ascending=False)[cols].head(12),
                              "largest clusters"))


@section("locations", "Pattern locations (Table 5)",
         "A pattern location is a (layer, head, cluster). total: locations a task's "
         "inferences use; unique: used by no other task, split into used only by correct, "
         "only by incorrect, or by both kinds of inferences; share of possible: total "
         "over all locations of the run.",
         "cluster/pattern_locations.parquet", stage="cluster")
def locations_section(run: Path, man: dict, s: Section) -> None:
    df = pd.read_parquet(run / layout.CLUSTER_DIR / layout.PATTERN_LOCATIONS_PARQUET)
    df = df.sort_values("task", kind="stable", key=task_rank)
    s.blocks.append(table(df.rename(columns=lambda c: c.replace("_", " "))))


@section("classify", "Predicting correctness from patterns",
         "CatBoost on the cluster id of every head, cross-validated, beside a majority "
         "and a logistic-regression baseline on the same folds and the target model's "
         "own accuracy (mean accuracy with its 95% confidence interval).",
         "classify/metrics.parquet", stage="classify")
def classify_section(run: Path, man: dict, s: Section) -> None:
    m = pd.read_parquet(run / layout.CLASSIFY_DIR / layout.METRICS_PARQUET)
    wide = []
    for task, g in m.groupby("task", sort=False):
        row = {"task": task}
        for r in g.itertuples():
            row[r.method.replace("_", " ")] = (f"{r.accuracy_mean:.3f}" if pd.isna(r.ci_low) else
                                               f"{r.accuracy_mean:.3f} [{r.ci_low:.3f}, "
                                               f"{r.ci_high:.3f}]")
        cb = g[g["method"] == "catboost"]
        if len(cb):
            row["catboost ROC AUC"] = cb["roc_auc_mean"].iloc[0]
            row["samples"] = cb["n_samples"].iloc[0]
            row["folds"] = cb["n_folds"].iloc[0]
        wide.append(row)
    s.blocks.append(table(pd.DataFrame(wide), "accuracy [95% CI] per task and method"))
    if (run / layout.CLASSIFY_DIR / "accuracy.png").exists():
        s.blocks.append(image(run / layout.CLASSIFY_DIR / "accuracy.png", "accuracy per task (Fig. 4)"))
    skipped = man.get("classify", {}).get("skipped") or {}
    if skipped:
        s.blocks.append(para("tasks skipped: " + "; ".join(f"{t}: {w}" for t, w in skipped.items())))


@section("shap", "SHAP head importance",
         "Per head, the largest difference between the mean SHAP values of its clusters "
         "(high: one pattern in this head pushes towards correct, another towards "
         "incorrect), and the head's mean signed SHAP value.",
         "classify/head_importance.parquet", stage="classify")
def shap_section(run: Path, man: dict, s: Section) -> None:
    imp = pd.read_parquet(run / layout.CLASSIFY_DIR / layout.HEAD_IMPORTANCE_PARQUET)
    top = (imp.sort_values("importance", ascending=False).groupby("task", sort=False).head(3)
           .sort_values("task", kind="stable", key=task_rank))
    cols = [c for c in ("task", "layer", "head", "importance", "mean_shap") if c in top]
    s.blocks.append(table(top[cols], "three most important heads per task"))
    base = run / layout.CLASSIFY_DIR
    if (base / "importance.png").exists():
        s.blocks.append(image(base / "importance.png", "importance per head, every task"))
    s.blocks.append(grid([image(base / "heatmaps" / f"{t}.png",
                                f"{t}: importance and mean SHAP per head")
                          for t in TASKS if (base / "heatmaps" / f"{t}.png").exists()]))


@section("intervene", "Interventions: zeroing heads",
         "Held-out inferences re-run with the k heads of each SHAP group zeroed; net "
         "change = incorrect->correct minus correct->incorrect (* p < 0.05 against "
         "zeroing k random heads, exact McNemar).",
         "intervene/results.parquet", stage="intervene")
def intervene_section(run: Path, man: dict, s: Section) -> None:
    r = pd.read_parquet(run / layout.INTERVENE_DIR / layout.RESULTS_PARQUET)
    if (run / layout.INTERVENE_DIR / "net_change.png").exists():
        s.blocks.append(image(run / layout.INTERVENE_DIR / "net_change.png", "net change against k (Fig. 7)"))
    sig = r["p_vs_random"] < 0.05 if "p_vs_random" in r else pd.Series(False, index=r.index)
    r = r.assign(cell=[f"{int(v):+d}" + ("*" if s_ else "") for v, s_ in zip(r["net_change"], sig)])
    wide = r.pivot_table(index=["task", "group", "n"], columns="k", values="cell",
                         aggfunc="first", sort=False)
    wide.columns = [f"k={k}" for k in wide.columns]
    s.blocks.append(table(wide.reset_index(), "net change per number of zeroed heads "
                                              "(n: held-out inferences)"))


# The page's sections in order: key (HTML id, manifest entry) -> builder.
SECTIONS = {"findings": findings_section, "run": run_section, "tasks": tasks_section,
            "apmae": apmae_section, "clusters": cluster_section, "locations": locations_section,
            "classify": classify_section, "shap": shap_section, "intervene": intervene_section}


# --------------------------------------------------------------------------- page
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>AP-MAE report: {{ name }}</title>
<style>
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d232b;margin:0;background:#fafafa}
header,main{max-width:1180px;margin:0 auto;padding:0 24px}
header{padding-top:20px}h1{font-size:26px;margin:0 0 4px}header p{margin:0;color:#56606b}
nav{margin:12px 0 4px;font-size:14px}nav a{margin-right:14px;color:#1f5fa8;text-decoration:none}
.explore{margin:8px 0 0}.explore a{font-weight:600;color:#1f5fa8}
section{background:#fff;border:1px solid #e3e6ea;border-radius:6px;padding:6px 20px 16px;margin:16px 0}
h2{font-size:20px;margin:12px 0 4px}.intro{color:#56606b;margin-top:0}
.missing{color:#8a4b00;background:#fff4e0;border-left:4px solid #e6a23c;padding:8px 12px}
.tbl{overflow-x:auto;margin:10px 0}table{border-collapse:collapse;font-size:13px}
caption{text-align:left;color:#56606b;padding:2px 0 6px;font-size:13px}
th,td{padding:3px 10px;border-bottom:1px solid #eceef1}th{background:#f2f4f7;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:14px 0}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:0 16px}figure img{max-width:100%;height:auto;border:1px solid #eceef1}
figcaption{font-size:13px;color:#56606b}details{margin:8px 0}summary{cursor:pointer;color:#1f5fa8}
footer{max-width:1180px;margin:0 auto 30px;padding:0 24px;color:#8a939c;font-size:12px}
</style></head><body>
<header><h1>AP-MAE report: {{ name }}</h1><p>{{ subtitle }}</p>
{% if explorer %}<p class="explore"><a id="explorer-link" href="{{ explorer }}">Open the per-head explorer</a> (clusters, typical maps and prompts of every head; {{ explorer }})</p>{% endif %}
<nav>{% for s in sections %}<a href="#{{ s.key }}">{{ s.title }}</a>{% endfor %}</nav></header>
<main>{% for s in sections %}
<section id="{{ s.key }}" class="report-section"><h2>{{ s.title }}</h2>
{% if s.intro %}<p class="intro">{{ s.intro }}</p>{% endif %}
{% if s.missing %}<p class="missing">{{ s.missing }}</p>{% endif %}
{% for b in s.blocks %}{{ b | safe }}
{% endfor %}</section>{% endfor %}</main>
<footer>apmae_gpu {{ version }}, written {{ when }}</footer>
</body></html>
"""


def render(run: Path, sections: list[Section], explorer: str | None = None) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    cap = read_manifest(run).get("capture", {})
    model = (cap.get("model") or {}).get("spec", "") if isinstance(cap.get("model"), dict) else ""
    return env.from_string(PAGE).render(
        name=run.resolve().name, subtitle=" · ".join(x for x in (model, str(run.resolve())) if x),
        sections=sections, version=__version__, when=time.strftime("%Y-%m-%d %H:%M"),
        explorer=explorer)


def report(run: str | os.PathLike, settings: ReportConfig | None = None, **overrides) -> Path:
    """Write ``RUN/report/index.html`` (and, with the ``report`` section's ``notebook``, the
    executed findings notebook beside it); records a ``report`` section in the manifest.
    Returns the page."""
    cfg = config.section(ReportConfig, settings, overrides)
    notebook = cfg.notebook
    run = Path(run)
    if not run.is_dir():
        raise ApmaeError(f"{run} is not a directory")
    man = read_manifest(run)
    if not man:
        raise ApmaeError(f"{run}: no manifest.json (not a run directory, or no stage has run)")
    _require_sound(run, man)
    t0 = time.perf_counter()
    sections = []
    for key, build in SECTIONS.items():
        try:
            sections.append(build(run, man))
        except (ApmaeError, OSError, KeyError, ValueError) as exc:
            log.error("report section %s failed: %s", key, exc)
            sections.append(Section(key, key, missing=f"could not be built: {exc}"))
    out = run / REPORT_DIR / INDEX
    out.parent.mkdir(parents=True, exist_ok=True)
    explorer = _explorer(run, out.parent, cfg)
    html = render(run, sections, EXPLORER if explorer else None)
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
        tmp.chmod(0o644)   # a page to share (mkstemp creates 0600)
    executed = execute_notebook(run, out.parent / NOTEBOOK.name) if notebook else None
    seconds = round(time.perf_counter() - t0, 2)
    update_manifest(run, "report", {
        "path": f"{REPORT_DIR}/{INDEX}", "bytes": out.stat().st_size,
        "figures": html.count("<img "), "sections": {s.key: s.status for s in sections},
        "notebook": str(executed.relative_to(run)) if executed else None, "seconds": seconds,
        "explorer": explorer})
    missing = [s.key for s in sections if s.missing]
    log.info("report: %s (%.1f MiB, %d figures, %.1f s)%s", out, out.stat().st_size / 2**20,
             html.count("<img "), seconds, f"; incomplete: {', '.join(missing)}" if missing else "")
    typer.echo(f"report: {out}")
    return out


def _explorer(run: Path, out_dir: Path, cfg: ReportConfig) -> dict | None:
    """Write the per-head explorer (``apmae_gpu.report.explorer_page``); None, logged, when it
    cannot be built (the page itself never fails for it)."""
    try:
        return write_explorer(run, out_dir, cfg)
    except (ApmaeError, OSError, KeyError, ValueError) as exc:
        log.error("report explorer failed: %s", exc)
        return None


def _require_sound(run: Path, man) -> None:
    """Refuse, in one line, a manifest or table the sections would misread
    (:mod:`apmae_gpu.core.tables`; ``apmae check`` lists every such problem)."""
    found = tables.manifest_problems(man)
    if found:
        raise ApmaeError(f"{run / layout.MANIFEST_JSON}: {found[0]}: restore it from a backup, or "
                         f"rerun the stages into a new run")
    for rel in tables.TABLES:
        if (run / rel).exists():
            tables.require(run / rel, rel, f"rerun the stage that writes it (`apmae check {run}` "
                                           f"says which)")


def execute_notebook(run: Path, out: Path, timeout: int = 600) -> Path:
    """Execute ``notebooks/findings.ipynb`` on ``run`` (env ``APMAE_RUN``); keep the result."""
    try:
        import nbclient
        import nbformat
    except ImportError:
        raise ApmaeError("executing the notebook needs nbclient and nbformat "
                         "(pip install 'apmae_gpu[test]')") from None
    if not NOTEBOOK.exists():
        raise ApmaeError(f"{NOTEBOOK} not found (notebooks ship with the source tree)")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    old = os.environ.get("APMAE_RUN")
    os.environ["APMAE_RUN"] = str(run.resolve())
    try:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    except nbclient.exceptions.CellExecutionError as exc:
        raise ApmaeError(f"{NOTEBOOK.name} failed on {run}: {str(exc).splitlines()[0]}") from None
    finally:
        if old is None:
            os.environ.pop("APMAE_RUN", None)
        else:
            os.environ["APMAE_RUN"] = old
    with atomic_path(out) as tmp:
        nbformat.write(nb, str(tmp))
        tmp.chmod(0o644)
    return out


__all__ = [
    "SECTIONS",
    "example_maps",
    "execute_notebook",
    "image",
    "render",
    "report",
    "table",
    "target_accuracy",
    "training_curve",
]
