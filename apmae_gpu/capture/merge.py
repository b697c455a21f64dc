"""Merging a capture's shards (``RUN/shards/K-of-N``, from torchrun ranks or ``--shard K/N``
processes) into the run's own store: exactly the rounds one process would have computed, in
its order, with the keep rule applied to the complete outcomes (see :mod:`apmae_gpu.capture.ranks`);
with ``--encode-with`` the kept embeddings instead of maps
(:class:`apmae_gpu.encoding.merge.EmbeddingMerge`).  Each commit is one round, so a killed
merge reruns to the same result.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from apmae_gpu.capture.ranks import Outcomes, RoundPlan, outcome_code, summary
from apmae_gpu.core import layout
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import read_manifest, update_manifest
from apmae_gpu.core.store import INFERENCE_SCHEMA, MapStore
from apmae_gpu.encoding.merge import EmbeddingMerge

log = logging.getLogger("apmae_gpu.capture.ranks")


def load_plan(path: Path) -> tuple[RoundPlan, dict]:
    data = json.loads(Path(path).read_text())
    order = {t: np.zeros(n, np.int64) for t, n in data["candidates"].items()}
    capped = data.get("capped", {})
    return RoundPlan(data["split"], int(data["quota"]), int(data["batch"]), order, capped), data


def merge_capture(run: Path) -> dict:
    """Append the needed rounds of every shard under ``RUN/shards`` to RUN's store, in the
    order one process commits them (see module docstring); resumable; removes the shards."""
    run = Path(run)
    dirs = [d for d in layout.shard_dirs(run) if (d / layout.MAPS_ZARR).exists()]
    plans = sorted((run / layout.SHARDS_DIR).glob("plan-*.json"),
                   key=lambda p: json.loads(p.read_text())["created_ns"])
    if not dirs:
        raise ApmaeError(f"{run}/shards holds no shard to merge")
    if not plans:
        raise ApmaeError(f"{run}/shards has no plan-<split>.json (shards written by an older "
                         "apmae_gpu cannot be merged by this one)")
    srcs = [MapStore(d) for d in dirs]
    infs = [s.inferences() for s in srcs]
    indexes = [s.index() for s in srcs]
    merged, surplus, t0 = 0, 0, time.perf_counter()
    section = read_manifest(run).get("capture", {})
    shard_calls: dict[str, dict] = {}
    for d, man in ((d, read_manifest(d)) for d in dirs):
        for key, value in man.get("capture", {}).items():
            if key != "splits":
                section.setdefault(key, value)
        for split, info in man.get("capture", {}).get("splits", {}).items():
            shard_calls.setdefault(split, {})[d.name] = info.get("this_call")
    for plan_file in plans:
        plan, extra = load_plan(plan_file)
        known = Outcomes(plan, run)
        needed = known.needed_rounds()
        info = srcs[0].info
        dst = MapStore.create_or_open(run, window=info.window, scaler=info.scaler,
                                      fill_value=info.fill_value, floor=info.floor,
                                      chunk_maps=info.chunk_maps)
        emb = None
        if extra.get("encode_with"):
            emb = EmbeddingMerge(run, dst, plan.split, extra, dirs, int(section["n_layers"]),
                                 int(section["n_heads"]))
        done = dst.inferences()
        have = set()
        if not done.empty:
            mine = done[done.split == plan.split]
            have = set(zip(mine.task, mine.attempt))
        next_id = int(done.inference_id.max()) + 1 if not done.empty else 0
        next_batch = int(done[done.split == plan.split].batch.max()) + 1 if (
            not done.empty and (done.split == plan.split).any()) else 0
        by_round = [df[df.split == plan.split].set_index(["task", "attempt"]) for df in infs]
        positions = [ix.groupby("inference_id").indices for ix in indexes]
        for k, _, task in needed:
            attempts = plan.attempts(task, k)
            present = [(task, int(a)) in have for a in attempts]
            if all(present):
                continue
            if any(present):
                raise ApmaeError(f"{run}: round {k} of {task} is partly merged; the store is "
                                 "damaged")
            s = next((j for j, df in enumerate(by_round)
                      if all((task, int(a)) in df.index for a in attempts)), None)
            if s is None:
                raise ApmaeError(f"round {k} of {task} is split over shards; rerun the capture")
            part = by_round[s].loc[[(task, int(a)) for a in attempts]].reset_index()
            rows, maps, index_parts = [], [], []
            for b, row in enumerate(part.itertuples(index=False)):
                code = outcome_code(row.correct)
                keep = known.may_keep(task, int(row.attempt), code)
                new_id = next_id + b
                sel = indexes[s].iloc[positions[s].get(row.inference_id, [])]
                if keep and emb is not None:
                    if not row.has_maps:
                        raise ApmaeError(f"{dirs[s]}: inference {row.inference_id} should have "
                                         "its embedding stored; rerun the capture, then merge")
                    emb.take(s, row.inference_id, new_id)
                elif keep:
                    if not row.has_maps or len(sel) == 0:
                        raise ApmaeError(f"{dirs[s]}: inference {row.inference_id} should have "
                                         "its maps stored; rerun the capture with --restart")
                    maps.append(srcs[s].read(sel.map_id.to_numpy()))
                    index_parts.append(pd.DataFrame({"inference_id": new_id,
                                                     "layer": sel.layer.to_numpy(),
                                                     "head": sel["head"].to_numpy()}))
                rows.append({**row._asdict(), "inference_id": new_id, "batch": next_batch,
                             "has_maps": keep, "n_maps": len(sel) if keep else 0})
            if emb is not None:
                emb.flush()
            dst.commit(np.concatenate(maps) if maps else None,
                       pd.concat(index_parts, ignore_index=True) if index_parts else None,
                       pd.DataFrame(rows)[[f.name for f in INFERENCE_SCHEMA]],
                       inference_schema=INFERENCE_SCHEMA)
            next_id += len(rows)
            next_batch += 1
            merged += len(rows)
        if emb is not None:
            emb.close()
        n_split = sum(int((df.split == plan.split).sum()) for df in infs)
        surplus += n_split - sum(len(plan.attempts(t, k)) for k, _, t in needed)
        splits = section.setdefault("splits", {})
        splits[plan.split] = {**{k: extra.get(k) for k in ("per_task", "heads", "batch_size",
                                                           "seed", "max_attempts")},
                              "quota": plan.quota, "shard": None, "tasks": summary(known),
                              "shards": shard_calls.get(plan.split, {}),
                              "surplus_attempts": int(n_split - sum(
                                  len(plan.attempts(t, k)) for k, _, t in needed)),
                              "n_maps_total": dst.n_maps}
    section["merged_shards"] = [d.name for d in dirs]
    section["merge_seconds"] = round(time.perf_counter() - t0, 2)
    update_manifest(run, "capture", section)
    shutil.rmtree(run / layout.SHARDS_DIR)
    log.info("merged %d shards into %s: %d inferences (%d surplus attempts left out)",
             len(dirs), run, merged, surplus)
    return {"shards": len(dirs), "inferences": merged, "surplus_attempts": surplus}
