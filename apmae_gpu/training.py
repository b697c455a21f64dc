"""Training AP-MAE on a run's maps (``apmae train``).

Data
    The maps of ``train``-split inferences with ``has_maps``.  A deterministic share of those
    inferences (``val_fraction``, by a hash of ``inference_id``, so every map of one prompt
    sits on one side, and ``apmae evaluate --split validation`` finds the same maps in any
    process) is held out for validation.
Loader
    Whole Zarr chunks are read in a background thread.  Each epoch the chunks are permuted
    (seed, epoch), dealt to the ranks, grouped into windows of ``buffer_maps`` maps and shuffled
    within a window.  The order of the maps is therefore a pure function of (seed, epoch, rank),
    so a resumed run skips straight to its step: no replay, nothing seen twice or lost.
Loop
    AdamW (weight decay 0.05, betas 0.9/0.95, none on biases, norms and tokens), linear warm-up
    then cosine decay, peak LR base x global batch / 50 by default (base 1.5e-4 for ``paper``
    as in the paper, larger for the small presets: ``BASE_LR``); bf16 autocast on CUDA;
    optional ``torch.compile``; DDP under ``torchrun`` (each rank reads its own chunks, only
    rank 0 writes).  A non-finite loss stops the run with an error.

Layout of ``OUT`` (default ``RUN/apmae``)::

    final/                       save_pretrained directory (config.json, model.safetensors)
    checkpoints/step-0001000/    config.json, model.safetensors, state.pt, training_args.json
    metrics.jsonl                one JSON object per log interval / validation
    training_args.json           the run's settings (never mixed into the model config)

``state.pt`` (``torch.load(weights_only=True)``-safe) holds the optimizer, scheduler, step, the
masking RNG of every rank, torch's RNG and the data position.  ``--resume`` after a kill
continues to bit-identical weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from apmae_gpu.model import APMAEModel, config_fields, describe, parameter_counts, preset_config
from apmae_gpu.runs import (
    ApmaeError,
    atomic_path,
    describe_machine,
    progress,
    quiet_hf_progress,
    read_manifest,
    resolve_device,
    update_manifest,
    write_json,
)
from apmae_gpu.scaling import FLOOR
from apmae_gpu.store import MapStore

log = logging.getLogger("apmae_gpu.training")

FINAL, CHECKPOINTS, METRICS, ARGS, STATE = (
    "final", "checkpoints", "metrics.jsonl", "training_args.json", "state.pt")
WEIGHT_DECAY = 0.05
BETAS = (0.9, 0.95)
# Base LR of the rule ``peak = base x global batch / 50``: the paper's 1.5e-4 for ``paper``;
# the small presets train for minutes rather than days and need larger steps.  Measured with
# tiny, batch 32: on synthetic maps base 1.5e-4 is still above the mean-of-visible-patches
# baseline after 200 steps; on 3k SmolLM2 maps, 300 steps, base 1.5e-3 reaches validation MSE
# 0.0194 and 4.7e-3 0.0185 (mean of visible patches 0.0254, dataset mean patch 0.0224).
BASE_LR = {"paper": 1.5e-4, "small": 1.5e-3, "tiny": 3e-3}
# Run settings that must match for --resume to continue the same run.
_RESUME_KEYS = ("preset", "batch_size", "global_batch", "lr", "seed", "raw", "val_fraction",
                "warmup_steps", "buffer_maps", "model_overrides")


# --------------------------------------------------------------------------- split
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


# --------------------------------------------------------------------------- loader
class MapLoader:
    """Deterministic, resumable batches ``[B, W, W]`` float16 from whole-chunk reads.

    ``batches(start_step)`` yields ``(step, maps)`` forever (epoch after epoch); the batch of a
    given step is the same whether the iteration started at 0 or at that step.
    """

    def __init__(self, store: MapStore, map_ids: np.ndarray, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, buffer_maps: int = 2048, workers: int = 1,
                 prefetch: int = 2):
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.rank, self.world, self.workers, self.prefetch = rank, world, workers, prefetch
        self.ids = np.sort(np.asarray(map_ids, dtype=np.int64))
        cm = store.info.chunk_maps
        chunk_of = self.ids // cm
        self.chunks, starts, self.counts = np.unique(chunk_of, return_index=True,
                                                     return_counts=True)
        self.chunk_ids = np.split(self.ids, starts[1:])  # train map ids of each chunk
        self.window_chunks = max(1, buffer_maps // cm)
        self._epoch_steps: list[int] = []
        if self.steps_per_epoch(0) == 0:
            raise ApmaeError(f"batch size {batch_size} x {world} rank(s) exceeds the "
                             f"{self.ids.size} training maps; lower --batch-size")

    def _rank_chunks(self, epoch: int, rank: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        return perm[rank::self.world]

    def steps_per_epoch(self, epoch: int) -> int:
        """Batches every rank can fill in ``epoch`` (the same on all ranks)."""
        while len(self._epoch_steps) <= epoch:
            e = len(self._epoch_steps)
            n = min(int(self.counts[self._rank_chunks(e, r)].sum()) for r in range(self.world))
            self._epoch_steps.append(n // self.batch_size)
        return self._epoch_steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a global step."""
        epoch = 0
        while step >= self.steps_per_epoch(epoch):
            step -= self.steps_per_epoch(epoch)
            epoch += 1
        return epoch, step

    def _windows(self, epoch: int) -> list[np.ndarray]:
        """This rank's windows of ``epoch``: the shuffled map ids of each window."""
        mine = self._rank_chunks(epoch, self.rank)
        out = []
        for w, start in enumerate(range(0, len(mine), self.window_chunks)):
            ids = np.concatenate([self.chunk_ids[c] for c in mine[start:start + self.window_chunks]])
            rng = np.random.default_rng([self.seed, epoch, self.rank, w])
            out.append(ids[rng.permutation(ids.size)])
        return out

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Map ids this rank trains on in ``epoch``, in order (``steps_per_epoch * B`` of them);
        the batch of step ``s`` of the epoch is ``order[s * B:(s + 1) * B]``."""
        order = np.concatenate(self._windows(epoch))
        return order[:self.steps_per_epoch(epoch) * self.batch_size]

    def _read_window(self, ids: np.ndarray, pool) -> np.ndarray:
        """Maps of ``ids`` (in that order) [len(ids), W, W] float16, reading each touched chunk
        once, whole, and copying every map once, straight to its place (in ``pool``'s threads
        when given)."""
        cm, w = self.store.info.chunk_maps, self.store.info.window
        chunk_of = ids // cm
        order = np.argsort(chunk_of, kind="stable")
        chunks, starts = np.unique(chunk_of[order], return_index=True)
        groups = np.split(order, starts[1:])  # positions (in ids and out) of each chunk's maps
        out = np.empty((ids.size, w, w), np.float16)

        def read(k: int) -> None:
            c = int(chunks[k])
            block = self.store.read_chunk(c)   # checked: present and intact
            for pos in groups[k]:
                m = block[ids[pos] - c * cm]
                if ((m.view(np.uint16) & 0x7C00) == 0x7C00).any():
                    raise ApmaeError(f"{self.store.maps_path}: NaN or infinite values in map "
                                     f"{int(ids[pos])}; refusing to train on it")
                out[pos] = m

        if pool:
            list(pool.map(read, range(len(chunks))))
        else:
            for k in range(len(chunks)):
                read(k)
        return out

    def _produce(self, start_step: int, out: queue.Queue, stop: threading.Event) -> None:
        """Background thread: put (epoch, first_position, maps) windows on ``out``."""
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        try:
            epoch, batch = self.locate(start_step)
            skip = batch * self.batch_size
            while not stop.is_set():
                need = self.steps_per_epoch(epoch) * self.batch_size
                pos = 0
                for ids in self._windows(epoch):
                    if pos >= need or stop.is_set():
                        break
                    lo, hi = max(skip - pos, 0), min(ids.size, need - pos)
                    if lo < hi:
                        item = (epoch, self._read_window(ids[lo:hi], pool))
                        while not stop.is_set():
                            try:
                                out.put(item, timeout=0.1)
                                break
                            except queue.Full:
                                continue
                    pos += ids.size
                epoch, skip = epoch + 1, 0
        except Exception as exc:  # handed to the consumer, which re-raises it
            while not stop.is_set():
                try:
                    out.put(("error", exc), timeout=0.1)
                    break
                except queue.Full:
                    continue
        finally:
            if pool:
                pool.shutdown(wait=False)

    def batches(self, start_step: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(step, epoch, maps [B, W, W] float16)`` from ``start_step`` on."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(start_step, q, stop), daemon=True,
                                  name="apmae-loader")
        thread.start()
        step, b = start_step, self.batch_size
        carry: np.ndarray | None = None
        carry_epoch = -1
        try:
            while True:
                item = q.get()
                if item[0] == "error":
                    raise item[1]
                epoch, maps = item
                if carry is not None and carry_epoch == epoch and len(carry):
                    maps = np.concatenate([carry, maps])
                start = 0
                while maps.shape[0] - start >= b:
                    yield step, epoch, maps[start:start + b]
                    step, start = step + 1, start + b
                carry, carry_epoch = maps[start:], epoch
        finally:
            stop.set()
            thread.join(timeout=5)


# --------------------------------------------------------------------------- helpers
def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def _load_overrides(model_config) -> dict:
    """Config overrides from a dict or a JSON/YAML file (only the keys that differ)."""
    if model_config is None:
        return {}
    from apmae_gpu.config import bounded_freeform, load_yaml, read_text_file

    if isinstance(model_config, dict):
        data = dict(model_config)
    else:
        path = Path(model_config)
        if not path.exists():
            raise ApmaeError(f"--model-config {path}: no such file")
        import yaml

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


def _param_groups(model: torch.nn.Module) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name in ("cls_token", "mask_token"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0}]


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete ``checkpoints/step-*`` directory (temporaries start with a dot)."""
    d = Path(out) / CHECKPOINTS
    found = sorted(p for p in d.glob("step-*") if (p / STATE).exists()) if d.is_dir() else []
    return found[-1] if found else None


def _config_diff(a: dict, b: dict) -> list[str]:
    """Architecture keys on which two config dicts differ."""
    return sorted(k for k in config_fields() if a.get(k) != b.get(k))


def _save_dir(final: Path, write) -> None:
    """Write a directory through a dot-temporary beside it, then rename it into place."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _save_final(out: Path, model: APMAEModel, args: dict) -> None:
    def write(tmp: Path):
        with quiet_hf_progress():
            model.save_pretrained(tmp)
        write_json(tmp / ARGS, args)

    _save_dir(out / FINAL, write)


def _masked_mse(model: APMAEModel, maps: torch.Tensor, noise: torch.Tensor, batch: int,
                device: str, amp) -> torch.Tensor:
    """Per-map masked MSE [n] of ``model`` on fixed masks (no gradients)."""
    out = []
    with torch.inference_mode():
        for i in range(0, maps.shape[0], batch):
            x = maps[i:i + batch].to(device, non_blocking=True)
            with amp():
                _, pred, mask = model(x, noise=noise[i:i + batch].to(device))
            target = model.prepare(x)
            out.append(model.forward_loss(target, pred, mask, per_map=True).float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- train
def _tf32_settings() -> list[tuple[object, str]]:
    """(object, attribute) pairs that decide TF32: torch's ``fp32_precision`` API where it
    exists, else the older ``allow_tf32`` flags."""
    import torch

    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision") and hasattr(b.cudnn, "conv"):
        return [(b.cuda.matmul, "fp32_precision"), (b.cudnn.conv, "fp32_precision")]
    return [(b.cuda.matmul, "allow_tf32"), (b.cudnn, "allow_tf32")]


def enable_tf32() -> None:
    """TF32 for float32 matmuls and convolutions (training only: see :func:`tf32_scope`)."""
    for obj, attr in _tf32_settings():
        setattr(obj, attr, "tf32" if attr == "fp32_precision" else True)


@contextlib.contextmanager
def tf32_scope():
    """Restore the TF32 settings on exit, so later stages in the same process (capture,
    encoding, kNN) compute in full float32."""
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in _tf32_settings()]
    try:
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def train(run, preset: str = "small", steps: int = 1000, batch_size: int = 64,
          lr: float | None = None, resume: bool = False, out=None, raw: bool = False,
          device: str = "auto", seed: int = 0, compile: bool = False, val_fraction: float = 0.1,
          *, model_config=None, warmup_steps: int | None = None, save_every: int | None = None,
          eval_every: int | None = None, log_every: int | None = None, keep_checkpoints: int = 2,
          max_val_maps: int = 1024, buffer_maps: int = 2048, workers: int | None = None,
          threads: int | None = None) -> dict:
    """Train AP-MAE on ``run``'s train split and write ``out`` (default ``RUN/apmae``).

    ``model_config``: overrides of the preset's config (a dict or a JSON/YAML file), e.g.
    ``{"image_size": 64, "patch_size": 8}`` for small maps.  ``threads``: torch CPU threads
    while training (default: torch's choice, but 1 on machines with at most 2 cores, where one
    thread measured 2-7x faster than two for the small presets).  Returns the manifest's
    ``train`` section.  TF32 (on CUDA) is scoped to the call: the previous setting comes back
    when it returns.
    """
    cpu_threads = torch.get_num_threads()
    if threads is None and (os.cpu_count() or 1) <= 2:
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    try:
        with tf32_scope():
            return _train(run, preset, steps, batch_size, lr, resume, out, raw, device, seed,
                          compile, val_fraction, model_config, warmup_steps, save_every,
                          eval_every, log_every, keep_checkpoints, max_val_maps, buffer_maps,
                          workers)
    finally:
        torch.set_num_threads(cpu_threads)


def _train(run, preset, steps, batch_size, lr, resume, out, raw, device, seed, compile,
           val_fraction, model_config, warmup_steps, save_every, eval_every, log_every,
           keep_checkpoints, max_val_maps, buffer_maps, workers) -> dict:
    run = Path(run)
    out = Path(out) if out is not None else run / "apmae"
    rank, world, local_rank = _dist_env()
    own_group = world > 1 and not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1 and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    else:
        device = resolve_device(device)
    is_main = rank == 0
    if not is_main:  # one process per rank under torchrun: only rank 0 reports progress
        log.setLevel(logging.WARNING)
    cuda = device.startswith("cuda")

    # ---- validate everything before the first step
    if steps < 1 or batch_size < 1:
        raise ApmaeError("--steps and --batch-size must be positive")
    store = MapStore(run)
    overrides = _load_overrides(model_config)
    if store.info.scaler == "log_normalize" and raw:
        raise ApmaeError(f"{run}: maps were stored log_normalize'd; raw probabilities cannot be "
                         "recovered for --raw (capture with --scaler log)")
    config = preset_config(preset, **{"input_scaling": "raw" if raw else "log_minmax",
                                      "stored_scaler": store.info.scaler,
                                      "log_floor": float(store.info.floor or FLOOR), **overrides})
    if config.image_size != store.info.window:
        raise ApmaeError(f"{run}: the store holds {store.info.window}x{store.info.window} maps; "
                         f"preset {preset!r} takes {config.image_size}x{config.image_size} "
                         "(set image_size/patch_size with --model-config)")
    train_ids, val_ids, counts = split_maps(store, val_fraction)
    global_batch = batch_size * world
    peak_lr = lr if lr is not None else BASE_LR[preset] * global_batch / 50
    warmup = warmup_steps if warmup_steps is not None else max(1, round(0.05 * steps))
    save_every = save_every or max(1, min(2000, steps // 10))
    eval_every = eval_every or max(1, min(2000, steps // 10))
    log_every = log_every or max(1, min(50, steps // 100))
    workers = workers if workers is not None else max(1, min(8, (os.cpu_count() or 2) // 2))
    args = {"run": str(run.resolve()), "out": str(out.resolve()), "preset": preset,
            "model_overrides": overrides, "steps": steps, "batch_size": batch_size,
            "global_batch": global_batch, "world_size": world, "lr": peak_lr,
            "lr_rule": None if lr is not None else f"{BASE_LR[preset]} x {global_batch} / 50",
            "weight_decay": WEIGHT_DECAY, "betas": list(BETAS), "warmup_steps": warmup,
            "schedule": "linear warm-up, cosine to 0", "seed": seed, "raw": raw,
            "val_fraction": val_fraction, "device": device, "compile": compile,
            "precision": "bf16-autocast" if cuda else "fp32", "save_every": save_every,
            "eval_every": eval_every, "buffer_maps": buffer_maps,
            "torch_threads": torch.get_num_threads(), **counts}

    # ---- resume or start fresh
    start_step, state, resumed_from = 0, None, None
    ckpt = latest_checkpoint(out)
    if ckpt is None and (out / FINAL).exists():
        raise ApmaeError(f"{out} already holds a trained model and no checkpoint to resume "
                         "from; use another --out")
    if ckpt is not None:
        if not resume:
            raise ApmaeError(f"{out} already holds a training run (last checkpoint {ckpt.name}); "
                             "pass --resume to continue it or --out to train elsewhere")
        saved_cfg = json.loads((ckpt / "config.json").read_text())
        diff = _config_diff(saved_cfg, config.to_dict())
        if diff:
            raise ApmaeError(f"{ckpt} is a {saved_cfg.get('preset')!r} model that differs from "
                             f"the requested {preset!r} one in: {', '.join(diff)}")
        saved_args = json.loads((ckpt / ARGS).read_text())
        if warmup_steps is None:  # the default depends on --steps, which may grow
            warmup = args["warmup_steps"] = saved_args.get("warmup_steps", warmup)
        diff = [k for k in _RESUME_KEYS if saved_args.get(k) != args.get(k)]
        if diff:
            raise ApmaeError(f"--resume: {ckpt} was trained with other settings: " + ", ".join(
                f"{k}={saved_args.get(k)!r} (now {args.get(k)!r})" for k in diff))
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
        start_step, resumed_from = int(state["step"]), str(ckpt)
        if saved_args.get("steps") != steps:
            log.warning("--steps %d differs from the checkpoint's %s: the cosine schedule is "
                        "stretched from step %d on", steps, saved_args.get("steps"), start_step)
        if start_step > steps:
            raise ApmaeError(f"{ckpt} is already at step {start_step} > --steps {steps}")
        log.info("resuming from %s (step %d)", ckpt, start_step)

    # ---- model, optimizer, schedule
    torch.manual_seed(seed)
    model = APMAEModel(config).to(device)
    optimizer = torch.optim.AdamW(_param_groups(model), lr=peak_lr, betas=BETAS,
                                  **({"fused": True} if cuda else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, steps))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    if state is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(ckpt / "model.safetensors", device=str(device)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if int(state["world_size"]) == world:
            gen.set_state(state["mask_rng"][rank])
        else:
            log.warning("checkpoint was written by %s rank(s), this run has %d: masks after "
                        "the resume differ from an uninterrupted run", state["world_size"], world)
        torch.set_rng_state(state["torch_rng"])
        if cuda and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    counts_params = parameter_counts(model)
    if start_step == steps:  # finished; at most the final save was lost to a kill
        if is_main and not (out / FINAL).exists():
            _save_final(out, model, args)
        log.info("%s is complete (step %d); nothing to train", out, steps)
        return read_manifest(run).get("train", {"final": str(out / FINAL), "steps": steps})
    if is_main:
        log.info("AP-MAE %s; %.1fM + %.1fM parameters", describe(config),
                 counts_params["encoder"] / 1e6, counts_params["decoder"] / 1e6)
        log.info("%d training maps (%d inferences), %d validation maps (%d inferences); "
                 "global batch %d, peak LR %.3g, %s on %s", counts["n_train_maps"],
                 counts["n_train_inferences"], counts["n_val_maps"], counts["n_val_inferences"],
                 global_batch, peak_lr, args["precision"], device)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if cuda else None)
    if compile:
        net = torch.compile(net)
    if cuda:
        enable_tf32()   # train() restores the previous setting when it returns

    def amp():
        return (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                else contextlib.nullcontext())

    loader = MapLoader(store, train_ids, batch_size, seed=seed, rank=rank, world=world,
                       buffer_maps=buffer_maps, workers=workers)

    # ---- validation set: fixed maps and masks, baselines once
    val_maps = val_noise = None
    val_base: dict[str, float] = {}
    if is_main and val_ids.size:
        pick = val_ids[np.linspace(0, val_ids.size - 1, min(max_val_maps, val_ids.size)).astype(int)]
        val_maps = torch.from_numpy(store.read(np.unique(pick)))
        if not torch.isfinite(val_maps).all():
            raise ApmaeError(f"{store.maps_path}: NaN or infinite values among the validation maps")
        val_noise = torch.rand(val_maps.shape[0], config.num_patches,
                               generator=torch.Generator().manual_seed(seed + 7919))
        from apmae_gpu.evaluation import baseline_mse

        with torch.inference_mode():
            base = baseline_mse(model, val_maps, val_noise)
        val_base = {k: float(v.mean()) for k, v in base.items()}

    # ---- metrics file: keep what the resumed checkpoint had seen
    metrics_path = out / METRICS
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if metrics_path.exists():
            for line in metrics_path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    rec = json.loads(line)
                    if rec.get("step", 0) <= start_step:
                        kept.append(line)
        with atomic_path(metrics_path) as tmp:
            tmp.write_text("".join(k + "\n" for k in kept))
        write_json(out / ARGS, args)

    def log_metrics(rec: dict) -> None:
        if is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def validate(step: int) -> float | None:
        if val_maps is None:
            return None
        model.eval()
        mse = _masked_mse(model, val_maps, val_noise, max(batch_size, 64), device, amp)
        model.train()
        rec = {"kind": "val", "step": step, "val_loss": float(mse.mean()),
               "val_loss_std": float(mse.std()) if mse.numel() > 1 else 0.0,
               **{f"val_{k}": v for k, v in val_base.items()}}
        log_metrics(rec)
        return rec["val_loss"]

    def save_checkpoint(step: int) -> None:
        rngs = [gen.get_state()]
        if world > 1:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, gen.get_state())
        if not is_main:
            return
        epoch, batch = loader.locate(step)
        st = {"step": step, "optimizer": optimizer.state_dict(),
              "scheduler": scheduler.state_dict(), "mask_rng": rngs,
              "torch_rng": torch.get_rng_state(), "world_size": world,
              "data": {"seed": seed, "epoch": epoch, "batch_in_epoch": batch,
                       "batch_size": batch_size, "n_train_maps": counts["n_train_maps"]}}
        if cuda:
            st["cuda_rng"] = torch.cuda.get_rng_state(device)

        def write(tmp: Path):
            with quiet_hf_progress():
                model.save_pretrained(tmp)
            torch.save(st, tmp / STATE)
            write_json(tmp / ARGS, args)

        _save_dir(out / CHECKPOINTS / f"step-{step:07d}", write)
        for old in sorted((out / CHECKPOINTS).glob("step-*"))[:-keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- loop
    model.train()
    t0 = time.perf_counter()
    t_int, maps_int, wait, loss_sum, n_loss = time.perf_counter(), 0, 0.0, None, 0
    last_loss, val_loss = float("nan"), None
    bar = progress(total=steps, initial=start_step, desc="train", unit="step",
                   disable=None if is_main else True)
    batches = loader.batches(start_step)
    t_wait = time.perf_counter()
    try:
        for step, epoch, maps_np in batches:
            if step >= steps:
                break
            x = torch.from_numpy(maps_np)
            if cuda:
                x = x.pin_memory()
            x = x.to(device, non_blocking=True)
            noise = torch.rand(x.shape[0], config.num_patches, generator=gen)
            wait += time.perf_counter() - t_wait
            with amp():
                loss, _, _ = net(x, noise=noise.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            n_loss += 1
            maps_int += x.shape[0] * world
            done = step + 1
            bar.update(1)
            if done % log_every == 0 or done == steps or done % save_every == 0:
                total = loss_sum.float()
                if world > 1:
                    torch.distributed.all_reduce(total)
                last_loss = float(total) / (n_loss * world)
                if not math.isfinite(last_loss):
                    prev = latest_checkpoint(out)
                    raise ApmaeError(f"non-finite training loss ({last_loss}) by step {done}; "
                                     f"last good checkpoint: {prev or 'none'}; try a lower --lr")
                dt = time.perf_counter() - t_int
                log_metrics({"kind": "train", "step": done, "epoch": epoch, "loss": last_loss,
                             "lr": scheduler.get_last_lr()[0], "maps_per_s": maps_int / dt,
                             "data_wait_share": wait / dt, "elapsed_s": time.perf_counter() - t0})
                bar.set_postfix(loss=f"{last_loss:.4g}", refresh=False)
                t_int, maps_int, wait, loss_sum, n_loss = time.perf_counter(), 0, 0.0, None, 0
            if is_main and (done % eval_every == 0 or done == steps):
                val_loss = validate(done)
            if done % save_every == 0 or done == steps:
                save_checkpoint(done)
            t_wait = time.perf_counter()
    finally:
        batches.close()
        bar.close()
    seconds = time.perf_counter() - t0
    trained = steps - start_step

    # ---- final model and manifest (rank 0)
    summary = {"preset": preset, "model": describe(config), "parameters": counts_params,
               "out": str(out), "final": str(out / FINAL), "steps": steps,
               "batch_size": batch_size, "global_batch": global_batch, "lr": peak_lr,
               "warmup_steps": warmup, "weight_decay": WEIGHT_DECAY, "raw": raw,
               "input_scaling": config.input_scaling, "val_fraction": val_fraction, **counts,
               "final_loss": last_loss, "val_loss": val_loss,
               **{f"val_{k}": v for k, v in val_base.items()},
               "maps_per_s": trained * global_batch / seconds if seconds else None,
               "seconds": seconds, "device": device, "world_size": world,
               "precision": args["precision"], "compile": compile, "resumed_from": resumed_from,
               "machine": describe_machine()}
    if is_main:
        _save_final(out, model, args)
        update_manifest(run, "train", summary)
        base = val_base.get("visible_mean")
        log.info("trained to step %d in %.0f s: loss %.4g, validation %s%s", steps, seconds,
                 last_loss, "n/a" if val_loss is None else f"{val_loss:.4g}",
                 "" if base is None else f" (mean-of-visible-patches baseline {base:.4g})")
    if world > 1:
        torch.distributed.barrier()
        if own_group:
            torch.distributed.destroy_process_group()
    return summary
