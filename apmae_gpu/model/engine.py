"""The AP-MAE training loop: one step, validation on fixed masks, metrics, checkpoints.

:func:`train_steps` runs a set-up :class:`Session` (``apmae_gpu.model.training`` builds it: model,
optimizer, schedule, data and any restored checkpoint) from its start step to the last one.
Each step draws its masking noise from the session's generator, runs the model under
:func:`apmae_gpu.core.devices.autocast` and takes one AdamW step; every ``log_every`` steps the loss
(averaged over the interval and the ranks) goes to ``metrics.jsonl`` and a non-finite loss
stops the run with an error; every ``eval_every`` steps rank 0 validates; every
``save_every`` steps (and at the end) a checkpoint is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from apmae_gpu.core import layout
from apmae_gpu.core.devices import autocast
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import atomic_path, write_json
from apmae_gpu.core.logs import progress
from apmae_gpu.model.checkpoints import ARGS, latest_checkpoint, save_checkpoint
from apmae_gpu.model.loader import MapLoader
from apmae_gpu.model.network import APMAEModel

METRICS = layout.METRICS_JSONL


@dataclass
class Session:
    """One training process, set up: what the loop reads and drives.

    ``steps`` .. ``keep_checkpoints`` are the run's resolved settings; ``args`` is what
    ``training_args.json`` records; ``val_maps`` [n, W, W] / ``val_noise`` [n, N] the fixed
    validation maps and masks (rank 0 only, else None) and ``val_base`` their baselines' MSE.
    """
    out: Path
    device: str
    rank: int
    world: int
    seed: int
    steps: int
    start_step: int
    batch_size: int
    log_every: int
    save_every: int
    eval_every: int
    keep_checkpoints: int
    args: dict
    counts: dict
    model: APMAEModel
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    loader: MapLoader
    val_maps: torch.Tensor | None = None
    val_noise: torch.Tensor | None = None
    val_base: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass
class Outcome:
    """What the loop leaves for the run's summary."""
    last_loss: float = float("nan")
    val_loss: float | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------- metrics
def open_metrics(s: Session) -> None:
    """Rank 0: create ``OUT``, keep the metrics the resumed checkpoint had seen (steps up to
    the start step) and write ``training_args.json``."""
    if not s.is_main:
        return
    s.out.mkdir(parents=True, exist_ok=True)
    path = s.out / METRICS
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if rec.get("step", 0) <= s.start_step:
                    kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(k + "\n" for k in kept))
    write_json(s.out / ARGS, s.args)


def log_metrics(s: Session, rec: dict) -> None:
    """Append one record to ``metrics.jsonl`` (rank 0)."""
    if s.is_main:
        with open(s.out / METRICS, "a") as f:
            f.write(json.dumps(rec) + "\n")


# --------------------------------------------------------------------------- validation
def masked_mse(model: APMAEModel, maps: torch.Tensor, noise: torch.Tensor, batch: int,
               device: str) -> torch.Tensor:
    """Per-map masked MSE [n] of ``model`` on fixed masks (no gradients)."""
    out = []
    with torch.inference_mode():
        for i in range(0, maps.shape[0], batch):
            x = maps[i:i + batch].to(device, non_blocking=True)
            with autocast(device):
                _, pred, mask = model(x, noise=noise[i:i + batch].to(device))
            target = model.prepare(x)
            out.append(model.forward_loss(target, pred, mask, per_map=True).float().cpu())
    return torch.cat(out)


def validate(s: Session, step: int) -> float | None:
    """Validation MSE at ``step`` (logged with the baselines'); None without validation maps."""
    if s.val_maps is None:
        return None
    s.model.eval()
    mse = masked_mse(s.model, s.val_maps, s.val_noise, max(s.batch_size, 64), s.device)
    s.model.train()
    rec = {"kind": "val", "step": step, "val_loss": float(mse.mean()),
           "val_loss_std": float(mse.std()) if mse.numel() > 1 else 0.0,
           **{f"val_{k}": v for k, v in s.val_base.items()}}
    log_metrics(s, rec)
    return rec["val_loss"]


# --------------------------------------------------------------------------- checkpoints
def checkpoint(s: Session, step: int) -> None:
    """Every rank's masking RNG to rank 0, which writes checkpoint ``step``."""
    rngs = [s.gen.get_state()]
    if s.world > 1:
        rngs = [None] * s.world
        torch.distributed.all_gather_object(rngs, s.gen.get_state())
    if not s.is_main:
        return
    epoch, batch = s.loader.locate(step)
    state = {"step": step, "optimizer": s.optimizer.state_dict(),
             "scheduler": s.scheduler.state_dict(), "mask_rng": rngs,
             "torch_rng": torch.get_rng_state(), "world_size": s.world,
             "data": {"seed": s.seed, "epoch": epoch, "batch_in_epoch": batch,
                      "batch_size": s.batch_size, "n_train_maps": s.counts["n_train_maps"]}}
    if s.cuda:
        state["cuda_rng"] = torch.cuda.get_rng_state(s.device)
    save_checkpoint(s.out, step, s.model, state, s.args, s.keep_checkpoints)


# --------------------------------------------------------------------------- loop
def train_step(s: Session, maps_np: np.ndarray) -> tuple[torch.Tensor, float]:
    """One optimizer step on a batch ``maps_np`` [B, W, W] float16: (the loss, detached; the
    seconds spent before the forward pass, i.e. moving the batch and drawing its masks)."""
    t = time.perf_counter()
    x = torch.from_numpy(maps_np)
    if s.cuda:
        x = x.pin_memory()
    x = x.to(s.device, non_blocking=True)
    noise = torch.rand(x.shape[0], s.model.config.num_patches, generator=s.gen)
    moved = time.perf_counter() - t
    with autocast(s.device):
        loss, _, _ = s.net(x, noise=noise.to(s.device, non_blocking=True))
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    s.optimizer.step()
    s.scheduler.step()
    return loss.detach(), moved


def _interval_loss(s: Session, loss_sum: torch.Tensor, n_loss: int, done: int) -> float:
    """Mean loss of the interval over every rank; a non-finite one stops the run."""
    total = loss_sum.float()
    if s.world > 1:
        torch.distributed.all_reduce(total)
    loss = float(total) / (n_loss * s.world)
    if not math.isfinite(loss):
        prev = latest_checkpoint(s.out)
        raise ApmaeError(f"non-finite training loss ({loss}) by step {done}; "
                         f"last good checkpoint: {prev or 'none'}; try a lower --lr")
    return loss


def train_steps(s: Session) -> Outcome:
    """Train from ``s.start_step`` to ``s.steps``: log, validate and checkpoint on the way."""
    result = Outcome()
    s.model.train()
    t0 = time.perf_counter()
    t_int, maps_int, wait, loss_sum, n_loss = time.perf_counter(), 0, 0.0, None, 0
    bar = progress(total=s.steps, initial=s.start_step, desc="train", unit="step",
                   disable=None if s.is_main else True)
    batches = s.loader.batches(s.start_step)
    t_wait = time.perf_counter()
    try:
        for step, epoch, maps_np in batches:
            if step >= s.steps:
                break
            wait += time.perf_counter() - t_wait
            loss, moved = train_step(s, maps_np)
            wait += moved
            loss_sum = loss if loss_sum is None else loss_sum + loss
            n_loss += 1
            maps_int += maps_np.shape[0] * s.world
            done = step + 1
            bar.update(1)
            if done % s.log_every == 0 or done == s.steps or done % s.save_every == 0:
                result.last_loss = _interval_loss(s, loss_sum, n_loss, done)
                dt = time.perf_counter() - t_int
                log_metrics(s, {"kind": "train", "step": done, "epoch": epoch,
                                "loss": result.last_loss, "lr": s.scheduler.get_last_lr()[0],
                                "maps_per_s": maps_int / dt, "data_wait_share": wait / dt,
                                "elapsed_s": time.perf_counter() - t0})
                bar.set_postfix(loss=f"{result.last_loss:.4g}", refresh=False)
                t_int, maps_int, wait, loss_sum, n_loss = time.perf_counter(), 0, 0.0, None, 0
            if s.is_main and (done % s.eval_every == 0 or done == s.steps):
                result.val_loss = validate(s, done)
            if done % s.save_every == 0 or done == s.steps:
                checkpoint(s, done)
            t_wait = time.perf_counter()
    finally:
        batches.close()
        bar.close()
    result.seconds = time.perf_counter() - t0
    return result
