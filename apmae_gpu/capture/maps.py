"""Capture: prompt the target LLM on mined tasks, judge its next token, and store every
query head's attention map, scaled on the device, in the run's maps store.

How maps are taken
    Only eager attention returns probabilities in transformers, and eager is the slowest
    kernel.  Instead, an attention function is registered with transformers'
    ``AttentionInterface`` (name :data:`CAPTURE_IMPL`): it runs the model's own SDPA kernel
    for the layer output, and from the same query and key tensors (after RoPE, before the
    kernel) computes the softmax probabilities in float32 for the heads asked for (with GQA
    every query head gets its own map), applies the layer's mask the same way, scales them
    on the device and writes them as float16 into one buffer per batch, which is copied to
    the host once.  ``tests/test_capture.py`` proves the maps equal eager attention.

Scalers (applied on the device, float32, then stored as float16; nothing NaN or infinite):
    see :mod:`apmae_gpu.core.scaling`.  ``log`` (default) stores ln p unfloored (p = 0 and the upper
    triangle at -104), from which the model computes the reference package's
    ``log_normalize`` exactly; ``log_normalize`` stores that input itself; ``none`` stores p.

Splits
    ``train``     random_masking prompts, correct predictions only, a random 25% of the heads
                  of each layer per inference (``--heads layerwise:0.25``).
    ``analysis``  every mined task, all heads; per task N correct and N incorrect inferences
                  (noise: 2N, a task's total, as in the paper), prompting until both quotas are
                  met or the candidates run out.

A split prompts only the rows mined for it (``tasks.parquet``'s ``split``: training and analysis
rows never share a source file); a task row is prompted at most once per run, and a split skips
any row from a source file another split already prompted (this also holds for tasks mined
before the ``split`` column, whose rows either split may take).  Each
task's candidates are prompted in a seeded order, one forward batch of ``--batch-size``
candidates of one task at a time (a *round*); round ``k`` runs only while the rounds before
it fall short of the task's quota, and an attempt is kept while its class is short of it
(:mod:`apmae_gpu.capture.ranks`).  Every attempt gets a row in ``inferences.parquet``; only kept ones
have maps.  Each round is one commit, so a killed capture rerun with the same command gives
exactly the uninterrupted result, and N processes (torchrun ranks or ``--shard K/N``) give
exactly the result of one once their shards are merged.

The stage, step by step (:func:`capture`): ``_settings`` (its arguments as one
:class:`~apmae_gpu.core.config.CaptureConfig`), ``_context`` (the run, its tasks and this process's
rank: a :class:`CaptureRun`), ``_load_target`` (device and LLM), ``_open_store`` (store,
encoder, where a killed capture stopped, the round plan), ``_prompt_rounds`` (per round:
forward with maps, judge, keep, write) and ``_finish`` (manifest; rank 0 merges).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from apmae_gpu.capture import identity, llm, ranks, requota
from apmae_gpu.capture import merge as rank_merge
from apmae_gpu.capture.ranks import kept_target, split_rows  # noqa: F401  (part of capture's API)
from apmae_gpu.core import devices, layout, tables
from apmae_gpu.core.config import CaptureConfig, CaptureSplitConfig, section, split_settings
from apmae_gpu.core.devices import resolve_device
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import read_manifest, read_parquet, update_manifest
from apmae_gpu.core.logs import progress
from apmae_gpu.core.scaling import FILL_VALUES, FLOOR, SCALERS, scale_maps
from apmae_gpu.core.store import INFERENCE_SCHEMA, MapStore
from apmae_gpu.encoding.encoder import BLOCK_BUDGET_BYTES, StreamingEncoder
from apmae_gpu.encoding.merge import roll_back_unencoded

log = logging.getLogger("apmae_gpu.capture.maps")

CAPTURE_IMPL = "apmae_capture"


# --------------------------------------------------------------------------- the hook
@dataclass
class _Session:
    """Per-forward capture state, attached to every attention module while active."""

    buffer: object                  # [B, L, K, T, T] float16 on the model's device
    heads: list                     # per layer: LongTensor [B, K] of query heads, or None = all
    scaler: str
    seen: set = field(default_factory=set)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **kwargs):
    """AttentionInterface function: the model's SDPA output, plus the probabilities."""
    session: _Session | None = getattr(module, "_apmae_session", None)
    if session is not None:
        _record(module, session, query, key, attention_mask, scaling, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _record(module, session: _Session, query, key, attention_mask, scaling, kwargs) -> None:
    layer = module._apmae_layer
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    heads = session.heads[layer]
    if heads is None:
        q = query
        k = key.repeat_interleave(Hq // Hkv, dim=1) if Hkv != Hq else key
    else:
        idx = heads.to(query.device)
        q = torch.gather(query, 1, idx[:, :, None, None].expand(-1, -1, T, D))
        kv_idx = idx // (Hq // Hkv)
        k = torch.gather(key, 1, kv_idx[:, :, None, None].expand(-1, -1, key.shape[2], D))
    scale = scaling if scaling is not None else D ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    softcap = kwargs.get("softcap")
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    S = scores.shape[-1]
    if attention_mask is None:
        allowed = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        if window:
            allowed &= ~torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T - window)
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[:, :, :, :S], float("-inf"))
    else:
        scores = scores + attention_mask[:, :, :, :S].float()
    probs = torch.softmax(scores, dim=-1)
    session.buffer[:, layer, :probs.shape[1]] = scale_maps(probs, session.scaler).to(torch.float16)
    session.seen.add(layer)


def _register() -> None:
    """Register the capture's attention and mask functions with transformers (idempotent:
    the registries are dicts, so registering again is a no-op)."""
    AttentionInterface.register(CAPTURE_IMPL, _capture_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_IMPL, sdpa_mask)


@contextmanager
def capturing(model, fam, heads: list, scaler: str, batch: int, window: int):
    """Within the block, a forward pass of ``model`` on a [batch, window] input fills
    ``session.buffer`` [batch, layers, K, window, window] (float16) with the scaled maps of
    ``heads`` (per layer: LongTensor [batch, K] or None for all heads).  Hooks and the
    attention implementation are always restored."""
    _register()
    k = max(fam.n_heads if h is None else h.shape[1] for h in heads)
    device = next(model.parameters()).device
    buffer = torch.empty(batch, fam.n_layers, k, window, window, dtype=torch.float16,
                         device=device)
    session = _Session(buffer, heads, scaler)
    previous = model.config._attn_implementation
    try:
        for i, module in enumerate(fam.attention):
            module._apmae_session = session
            module._apmae_layer = i
        model.set_attn_implementation(CAPTURE_IMPL)
        yield session
    finally:
        for module in fam.attention:
            for attr in ("_apmae_session", "_apmae_layer"):
                if hasattr(module, attr):
                    delattr(module, attr)
        model.set_attn_implementation(previous)


def forward_with_maps(model, fam, input_ids, heads: list, scaler: str):
    """One forward pass: returns (last-position logits [B, V], maps [B, L, K, T, T] fp16),
    both on the model's device."""
    B, T = input_ids.shape
    with capturing(model, fam, heads, scaler, B, T) as session, torch.inference_mode():
        out = model(input_ids=input_ids, logits_to_keep=1, use_cache=False)
    if len(session.seen) != fam.n_layers:
        raise ApmaeError(
            f"model family {fam.name!r}: {fam.n_layers - len(session.seen)} of {fam.n_layers} "
            "layers did not go through transformers' attention interface, so their attention "
            "cannot be captured")
    return out.logits[:, -1, :], session.buffer


# --------------------------------------------------------------------------- head choice
def parse_heads(heads: str | None, split: str) -> float | None:
    """``all`` -> None; ``layerwise:F`` -> F (fraction of each layer's heads)."""
    heads = heads or ("layerwise:0.25" if split == "train" else "all")
    if heads == "all":
        return None
    if heads.startswith("layerwise:"):
        try:
            frac = float(heads.split(":", 1)[1])
        except ValueError:
            frac = -1.0
        if 0 < frac <= 1:
            return frac
    raise ApmaeError(f"--heads {heads}: expected all or layerwise:FRACTION with 0 < FRACTION <= 1")


def choose_heads(inference_ids, n_layers: int, n_heads: int, frac: float | None, seed: int):
    """Per layer a LongTensor [B, K] of sorted head indices (None = all heads): a seeded
    ``round(frac * n_heads)`` (at least 1) heads of each layer, drawn per prompt from its
    ``inference_ids`` (capture passes the task ids, so the draw does not depend on which
    process prompts it)."""
    if frac is None:
        return [None] * n_layers
    k = max(1, int(round(frac * n_heads)))
    per_layer = np.empty((n_layers, len(inference_ids), k), dtype=np.int64)
    for b, inf in enumerate(inference_ids):
        rng = np.random.default_rng([seed, 7, int(inf)])
        for layer in range(n_layers):
            per_layer[layer, b] = np.sort(rng.choice(n_heads, size=k, replace=False))
    return [torch.from_numpy(per_layer[layer]) for layer in range(n_layers)]


# --------------------------------------------------------------------------- writer
class _Writer:
    """Commits batches to the store on a background thread so writing overlaps compute."""

    def __init__(self, store):
        self.store, self.schema = store, INFERENCE_SCHEMA
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.bytes = 0
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            maps, index, rows = item
            t0 = time.perf_counter()
            try:
                self.store.commit(maps, index, rows, inference_schema=self.schema)
            except OSError as exc:
                self.error = ApmaeError(f"writing {self.store.run} failed ({exc.strerror or exc}); "
                                        "every batch committed before stays valid: free space "
                                        "and rerun the same command to resume")
            except BaseException as exc:  # surfaced on the main thread
                self.error = exc
            self.seconds += time.perf_counter() - t0
            self.bytes += 0 if maps is None else maps.nbytes

    def put(self, item) -> None:
        self.check()
        self.q.put(item)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self.check()


# --------------------------------------------------------------------------- the stage
@dataclass
class CaptureRun:
    """One capture call's context, apart from its settings (:class:`CaptureConfig`)."""

    run: Path                       # the run directory
    model: str
    split: str                      # "train" | "analysis"
    device: str                     # as given; resolved by :func:`_load_target`
    seed: int
    shard: str | None               # "K/N" as given
    encode_with: Path | None
    trust_remote_code: bool
    frac: float | None              # heads per layer (None: all), from the split's ``heads``
    dist: tuple[int, int, int] | None   # torchrun's (rank, world, local rank)
    rank: int
    world: int
    out_run: Path                   # the run, or this process's shard of it
    tasks: pd.DataFrame             # tasks.parquet
    window: int                     # prompt length in tokens

    @property
    def sharded(self) -> bool:
        return self.out_run != self.run


@dataclass
class _Target:
    """The loaded target LLM."""

    spec: llm.ModelSpec
    lm: object
    fam: llm.Family


@dataclass
class _State:
    """Where the capture stands: the store, the plan and what was prompted so far."""

    store: MapStore
    encoder: StreamingEncoder | None
    encoded_upto: int               # last inference id whose embedding is committed
    plan: ranks.RoundPlan
    known: ranks.Outcomes
    by_id: pd.DataFrame             # tasks indexed by task_id
    next_id: int
    next_batch: int
    stats: Counter = field(default_factory=Counter)
    reuse: requota.Reuse | None = None  # a raised quota: the rounds the run already holds


@dataclass
class _Round:
    """One round's prompts: ``len(attempts)`` candidates of one task."""

    task: str
    attempts: np.ndarray
    task_ids: np.ndarray
    ids: np.ndarray                 # inference ids
    input_ids: torch.Tensor         # [B, T] on the device
    targets: torch.Tensor           # [B] on the CPU
    heads: list                     # :func:`choose_heads`


def capture(run: Path, model: str, settings: CaptureConfig | None = None, *,
            split: str = "analysis", device: str = "auto", seed: int = 0,
            shard: str | None = None, trust_remote_code: bool = False,
            encode_with: Path | None = None, **overrides) -> dict:
    """Capture one split of RUN (see module docstring); returns the split's summary.

    ``encode_with`` (an AP-MAE checkpoint, analysis split only) encodes the kept maps in the
    same pass and stores only their embeddings (``embeddings.zarr``), not the maps: the way to
    run at paper scale.  Inference rows are still written (``has_maps`` marks the kept ones).
    With several processes each shard stores the embeddings of the attempts that may still be
    kept (``shards/K-of-N/embeddings.zarr``) and the merge copies the kept ones into the run's.

    Under ``torchrun`` (or with ``--shard K/N``) every process captures its share of the
    rounds into ``RUN/shards/K-of-N`` and the shards are merged into the same run one process
    writes (:mod:`apmae_gpu.capture.ranks`); under torchrun rank 0 merges at the end.

    ``settings``: the ``capture`` section (:class:`~apmae_gpu.core.config.CaptureConfig`; default
    the paper's), with keyword ``overrides`` of its fields over it, the split's own
    (``per_task``, ``heads``, ``max_attempts``) included.
    """
    cfg = _settings(split, settings, overrides, encode_with)
    ctx = _context(cfg, Path(run), model, split, device, seed, shard, encode_with,
                   trust_remote_code)
    requota.complete(ctx.run)       # a raised quota's capture a kill left before its swap
    target = _load_target(ctx, cfg)
    raised = _enforce_identity(ctx, cfg, target)
    if raised:                      # capture the split again at the new quota, then swap
        ctx.run = ctx.out_run = requota.prepare(ctx.run, split, getattr(cfg, split).per_task)
    state = _open_store(ctx, cfg, target)
    state.reuse = requota.Reuse(Path(run), split, cfg.batch_size) if raised else None
    log.info("capture %s split of %s with %s on %s (%s, %d layers x %d heads, scaler %s%s)",
             split, ctx.run, target.spec.spec, ctx.device,
             str(target.lm.dtype).replace("torch.", ""), target.fam.n_layers,
             target.fam.n_heads, cfg.scaler,
             f", rank {ctx.rank} of {ctx.world}" if ctx.world > 1 else "")
    seconds = _prompt_rounds(ctx, cfg, target, state)
    if raised:
        ctx.run = ctx.out_run = Path(run)
        state.store = requota.swap(ctx.run, split)
    return _finish(ctx, cfg, target, state, seconds)


def _settings(split: str, settings: CaptureConfig | None, overrides: dict,
              encode_with: Path | None) -> CaptureConfig:
    """The capture section with capture()'s keyword overrides over it (the split's own
    settings into ``train``/``analysis``; ``heads`` None: the split's default); bad values
    are one-line errors."""
    if split not in ("train", "analysis"):
        raise ApmaeError(f"--split {split}: expected train or analysis")
    if overrides.get("scaler", "log") not in SCALERS:
        raise ApmaeError(f"--scaler {overrides['scaler']}: expected one of {', '.join(SCALERS)}")
    llm.check_dtype(overrides.get("dtype", "auto"))
    own, of_split = split_settings(overrides, CaptureConfig, CaptureSplitConfig)
    base = settings if settings is not None else CaptureConfig()
    split_cfg = {**getattr(base, split).model_dump(), **of_split}
    if split_cfg["heads"] is None:
        split_cfg["heads"] = getattr(CaptureConfig(), split).heads
    return section(CaptureConfig, base, {**own, split: split_cfg,
                                         "encode_analysis": encode_with is not None})


def _context(cfg: CaptureConfig, run: Path, model: str, split: str, device: str, seed: int,
             shard: str | None, encode_with: Path | None, trust_remote_code: bool
             ) -> CaptureRun:
    """Check the arguments against each other and the run; read the run's tasks."""
    if encode_with is not None and split != "analysis":
        raise ApmaeError("--encode-with applies to the analysis split (AP-MAE trains on the "
                         "stored maps of the train split)")
    frac = parse_heads(getattr(cfg, split).heads, split)
    shard_kn = layout.parse_shard(shard)
    dist = ranks.dist_env()
    if dist is not None and shard_kn is not None:
        raise ApmaeError("--shard is for processes launched one by one; under torchrun every "
                         "rank takes its share by itself")
    if dist is not None and cfg.device_map is not None:
        raise ApmaeError(f"--device-map {cfg.device_map} spreads one model over every GPU: run "
                         "it in one process, not under torchrun (each rank has its own GPU)")
    if not run.is_dir():
        raise ApmaeError(f"run directory {run} does not exist (run `apmae mine` first)")
    tasks_path = run / layout.TASKS_PARQUET
    if not tasks_path.exists():
        raise ApmaeError(f"{tasks_path} is missing (run `apmae mine` first)")
    tasks = read_parquet(tasks_path)   # a damaged file is a one-line error
    tables.require(tasks_path, layout.TASKS_PARQUET, "mine into a new run")
    if tasks.empty:
        raise ApmaeError(f"{tasks_path} holds no tasks")
    tables.validate_tasks(tasks, tasks_path)   # a hand-edited one too
    window = len(tasks.input_ids.iloc[0])
    if split == "train" and not (tasks.task == "random_masking").any():
        raise ApmaeError("--split train needs random_masking tasks (mine them with --tasks)")
    if dist is None and shard_kn is None and layout.shard_dirs(run):
        raise ApmaeError(f"{run}/shards holds an unfinished multi-process capture: finish it "
                         "with the same torchrun command (or --shard K/N processes), then "
                         "`apmae merge-shards`")
    rank, world = (dist[0], dist[1]) if dist else (shard_kn or (0, 1))
    out_run = run if world == 1 and shard_kn is None else layout.shard_dir(run, rank, world)
    return CaptureRun(run=run, model=model, split=split, device=device, seed=seed, shard=shard,
                      encode_with=encode_with, trust_remote_code=trust_remote_code, frac=frac,
                      dist=dist, rank=rank, world=world, out_run=out_run, tasks=tasks,
                      window=window)


def _load_target(ctx: CaptureRun, cfg: CaptureConfig) -> _Target:
    """Resolve the device (joining torchrun's group), load the LLM and check that the tasks
    fit its context and vocabulary."""
    ctx.device = resolve_device(ctx.device)
    if ctx.dist is not None:
        ctx.device = ranks.rank_device(ctx.device, ctx.dist[2])
        ranks.init_group(ctx.device)
    spec = llm.resolve(ctx.model)
    lm = llm.load_model(spec, device=ctx.device, dtype=llm.parse_dtype(cfg.dtype, ctx.device),
                        device_map=cfg.device_map, trust_remote_code=ctx.trust_remote_code,
                        seed=ctx.seed)
    fam = llm.family(lm)
    n_ctx = llm.context_length(lm)
    if n_ctx is not None and ctx.window > n_ctx:
        raise ApmaeError(f"prompts are {ctx.window} tokens but {ctx.model} has a context of "
                         f"{n_ctx}")
    vocab = lm.get_input_embeddings().num_embeddings
    top = max(int(np.concatenate(ctx.tasks.input_ids.to_numpy()).max()),
              int(ctx.tasks.target_token_id.max()))
    if top >= vocab:
        raise ApmaeError(f"tasks hold token id {top} but {ctx.model} has a vocabulary of "
                         f"{vocab}: mine with this model's tokenizer")
    return _Target(spec, lm, fam)


def _enforce_identity(ctx: CaptureRun, cfg: CaptureConfig, target: _Target) -> bool:
    """Record the run's identity, or refuse other settings; True: a raised quota (requota)."""
    sc = getattr(cfg, ctx.split)
    old = (identity.recorded(ctx.run).get(ctx.split) or {}).get("per_task")
    raised = old is not None and sc.per_task > old
    if raised:
        requota.check_raise(ctx.run, ctx.split, old, sc.per_task, sharded=ctx.world > 1
                            or ctx.sharded, encoding=ctx.encode_with is not None)
    identity.enforce(ctx.run, ctx.split, {
        "model": target.spec.path or target.spec.spec,
        "model_revision": llm.model_revision(target.spec),
        "dtype": str(target.lm.dtype).replace("torch.", ""), "seed": ctx.seed,
        "window": ctx.window, "scaler": cfg.scaler,
        ctx.split: {"heads": sc.heads, "per_task": old if raised else sc.per_task}})
    return raised


def _open_store(ctx: CaptureRun, cfg: CaptureConfig, target: _Target) -> _State:
    """Open (or create) the store, and the encoder with ``encode_with``; find where a killed
    capture stopped and build the round plan (saved for the merge when sharded)."""
    split, fam = ctx.split, target.fam
    store = MapStore.create_or_open(ctx.out_run, window=ctx.window, scaler=cfg.scaler,
                                    fill_value=FILL_VALUES[cfg.scaler],
                                    floor=FLOOR if cfg.scaler == "log" else None,
                                    chunk_maps=cfg.chunk_maps)
    encoder = None
    if ctx.encode_with is not None:
        # a shard's blocks are smaller (the merge holds one block of every shard in memory)
        encoder = StreamingEncoder(ctx.out_run, ctx.encode_with, fam.n_layers, fam.n_heads,
                                   pool=cfg.pool, device=ctx.device,
                                   block_budget=BLOCK_BUDGET_BYTES // ctx.world
                                   if ctx.sharded else None)
        roll_back_unencoded(store, split, encoder.committed_ids)
    if ctx.dist is not None:
        ranks.barrier(ctx.device)   # no rank reads the shards while another rolls its own back
    encoded_upto = (int(encoder.committed_ids[-1]) if encoder is not None
                    and len(encoder.committed_ids) else -1)
    used_elsewhere: set = set()
    for src in [ctx.run, *layout.shard_dirs(ctx.run)]:
        if (src / layout.MAPS_ZARR).exists():
            other = MapStore(src).inferences(columns=["inference_id", "split", "task_id"])
            if not other.empty:
                used_elsewhere |= set(other.loc[other.split != split, "task_id"].tolist())
    done_all = store.inferences(columns=["inference_id", "split", "batch"])
    next_id = int(done_all.inference_id.max()) + 1 if not done_all.empty else 0
    done = done_all[done_all.split == split] if not done_all.empty else done_all
    next_batch = int(done.batch.max()) + 1 if not done.empty else 0
    sc = getattr(cfg, split)
    plan = ranks.RoundPlan.build(ctx.tasks, split, sc.per_task, cfg.batch_size, ctx.seed,
                                 sc.max_attempts, used_elsewhere)
    if ctx.sharded:
        encoding = {"encode_with": None if ctx.encode_with is None else str(ctx.encode_with),
                    "pool": cfg.pool if ctx.encode_with is not None else None}
        ranks.check_plan(ctx.run, plan, ctx.seed, encoding["encode_with"])
        plan.save(ranks.plan_path(ctx.run, split), {
            "seed": ctx.seed, "per_task": sc.per_task, "batch_size": cfg.batch_size,
            "max_attempts": sc.max_attempts, "capped": plan.capped, **encoding,
            "heads": sc.heads})
    return _State(store=store, encoder=encoder, encoded_upto=encoded_upto, plan=plan,
                  known=ranks.Outcomes(plan, ctx.run), by_id=ctx.tasks.set_index("task_id"),
                  next_id=next_id, next_batch=next_batch)


def _prompt_rounds(ctx: CaptureRun, cfg: CaptureConfig, target: _Target, state: _State
                   ) -> float:
    """Prompt round after round until the plan is done, committing each on the writer's
    thread; returns the seconds it took."""
    writer = _Writer(state.store)
    t0 = time.perf_counter()
    bar = progress(desc=f"capture {ctx.split}", unit="inf")
    try:
        while True:
            nxt = ranks.next_round(state.known, ctx.rank, ctx.world, wait=ctx.dist is not None)
            if nxt is None:
                break
            rnd = _next_round(ctx, target, state, *nxt)
            copied = state.reuse and state.reuse.take(rnd, state.known, target.fam.n_layers)
            if copied:
                verdict, maps = copied
            else:
                logits, maps = forward_with_maps(target.lm, target.fam, rnd.input_ids,
                                                 rnd.heads, cfg.scaler)
                verdict = llm.judge(logits, rnd.targets.to(logits.device))
            rows, keep_idx, index_parts = _judge_rows(ctx, target.fam, state, rnd, verdict,
                                                      maps)
            kept_maps, index = _kept_maps(ctx, state, rnd, maps, rows, keep_idx, index_parts)
            writer.put((kept_maps, index, pd.DataFrame(rows)))
            state.next_id += len(rnd.attempts)
            state.next_batch += 1
            bar.update(len(rnd.attempts))
            bar.set_postfix(kept=state.stats["kept"], maps=state.stats["maps"])
        writer.close()
        if state.encoder is not None:
            state.encoder.close()
    except BaseException:
        bar.close()
        try:
            writer.close()
        except BaseException:  # the first error is the one to report
            pass
        raise
    bar.close()
    return time.perf_counter() - t0


def _next_round(ctx: CaptureRun, target: _Target, state: _State, task: str, k: int
                ) -> _Round:
    """Round ``k`` of ``task``: its candidates' prompts, targets and heads."""
    attempts = state.plan.attempts(task, k)
    task_ids = state.plan.order[task][attempts]
    ids = np.arange(state.next_id, state.next_id + len(attempts), dtype=np.int64)
    by_id = state.by_id
    input_ids = torch.tensor(np.stack([np.asarray(by_id.at[t, "input_ids"], dtype=np.int64)
                                       for t in task_ids]), device=ctx.device)
    targets = torch.tensor([int(by_id.at[t, "target_token_id"]) for t in task_ids])
    head_sel = choose_heads(task_ids, target.fam.n_layers, target.fam.n_heads, ctx.frac,
                            ctx.seed)
    return _Round(task, attempts, task_ids, ids, input_ids, targets, head_sel)


def _judge_rows(ctx: CaptureRun, fam, state: _State, rnd: _Round, verdict: dict, maps
                ) -> tuple[list[dict], list[int], list[pd.DataFrame]]:
    """Record every attempt's outcome and decide which to keep: the inference rows, the
    batch positions kept and their map index rows."""
    rows, keep_idx, index_parts = [], [], []
    known, targets, ids = state.known, rnd.targets, rnd.ids
    for b, (task_id, attempt) in enumerate(zip(rnd.task_ids, rnd.attempts)):
        has_target = int(targets[b]) >= 0
        correct = bool(verdict["correct"][b]) if has_target else None
        code = ranks.outcome_code(correct)
        keep = known.may_keep(rnd.task, int(attempt), code)
        known.record(rnd.task, int(attempt), code)
        n_maps = 0
        if keep:
            keep_idx.append(b)
            layers = np.repeat(np.arange(fam.n_layers), maps.shape[2])
            if ctx.frac is None:
                head_ids = np.tile(np.arange(fam.n_heads), fam.n_layers)
            else:
                head_ids = np.concatenate([h[b].numpy() for h in rnd.heads])
            n_maps = len(layers)
            index_parts.append(pd.DataFrame({"inference_id": ids[b], "layer": layers,
                                             "head": head_ids}))
        rows.append({
            "inference_id": int(ids[b]), "split": ctx.split, "task": rnd.task,
            "task_id": int(task_id), "batch": state.next_batch, "attempt": int(attempt),
            "input_ids": rnd.input_ids[b].cpu().numpy().astype(np.int32),
            "target_token_id": int(targets[b]),
            "predicted_token_id": int(verdict["predicted"][b]), "correct": correct,
            "target_logprob": float(verdict["target_logprob"][b]),
            "target_rank": int(verdict["target_rank"][b]),
            "predicted_logprob": float(verdict["predicted_logprob"][b]),
            "has_maps": keep, "n_maps": n_maps})
        state.stats["attempts"] += 1
        state.stats["kept"] += int(keep)
    return rows, keep_idx, index_parts


def _kept_maps(ctx: CaptureRun, state: _State, rnd: _Round, maps, rows: list[dict],
               keep_idx: list[int], index_parts: list[pd.DataFrame]):
    """The kept prompts' maps for the store, and their index (None, None when nothing is
    stored: nothing kept, or the maps went to the encoder)."""
    kept_maps = None
    if keep_idx and state.encoder is not None:
        fresh = [b for b in keep_idx if rnd.ids[b] > state.encoded_upto]
        if fresh:
            state.encoder.add(rnd.ids[fresh], maps[fresh])
        state.stats["maps"] += len(keep_idx) * maps.shape[1] * maps.shape[2]
        for r in rows:
            r["n_maps"] = 0
        index_parts = []
    elif keep_idx:
        # only the kept prompts' maps leave the device (the analysis split's attempts
        # surplus to their class quota never do)
        kept_maps = devices.to_host(maps[keep_idx]).reshape(-1, ctx.window, ctx.window)
        state.stats["maps"] += kept_maps.shape[0]
    index = pd.concat(index_parts, ignore_index=True) if index_parts else None
    return kept_maps, index


def _finish(ctx: CaptureRun, cfg: CaptureConfig, target: _Target, state: _State,
            seconds: float) -> dict:
    """Record the split in the manifest; under torchrun rank 0 merges the shards.  Returns
    the split's summary."""
    split, fam, lm, store, stats = ctx.split, target.fam, target.lm, state.store, state.stats
    sc = getattr(cfg, split)
    summary = ranks.summary(state.known)
    section = read_manifest(ctx.out_run).get("capture", {})
    section.update({
        "model": target.spec.describe(), "model_revision": llm.model_revision(target.spec),
        "model_type": fam.name, "n_layers": fam.n_layers, "n_heads": fam.n_heads,
        "n_kv_heads": fam.n_kv_heads, "dtype": str(lm.dtype).replace("torch.", ""),
        "device": ctx.device, "device_map": cfg.device_map,
        "attention_backend": f"{CAPTURE_IMPL}: probabilities from the model's own q/k in float32 "
                             "through transformers' AttentionInterface; layer output by sdpa",
        "scaler": cfg.scaler, "floor": FLOOR if cfg.scaler == "log" else None,
        "fill_value": FILL_VALUES[cfg.scaler], "window": ctx.window,
        "chunk_maps": store.info.chunk_maps, "codec": store.info.codec,
    })
    if state.encoder is not None:
        section["encoded_with"] = str(ctx.encode_with)
    splits = section.setdefault("splits", {})
    splits[split] = {
        "per_task": sc.per_task, "quota": sc.per_task, "heads": sc.heads,
        "batch_size": cfg.batch_size, "seed": ctx.seed, "max_attempts": sc.max_attempts,
        "shard": ctx.shard,
        "tasks": summary, "this_call": {"attempts": stats["attempts"], "kept": stats["kept"],
                                         "maps": stats["maps"], "seconds": round(seconds, 2)},
        "n_maps_total": store.n_maps,
    }
    if ctx.world > 1:
        splits[split]["rank"] = f"{ctx.rank} of {ctx.world}"
    update_manifest(ctx.out_run, "capture", section)
    rate = stats["attempts"] / max(seconds, 1e-9)
    log.info("captured %d inferences (%d kept, %d maps) in %.1fs: %.2f inferences/s, %.0f maps/s",
             stats["attempts"], stats["kept"], stats["maps"], seconds, rate,
             stats["maps"] / max(seconds, 1e-9))
    if ctx.dist is not None:
        ranks.finish(ctx.device)        # every shard is committed; the merge needs no group
        if ctx.rank == 0:
            rank_merge.merge_capture(ctx.run)
            splits = read_manifest(ctx.run)["capture"]["splits"]
        return splits[split]
    short = {t: s["status"] for t, s in summary.items() if s["status"] != "quota met"}
    if short and not ctx.sharded:
        log.warning("quotas not met: %s", short)
    return splits[split]


def merge_shards(run: Path) -> dict:
    """Merge ``RUN/shards/K-of-N`` (torchrun ranks or ``--shard`` processes) into RUN's own
    store: the same inferences, maps and order as one process (:func:`rank_merge.merge_capture`)."""
    return rank_merge.merge_capture(Path(run))
