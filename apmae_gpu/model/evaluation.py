"""Evaluating AP-MAE checkpoints (``apmae evaluate``): reconstruction MSE with baselines.

For every checkpoint x dataset pair (the paper's cross-evaluation, Table 2) the masked-patch
MSE of each map is measured (the training loss: masked patches only, pixels on or below the
diagonal, in the checkpoint's own input space), together with two trivial predictors on
*exactly the same masks*:

``visible_mean``
    every masked patch predicted as the pixel-wise mean of the map's visible patches;
``dataset_mean``
    every masked patch predicted as the mean patch of its grid position over the evaluated
    maps (an oracle-ish per-position average).

``mse_padded_*`` is the same error by the paper's Table 2 definition: the padding above the
diagonal of the masked diagonal patches counted as pixels (with no error, as it is a known
zero), so it reads ~11% lower at 256/32 and sits beside the paper's numbers.

Masks come from one seeded noise tensor per dataset, shared by every checkpoint and baseline.
For checkpoints trained on raw probabilities (``apmae train --raw``), ``mse_log_*`` re-measures
every prediction in the common log-min-max space, so the paper's log-vs-raw ablation compares
on one scale (for log-min-max checkpoints it equals ``mse_*``).

Outputs in ``--out`` (default ``RUN/evaluate`` of the first ``--data``):
``evaluation.parquet`` (checkpoint, dataset, method, mse_mean, mse_std, n_maps, ...),
``evaluation_maps.parquet`` (per-map MSE with map_id, inference_id, layer, head) and
``reconstruction_<checkpoint>_on_<dataset>.png`` figures like the paper's Fig. 1.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from apmae_gpu.capture.llm import quiet_hf_progress
from apmae_gpu.core import layout
from apmae_gpu.core.config import EvaluateConfig, section
from apmae_gpu.core.devices import autocast, resolve_device
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.figures import pyplot, save_figure
from apmae_gpu.core.frames import update_manifest, write_parquet
from apmae_gpu.core.logs import progress
from apmae_gpu.core.scaling import FLOOR, log_minmax, log_range_min, rescale_logs
from apmae_gpu.core.splits import select_maps
from apmae_gpu.core.store import MapStore
from apmae_gpu.model.baselines import dataset_mean_patches, visible_mean_prediction
from apmae_gpu.model.checkpoints import FINAL, resolve_checkpoint
from apmae_gpu.model.network import APMAEModel, lower_mask

log = logging.getLogger("apmae_gpu.model.evaluation")

METHODS = ("apmae", "visible_mean", "dataset_mean")


# --------------------------------------------------------------------------- metrics
def log_space_mse(model: APMAEModel, maps: torch.Tensor, pred: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """Per-map masked MSE [B] of ``pred`` (in ``model``'s input space) re-measured in the
    log-min-max space, using each original map's log range (a raw prediction below the map's
    smallest non-zero probability counts as that probability, i.e. 0 in this space)."""
    c = model.config
    if c.stored_scaler == "log_normalize":   # stored in this space already
        return model.forward_loss(model.prepare(maps), pred, mask, per_map=True)
    logs, keep = model.patch_logs(maps)
    target = log_minmax(logs, keep, dims=(1, 2))
    if c.input_scaling == "raw":
        lo = log_range_min(logs, keep, dims=(1, 2))
        pred = rescale_logs(pred.float().clamp(FLOOR, 1.0).log(), lo).clamp_min(0.0)
    return model.forward_loss(target, pred, mask, per_map=True)


# --------------------------------------------------------------------------- inputs
def _label(path: Path, kind: str) -> str:
    path = path.resolve()
    if kind == "checkpoint":
        if path.name == FINAL:  # RUN/apmae/final -> RUN; DIR/final -> DIR
            parent = path.parent
            return (parent.parent if parent.name == "apmae" else parent).name
        if path.name.startswith("step-") and path.parent.name == layout.CHECKPOINTS_DIR:
            return f"{path.parent.parent.parent.name}@{path.name}"
    return path.name


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for s in labels:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}#{seen[s]}")
    return out


def _read(store: MapStore, ids: np.ndarray) -> torch.Tensor:
    maps = store.read(ids)
    if not np.isfinite(maps).all():
        raise ApmaeError(f"{store.maps_path}: NaN or infinite values among the evaluated maps")
    return torch.from_numpy(maps)


# --------------------------------------------------------------------------- figure
def reconstruction_figure(model: APMAEModel, maps: torch.Tensor, noise: torch.Tensor,
                          path, title: str = "") -> Path:
    """Fig. 1-like PNG: per map, original, masked input, reconstruction, and the visible
    original combined with the reconstructed masked patches (model input space)."""
    plt = pyplot()
    import matplotlib
    from matplotlib.colors import LogNorm

    dev = model.pixel_valid.device
    with torch.inference_mode():
        x = maps.to(dev)
        _, pred, mask = model(x, noise=noise.to(dev))
        target = model.prepare(x)
        m = mask[..., None].bool()
        masked_in = target.masked_fill(m, float("nan"))
        combined = torch.where(m, pred.float(), target)
        panels = [model.unpatchify(t.float()).cpu().numpy()
                  for t in (target, masked_in, pred.float(), combined)]
    upper = ~lower_mask(model.config.image_size).numpy()
    raw = model.config.input_scaling == "raw"
    n = maps.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n), squeeze=False)
    names = ("original", "masked input", "reconstruction", "combined")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.8")  # masked patches grey
    for i in range(n):
        for j in range(4):
            img = panels[j][i]
            if raw:  # log colour scale (the paper's Fig. 1c); predictions <= 0 at its floor
                img = np.clip(img, 1e-4, 1.0)
            ax = axes[i, j]
            ax.imshow(np.ma.masked_invalid(img), cmap=cmap,
                      norm=LogNorm(vmin=1e-4, vmax=1.0) if raw else None,
                      vmin=None if raw else 0.0, vmax=None if raw else 1.0)
            ax.imshow(np.ma.masked_where(~upper, np.ones_like(img)), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(names[j], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110, format="png")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", s)


# --------------------------------------------------------------------------- evaluate
def evaluate(checkpoints, data, settings: EvaluateConfig | None = None, *, out=None,
             device: str = "auto", seed: int = 0, **overrides) -> pd.DataFrame:
    """Reconstruction MSE of every checkpoint on every dataset, with baselines; prints a
    table and writes ``evaluation.parquet``, ``evaluation_maps.parquet`` and figures.

    ``settings``: the ``evaluate`` section (:class:`~apmae_gpu.core.config.EvaluateConfig`), with
    keyword ``overrides`` of its fields over it; its ``checkpoints`` / ``data`` are the
    pipeline's to add to the arguments."""
    t0 = time.perf_counter()
    cfg = section(EvaluateConfig, settings, overrides)
    split, max_maps, batch_size, figure_maps = (cfg.split, cfg.max_maps, cfg.batch_size,
                                                cfg.figure_maps)
    checkpoints, data = [Path(c) for c in checkpoints], [Path(d) for d in data]
    if not checkpoints or not data:
        raise ApmaeError("give at least one --checkpoint and one --data")
    device = resolve_device(device)
    out = Path(out) if out is not None else data[0] / layout.EVALUATE_DIR
    paths = [resolve_checkpoint(c) for c in checkpoints]
    ck_names = _unique([_label(p, "checkpoint") for p in paths])
    ds_names = _unique([_label(d, "dataset") for d in data])
    models = []
    for p in paths:
        with quiet_hf_progress():
            try:
                m = APMAEModel.from_pretrained(p)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise ApmaeError(f"{p}: cannot load the AP-MAE checkpoint "
                                 f"({str(exc).splitlines()[0]})") from None
        models.append(m.to(device).eval())

    rows, per_map = [], []
    out.mkdir(parents=True, exist_ok=True)
    for dpath, dname in zip(data, ds_names):
        store = MapStore(dpath)
        for m, p in zip(models, paths):
            c = m.config
            if c.image_size != store.info.window:
                raise ApmaeError(f"{p} takes {c.image_size}x{c.image_size} maps; {dpath} holds "
                                 f"{store.info.window}x{store.info.window}")
            if c.stored_scaler != store.info.scaler:
                raise ApmaeError(f"{p} reads maps stored as {c.stored_scaler!r}; {dpath} holds "
                                 f"{store.info.scaler!r} maps")
        sel = select_maps(store, split, max_maps, seed)
        ids = sel["map_id"].to_numpy()
        n = ids.size
        starts = range(0, n, batch_size)
        log.info("%s: %d %s maps", dname, n, split)
        noise = {}
        for m in models:
            k = m.config.num_patches
            if k not in noise:
                noise[k] = torch.rand(n, k, generator=torch.Generator().manual_seed(seed))
        # pass 1: dataset mean patches (per input space)
        means: dict[tuple, torch.Tensor] = {}
        for m in models:
            key = (m.config.input_scaling, m.config.patch_size, m.config.stored_scaler)
            if key not in means:
                means[key] = dataset_mean_patches(
                    m, (_read(store, ids[s:s + batch_size]).to(device) for s in starts)).to(device)
        # pass 2: model and baselines on the same masks
        res = {(i, meth): ([], [], []) for i in range(len(models)) for meth in METHODS}
        for s in progress(starts, desc=f"evaluate {dname}", unit="batch"):
            x = _read(store, ids[s:s + batch_size]).to(device)
            for i, m in enumerate(models):
                c = m.config
                nz = noise[c.num_patches][s:s + batch_size].to(device)
                with torch.inference_mode():
                    with autocast(device):
                        _, pred, mask = m(x, noise=nz)
                    target = m.prepare(x)
                    key = (c.input_scaling, c.patch_size, c.stored_scaler)
                    preds = {"apmae": pred.float(),
                             "visible_mean": visible_mean_prediction(target, mask, m.pixel_valid),
                             "dataset_mean": means[key][None].expand_as(target)}
                    for meth, pr in preds.items():
                        mse = m.forward_loss(target, pr, mask, per_map=True)
                        mlog = mse if c.input_scaling == "log_minmax" else log_space_mse(
                            m, x, pr, mask)
                        res[(i, meth)][0].append(mse.cpu())
                        res[(i, meth)][1].append(mlog.cpu())
                        res[(i, meth)][2].append(m.forward_loss(
                            target, pr, mask, per_map=True, count_padding=True).cpu())
        for i, (m, p, cname) in enumerate(zip(models, paths, ck_names)):
            for meth in METHODS:
                mse = torch.cat(res[(i, meth)][0]).double().numpy()
                mlog = torch.cat(res[(i, meth)][1]).double().numpy()
                mpad = torch.cat(res[(i, meth)][2]).double().numpy()
                rows.append({"checkpoint": str(p), "checkpoint_name": cname,
                             "dataset": str(dpath), "dataset_name": dname, "split": split,
                             "method": meth, "mse_mean": float(mse.mean()),
                             "mse_std": float(mse.std()), "mse_median": float(np.median(mse)),
                             "n_maps": int(n), "input_scaling": m.config.input_scaling,
                             "mse_log_mean": float(mlog.mean()), "mse_log_std": float(mlog.std()),
                             "mse_padded_mean": float(mpad.mean()),
                             "mse_padded_std": float(mpad.std()), "seed": seed})
                per_map.append(pd.DataFrame({
                    "checkpoint_name": cname, "dataset_name": dname, "method": meth,
                    "map_id": ids, "inference_id": sel["inference_id"].to_numpy(),
                    "layer": sel["layer"].to_numpy(), "head": sel["head"].to_numpy(),
                    "mse": mse.astype(np.float32), "mse_log": mlog.astype(np.float32),
                    "mse_padded": mpad.astype(np.float32)}))
            if figure_maps > 0:
                pick = np.linspace(0, n - 1, min(figure_maps, n)).astype(int)
                reconstruction_figure(
                    m, _read(store, ids[pick]), noise[m.config.num_patches][pick],
                    out / f"reconstruction_{_slug(cname)}_on_{_slug(dname)}.png",
                    title=f"{cname} on {dname} ({m.config.input_scaling})")
    table = pd.DataFrame(rows)
    write_parquet(table, out / layout.EVALUATION_PARQUET)
    write_parquet(pd.concat(per_map, ignore_index=True), out / layout.EVALUATION_MAPS_PARQUET)
    _print_tables(table)
    update_manifest(data[0], "evaluate", {
        "out": str(out), "split": split, "max_maps": max_maps, "seed": seed,
        "checkpoints": [str(p) for p in paths], "datasets": [str(d) for d in data],
        "results": table[["checkpoint_name", "dataset_name", "method", "mse_mean", "mse_std",
                          "mse_padded_mean", "n_maps"]].to_dict(orient="records"),
        "seconds": time.perf_counter() - t0})
    return table


def _print_tables(table: pd.DataFrame) -> None:
    console = Console()
    show_log = (table["input_scaling"] != "log_minmax").any()
    t = Table(title=f"AP-MAE reconstruction MSE (x1e-3, masked patches, split "
                    f"{table['split'].iloc[0]})")
    for col in ("checkpoint", "dataset", "method", "mean ± std", "Table 2 def.", "n maps"):
        t.add_column(col, justify="left" if col in ("checkpoint", "dataset", "method")
                     else "right")
    if show_log:
        t.add_column("log-space mean ± std", justify="right")
    for r in table.itertuples():
        cells = [r.checkpoint_name, r.dataset_name, r.method,
                 f"{r.mse_mean * 1e3:.2f} ± {r.mse_std * 1e3:.2f}",
                 f"{r.mse_padded_mean * 1e3:.2f} ± {r.mse_padded_std * 1e3:.2f}", str(r.n_maps)]
        if show_log:
            cells.append(f"{r.mse_log_mean * 1e3:.2f} ± {r.mse_log_std * 1e3:.2f}")
        t.add_row(*cells)
    console.print(t)
    ap = table[table["method"] == "apmae"]
    if ap["checkpoint_name"].nunique() > 1 or ap["dataset_name"].nunique() > 1:
        # checkpoints of different input scalings compare only in the common log space
        mixed = ap["input_scaling"].nunique() > 1
        col = "mse_log" if mixed else "mse"
        cross = Table(title="Cross-evaluation (AP-MAE MSE x1e-3"
                            + (", log-min-max space" if mixed else "")
                            + "; rows trained on, columns evaluated on)")
        cross.add_column("checkpoint")
        datasets = list(dict.fromkeys(ap["dataset_name"]))
        for d in datasets:
            cross.add_column(d, justify="right")
        for ck, g in ap.groupby("checkpoint_name", sort=False):
            cells = {r.dataset_name: f"{getattr(r, col + '_mean') * 1e3:.2f} ± "
                                     f"{getattr(r, col + '_std') * 1e3:.2f}"
                     for r in g.itertuples()}
            cross.add_row(ck, *[cells.get(d, "") for d in datasets])
        console.print(cross)
