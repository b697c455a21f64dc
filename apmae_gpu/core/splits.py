"""Which maps train AP-MAE and which validate it (``apmae train``, ``apmae evaluate``).

A deterministic share of the ``train``-split inferences (``val_fraction``, by a hash of
``inference_id``, so every map of one prompt sits on one side, and ``apmae evaluate --split
validation`` finds the same maps in any process) is held out for validation.
:func:`select_maps` picks the maps ``apmae evaluate`` measures by the same rule.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import read_manifest
from apmae_gpu.core.store import MapStore

# what ``apmae evaluate --split`` takes
EVAL_SPLITS = ("validation", "train", "analysis", "all")


def validation_mask(inference_ids, fraction: float) -> np.ndarray:
    """[n] bool: the inference is held out for validation.

    Hash-based (splitmix64 of the id), so the choice depends only on the id and the fraction,
    and a smaller fraction picks a subset of a larger one.  When ``fraction > 0`` picks none,
    the inference with the smallest hash is held out (tiny runs still validate).
    """
    ids = np.asarray(inference_ids, dtype=np.int64).astype(np.uint64)
    if not 0.0 <= fraction < 1.0:
        raise ApmaeError(f"--val-fraction must lie in [0, 1), got {fraction}")
    with np.errstate(over="ignore"):
        z = ids + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    held = u < fraction
    if fraction > 0 and ids.size > 1 and not held.any():
        held[np.argmin(u)] = True
    return held


def split_maps(store: MapStore, val_fraction: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Map ids (sorted) of the training and validation maps of a store, and counts."""
    inf = store.inferences(columns=["inference_id", "split", "has_maps"])
    if inf.empty or store.n_maps == 0:
        raise ApmaeError(f"{store.run}: the maps store is empty (run `apmae capture` first)")
    inf = inf[(inf["split"] == "train") & inf["has_maps"]]
    if inf.empty:
        raise ApmaeError(f"{store.run}: no train-split inferences with maps "
                         "(run `apmae capture --split train`)")
    held = validation_mask(inf["inference_id"].to_numpy(), val_fraction)
    val_inf = set(inf["inference_id"].to_numpy()[held].tolist())
    train_inf = set(inf["inference_id"].to_numpy()[~held].tolist())
    index = store.index(columns=["map_id", "inference_id"])
    map_inf = index["inference_id"].to_numpy()
    train_ids = index["map_id"].to_numpy()[np.isin(map_inf, list(train_inf))]
    val_ids = index["map_id"].to_numpy()[np.isin(map_inf, list(val_inf))]
    counts = {"n_train_inferences": len(train_inf), "n_val_inferences": len(val_inf),
              "n_train_maps": int(train_ids.size), "n_val_maps": int(val_ids.size)}
    if train_ids.size == 0:
        raise ApmaeError(f"{store.run}: every train inference is held out for validation; "
                         "lower --val-fraction")
    return np.sort(train_ids), np.sort(val_ids), counts


def select_maps(store: MapStore, split: str, max_maps: int, seed: int = 0,
                val_fraction: float | None = None) -> pd.DataFrame:
    """Index rows (map_id, inference_id, layer, head) of the maps to evaluate, by map_id.

    ``validation``: maps of the train-split inferences training held out (same hash rule,
    fraction from the run's manifest, else 0.1); ``train``: the others; ``analysis``; ``all``.
    At most ``max_maps``, drawn with ``seed``.
    """
    if split not in EVAL_SPLITS:
        raise ApmaeError(f"--split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    index = store.index()
    if split != "all":
        inf = store.inferences(columns=["inference_id", "split", "has_maps"])
        if inf.empty:
            raise ApmaeError(f"{store.run}: the maps store is empty")
        want = inf[(inf["split"] == ("analysis" if split == "analysis" else "train"))
                   & inf["has_maps"]]
        if split in ("validation", "train"):
            if val_fraction is None:
                val_fraction = read_manifest(store.run).get("train", {}).get("val_fraction", 0.1)
            held = validation_mask(want["inference_id"].to_numpy(), val_fraction)
            want = want[held if split == "validation" else ~held]
        index = index[index["inference_id"].isin(want["inference_id"])]
    if index.empty:
        raise ApmaeError(f"{store.run}: no maps in split {split!r}")
    if len(index) > max_maps:
        rng = np.random.default_rng(seed)
        index = index.iloc[np.sort(rng.choice(len(index), max_maps, replace=False))]
    return index.sort_values("map_id").reset_index(drop=True)
