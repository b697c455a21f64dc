"""The per-head explorer's data (``RUN/report/explorer.json``), built by ``apmae report``.

One JSON object the page (:mod:`apmae_gpu.report.explorer_page`) and notebooks read:

- ``metrics``: layer x head grids the head grid can be coloured by (clusters per head, share
  clustered, SHAP importance per task and its mean, the stability-selection probability and
  the stability ARI where those were computed; ``null`` for a head without a value).
- ``inferences``: a seeded sample of at most ``explorer_points`` analysis inferences, the same
  for every head (columns: ``id``, ``task``, ``correct``, ``left``/``right`` text around the
  hole, ``target``, ``predicted``).
- ``heads``: per clustered head (``"L3H1"``) its numbers from ``cluster/heads.parquet``, the
  2-D coordinates of the sampled points (``row``: position in ``inferences``) with their
  cluster, and its ``explorer_clusters`` largest kept clusters: size, share correct, task mix
  (over every member, from ``clusters_summary``/``locations``), examples (sampled members
  closest to the cluster's centre) and the typical map (mean of at most ``explorer_members``
  sampled members' maps in the log-min-max space, ``explorer_map_px`` pixels a side, a PNG).
- ``missing``: what the page cannot show and why (stage not run, no maps kept, ...).

Bounded size: points <= heads x ``explorer_points`` x ~18 bytes; prompts <= ``explorer_points``
x ~1 KB; typical maps <= heads x ``explorer_clusters`` x ~3 KB at 64 px.
"""

from __future__ import annotations

import base64
import functools
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pyarrow.parquet as pq
import torch

from apmae_gpu import TASKS
from apmae_gpu.capture import llm
from apmae_gpu.core import layout
from apmae_gpu.core.config import ReportConfig
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.figures import pyplot
from apmae_gpu.core.frames import read_manifest
from apmae_gpu.core.layout import cluster_dirs, head_name
from apmae_gpu.core.scaling import log_minmax, stored_logs
from apmae_gpu.core.store import INDEX, INFERENCES, MAPS, MapStore

log = logging.getLogger("apmae_gpu.report.build")

FORMAT = 1
LEFT_CHARS, RIGHT_CHARS = 600, 240   # text kept either side of the hole
LEVELS = 64                          # colours of a typical map's PNG


def head_key(layer: int, head: int) -> str:
    return f"L{int(layer)}H{int(head)}"


def _grid(df: pd.DataFrame, col: str, shape: tuple[int, int]) -> list | None:
    if col not in df or df[col].isna().all():
        return None
    g = np.full(shape, np.nan)
    ok = df.dropna(subset=[col])
    g[ok["layer"].to_numpy(int), ok["head"].to_numpy(int)] = ok[col].to_numpy(float)
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in g]


def metrics(run: Path, heads: pd.DataFrame, shape: tuple[int, int]) -> dict:
    """Layer x head grids the page colours the head grid by (label -> grid)."""
    ok = heads[heads["status"] == "ok"]
    out = {"clusters per head": _grid(ok, "n_clusters", shape),
           "share clustered": _grid(ok, "share_clustered", shape)}
    imp_path = run / layout.CLASSIFY_DIR / layout.HEAD_IMPORTANCE_PARQUET
    if imp_path.exists():
        imp = pd.read_parquet(imp_path)
        if len(imp):
            out["SHAP importance: mean of tasks"] = _grid(
                imp.groupby(["layer", "head"], as_index=False)["importance"].mean(),
                "importance", shape)
            for task in [t for t in TASKS if t in set(imp["task"])]:
                g = imp[imp["task"] == task]
                out[f"SHAP importance: {task}"] = _grid(g, "importance", shape)
                if "selection_probability" in g:
                    out[f"selection probability: {task}"] = _grid(g, "selection_probability",
                                                                  shape)
    stab = cluster_dirs(run)["base"] / layout.STABILITY_HEADS_PARQUET
    if stab.exists():
        s = pd.read_parquet(stab)
        if len(s) and "ari" in s:
            out["stability ARI"] = _grid(s.groupby(["layer", "head"], as_index=False)["ari"]
                                         .mean(), "ari", shape)
    return {k: v for k, v in out.items() if v is not None}


# --------------------------------------------------------------------------- prompts
def _texts(run: Path, inf: pd.DataFrame) -> tuple[list, list, list, list, str | None]:
    """``left``, ``right`` (text either side of the hole), ``target`` and ``predicted`` of
    each inference; token ids as text (and a note) when the tokenizer cannot be loaded."""
    spec = (read_manifest(run).get("capture", {}).get("model") or {})
    spec = spec.get("spec") if isinstance(spec, dict) else spec
    try:
        tok = llm.load_tokenizer(spec) if spec else None
    except ApmaeError as exc:
        tok, note = None, f"prompts shown as token ids: {exc}"
    else:
        note = None if tok is not None else "prompts shown as token ids: no model in the manifest"
    dec = ((lambda ids: tok.decode(list(ids))) if tok is not None
           else (lambda ids: " ".join(map(str, ids))))
    fim = llm.fim_ids(tok) if tok is not None else None
    left, right, target, pred = [], [], [], []
    for r in inf.itertuples():
        ids = [int(i) for i in r.input_ids]
        if fim and fim[0] in ids and fim[1] in ids and fim[2] in ids:
            a, b = ids.index(fim[0]), ids.index(fim[1])
            lt, rt = ids[a + 1:b], ids[b + 1:ids.index(fim[2])]
        else:
            lt, rt = ids, []
        left.append(dec(lt)[-LEFT_CHARS:])
        right.append(dec(rt)[:RIGHT_CHARS])
        target.append(dec([r.target_token_id]) if r.target_token_id >= 0 else None)
        pred.append(dec([r.predicted_token_id]) if r.predicted_token_id >= 0 else None)
    return left, right, target, pred, note


def sample_inferences(run: Path, ids: np.ndarray, cap: int, seed: int = 0) -> pd.DataFrame:
    """A seeded sample of at most ``cap`` of ``ids`` (ascending) with their task, correctness
    and prompt text."""
    ids = np.unique(ids)
    if len(ids) > cap:
        ids = np.sort(np.random.default_rng(seed).choice(ids, cap, replace=False))
    inf = pd.read_parquet(run / INFERENCES, columns=[
        "inference_id", "task", "input_ids", "target_token_id", "predicted_token_id", "correct"])
    return inf.set_index("inference_id").reindex(ids).reset_index()


# --------------------------------------------------------------------------- typical maps
@functools.lru_cache(maxsize=1)
def _palette() -> list[int]:
    pal = (pyplot().get_cmap("magma")(np.linspace(0, 1, LEVELS))[:, :3] * 255).round()
    return np.vstack([pal, [[235, 235, 235]]]).astype(np.uint8).ravel().tolist()


def _png(img: np.ndarray) -> str:
    """``img`` (values in [0, 1], NaN: not a value) as a palette PNG data URI: magma in
    ``LEVELS`` steps, NaN light grey (a small palette: a fraction of an RGB PNG's bytes)."""
    q = np.where(np.isfinite(img), np.clip(np.nan_to_num(img), 0, 1) * (LEVELS - 1), LEVELS)
    im = PIL.Image.fromarray(q.round().astype(np.uint8), mode="P")
    im.putpalette(_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _block_mean(y: torch.Tensor, px: int) -> torch.Tensor:
    """``y`` [..., W, W] block-averaged to at most ``px`` a side (W cut to a multiple)."""
    w = y.shape[-1]
    f = int(np.ceil(w / px))
    if f == 1:
        return y
    n = (w // f) * f
    y = y[..., :n, :n]
    return y.reshape(*y.shape[:-2], n // f, f, n // f, f).mean(dim=(-3, -1))


def log_minmax_maps(maps: np.ndarray, scaler: str, floor: float) -> torch.Tensor:
    """Stored maps ``[k, W, W]`` in the log-min-max space (the reference's AP-MAE input,
    in [0, 1]; 0 above the diagonal)."""
    x = torch.from_numpy(maps.astype(np.float32))
    w = x.shape[-1]
    lower = torch.ones(w, w, dtype=torch.bool).tril()
    if scaler == "log_normalize":
        return x.masked_fill(~lower, 0.0)
    logs, keep = stored_logs(x, scaler, floor, valid=lower)
    return log_minmax(logs, keep, dims=(-2, -1))


def _upper_nan(img: np.ndarray) -> np.ndarray:
    return np.where(np.tril(np.ones(img.shape, bool)), img, np.nan)


def typical_map(maps: np.ndarray, scaler: str, floor: float, px: int) -> np.ndarray:
    """Mean of stored maps ``[k, W, W]`` in the log-min-max space, block-averaged to at most
    ``px`` a side; NaN above the diagonal."""
    y = _block_mean(log_minmax_maps(maps, scaler, floor), px).mean(0)
    return _upper_nan(y.numpy().astype(np.float64))


class MapSource:
    """Typical maps from the sampled inferences' maps: one read of the index, then one pass
    over the sampled inferences (their maps are contiguous in the store), each map added to
    the sum of every cluster it was picked for; or why there are none."""

    BATCH = 8   # inferences per read

    def __init__(self, run: Path, ids: np.ndarray):
        self.missing = None
        self.wanted: dict[tuple[int, int, int], list] = {}   # (layer, head, id) -> slots
        self.slots: list[dict] = []
        idx = pd.DataFrame()
        if (run / MAPS).exists() and (run / INDEX).exists():
            self.store = MapStore(run)
            idx = pq.read_table(run / INDEX, columns=["map_id", "inference_id", "layer", "head"],
                                filters=[("inference_id", "in", [int(i) for i in ids])])
            idx = idx.to_pandas()
        if idx.empty:
            self.missing = ("typical maps: this run keeps no attention maps of the clustered "
                            "inferences (captured and encoded in one pass, capture "
                            "--encode-with); the explorer shows clusters without their "
                            "typical map")
            return
        self.index = idx.sort_values("map_id", kind="stable")

    def want(self, layer: int, head: int, ids, card: dict) -> None:
        """Average the maps of (``ids``, layer, head) into ``card["map"]`` at :meth:`fill`."""
        if self.missing is not None:
            card["map"] = None
            return
        self.slots.append(card)
        for i in ids:
            self.wanted.setdefault((int(layer), int(head), int(i)), []).append(
                len(self.slots) - 1)

    def fill(self, px: int) -> None:
        if self.missing is not None or not self.slots:
            return
        info = self.store.info
        sums, counts = None, np.zeros(len(self.slots), np.int64)
        for _, g in self.index.groupby(self.index["inference_id"].rank(method="dense")
                                       .sub(1).floordiv(self.BATCH), sort=True):
            keys = list(zip(g["layer"], g["head"], g["inference_id"]))
            pick = [k in self.wanted for k in keys]
            if not any(pick):
                continue
            g = g[pick]
            y = _block_mean(log_minmax_maps(self.store.read(g["map_id"].to_numpy(np.int64)),
                                            info.scaler, info.floor), px).numpy()
            if sums is None:
                sums = np.zeros((len(self.slots), *y.shape[1:]), np.float64)
            for row, key in enumerate(k for k, p in zip(keys, pick) if p):
                for slot in self.wanted[key]:
                    sums[slot] += y[row]
                    counts[slot] += 1
        for slot, card in enumerate(self.slots):
            card["map"] = (_png(_upper_nan(sums[slot] / counts[slot])) if counts[slot]
                           else None)


# --------------------------------------------------------------------------- heads
def to_2d(coords: np.ndarray) -> np.ndarray:
    """The head's UMAP coordinates in 2-D: as they are with 2 dims, else their first two
    principal components (1 dim: y = 0); scaled to [0, 1] and rounded to 1e-3."""
    c = coords.astype(np.float64)
    if c.shape[1] == 1:
        c = np.hstack([c, np.zeros_like(c)])
    elif c.shape[1] > 2:
        c = c - c.mean(0)
        c = c @ np.linalg.svd(c, full_matrices=False)[2][:2].T
    lo, span = c.min(0), np.ptp(c, axis=0)
    return np.round((c - lo) / np.where(span > 0, span, 1.0), 3)


def _clusters(summary: pd.DataFrame, locs: pd.DataFrame, part: pd.DataFrame, xy: np.ndarray,
              maps: MapSource, cfg: ReportConfig, layer: int, head: int) -> list[dict]:
    """The head's largest kept clusters: numbers over every member, examples and the typical
    map from the sampled ones."""
    out = []
    mixes = {k: g.groupby("task")["n"].sum() for k, g in locs.groupby("cluster")}
    labels, inf_ids, rows = (part[c].to_numpy() for c in ("cluster", "inference_id", "row"))
    for c in summary.sort_values("size", ascending=False).head(cfg.explorer_clusters).itertuples():
        judged = int(c.n_correct) + int(c.n_incorrect)
        mix = mixes.get(c.cluster, pd.Series(dtype=int))
        members = np.flatnonzero(labels == c.cluster)
        if len(members):
            d = np.linalg.norm(xy[members] - xy[members].mean(0), axis=1)
            members = members[np.argsort(d, kind="stable")]
        ids = inf_ids[members[:cfg.explorer_members]]
        out.append({
            "cluster": int(c.cluster), "size": int(c.size), "share": round(float(c.share), 4),
            "n_correct": int(c.n_correct), "n_incorrect": int(c.n_incorrect),
            "share_correct": round(c.n_correct / judged, 4) if judged else None,
            "task_mix": {t: int(mix[t]) for t in TASKS if t in mix.index},
            "sampled": int(len(members)),
            "examples": [int(r) for r in rows[members[:cfg.explorer_examples]]],
            "map": None, "map_members": int(len(ids))})
        maps.want(layer, head, ids, out[-1])
    return out


def head_detail(run: Path, rec, summary: pd.DataFrame, locs: pd.DataFrame, rows: pd.Series,
                maps: MapSource, cfg: ReportConfig) -> dict:
    """One clustered head: its numbers, the sampled points in 2-D and its clusters."""
    layer, head = int(rec.layer), int(rec.head)
    part = pd.read_parquet(cluster_dirs(run)["parts"] / f"{head_name(layer, head)}.parquet")
    part = part[part["inference_id"].isin(rows.index)].reset_index(drop=True)
    kept = summary[summary["kept"]]
    part.loc[~part["cluster"].isin(kept["cluster"]), "cluster"] = -1   # as clusters.parquet
    part["row"] = rows.reindex(part["inference_id"]).to_numpy()
    coords = part[[c for c in part.columns if c.startswith("umap_")]].to_numpy()
    xy = to_2d(coords) if len(part) else np.zeros((0, 2))
    return {
        "layer": layer, "head": head, "n_clusters": int(rec.n_clusters),
        "n_points": int(rec.n_points), "share_clustered": round(float(rec.share_clustered), 4),
        "umap_dims": int(coords.shape[1]), "row": part["row"].astype(int).tolist(),
        "x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(),
        "cluster": part["cluster"].astype(int).tolist(),
        "clusters": _clusters(kept, locs, part, xy, maps, cfg, layer, head),
        "more_clusters": max(0, len(kept) - cfg.explorer_clusters)}


# --------------------------------------------------------------------------- the whole run
def _clustered(run: Path) -> str | None:
    base = cluster_dirs(run)["base"]
    for need in (base / layout.HEADS_PARQUET, base / layout.CLUSTERS_SUMMARY_PARQUET,
                 base / layout.LOCATIONS_PARQUET, run / layout.CLUSTERS_PARQUET):
        if not need.exists():
            return f"stage not run: cluster (no {need.relative_to(run)} in this run)"
    return None


def explorer_data(run: Path, cfg: ReportConfig, seed: int = 0) -> dict:
    """The explorer's JSON object for ``run`` (see the module's doc)."""
    man = read_manifest(run)
    cap = man.get("capture", {})
    model = cap.get("model")
    data = {"format": FORMAT, "run": run.resolve().name,
            "model": model.get("spec") if isinstance(model, dict) else model,
            "settings": {k: getattr(cfg, k) for k in ReportConfig.model_fields
                         if k.startswith("explorer_")},
            "tasks": [], "metrics": {}, "inferences": {}, "heads": {}, "missing": []}
    why = _clustered(run)
    if why:
        data["missing"].append(why)
        return data
    base = cluster_dirs(run)["base"]
    heads = pd.read_parquet(base / layout.HEADS_PARQUET)
    shape = (int(cap.get("n_layers") or heads["layer"].max() + 1),
             int(cap.get("n_heads") or heads["head"].max() + 1))
    data["n_layers"], data["n_heads"] = shape
    data["metrics"] = metrics(run, heads, shape)
    ids = pq.read_table(run / layout.CLUSTERS_PARQUET, columns=["inference_id"])["inference_id"]
    inf = sample_inferences(run, ids.to_numpy(), cfg.explorer_points, seed)
    left, right, target, pred, note = _texts(run, inf)
    tasks = [t for t in TASKS if t in set(inf["task"])]
    data["tasks"] = tasks
    data["inferences"] = {
        "id": inf["inference_id"].astype(int).tolist(),
        "task": [tasks.index(t) for t in inf["task"]],
        "correct": [None if pd.isna(c) else bool(c) for c in inf["correct"]],
        "left": left, "right": right, "target": target, "predicted": pred}
    data["missing"] += [note] if note else []
    maps = MapSource(run, inf["inference_id"].to_numpy())
    data["missing"] += [maps.missing] if maps.missing else []
    rows = pd.Series(np.arange(len(inf)), index=inf["inference_id"].to_numpy())
    summary = pd.read_parquet(base / layout.CLUSTERS_SUMMARY_PARQUET)
    locs = pd.read_parquet(base / layout.LOCATIONS_PARQUET)
    by_head = {k: g for k, g in summary.groupby(["layer", "head"])}
    locs_by = {k: g for k, g in locs.groupby(["layer", "head"])}
    for rec in heads[heads["status"] == "ok"].itertuples():
        key = (rec.layer, rec.head)
        data["heads"][head_key(*key)] = head_detail(
            run, rec, by_head.get(key, summary.iloc[:0]), locs_by.get(key, locs.iloc[:0]),
            rows, maps, cfg)
    maps.fill(cfg.explorer_map_px)
    failed = heads[heads["status"] != "ok"]
    if len(failed):
        data["missing"].append(f"{len(failed)} head(s) not clustered (cluster/heads.parquet): "
                               + ", ".join(head_key(r.layer, r.head) for r in failed.head(10)
                                           .itertuples()))
    return data
