"""Intervention: zero the heads SHAP selects and count which predictions flip.

Ablation
    A head is ablated by zeroing its slice of the attention output (``[..., H * head_dim]``,
    head-major) right before the output projection (``o_proj`` for Llama/Starcoder2,
    ``c_proj`` for GPT-2; grouped-query attention included: query heads are zeroed, shared
    KV heads are untouched).  The projection's bias stays: it belongs to no head.  Hooks are
    forward pre-hooks installed by :func:`ablate_heads` / :func:`scale_heads`, context managers
    that always remove them; a mask can differ per sample, so many conditions run in one batch.

Head groups (:mod:`apmae_gpu.intervention.groups`; per task, from
``classify/head_importance.parquet``), as the reference forms them
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
    with the KV cache, exact match.  The statistics live in :mod:`apmae_gpu.intervention.stats`.

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from apmae_gpu import TASKS
from apmae_gpu.capture import llm
from apmae_gpu.core import layout
from apmae_gpu.core.config import InterveneConfig, section
from apmae_gpu.core.devices import resolve_device
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.figures import pyplot, save_figure
from apmae_gpu.core.frames import (
    load_frame,
    read_manifest,
    update_manifest,
    write_json,
    write_parquet,
)
from apmae_gpu.core.logs import progress
from apmae_gpu.intervention.groups import ZERO_TOL, head_groups, sampled_mask, task_rng
from apmae_gpu.intervention.stats import aggregate, echo_summary, summarize

log = logging.getLogger("apmae_gpu.intervention.ablation")



# --------------------------------------------------------------------------- hooks
def head_mask(heads: Iterable[tuple[int, int]], n_layers: int, n_heads: int):
    """Bool ``[n_layers, n_heads]``, True for each ``(layer, head)`` in ``heads``."""
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
    get no hook.  Yields the model's :class:`apmae_gpu.capture.llm.Family`.
    """
    fam = fam or llm.family(model)
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
    ablate = torch.as_tensor(ablate, dtype=torch.bool)
    with scale_heads(model, (~ablate).float(), fam=fam) as f:
        yield f


# --------------------------------------------------------------------------- decoding
def first_tokens(model, input_ids):
    """Greedy next token after each prompt: ``input_ids`` [B, T] long -> [B] long (CPU)."""
    with torch.inference_mode():
        out = model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1).cpu()


def greedy_complete(model, input_ids, n_tokens: int):
    """Greedy completion of ``n_tokens`` tokens with the KV cache: [B, T] -> [B, n_tokens]
    (CPU).  No stopping at EOS and no logits processors: plain argmax decoding."""
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


# --------------------------------------------------------------------------- held-out data
def heldout_candidates(task: str, inferences: pd.DataFrame, tasks: pd.DataFrame | None,
                       seed: int) -> pd.DataFrame:
    """Inputs of ``task`` the classifier never saw, in the order to judge them: surplus
    analysis attempts (shuffled), then never-prompted ``tasks.parquet`` rows (shuffled).

    Columns: ``source`` (``surplus`` | ``unprompted``), ``inference_id`` (-1 for unprompted),
    ``task_id``, ``input_ids``, ``target_token_id``, ``target_token_ids``, ``recorded_correct``.
    """
    rng = task_rng(seed + 1, task)
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


def intervene_task(task: str, model, fam, importance: pd.DataFrame, candidates: pd.DataFrame,
                   ks: list[int], groups: list[str], per_group: int, batch_size: int,
                   device: str, seed: int, multi_token: bool, rank_by: str, work: Path
                   ) -> tuple[pd.DataFrame, dict]:
    """Run every (group, k) condition of one task on its held-out samples; resumable."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    held = work / layout.HELDOUT_PARQUET
    if held.exists():
        samples = pd.read_parquet(held)
        summary = json.loads((work / layout.HELDOUT_JSON).read_text())
    else:
        samples, summary = select_heldout(model, fam, candidates, per_group, batch_size, device,
                                          multi_token)
        if samples.empty:
            raise ApmaeError(f"no held-out inference found among {len(candidates)} candidates "
                             f"(capture more attempts or mine more tasks)")
        write_parquet(samples, held)
        write_json(work / layout.HELDOUT_JSON, summary)
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


@dataclass
class _Inputs:
    """What intervene reads from the run."""

    importance: pd.DataFrame        # classify/head_importance.parquet
    classified: dict                # the manifest's classify section
    wanted: list[str]               # the tasks to intervene on
    inferences: pd.DataFrame
    tasks: pd.DataFrame | None      # tasks.parquet, if the run has it


@dataclass
class _Target:
    """The loaded LLM and the run context the tasks share."""

    lm: object
    fam: llm.Family
    device: str
    seed: int
    ks: list[int]                   # the settings' k that the model has heads for
    too_big: list[int]              # the others
    config: dict                    # what a task's resumable work is keyed by


def intervene(run: str | os.PathLike, settings: InterveneConfig | None = None, *,
              model: str | None = None, device: str = "auto", seed: int = 0,
              **overrides) -> pd.DataFrame:
    """Ablate SHAP-selected heads on held-out inferences of each task (``task`` None: every
    classified task, as the paper); write ``RUN/intervene/results.parquet`` (with ``task ==
    "all"`` rows aggregating the tasks when there are several) and ``net_change.png``.

    ``settings``: the ``intervene`` section (:class:`~apmae_gpu.core.config.InterveneConfig`;
    default the paper's), with keyword ``overrides`` of its fields over it; ``model``: the
    target LLM (default: the one the manifest records).  Returns the results frame."""
    cfg = _settings(settings, overrides)
    run = Path(run)
    inputs = _read_inputs(run, cfg)
    target = _load_target(run, model, device, seed, cfg, inputs.importance)
    out = run / layout.INTERVENE_DIR
    t0 = time.perf_counter()
    all_results, records, skipped = _intervene_tasks(target, cfg, inputs, out)
    if not all_results:
        raise ApmaeError("no task could be intervened on: " +
                         "; ".join(f"{t}: {r}" for t, r in skipped.items()))
    results = pd.concat(all_results, ignore_index=True)
    if len(all_results) > 1:
        results = pd.concat([results, aggregate(results)], ignore_index=True)
    write_parquet(results, out / layout.RESULTS_PARQUET)
    figure = plot_net_change(results, out / "net_change.png")
    fam, config = target.fam, target.config
    update_manifest(run, "intervene", {
        "model": config, "family": fam.name, "layers": fam.n_layers, "heads": fam.n_heads,
        "mode": "multi_token" if cfg.multi_token else "first_token", "k": target.ks,
        "k_skipped": target.too_big, "groups": cfg.groups, "rank_by": cfg.rank_by,
        "per_group": cfg.per_group, "batch_size": cfg.batch_size, "zero_tolerance": ZERO_TOL,
        "preregistered": {"few_heads_k": cfg.few_heads_k, "many_heads_k": cfg.many_heads_k},
        "test": "exact McNemar (paired, same samples): vs the random group at the same k and "
                "vs the unablated model; Holm-adjusted per task; task 'all' pools the tasks' "
                "discordant pairs (Holm over its rows)",
        "sampled_groups": "zero and random drawn anew for every inference and every k",
        "dtype": config["dtype"],
        "tasks": records, "skipped": skipped,
        "inferences": sum(r["inferences"] for r in records.values()),
        "seconds": round(time.perf_counter() - t0, 2),
        "files": ["intervene/results.parquet", figure],
    })
    echo_summary(results)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


def _settings(settings: InterveneConfig | None, overrides: dict) -> InterveneConfig:
    """The intervene section with intervene()'s keyword overrides over it, ``k`` sorted
    without repeats; bad values are one-line errors."""
    llm.check_dtype(overrides.get("dtype", "auto"))
    cfg = section(InterveneConfig, settings, overrides)
    return cfg.model_copy(update={"k": sorted(set(cfg.k))})


def _read_inputs(run: Path, cfg: InterveneConfig) -> _Inputs:
    """The head importance, the tasks to run, the inferences and the mined tasks."""
    imp_path = run / layout.CLASSIFY_DIR / layout.HEAD_IMPORTANCE_PARQUET
    if not imp_path.exists():
        raise ApmaeError(f"{run}: no classify/head_importance.parquet (run `apmae classify` first)")
    importance = load_frame(imp_path, prefer="pandas")
    manifest_cls = read_manifest(run).get("classify") or {}
    known = [t for t in TASKS if t in set(importance["task"]) or t in manifest_cls.get("tasks", {})
             or t in manifest_cls.get("skipped", {})]
    wanted = [t.strip() for t in cfg.task.split(",")] if cfg.task else known
    if not wanted:
        raise ApmaeError(f"{imp_path} has no task")
    inferences = load_frame(run / layout.INFERENCES_PARQUET, prefer="pandas",
                            columns=["inference_id", "split", "task", "task_id", "input_ids",
                                     "target_token_id", "correct", "has_maps"])
    tasks_path = run / layout.TASKS_PARQUET
    tasks_df = load_frame(tasks_path, prefer="pandas",
                          columns=["task_id", "task", "input_ids", "target_token_id",
                                   "target_token_ids"]) if tasks_path.exists() else None
    if tasks_df is None:
        log.warning("%s: no tasks.parquet; only surplus attempts can be held out", run)
    return _Inputs(importance, manifest_cls, wanted, inferences, tasks_df)


def _load_target(run: Path, model: str | None, device: str, seed: int, cfg: InterveneConfig,
                 importance: pd.DataFrame) -> _Target:
    """Load the LLM; keep the k it has heads for; check the importance names its heads."""
    spec = _model_spec(run, model)
    device = resolve_device(device)
    t_load = time.perf_counter()
    lm = llm.load_model(spec, device=device, dtype=llm.parse_dtype(cfg.dtype, device))
    fam = llm.family(lm)   # ApmaeError for a family without a known output projection
    total_heads = fam.n_layers * fam.n_heads
    log.info("loaded %s (%s, %d layers x %d heads) in %.1f s", spec, fam.name, fam.n_layers,
             fam.n_heads, time.perf_counter() - t_load)
    too_big = [x for x in cfg.k if x > total_heads]
    ks = [x for x in cfg.k if x <= total_heads]
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
                  dtype=str(next(lm.parameters()).dtype), per_group=cfg.per_group, seed=seed,
                  multi_token=cfg.multi_token, rank_by=cfg.rank_by,
                  sampled_groups="per inference")
    return _Target(lm, fam, device, seed, ks, too_big, config)


def _intervene_tasks(target: _Target, cfg: InterveneConfig, inputs: _Inputs, out: Path
                     ) -> tuple[list[pd.DataFrame], dict, dict]:
    """Every wanted task in turn: its results frames, records and the skipped tasks (why)."""
    all_results, records, skipped = [], {}, {}
    importance = inputs.importance
    for t in inputs.wanted:
        rows = importance[importance["task"] == t]
        if rows.empty:
            why = (inputs.classified.get("skipped") or {}).get(t)
            skipped[t] = ("no head importance rows" + (f" (classify skipped it: {why})" if why
                                                      else " (run `apmae classify` on it)"))
            log.error("%s: skipped: %s", t, skipped[t])
            continue
        try:
            cands = heldout_candidates(t, inputs.inferences, inputs.tasks, target.seed)
            work = out / "work" / f"{t}-{_config_key(t, target.config, rows)}"
            results, rec = intervene_task(t, target.lm, target.fam, rows, cands, target.ks,
                                          cfg.groups, cfg.per_group, cfg.batch_size,
                                          target.device, target.seed, cfg.multi_token,
                                          cfg.rank_by, work)
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
    return all_results, records, skipped


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
