"""Synthetic attention maps and runs, for tests and benchmarks only.

Maps are real causal softmax distributions built from a few recurring pattern families seen in
LLM heads (previous-token diagonals, attention sinks / vertical stripes, local windows, uniform,
periodic blocks), so that AP-MAE can learn them and clustering can recover them.  Nothing
here is used on real data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from apmae_gpu import TASKS
from apmae_gpu.capture import llm
from apmae_gpu.core import layout
from apmae_gpu.core.frames import write_parquet
from apmae_gpu.core.scaling import FLOOR, LOG_FILL
from apmae_gpu.core.store import INFERENCE_SCHEMA, MapStore
from apmae_gpu.mining.tasks import TASKS_SCHEMA

PATTERNS = ("diagonal", "sink", "local", "uniform", "blocks")


def pattern_scores(kind: str, window: int, rng: np.random.Generator) -> np.ndarray:
    """Attention logits [window, window] of one pattern family (before the causal mask)."""
    i = np.arange(window)[:, None]
    j = np.arange(window)[None, :]
    d = i - j
    if kind == "diagonal":
        off = int(rng.integers(0, 3))
        s = np.where(d == off, 8.0, 0.0)
    elif kind == "sink":
        cols = rng.choice(window // 2, size=int(rng.integers(1, 4)), replace=False)
        s = np.where(np.isin(j, cols), 6.0, 0.0) + 0.0 * i
    elif kind == "local":
        width = int(rng.integers(4, 16))
        s = np.where((d >= 0) & (d < width), 4.0, 0.0)
    elif kind == "uniform":
        s = np.zeros((window, window))
    elif kind == "blocks":
        period = int(rng.integers(16, 64))
        s = np.where((i // period) == (j // period), 3.0, 0.0) + np.where(d % period == 0, 3.0, 0.0)
    else:
        raise ValueError(kind)
    return s.astype(np.float64)


def causal_softmax(scores: np.ndarray) -> np.ndarray:
    w = scores.shape[-1]
    mask = np.tril(np.ones((w, w), dtype=bool))
    s = np.where(mask, scores, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def log_scale(p: np.ndarray) -> np.ndarray:
    """The ``log`` scaler of capture on float32 probabilities: ln p where p > 0, else (and
    above the diagonal) ``LOG_FILL``."""
    w = p.shape[-1]
    p32 = p.astype(np.float32)
    with np.errstate(divide="ignore"):
        out = np.where(p32 > 0, np.log(p32), LOG_FILL)
    out[..., ~np.tril(np.ones((w, w), dtype=bool))] = LOG_FILL
    return out


def synthetic_maps(n: int, window: int = 256, seed: int = 0, kinds: np.ndarray | None = None,
                   noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``n`` log-scaled float16 maps and their pattern ids ([n] ints into PATTERNS)."""
    rng = np.random.default_rng(seed)
    if kinds is None:
        kinds = rng.integers(0, len(PATTERNS), size=n)
    out = np.empty((n, window, window), np.float16)
    for k in range(n):
        s = pattern_scores(PATTERNS[int(kinds[k])], window, rng)
        s = s + noise * rng.standard_normal((window, window))
        out[k] = log_scale(causal_softmax(s)).astype(np.float16)
    return out, np.asarray(kinds)


def synthetic_run(run: str | Path, n_layers: int = 2, n_heads: int = 3, window: int = 64,
                  n_train: int = 40, n_per_task: int = 6, tasks: tuple[str, ...] = TASKS,
                  seed: int = 0, chunk_maps: int = 16) -> Path:
    """A run directory with a maps store like capture writes: a ``train`` split (all heads,
    random masking, correct only) and an ``analysis`` split (every task, ``n_per_task`` correct
    and ``n_per_task`` incorrect, noise without correctness).

    Each head has a preferred pattern that depends on the inference's correctness for some
    heads, so a classifier has something real to find: heads with ``(layer + head) % 2 == 0``
    switch pattern with correctness, the others do not.
    """
    run = Path(run)
    rng = np.random.default_rng(seed)
    store = MapStore.create_or_open(run, window=window, scaler="log",
                                    fill_value=LOG_FILL, floor=FLOOR,
                                    chunk_maps=chunk_maps)
    rows = []
    inf_id = 0
    for split in ("train", "analysis"):
        plan: list[tuple[str, bool | None]] = []
        if split == "train":
            plan = [("random_masking", True)] * n_train
        else:
            for task in tasks:
                if task == "noise":
                    plan += [(task, None)] * n_per_task
                else:
                    plan += [(task, True)] * n_per_task + [(task, False)] * n_per_task
        for task, correct in plan:
            kinds = []
            for layer in range(n_layers):
                for head in range(n_heads):
                    base = (layer * n_heads + head) % len(PATTERNS)
                    if (layer + head) % 2 == 0 and correct is False:
                        base = (base + 1) % len(PATTERNS)
                    if rng.random() < 0.15:  # some variety within a head
                        base = int(rng.integers(0, len(PATTERNS)))
                    kinds.append(base)
            maps, _ = synthetic_maps(len(kinds), window, seed=int(rng.integers(1 << 31)),
                                     kinds=np.asarray(kinds))
            index = pd.DataFrame({"inference_id": inf_id,
                                  "layer": np.repeat(np.arange(n_layers), n_heads),
                                  "head": np.tile(np.arange(n_heads), n_layers)})
            target = int(rng.integers(100, 1000))
            pred = target if correct else target + 1
            row = {"inference_id": inf_id, "split": split, "task": task, "task_id": -1,
                   "batch": inf_id, "input_ids": rng.integers(0, 1000, size=window).tolist(),
                   "target_token_id": -1 if correct is None else target,
                   "predicted_token_id": pred, "correct": correct,
                   "target_logprob": float("nan") if correct is None else -float(rng.random()),
                   "target_rank": -1 if correct is None else (0 if correct else 1),
                   "predicted_logprob": -float(rng.random()), "has_maps": True,
                   "n_maps": len(kinds), "attempt": inf_id}
            store.commit(maps, index, pd.DataFrame([row]), inference_schema=INFERENCE_SCHEMA)
            rows.append(row)
            inf_id += 1
    return run


def synthetic_tasks(run: str | Path, model: str, n_per_task: int = 6, window: int = 32,
                    seed: int = 0, tasks: tuple[str, ...] = ("identifiers", "closing_brackets",
                                                            "random_masking", "noise"),
                    model_seed: int = 0) -> Path:
    """A run whose ``tasks.parquet`` holds random prompts with targets chosen from ``model``'s
    own greedy prediction (even rows: the prediction, odd rows: another token), so a random-
    weight model still yields correct and incorrect inferences.  ``model_seed`` must be the
    seed capture will load the model with (its ``--seed``)."""
    run = Path(run)
    lm = llm.load_model(model, device="cpu", seed=model_seed)
    vocab = lm.get_input_embeddings().num_embeddings
    rng = np.random.default_rng(seed)
    rows = []
    for task in tasks:
        ids = rng.integers(100, min(vocab, 40000), size=(n_per_task, window))
        with torch.inference_mode():
            pred = lm(input_ids=torch.tensor(ids)).logits[:, -1].argmax(-1).numpy()
        for i in range(n_per_task):
            target = -1 if task == "noise" else int(pred[i] if i % 2 == 0 else (pred[i] + 1) % vocab)
            rows.append({"task": task, "source": f"synthetic/{task}/{i}.java", "start_byte": 0,
                         "end_byte": 1, "target": "x", "kind": "synthetic",
                         "input_ids": ids[i].tolist(), "target_token_id": target,
                         "target_token_ids": [] if target < 0 else [target], "fim": False,
                         "window_rule": "left" if task != "noise" else "noise",
                         "n_left": window, "n_right": 0, "file_sha256": "",
                         "split": None})   # either split may take a row (each its own file)
    df = pd.DataFrame(rows)
    df.insert(0, "task_id", np.arange(len(df), dtype=np.int64))
    run.mkdir(parents=True, exist_ok=True)
    write_parquet(df, run / layout.TASKS_PARQUET, schema=TASKS_SCHEMA)
    return run
