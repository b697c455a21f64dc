"""Intervention: zero the heads SHAP selects and count which predictions flip.

Ablation
    A head is ablated by zeroing its slice of the attention output (``[..., H * head_dim]``,
    head-major) right before the output projection (``o_proj`` for Llama/Starcoder2,
    ``c_proj`` for GPT-2; grouped-query attention included: query heads are zeroed, shared
    KV heads are untouched).  The projection's bias stays: it belongs to no head.  Hooks are
    forward pre-hooks installed by :func:`ablate_heads` / :func:`scale_heads`, context managers
    that always remove them; a mask can differ per sample, so many conditions run in one batch.

Head groups (per task, from ``classify/head_importance.parquet``), as the reference forms them
    ``positive``: largest mean of the positive parts of the head's SHAP values
    (``mean_shap_pos``) first; ``negative``: most negative mean of the negative parts
    (``mean_shap_neg``) first (``--rank-by mean_shap``: the signed mean for both, an option);
    ``zero``: the paper's "near zero" heads, ``|mean_shap| <= 1e-5``, k of them drawn with
    replacement for every inference; ``random``: k distinct heads drawn anew for every
    inference and every k (the baseline); ``importance`` (optional): largest ``importance``
    first.  The k heads of a ranked group are the first k of its ranking (ties broken by a
    seeded permutation), so those sets grow with k; ``n_in_group`` says how many of them have
    the group's sign.

Held-out inferences
    N originally correct and N originally incorrect per task that the classifier never saw:
    surplus analysis attempts (``has_maps`` False) first, then ``tasks.parquet`` rows never
    prompted.  "Originally" is re-judged here with a plain forward on this device and dtype,
    so a flip is caused by the ablation and not by numerics (agreement with capture's record
    is logged).

Outcomes
    For every (group, k) on the same 2N samples: correct->incorrect, incorrect->correct,
    other changes (a different prediction, correctness unchanged), net change; McNemar's
    exact test against the unablated model (``p_vs_baseline``) and, paired on the same
    samples, against the random group at the same k (``p_vs_random``: the discordant pairs
    are exactly what makes the two net changes differ; stored as ``n_better_than_random`` /
    ``n_worse_than_random``, so tests can pool tasks), with Holm's correction per task.
    First token as in the paper, or (``multi_token``) greedy completion of the whole target
    with the KV cache, exact match.

Work is resumable: per task and configuration, the held-out set and finished conditions are
kept under ``RUN/intervene/work/<task>-<config>/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from apmae_gpu import TASKS
from apmae_gpu.figures import pyplot, save_figure
from apmae_gpu.runs import (ApmaeError, load_frame, progress, read_manifest, resolve_device,
                            update_manifest, write_json, write_parquet)

log = logging.getLogger("apmae_gpu.intervention")

GROUPS = ("positive", "negative", "zero", "random")
EXTRA_GROUPS = ("importance",)
ZERO_TOL = 1e-5
DEFAULT_K = (1, 2, 5, 10, 20, 50, 100, 200, 400, 600, 800)


# --------------------------------------------------------------------------- hooks
def head_mask(heads: Iterable[tuple[int, int]], n_layers: int, n_heads: int):
    """Bool ``[n_layers, n_heads]``, True for each ``(layer, head)`` in ``heads``."""
    import torch

    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"head L{layer}H{head} outside {n_layers} layers x {n_heads} heads")
        mask[layer, head] = True
    return mask


def _in_features(proj) -> int:
    for name in ("in_features", "nx"):          # nn.Linear, transformers' Conv1D (GPT-2)
        if hasattr(proj, name):
            return int(getattr(proj, name))
    return int(proj.weight.shape[-1])


def _scaler(scale, n_heads: int, head_dim: int):
    """Pre-hook multiplying head slices: ``scale`` is ``[H]`` or per sample ``[B, H]``."""
    per_sample = scale.dim() == 2

    def hook(module, args):
        x = args[0]                                      # [B, T, H * D]
        if per_sample:
            if x.shape[0] != scale.shape[0]:
                raise ValueError(f"per-sample head mask has {scale.shape[0]} rows, the batch "
                                 f"{x.shape[0]}")
            factor = scale.view(scale.shape[0], *([1] * (x.dim() - 2)), n_heads, 1)
        else:
            factor = scale.view(n_heads, 1)
        y = (x.unflatten(-1, (n_heads, head_dim)) * factor).flatten(-2)
        return (y, *args[1:])

    return hook


@contextlib.contextmanager
def scale_heads(model, scale, fam=None) -> Iterator:
    """Multiply every head's slice of the attention output by ``scale`` before the output
    projection, inside the ``with`` block.

    ``scale``: float ``[L, H]`` (every sample) or ``[B, L, H]`` (one row per sample of every
    forward inside the block); 1 keeps a head, 0 ablates it.  Layers whose factors are all 1
    get no hook.  Yields the model's :class:`apmae_gpu.llm.Family`.
    """
    import torch

    from apmae_gpu.llm import family

    fam = fam or family(model)
    scale = torch.as_tensor(scale)
    L, H, D = fam.n_layers, fam.n_heads, fam.head_dim
    if scale.dim() not in (2, 3) or tuple(scale.shape[-2:]) != (L, H):
        raise ValueError(f"head mask must be [{L}, {H}] or [B, {L}, {H}], got {tuple(scale.shape)}")
    handles = []
    try:
        for layer, proj in enumerate(fam.out_proj):
            factors = scale[..., layer, :]
            if bool((factors == 1).all()):
                continue
            if _in_features(proj) != H * D:
                raise ApmaeError(f"model family {fam.name!r}: the output projection of layer "
                                 f"{layer} takes {_in_features(proj)} features, not "
                                 f"{H} heads x {D}")
            weight = proj.weight
            factors = factors.to(device=weight.device, dtype=weight.dtype)
            handles.append(proj.register_forward_pre_hook(_scaler(factors, H, D)))
        yield fam
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def ablate_heads(model, ablate, fam=None) -> Iterator:
    """Zero the heads marked True in ``ablate`` (bool ``[L, H]`` or per sample ``[B, L, H]``)
    inside the ``with`` block; hooks are removed on exit, also after an exception."""
    import torch

    ablate = torch.as_tensor(ablate, dtype=torch.bool)
    with scale_heads(model, (~ablate).float(), fam=fam) as f:
        yield f


# --------------------------------------------------------------------------- decoding
def first_tokens(model, input_ids):
    """Greedy next token after each prompt: ``input_ids`` [B, T] long -> [B] long (CPU)."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1).cpu()


def greedy_complete(model, input_ids, n_tokens: int):
    """Greedy completion of ``n_tokens`` tokens with the KV cache: [B, T] -> [B, n_tokens]
    (CPU).  No stopping at EOS and no logits processors: plain argmax decoding."""
    import torch

    tokens = []
    with torch.inference_mode():
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        for step in range(n_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            tokens.append(nxt)
            if step + 1 < n_tokens:
                out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values,
                            use_cache=True)
    return torch.stack(tokens, dim=1).cpu()


# --------------------------------------------------------------------------- head groups
def _rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


RANKINGS = {"shap_parts": ("mean_shap_pos", "mean_shap_neg"), "mean_shap": ("mean_shap",) * 2,
            "extreme_shap": ("extreme_shap",) * 2}
SAMPLED = ("zero", "random")      # groups drawn anew for every inference


def head_groups(importance: pd.DataFrame, n_layers: int, n_heads: int, ks: list[int],
                groups: Iterable[str], seed: int, task: str, rank_by: str = "shap_parts"
                ) -> dict[tuple[str, int], dict]:
    """The heads to ablate for every (group, k).  Ranked groups: ``{"heads": [(l, h), ...],
    "n_in_group": int}``; sampled groups (:data:`SAMPLED`): ``{"heads": None, "pool": flat
    head indices to draw from, "replace": bool, "n_in_group": k}``, drawn per inference by
    :func:`sampled_mask`.  ``importance``: one task's rows of ``head_importance.parquet``
    (heads without a row count as 0).  A ``zero`` group with an empty pool is left out."""
    cols = RANKINGS[rank_by]
    missing = sorted({*cols, "mean_shap"} - set(importance.columns))
    if missing:
        raise ApmaeError(f"head importance has no {', '.join(missing)} column (written by an "
                         f"older `apmae classify`): rerun classify, or pass --rank-by mean_shap")
    layer, head = importance["layer"].to_numpy(int), importance["head"].to_numpy(int)

    def flat(col: str) -> np.ndarray:
        out = np.zeros((n_layers, n_heads))
        out[layer, head] = importance[col]
        return out.ravel()

    pos, neg, mean, imp = flat(cols[0]), flat(cols[1]), flat("mean_shap"), flat("importance")
    tie = _rng(seed, task).random(pos.size)
    order = {
        "positive": (np.lexsort((tie, -pos)), pos > 0),
        "negative": (np.lexsort((tie, neg)), neg < 0),
        "importance": (np.lexsort((tie, -imp)), imp > 0),
    }
    pools = {"zero": (np.flatnonzero(np.abs(mean) <= ZERO_TOL), True),
             "random": (np.arange(pos.size), False)}
    out = {}
    for g in groups:
        for k in ks:
            if g in pools:
                pool, replace = pools[g]
                if pool.size:
                    out[(g, k)] = {"heads": None, "pool": pool, "replace": replace,
                                   "n_in_group": k}
                continue
            ranking, member = order[g]
            chosen = ranking[:k]
            out[(g, k)] = {"heads": [divmod(int(i), n_heads) for i in chosen],
                           "n_in_group": int(member[chosen].sum())}
    return out


def sampled_mask(cond: dict, k: int, sample_ids: np.ndarray, n_layers: int, n_heads: int,
                 seed: int, task: str, group: str) -> np.ndarray:
    """Bool ``[n, L, H]``: for each sample its own draw of ``k`` heads from ``cond["pool"]``
    (seeded by seed, task, group, k and the sample, so reruns draw the same heads)."""
    out = np.zeros((len(sample_ids), n_layers * n_heads), bool)
    pool = cond["pool"]
    for i, sid in enumerate(sample_ids):
        rng = np.random.default_rng([seed, zlib.crc32(f"{task}/{group}".encode()), int(k), int(sid)])
        out[i, rng.choice(pool, size=k, replace=cond["replace"])] = True
    return out.reshape(len(sample_ids), n_layers, n_heads)


# --------------------------------------------------------------------------- held-out data
def heldout_candidates(task: str, inferences: pd.DataFrame, tasks: pd.DataFrame | None,
                       seed: int) -> pd.DataFrame:
    """Inputs of ``task`` the classifier never saw, in the order to judge them: surplus
    analysis attempts (shuffled), then never-prompted ``tasks.parquet`` rows (shuffled).

    Columns: ``source`` (``surplus`` | ``unprompted``), ``inference_id`` (-1 for unprompted),
    ``task_id``, ``input_ids``, ``target_token_id``, ``target_token_ids``, ``recorded_correct``.
    """
    rng = _rng(seed + 1, task)
    used_ids = set(inferences.loc[inferences["has_maps"].astype(bool), "task_id"]) - {-1}
    targets = {}
    if tasks is not None:
        targets = dict(zip(tasks["task_id"], tasks["target_token_ids"]))
    sur = inferences[(inferences["task"] == task) & (inferences["split"] == "analysis")
                     & ~inferences["has_maps"].astype(bool) & inferences["correct"].notna()]
    sur = sur[~sur["task_id"].isin(used_ids) | (sur["task_id"] == -1)]
    sur = sur[(sur["task_id"] == -1) | ~sur["task_id"].duplicated()]
    sur = sur.iloc[rng.permutation(len(sur))]
    frames = [pd.DataFrame({
        "source": "surplus", "inference_id": sur["inference_id"].to_numpy(np.int64),
        "task_id": sur["task_id"].to_numpy(np.int64), "input_ids": list(sur["input_ids"]),
        "target_token_id": sur["target_token_id"].to_numpy(np.int64),
        "target_token_ids": [_target_ids(targets.get(t), tt)
                             for t, tt in zip(sur["task_id"], sur["target_token_id"])],
        "recorded_correct": sur["correct"].astype("boolean").to_numpy()})]
    if tasks is not None:
        prompted = set(inferences["task_id"]) - {-1}
        new = tasks[(tasks["task"] == task) & (tasks["target_token_id"] >= 0)
                    & ~tasks["task_id"].isin(prompted)]
        new = new.iloc[rng.permutation(len(new))]
        frames.append(pd.DataFrame({
            "source": "unprompted", "inference_id": np.full(len(new), -1, np.int64),
            "task_id": new["task_id"].to_numpy(np.int64), "input_ids": list(new["input_ids"]),
            "target_token_id": new["target_token_id"].to_numpy(np.int64),
            "target_token_ids": [_target_ids(a, t) for a, t in
                                 zip(new["target_token_ids"], new["target_token_id"])],
            "recorded_correct": pd.array([pd.NA] * len(new), dtype="boolean")}))
    out = pd.concat(frames, ignore_index=True)
    out["recorded_correct"] = out["recorded_correct"].astype("boolean")
    return out


def _target_ids(ids, first: int) -> list[int]:
    if ids is None or len(ids) == 0:
        return [int(first)]
    return [int(t) for t in ids]


def _length_batches(lengths: np.ndarray, batch_size: int,
                    n_tokens: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Positions grouped into batches of equal prompt length (no padding, exact positions),
    similar numbers of tokens to generate side by side."""
    order = np.lexsort((np.zeros_like(lengths) if n_tokens is None else n_tokens, lengths))
    for length in np.unique(lengths):
        same = order[lengths[order] == length]
        for start in range(0, same.size, batch_size):
            yield same[start:start + batch_size]


def predict(model, fam, inputs: list, n_tokens: np.ndarray, masks, batch_size: int,
            device: str, multi_token: bool, bar=None) -> list[list[int]]:
    """Greedy prediction for each input under its head mask.

    ``inputs``: prompts (lists of ids); ``n_tokens``: [n] tokens to generate each (first-token
    mode: ignored, 1); ``masks``: bool ``[n, L, H]`` or None (no ablation).  Returns the
    generated ids per input (one id in first-token mode).
    """
    import torch

    lengths = np.array([len(x) for x in inputs])
    out: list[list[int] | None] = [None] * len(inputs)
    for idx in _length_batches(lengths, batch_size, n_tokens if multi_token else None):
        ids = torch.tensor(np.stack([np.asarray(inputs[i], dtype=np.int64) for i in idx]),
                           device=device)
        ctx = (ablate_heads(model, masks[idx], fam=fam) if masks is not None
               else contextlib.nullcontext())
        with ctx:
            if multi_token:
                gen = greedy_complete(model, ids, int(n_tokens[idx].max())).tolist()
            else:
                gen = first_tokens(model, ids)[:, None].tolist()
        for j, i in enumerate(idx):
            out[i] = gen[j][: int(n_tokens[i])] if multi_token else gen[j]
        if bar is not None:
            bar.update(len(idx))
    return out  # type: ignore[return-value]


def select_heldout(model, fam, candidates: pd.DataFrame, per_group: int, batch_size: int,
                   device: str, multi_token: bool) -> tuple[pd.DataFrame, dict]:
    """Judge candidates unablated until ``per_group`` correct and ``per_group`` incorrect are
    found.  Returns the chosen samples (``sample_id``, ..., ``predicted_before``,
    ``correct_before``) and a summary (judged, found, agreement with the recorded label)."""
    need = {True: per_group, False: per_group}
    chosen, judged, agree, recorded = [], 0, 0, 0
    pos = 0
    n_tok = np.array([len(t) for t in candidates["target_token_ids"]])
    while (need[True] or need[False]) and pos < len(candidates):
        batch = []
        while len(batch) < batch_size and pos < len(candidates):
            rec = candidates["recorded_correct"].iloc[pos]
            if multi_token or pd.isna(rec) or need[bool(rec)] > 0:
                batch.append(pos)
            pos += 1
        if not batch:
            continue
        idx = np.array(batch)
        preds = predict(model, fam, [candidates["input_ids"].iloc[i] for i in idx], n_tok[idx],
                        None, batch_size, device, multi_token)
        judged += len(idx)
        for i, pred in zip(idx, preds):
            row = candidates.iloc[i]
            target = row["target_token_ids"] if multi_token else [row["target_token_id"]]
            correct = list(pred) == [int(v) for v in target]
            if not pd.isna(row["recorded_correct"]) and not multi_token:
                recorded += 1
                agree += int(bool(row["recorded_correct"]) == correct)
            if need[correct] > 0:
                need[correct] -= 1
                chosen.append({**row.to_dict(), "predicted_before": list(pred),
                               "correct_before": correct})
    samples = pd.DataFrame(chosen)
    if not samples.empty:
        samples = samples.sort_values("correct_before", ascending=False, kind="stable")
        samples.insert(0, "sample_id", np.arange(len(samples), dtype=np.int64))
    summary = dict(judged=judged, n_correct=per_group - need[True],
                   n_incorrect=per_group - need[False],
                   recorded_agreement=(agree / recorded) if recorded else None)
    return samples.reset_index(drop=True), summary


# --------------------------------------------------------------------------- statistics
def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c``."""
    from scipy.stats import binomtest

    return 1.0 if b + c == 0 else float(binomtest(int(b), int(b + c), 0.5).pvalue)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN entries stay NaN)."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m:
        order = ok[np.argsort(p[ok], kind="stable")]
        adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
        out[order] = np.minimum(adj, 1.0)
    return out


def summarize(task: str, samples: pd.DataFrame, outcomes: pd.DataFrame, conditions: dict,
              mode: str) -> pd.DataFrame:
    """One row per (group, k): flip counts, net change and the tests (see module doc)."""
    before = samples.set_index("sample_id")
    rows = []
    after_by = {}
    for (g, k), grp in outcomes.groupby(["group", "k"], sort=False):
        grp = grp.set_index("sample_id").loc[before.index]
        after_by[(g, k)] = grp["correct"].to_numpy(bool)
    cb = before["correct_before"].to_numpy(bool)
    pb = [tuple(p) for p in before["predicted_before"]]
    for (g, k), ca in after_by.items():
        grp = outcomes[(outcomes["group"] == g) & (outcomes["k"] == k)].set_index(
            "sample_id").loc[before.index]
        changed = np.array([tuple(p) != q for p, q in zip(grp["predicted"], pb)])
        c2i, i2c = int((cb & ~ca).sum()), int((~cb & ca).sum())
        other = int((changed & (cb == ca)).sum())
        rand = after_by.get(("random", k))
        p_rand, better, worse = float("nan"), -1, -1
        if rand is not None and g != "random":
            better, worse = int((ca & ~rand).sum()), int((~ca & rand).sum())
            p_rand = mcnemar_exact(better, worse)
        cond = conditions[(g, k)]
        heads = (" ".join(f"L{a}H{b}" for a, b in cond["heads"]) if cond["heads"] is not None
                 else f"{k} drawn per inference from {len(cond['pool'])} heads"
                      + (" (with replacement)" if cond["replace"] else ""))
        rows.append(dict(task=task, mode=mode, group=g, k=int(k),
                         n_heads=len(cond["heads"]) if cond["heads"] is not None else int(k),
                         n_in_group=cond["n_in_group"], n=int(len(cb)),
                         n_correct_before=int(cb.sum()), n_correct_to_incorrect=c2i,
                         n_incorrect_to_correct=i2c, n_other_changes=other,
                         n_unchanged=int((~changed).sum()), net_change=i2c - c2i,
                         accuracy_before=float(cb.mean()), accuracy_after=float(ca.mean()),
                         p_vs_baseline=mcnemar_exact(i2c, c2i), p_vs_random=p_rand,
                         n_better_than_random=better, n_worse_than_random=worse, heads=heads))
    out = pd.DataFrame(rows)
    if not out.empty:
        rank = {g: i for i, g in enumerate(GROUPS + EXTRA_GROUPS)}
        out = out.sort_values(["group", "k"], key=lambda c: c.map(rank) if c.name == "group"
                              else c, kind="stable").reset_index(drop=True)
        out["p_vs_random_holm"] = holm(out["p_vs_random"].to_numpy())
    return out


# --------------------------------------------------------------------------- one task
def _config_key(task: str, config: dict, importance: pd.DataFrame) -> str:
    h = hashlib.sha256(json.dumps({**config, "task": task}, sort_keys=True).encode())
    h.update(pd.util.hash_pandas_object(importance.reset_index(drop=True), index=False)
             .to_numpy().tobytes())
    return h.hexdigest()[:12]


def _done_conditions(work: Path) -> pd.DataFrame:
    parts = sorted(work.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts \
        else pd.DataFrame(columns=["group", "k", "sample_id", "predicted", "correct"])


def _condition_mask(cond: dict, key: tuple[str, int], sample_ids, fam, seed: int,
                    task: str) -> np.ndarray:
    """Bool ``[n, L, H]``: the heads each sample has zeroed under condition ``key``."""
    group, k = key
    if cond["heads"] is None:
        return sampled_mask(cond, k, np.asarray(sample_ids), fam.n_layers, fam.n_heads, seed,
                            task, group)
    one = head_mask(cond["heads"], fam.n_layers, fam.n_heads).numpy()
    return np.repeat(one[None], len(sample_ids), axis=0)


def aggregate(results: pd.DataFrame) -> pd.DataFrame:
    """Rows ``task == "all"``: every (group, k) summed over the tasks that have it (the
    paper's figure over tasks); McNemar's exact test on the pooled discordant pairs, Holm over
    the aggregate rows."""
    if results.empty:
        return results
    sums = ["n", "n_correct_before", "n_correct_to_incorrect", "n_incorrect_to_correct",
            "n_other_changes", "n_unchanged", "net_change"]
    rows = []
    for (g, k), grp in results.groupby(["group", "k"], sort=False):
        row = {"task": "all", "mode": grp["mode"].iloc[0], "group": g, "k": int(k),
               "n_heads": int(k), "n_in_group": int(grp["n_in_group"].sum()),
               "n_tasks": int(len(grp)), **{c: int(grp[c].sum()) for c in sums}}
        row["accuracy_before"] = row["n_correct_before"] / max(row["n"], 1)
        row["accuracy_after"] = (row["n_correct_before"] + row["net_change"]) / max(row["n"], 1)
        row["p_vs_baseline"] = mcnemar_exact(row["n_incorrect_to_correct"],
                                             row["n_correct_to_incorrect"])
        paired = grp[grp["n_better_than_random"] >= 0]
        if len(paired) and g != "random":
            row["n_better_than_random"] = int(paired["n_better_than_random"].sum())
            row["n_worse_than_random"] = int(paired["n_worse_than_random"].sum())
            row["p_vs_random"] = mcnemar_exact(row["n_better_than_random"],
                                               row["n_worse_than_random"])
        else:
            row.update(n_better_than_random=-1, n_worse_than_random=-1, p_vs_random=float("nan"))
        row["heads"] = f"per task ({len(grp)} tasks)"
        rows.append(row)
    out = pd.DataFrame(rows)
    out["p_vs_random_holm"] = holm(out["p_vs_random"].to_numpy())
    return out


def intervene_task(task: str, model, fam, importance: pd.DataFrame, candidates: pd.DataFrame,
                   ks: list[int], groups: list[str], per_group: int, batch_size: int,
                   device: str, seed: int, multi_token: bool, rank_by: str, work: Path
                   ) -> tuple[pd.DataFrame, dict]:
    """Run every (group, k) condition of one task on its held-out samples; resumable."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    held = work / "heldout.parquet"
    if held.exists():
        samples = pd.read_parquet(held)
        summary = json.loads((work / "heldout.json").read_text())
    else:
        samples, summary = select_heldout(model, fam, candidates, per_group, batch_size, device,
                                          multi_token)
        if samples.empty:
            raise ApmaeError(f"no held-out inference found among {len(candidates)} candidates "
                             f"(capture more attempts or mine more tasks)")
        write_parquet(samples, held)
        write_json(work / "heldout.json", summary)
    if min(summary["n_correct"], summary["n_incorrect"]) < per_group:
        log.warning("%s: only %d correct and %d incorrect held-out inferences (asked for %d "
                    "each; %d judged)", task, summary["n_correct"], summary["n_incorrect"],
                    per_group, summary["judged"])
    conditions = head_groups(importance, fam.n_layers, fam.n_heads, ks, groups, seed, task,
                             rank_by)
    done = _done_conditions(work)
    finished = set(zip(done["group"], done["k"].astype(int)))
    todo = [c for c in conditions if c not in finished]
    n = len(samples)
    per_unit = max(1, math.ceil(batch_size / n))
    seq = len(list(work.glob("part-*.parquet")))
    n_tok = np.array([len(t) for t in samples["target_token_ids"]])
    targets = [[int(v) for v in t] if multi_token else [int(x)] for t, x in
               zip(samples["target_token_ids"], samples["target_token_id"])]
    t_run, n_run = 0.0, 0
    with progress(total=len(todo) * n, desc=f"intervene {task}", unit="inf") as bar:
        for start in range(0, len(todo), per_unit):
            unit = todo[start:start + per_unit]
            masks = np.concatenate([_condition_mask(conditions[c], c, samples["sample_id"],
                                                    fam, seed, task) for c in unit])
            t1 = time.perf_counter()
            preds = predict(model, fam, list(samples["input_ids"]) * len(unit),
                            np.tile(n_tok, len(unit)), masks, batch_size, device, multi_token,
                            bar)
            t_run += time.perf_counter() - t1
            n_run += len(preds)
            part = pd.DataFrame({
                "group": np.repeat([c[0] for c in unit], n),
                "k": np.repeat([c[1] for c in unit], n).astype(np.int64),
                "sample_id": np.tile(samples["sample_id"].to_numpy(), len(unit)),
                "predicted": preds,
                "correct": [list(p) == targets[i % n] for i, p in enumerate(preds)]})
            write_parquet(part, work / f"part-{seq:06d}.parquet")
            seq += 1
    outcomes = _done_conditions(work)
    outcomes["k"] = outcomes["k"].astype(int)
    wanted = set(conditions)
    outcomes = outcomes[[(g, k) in wanted for g, k in zip(outcomes["group"], outcomes["k"])]]
    results = summarize(task, samples, outcomes, conditions,
                        "multi_token" if multi_token else "first_token")
    record = dict(**summary, conditions=len(conditions), ran=len(todo), inferences=n_run,
                  seconds=round(time.perf_counter() - t0, 2),
                  inferences_per_s=round(n_run / t_run, 2) if t_run else None,
                  work=str(work.relative_to(work.parent.parent.parent)))
    return results, record


# --------------------------------------------------------------------------- the stage
def _model_spec(run: Path, model: str | None) -> str:
    recorded = ((read_manifest(run).get("capture") or {}).get("model") or {}).get("spec")
    if model and recorded and model != recorded:
        log.warning("--model %s differs from the captured model %s: held-out correctness is "
                    "re-judged with %s", model, recorded, model)
    spec = model or recorded
    if not spec:
        raise ApmaeError(f"{run}: no model recorded in manifest.json (capture.model.spec); "
                         f"pass --model")
    return spec


def intervene(run: str | os.PathLike, task: str | None = None, k: list[int] | None = None,
              per_group: int = 50, model: str | None = None, device: str = "auto",
              batch_size: int = 8, seed: int = 0, groups: list[str] | None = None,
              multi_token: bool = False, rank_by: str = "shap_parts", dtype: str = "auto"
              ) -> pd.DataFrame:
    """Ablate SHAP-selected heads on held-out inferences of each task (``task`` None: every
    classified task, as the paper); write ``RUN/intervene/results.parquet`` (with ``task ==
    "all"`` rows aggregating the tasks when there are several) and ``net_change.png``.
    Returns the results frame."""
    import torch

    from apmae_gpu import llm

    run = Path(run)
    ks = sorted(set(k or DEFAULT_K))
    groups = list(groups or GROUPS)
    bad = [g for g in groups if g not in GROUPS + EXTRA_GROUPS]
    if bad:
        raise ApmaeError(f"unknown group(s) {', '.join(bad)}; known: "
                         f"{', '.join(GROUPS + EXTRA_GROUPS)}")
    if any(x < 1 for x in ks):
        raise ApmaeError(f"--k {','.join(map(str, ks))}: head counts must be at least 1")
    if per_group < 1 or batch_size < 1:
        raise ApmaeError("--per-group and --batch-size must be at least 1")
    if rank_by not in RANKINGS:
        raise ApmaeError(f"--rank-by {rank_by}: expected one of {', '.join(RANKINGS)}")
    imp_path = run / "classify" / "head_importance.parquet"
    if not imp_path.exists():
        raise ApmaeError(f"{run}: no classify/head_importance.parquet (run `apmae classify` first)")
    importance = load_frame(imp_path, prefer="pandas")
    manifest_cls = read_manifest(run).get("classify") or {}
    known = [t for t in TASKS if t in set(importance["task"]) or t in manifest_cls.get("tasks", {})
             or t in manifest_cls.get("skipped", {})]
    wanted = [t.strip() for t in task.split(",")] if task else known
    if not wanted:
        raise ApmaeError(f"{imp_path} has no task")
    inferences = load_frame(run / "inferences.parquet", prefer="pandas",
                            columns=["inference_id", "split", "task", "task_id", "input_ids",
                                     "target_token_id", "correct", "has_maps"])
    tasks_path = run / "tasks.parquet"
    tasks_df = load_frame(tasks_path, prefer="pandas",
                          columns=["task_id", "task", "input_ids", "target_token_id",
                                   "target_token_ids"]) if tasks_path.exists() else None
    if tasks_df is None:
        log.warning("%s: no tasks.parquet; only surplus attempts can be held out", run)

    spec = _model_spec(run, model)
    device = resolve_device(device)
    t_load = time.perf_counter()
    lm = llm.load_model(spec, device=device, dtype=llm.parse_dtype(dtype, device))
    fam = llm.family(lm)   # ApmaeError for a family without a known output projection
    total_heads = fam.n_layers * fam.n_heads
    log.info("loaded %s (%s, %d layers x %d heads) in %.1f s", spec, fam.name, fam.n_layers,
             fam.n_heads, time.perf_counter() - t_load)
    too_big = [x for x in ks if x > total_heads]
    ks = [x for x in ks if x <= total_heads]
    if too_big:
        log.warning("k=%s skipped: the model has only %d heads", ",".join(map(str, too_big)),
                    total_heads)
    if not ks:
        raise ApmaeError(f"every --k exceeds the model's {total_heads} heads "
                         f"({fam.n_layers} layers x {fam.n_heads})")
    if (importance["layer"].max() >= fam.n_layers) or (importance["head"].max() >= fam.n_heads):
        raise ApmaeError(f"head importance names heads beyond the model's {fam.n_layers} layers "
                         f"x {fam.n_heads} heads: was the run captured with another model?")

    config = dict(model=spec, revision=llm.model_revision(spec), device=device.split(":")[0],
                  dtype=str(next(lm.parameters()).dtype), per_group=per_group, seed=seed,
                  multi_token=multi_token, rank_by=rank_by, sampled_groups="per inference")
    out = run / "intervene"
    all_results, records, skipped = [], {}, {}
    t0 = time.perf_counter()
    for t in wanted:
        rows = importance[importance["task"] == t]
        if rows.empty:
            why = (manifest_cls.get("skipped") or {}).get(t)
            skipped[t] = ("no head importance rows" + (f" (classify skipped it: {why})" if why
                                                      else " (run `apmae classify` on it)"))
            log.error("%s: skipped: %s", t, skipped[t])
            continue
        try:
            cands = heldout_candidates(t, inferences, tasks_df, seed)
            work = out / "work" / f"{t}-{_config_key(t, config, rows)}"
            results, rec = intervene_task(t, lm, fam, rows, cands, ks, groups, per_group,
                                          batch_size, device, seed, multi_token, rank_by, work)
        except ApmaeError as exc:
            skipped[t] = str(exc)
            log.error("%s: skipped: %s", t, exc)
            continue
        all_results.append(results)
        records[t] = rec
        best = results.loc[results["net_change"].idxmax()]
        log.info("%s: %d conditions on %d held-out inferences; best net change %+d (%s, k=%d)",
                 t, len(results), rec["n_correct"] + rec["n_incorrect"], best.net_change,
                 best.group, best.k)
    if not all_results:
        raise ApmaeError("no task could be intervened on: " +
                         "; ".join(f"{t}: {r}" for t, r in skipped.items()))
    results = pd.concat(all_results, ignore_index=True)
    if len(all_results) > 1:
        results = pd.concat([results, aggregate(results)], ignore_index=True)
    write_parquet(results, out / "results.parquet")
    figure = plot_net_change(results, out / "net_change.png")
    n_inf = sum(r["inferences"] for r in records.values())
    update_manifest(run, "intervene", {
        "model": config, "family": fam.name, "layers": fam.n_layers, "heads": fam.n_heads,
        "mode": "multi_token" if multi_token else "first_token", "k": ks,
        "k_skipped": too_big, "groups": groups, "rank_by": rank_by, "per_group": per_group,
        "batch_size": batch_size, "zero_tolerance": ZERO_TOL,
        "test": "exact McNemar (paired, same samples): vs the random group at the same k and "
                "vs the unablated model; Holm-adjusted per task; task 'all' pools the tasks' "
                "discordant pairs (Holm over its rows)",
        "sampled_groups": "zero and random drawn anew for every inference and every k",
        "dtype": config["dtype"],
        "tasks": records, "skipped": skipped, "inferences": n_inf,
        "seconds": round(time.perf_counter() - t0, 2),
        "files": ["intervene/results.parquet", figure],
    })
    _echo_summary(results)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


def _echo_summary(results: pd.DataFrame) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title="net change per k (incorrect->correct minus correct->incorrect)",
                  box=box.SIMPLE, pad_edge=False)
    ks = sorted(results["k"].unique())
    table.add_column("task")
    table.add_column("group")
    for k in ks:
        table.add_column(f"k={k}", justify="right")
    for (task, group), g in results.groupby(["task", "group"], sort=False):
        g = g.set_index("k")
        cells = []
        for k in ks:
            if k not in g.index:
                cells.append("-")
                continue
            r = g.loc[k]
            star = "*" if np.isfinite(r.p_vs_random) and r.p_vs_random < 0.05 else ""
            cells.append(f"{int(r.net_change):+d}{star}")
        table.add_row(task, group, *cells)
    Console(width=max(Console().width, 110)).print(table)
    Console().print("* p < 0.05 against the random group (exact McNemar, unadjusted)")


# --------------------------------------------------------------------------- figure
COLORS = {"positive": "C3", "negative": "C0", "zero": "C2", "random": "0.4", "importance": "C4"}


def plot_net_change(results: pd.DataFrame, path: Path) -> str:
    """Net change against k per group (log x): all tasks (mean ± sd over tasks) and one panel
    per task, like the paper's Fig. 7; filled markers: p < 0.05 against random."""
    plt = pyplot()
    from matplotlib.ticker import NullLocator

    tasks = [t for t in results["task"].unique() if t != "all"]
    ks = sorted(int(k) for k in results["k"].unique())
    panels = (["all"] if (results["task"] == "all").any() else []) + tasks
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        for group in results["group"].unique():
            color = COLORS.get(group, "k")
            g = results[(results["task"] == panel) & (results["group"] == group)].sort_values("k")
            ax.plot(g["k"], g["net_change"], color=color, label=group, lw=1.2)
            sig = g["p_vs_random"] < 0.05
            ax.scatter(g["k"][~sig], g["net_change"][~sig], s=14, facecolors="white",
                       edgecolors=color, zorder=3)
            ax.scatter(g["k"][sig], g["net_change"][sig], s=14, color=color, zorder=3)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks], fontsize=7)
        ax.set_title("all tasks (summed)" if panel == "all" else panel, fontsize=9)
        ax.set_xlabel("heads zeroed (k)", fontsize=8)
        ax.set_ylabel("net change", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    mode = results["mode"].iloc[0].replace("_", " ")
    fig.suptitle(f"net change in correct generations ({mode})\nfilled: p<0.05 vs random",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110, format="png")
    return str(path.relative_to(path.parent.parent))
