"""Training AP-MAE on a run's maps (``apmae train``): the entry point and its setup.

Data
    The maps of ``train``-split inferences with ``has_maps``, less a deterministic share of
    those inferences held out for validation (:mod:`apmae_gpu.core.splits`).
Loader
    :class:`apmae_gpu.model.loader.MapLoader`: whole-chunk reads in a background thread, an order of
    maps that is a pure function of (seed, epoch, rank), so a resumed run skips straight to
    its step.
Setup
    :func:`train` takes the run's settings as a ``TrainConfig`` and a :class:`RunContext`
    (paths, device, seed, ...); the setup validates everything before the first step, finds
    the checkpoint ``--resume`` continues, and builds the model, AdamW (weight decay 0.05,
    betas 0.9/0.95), the schedule (optional linear warm-up, then cosine decay, peak LR base x global batch / 50 by default: base 1.5e-4 for ``paper`` as in the
    paper, larger for the small presets: ``BASE_LR``), optional ``torch.compile`` and DDP under
    ``torchrun`` (each rank reads its own chunks, only rank 0 writes).
Recipe
    ``train.recipe`` (:data:`apmae_gpu.core.config.RECIPES`): ``reference`` (the default, the
    reference package where the paper is silent: no qkv bias, learned position embeddings,
    LayerNorm -> Linear -> LayerNorm patch embedding, weight decay on every parameter, no
    warm-up, batches of consecutive maps) or ``improved`` (MAE's choices: qkv bias, fixed
    sine-cosine positions, a Linear patch embedding, no decay on biases/norms/tokens, 5%
    warm-up, shuffled maps); each item is also a field of its own.
Loop
    :mod:`apmae_gpu.model.engine`: bf16 autocast on CUDA; a non-finite loss stops the run with
    an error; validation, ``metrics.jsonl``.

Layout of ``OUT`` (default ``RUN/apmae``)::

    final/                       save_pretrained directory (config.json, model.safetensors)
    checkpoints/step-0001000/    config.json, model.safetensors, state.pt, training_args.json
    metrics.jsonl                one JSON object per log interval / validation
    training_args.json           the run's settings (never mixed into the model config)

Checkpoints (:mod:`apmae_gpu.model.checkpoints`): ``state.pt`` (``torch.load(weights_only=True)``-
safe) holds the optimizer, scheduler, step, the masking RNG of every rank, torch's RNG and the
data position.  ``--resume`` after a kill continues to bit-identical weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from apmae_gpu.capture import ranks
from apmae_gpu.core import layout
from apmae_gpu.core.config import TrainConfig, bounded_freeform, load_yaml, read_text_file, section
from apmae_gpu.core.devices import describe_machine, deterministic_scope, resolve_device
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import read_manifest, update_manifest
from apmae_gpu.core.scaling import FLOOR
from apmae_gpu.core.splits import split_maps
from apmae_gpu.core.store import MapStore
from apmae_gpu.model.baselines import baseline_mse
from apmae_gpu.model.checkpoints import (
    ARGS,
    FINAL,
    latest_intact,
    restore,
    save_final,
)
from apmae_gpu.model.engine import Outcome, Session, open_metrics, train_steps
from apmae_gpu.model.loader import MapLoader
from apmae_gpu.model.network import (
    APMAEModel,
    config_fields,
    describe,
    parameter_counts,
    preset_config,
)

log = logging.getLogger("apmae_gpu.model.training")

WEIGHT_DECAY = 0.05
BETAS = (0.9, 0.95)
# Base LR of the rule ``peak = base x global batch / 50``: the paper's 1.5e-4 for ``paper``;
# the small presets train for minutes rather than days and need larger steps (with the paper's
# base, tiny stays above the mean-of-visible-patches baseline; tiny at its base beats both
# baselines: "tiny learns" in bench/results/bench_train-cpu2.md).
BASE_LR = {"paper": 1.5e-4, "small": 1.5e-3, "tiny": 3e-3}
# Run settings that must match for --resume to continue the same run.
_RESUME_KEYS = ("preset", "batch_size", "global_batch", "lr", "seed", "raw", "val_fraction",
                "warmup_steps", "buffer_maps", "model_overrides", "weight_decay_all",
                "batch_order")
# what runs trained before the recipe existed did (training_args.json lacks these keys)
_LEGACY_ARGS = {"weight_decay_all": False, "batch_order": "shuffled"}
MODEL_ITEMS = ("qkv_bias", "position_embeddings", "patch_norm")


# --------------------------------------------------------------------------- helpers
def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def _load_overrides(model_config) -> dict:
    """Config overrides from a dict or a JSON/YAML file (only the keys that differ)."""
    if model_config is None:
        return {}
    if isinstance(model_config, dict):
        data = dict(model_config)
    else:
        path = Path(model_config)
        if not path.exists():
            raise ApmaeError(f"--model-config {path}: no such file")
        text = read_text_file(path, "--model-config")
        try:
            data = json.loads(text) if path.suffix == ".json" else load_yaml(text, str(path))
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ApmaeError(f"--model-config {path}: cannot parse ({first})") from None
        if not isinstance(data, dict):
            raise ApmaeError(f"--model-config {path}: expected a mapping of config keys")
    try:
        return bounded_freeform(data, "--model-config")
    except ValueError as exc:
        raise ApmaeError(str(exc)) from None


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return f


def _param_groups(model: torch.nn.Module, decay_all: bool = False) -> list[dict]:
    """AdamW's groups: weight decay on every trainable parameter (the reference), or none on
    biases, norms and tokens (MAE's)."""
    if decay_all:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": WEIGHT_DECAY}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name in ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0}]


def _config_diff(a: dict, b: dict) -> list[str]:
    """Architecture keys on which two config dicts differ."""
    return sorted(k for k in config_fields() if a.get(k) != b.get(k))


# --------------------------------------------------------------------------- train
def tf32_state() -> tuple[str, bool]:
    """(float32 matmul precision, cuDNN TF32) through the legacy getters, which Inductor
    (``torch.compile``) still reads."""
    return torch.get_float32_matmul_precision(), bool(torch.backends.cudnn.allow_tf32)


def _set_tf32(state: tuple[str, bool]) -> None:
    # Only the legacy setters: torch keeps them readable through both its legacy and its
    # ``fp32_precision`` API, while setting ``fp32_precision`` makes every legacy getter raise
    # "mix of the legacy and new APIs" (Inductor's among them).
    torch.set_float32_matmul_precision(state[0])
    torch.backends.cudnn.allow_tf32 = state[1]


def enable_tf32() -> None:
    """TF32 for float32 matmuls and convolutions (training only: see :func:`tf32_scope`)."""
    _set_tf32(("high", True))


@contextlib.contextmanager
def tf32_scope():
    """Restore the TF32 settings on exit, so later stages in the same process (capture,
    encoding, kNN) compute in full float32."""
    saved = tf32_state()
    try:
        yield
    finally:
        _set_tf32(saved)




@dataclass
class RunContext:
    """Where and how one training process runs (the run's settings are a ``TrainConfig``).

    ``model_config_file``: a JSON/YAML file of config overrides, read instead of
    ``TrainConfig.model_config_overrides`` when given.
    """
    run: Path
    out: Path
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    threads: int | None = None
    model_config_file: Path | None = None
    log_every: int | None = None
    keep_checkpoints: int = 2
    max_val_maps: int = 1024
    buffer_maps: int = 2048
    workers: int | None = None


@dataclass
class _Dist:
    """This process's place under torchrun and its device."""
    rank: int
    world: int
    local_rank: int
    own_group: bool     # this call started the process group (and ends it)
    device: str


@dataclass
class _Plan:
    """The run's data and resolved settings, validated before the first step."""
    store: MapStore
    config: object      # APMAEConfig
    overrides: dict
    train_ids: np.ndarray
    val_ids: np.ndarray
    counts: dict
    global_batch: int
    peak_lr: float
    warmup: int
    save_every: int
    eval_every: int
    log_every: int
    workers: int
    args: dict          # what training_args.json records


def train(run, settings: TrainConfig | None = None, *, resume: bool = False, out=None,
          device: str = "auto", seed: int = 0, model_config=None, log_every: int | None = None,
          keep_checkpoints: int = 2, max_val_maps: int = 1024, buffer_maps: int = 2048,
          workers: int | None = None, threads: int | None = None, **overrides) -> dict:
    """Train AP-MAE on ``run``'s train split and write ``out`` (default ``RUN/apmae``).

    ``settings``: the ``train`` section (:class:`~apmae_gpu.core.config.TrainConfig`; default the
    paper's), with keyword ``overrides`` of its fields over it.  ``model_config``: overrides
    of the preset's config (a dict, or a JSON/YAML file read instead of the section's
    ``model_config_overrides``), e.g. ``{"image_size": 64, "patch_size": 8}`` for small maps.
    ``threads``: torch CPU threads while training (default: torch's choice, but 1 on machines
    with at most 2 cores, where one thread trains the small presets faster than two).
    Returns the manifest's ``train`` section.  TF32 (on CUDA) is scoped to the call: the
    previous setting comes back when it returns.
    """
    from_file = model_config is not None and not isinstance(model_config, dict)
    if model_config is not None and not from_file:
        overrides["model_config_overrides"] = model_config
    cfg = section(TrainConfig, settings, overrides)
    run = Path(run)
    ctx = RunContext(run=run, out=Path(out) if out is not None else run / layout.APMAE_DIR,
                     device=device, seed=seed, resume=resume, threads=threads,
                     model_config_file=Path(model_config) if from_file else None,
                     log_every=log_every, keep_checkpoints=keep_checkpoints,
                     max_val_maps=max_val_maps, buffer_maps=buffer_maps, workers=workers)
    cpu_threads = torch.get_num_threads()
    if ctx.threads is None and (os.cpu_count() or 1) <= 2:
        ctx.threads = 1
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    try:
        with tf32_scope(), deterministic_scope(cfg.deterministic):
            return _train(cfg, ctx)
    finally:
        torch.set_num_threads(cpu_threads)


def _train(cfg: TrainConfig, ctx: RunContext) -> dict:
    """Set up (or resume) the run, train it and save the final model (rank 0)."""
    dist = _init_distributed(ctx.device)
    plan = _plan(cfg, ctx, dist)
    start_step, state, ckpt = _find_resume(cfg, ctx, plan)
    torch.manual_seed(ctx.seed)
    model, optimizer, scheduler, gen = _build(cfg, ctx, dist, plan)
    if state is not None:
        restore(ckpt, state, model, optimizer, scheduler, gen, dist.rank, dist.world,
                dist.device)
    is_main, cuda = dist.rank == 0, dist.device.startswith("cuda")
    if start_step == cfg.steps:  # finished; at most the final save was lost to a kill
        if is_main and not (ctx.out / FINAL).exists():
            save_final(ctx.out, model, plan.args)
        log.info("%s is complete (step %d); nothing to train", ctx.out, cfg.steps)
        return read_manifest(ctx.run).get("train", {"final": str(ctx.out / FINAL),
                                                    "steps": cfg.steps})
    counts_params = parameter_counts(model)
    if is_main:
        log.info("AP-MAE %s; %.1fM + %.1fM parameters", describe(plan.config),
                 counts_params["encoder"] / 1e6, counts_params["decoder"] / 1e6)
        c = plan.counts
        log.info("%d training maps (%d inferences), %d validation maps (%d inferences); "
                 "global batch %d, peak LR %.3g, %s on %s", c["n_train_maps"],
                 c["n_train_inferences"], c["n_val_maps"], c["n_val_inferences"],
                 plan.global_batch, plan.peak_lr, plan.args["precision"], dist.device)
    net: torch.nn.Module = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(dist.device).index] if cuda else None)
    if cfg.compile:
        net = torch.compile(net)
    if cuda:
        enable_tf32()   # train() restores the previous setting when it returns
    loader = MapLoader(plan.store, plan.train_ids, cfg.batch_size, seed=ctx.seed,
                       rank=dist.rank, world=dist.world, buffer_maps=ctx.buffer_maps,
                       workers=plan.workers, shuffle=plan.args["batch_order"] == "shuffled")
    s = Session(out=ctx.out, device=dist.device, rank=dist.rank, world=dist.world,
                seed=ctx.seed, steps=cfg.steps, start_step=start_step,
                batch_size=cfg.batch_size, log_every=plan.log_every,
                save_every=plan.save_every, eval_every=plan.eval_every,
                keep_checkpoints=ctx.keep_checkpoints, args=plan.args, counts=plan.counts,
                model=model, net=net, optimizer=optimizer, scheduler=scheduler, gen=gen,
                loader=loader)
    if is_main and plan.val_ids.size:
        _validation_set(s, plan, ctx.max_val_maps)
    open_metrics(s)
    outcome = train_steps(s)
    summary = _summary(cfg, s, plan, outcome, counts_params,
                       str(ckpt) if state is not None else None)
    if is_main:
        save_final(ctx.out, model, plan.args)
        update_manifest(ctx.run, "train", summary)
        base = s.val_base.get("visible_mean")
        log.info("trained to step %d in %.0f s: loss %.4g, validation %s%s", cfg.steps,
                 outcome.seconds, outcome.last_loss,
                 "n/a" if outcome.val_loss is None else f"{outcome.val_loss:.4g}",
                 "" if base is None else f" (mean-of-visible-patches baseline {base:.4g})")
    if dist.world > 1:
        ranks.barrier(dist.device)
        if dist.own_group:
            torch.distributed.destroy_process_group()
    return summary


# --------------------------------------------------------------------------- setup
def _init_distributed(device: str) -> _Dist:
    """Join torchrun's process group (when there is one) and pick this rank's device; only
    rank 0 reports progress."""
    rank, world, local_rank = _dist_env()
    if world > 1 and torch.cuda.is_available():
        device = ranks.rank_device("cuda", local_rank)
    else:
        device = resolve_device(device)
    own_group = world > 1 and ranks.init_group(device)
    if rank != 0:  # one process per rank under torchrun: only rank 0 reports progress
        log.setLevel(logging.WARNING)
    return _Dist(rank, world, local_rank, own_group, device)


def _plan(cfg: TrainConfig, ctx: RunContext, dist: _Dist) -> _Plan:
    """Validate everything before the first step; resolve the defaults that depend on it."""
    steps, preset, run = cfg.steps, cfg.preset, ctx.run
    store = MapStore(run)
    overrides = _load_overrides(ctx.model_config_file or cfg.model_config_overrides)
    if store.info.scaler == "log_normalize" and cfg.raw:
        raise ApmaeError(f"{run}: maps were stored log_normalize'd; raw probabilities cannot be "
                         "recovered for --raw (capture with --scaler log)")
    recipe = cfg.resolved()
    config = preset_config(preset, **{"input_scaling": "raw" if cfg.raw else "log_minmax",
                                      "stored_scaler": store.info.scaler,
                                      "log_floor": float(store.info.floor or FLOOR),
                                      **{k: recipe[k] for k in MODEL_ITEMS}, **overrides})
    if config.image_size != store.info.window:
        raise ApmaeError(f"{run}: the store holds {store.info.window}x{store.info.window} maps; "
                         f"preset {preset!r} takes {config.image_size}x{config.image_size} "
                         "(set image_size/patch_size with --model-config)")
    train_ids, val_ids, counts = split_maps(store, cfg.val_fraction)
    global_batch = cfg.batch_size * dist.world
    lr = cfg.lr
    peak_lr = lr if lr is not None else BASE_LR[preset] * global_batch / 50
    frac = recipe["warmup_fraction"]
    warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
              else max(1, round(frac * steps)) if frac > 0 else 0)
    save_every = cfg.save_every or max(1, min(2000, steps // 10))
    eval_every = cfg.eval_every or max(1, min(2000, steps // 10))
    log_every = ctx.log_every or max(1, min(50, steps // 100))
    workers = (ctx.workers if ctx.workers is not None
               else max(1, min(8, (os.cpu_count() or 2) // 2)))
    cuda = dist.device.startswith("cuda")
    args = {"run": str(run.resolve()), "out": str(ctx.out.resolve()), "preset": preset,
            "model_overrides": overrides, "steps": steps, "batch_size": cfg.batch_size,
            "global_batch": global_batch, "world_size": dist.world, "lr": peak_lr,
            "lr_rule": None if lr is not None else f"{BASE_LR[preset]} x {global_batch} / 50",
            "weight_decay": WEIGHT_DECAY, "betas": list(BETAS), "warmup_steps": warmup,
            "schedule": "linear warm-up, cosine to 0" if warmup else "cosine to 0",
            "recipe": cfg.recipe, "weight_decay_all": recipe["weight_decay_all"],
            "batch_order": recipe["batch_order"], "seed": ctx.seed, "raw": cfg.raw,
            "val_fraction": cfg.val_fraction, "device": dist.device, "compile": cfg.compile,
            "precision": "bf16-autocast" if cuda else "fp32", "save_every": save_every,
            "eval_every": eval_every, "buffer_maps": ctx.buffer_maps,
            "torch_threads": torch.get_num_threads(), **counts}
    return _Plan(store, config, overrides, train_ids, val_ids, counts, global_batch, peak_lr,
                 warmup, save_every, eval_every, log_every, workers, args)


def _find_resume(cfg: TrainConfig, ctx: RunContext,
                 plan: _Plan) -> tuple[int, dict | None, Path | None]:
    """(start step, checkpoint state or None, checkpoint dir or None): the checkpoint in
    ``OUT`` that ``--resume`` continues, after checking it is the same run; a fresh ``OUT``
    starts at 0.  A resumed run keeps its checkpoint's default warm-up."""
    out, steps = ctx.out, cfg.steps
    ckpt, state = latest_intact(out)   # a damaged newer checkpoint is passed over
    if ckpt is None and (out / FINAL).exists():
        raise ApmaeError(f"{out} already holds a trained model and no checkpoint to resume "
                         "from; use another --out")
    if ckpt is None:
        return 0, None, None
    if not ctx.resume:
        raise ApmaeError(f"{out} already holds a training run (last checkpoint {ckpt.name}); "
                         "pass --resume to continue it or --out to train elsewhere")
    saved_cfg = json.loads((ckpt / "config.json").read_text())
    diff = _config_diff(saved_cfg, plan.config.to_dict())
    if diff:
        raise ApmaeError(f"{ckpt} is a {saved_cfg.get('preset')!r} model that differs from "
                         f"the requested {cfg.preset!r} one in: {', '.join(diff)}")
    saved_args = {**_LEGACY_ARGS, **json.loads((ckpt / ARGS).read_text())}
    args = plan.args
    if cfg.warmup_steps is None:  # the default depends on --steps, which may grow
        plan.warmup = args["warmup_steps"] = saved_args.get("warmup_steps", plan.warmup)
    diff = [k for k in _RESUME_KEYS if saved_args.get(k) != args.get(k)]
    if diff:
        raise ApmaeError(f"--resume: {ckpt} was trained with other settings: " + ", ".join(
            f"{k}={saved_args.get(k)!r} (now {args.get(k)!r})" for k in diff))
    start_step = int(state["step"])
    if saved_args.get("steps") != steps:
        log.warning("--steps %d differs from the checkpoint's %s: the cosine schedule is "
                    "stretched from step %d on", steps, saved_args.get("steps"), start_step)
    if start_step > steps:
        raise ApmaeError(f"{ckpt} is already at step {start_step} > --steps {steps}")
    log.info("resuming from %s (step %d)", ckpt, start_step)
    return start_step, state, ckpt


def _build(cfg: TrainConfig, ctx: RunContext, dist: _Dist, plan: _Plan):
    """(model, optimizer, scheduler, this rank's masking generator), freshly initialised
    (after ``torch.manual_seed(seed)``)."""
    model = APMAEModel(plan.config).to(dist.device)
    cuda = dist.device.startswith("cuda")
    optimizer = torch.optim.AdamW(_param_groups(model, plan.args["weight_decay_all"]),
                                  lr=plan.peak_lr, betas=BETAS,
                                  **({"fused": True} if cuda else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(plan.warmup, cfg.steps))
    gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + dist.rank)
    return model, optimizer, scheduler, gen


def _validation_set(s: Session, plan: _Plan, max_val_maps: int) -> None:
    """Rank 0: fixed validation maps and masks on ``s``, and their baselines' MSE once."""
    val_ids, store = plan.val_ids, plan.store
    pick = val_ids[np.linspace(0, val_ids.size - 1, min(max_val_maps, val_ids.size)).astype(int)]
    s.val_maps = torch.from_numpy(store.read(np.unique(pick)))
    if not torch.isfinite(s.val_maps).all():
        raise ApmaeError(f"{store.maps_path}: NaN or infinite values among the validation maps")
    s.val_noise = torch.rand(s.val_maps.shape[0], plan.config.num_patches,
                             generator=torch.Generator().manual_seed(s.seed + 7919))
    with torch.inference_mode():
        base = baseline_mse(s.model, s.val_maps, s.val_noise)
    s.val_base = {k: float(v.mean()) for k, v in base.items()}


def _summary(cfg: TrainConfig, s: Session, plan: _Plan, outcome: Outcome,
             counts_params: dict, resumed_from: str | None) -> dict:
    """The manifest's ``train`` section."""
    trained = cfg.steps - s.start_step
    seconds = outcome.seconds
    return {"preset": cfg.preset, "model": describe(plan.config), "parameters": counts_params,
            "out": str(s.out), "final": str(s.out / FINAL), "steps": cfg.steps,
            "batch_size": cfg.batch_size, "global_batch": plan.global_batch,
            "lr": plan.peak_lr, "warmup_steps": plan.warmup, "weight_decay": WEIGHT_DECAY,
            "recipe": cfg.recipe, "weight_decay_all": plan.args["weight_decay_all"],
            "batch_order": plan.args["batch_order"],
            "raw": cfg.raw, "input_scaling": plan.config.input_scaling,
            "val_fraction": cfg.val_fraction, **plan.counts,
            "final_loss": outcome.last_loss, "val_loss": outcome.val_loss,
            **{f"val_{k}": v for k, v in s.val_base.items()},
            "maps_per_s": trained * plan.global_batch / seconds if seconds else None,
            "seconds": seconds, "device": s.device, "world_size": s.world,
            "precision": plan.args["precision"], "compile": cfg.compile,
            "deterministic": cfg.deterministic,
            "resumed_from": resumed_from, "machine": describe_machine()}
