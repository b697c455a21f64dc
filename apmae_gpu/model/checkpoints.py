"""AP-MAE training checkpoints: where they live, how they are written, found and restored.

Layout of a training ``OUT`` (default ``RUN/apmae``)::

    final/                       save_pretrained directory (config.json, model.safetensors)
    checkpoints/step-0001000/    config.json, model.safetensors, state.pt, training_args.json
    training_args.json           the run's settings (never mixed into the model config)

Every directory is written through a dot-temporary beside it and renamed into place, so a
kill leaves either the previous checkpoint or the new one, never half of one.  ``state.pt``
(``torch.load(weights_only=True)``-safe) holds the optimizer, scheduler, step, the masking RNG
of every rank, torch's RNG and the data position.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from apmae_gpu.capture.llm import quiet_hf_progress
from apmae_gpu.core import layout
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import write_json
from apmae_gpu.model.network import APMAEConfig, APMAEModel

log = logging.getLogger("apmae_gpu.model.training")

FINAL, CHECKPOINTS = layout.FINAL_DIR, layout.CHECKPOINTS_DIR
ARGS, STATE = "training_args.json", "state.pt"         # inside one checkpoint


def resolve_checkpoint(path) -> Path:
    """A save_pretrained directory from a checkpoint dir, ``RUN/apmae`` or ``RUN``."""
    path = Path(path)
    for cand in (path, path / FINAL, path / layout.APMAE_DIR / FINAL):
        if (cand / "config.json").exists() and (cand / "model.safetensors").exists():
            return cand
    raise ApmaeError(f"{path}: no AP-MAE checkpoint (config.json + model.safetensors) there, "
                     f"nor in {path / FINAL} or {path / layout.APMAE_DIR / FINAL}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def damage(ckpt: Path) -> str | None:
    """Why the save_pretrained directory ``ckpt`` cannot be loaded (None: it can): its
    ``config.json`` is not a JSON object of known-typed values, or its ``model.safetensors``
    header does not parse or promises more bytes than the file holds."""
    try:
        cfg = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"config.json: {_first_line(exc)}"
    if not isinstance(cfg, dict):
        return "config.json is not a JSON object"
    for key, default in APMAEConfig().to_dict().items():
        value = cfg.get(key, default)
        if isinstance(default, (bool, int, float, str)) and not _same_kind(value, default):
            return f"config.json: {key} is {value!r}, not a {type(default).__name__}"
    try:
        with safe_open(ckpt / "model.safetensors", framework="pt") as f:
            list(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError on damage
        return f"model.safetensors: {_first_line(exc)}"
    return None


def _same_kind(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def load_model(path: Path) -> APMAEModel:
    """``APMAEModel.from_pretrained(path)``, or a one-line error naming the damage."""
    why = damage(Path(path))
    if why is not None:
        raise ApmaeError(f"{path}: damaged AP-MAE checkpoint ({why}): train again with "
                         f"`apmae train` or restore it")
    try:
        return APMAEModel.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ApmaeError(f"{path}: damaged AP-MAE checkpoint ({_first_line(exc)}): train "
                         f"again with `apmae train` or restore it") from None


def latest_intact(out: Path) -> tuple[Path | None, dict | None]:
    """The newest ``checkpoints/step-*`` that loads (and its ``state.pt``): a damaged newer one
    is passed over with a warning naming it.  (None, None) without checkpoints; a one-line
    error when every one is damaged."""
    d = Path(out) / CHECKPOINTS
    found = sorted(p for p in d.glob("step-*") if (p / STATE).exists()) if d.is_dir() else []
    first = None
    for ckpt in reversed(found):
        why = damage(ckpt)
        if why is None:
            try:
                return ckpt, load_state(ckpt)
            except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
                why = f"{STATE}: {_first_line(exc)}"
        first = first or f"{ckpt}: {why}"
        log.warning("checkpoint %s is damaged (%s); trying the one before it", ckpt, why)
    if first is not None:
        raise ApmaeError(f"every checkpoint in {d} is damaged (newest {first}): move them "
                         f"aside and train again, or train into another --out")
    return None, None


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete ``checkpoints/step-*`` directory (temporaries start with a dot)."""
    d = Path(out) / CHECKPOINTS
    found = sorted(p for p in d.glob("step-*") if (p / STATE).exists()) if d.is_dir() else []
    return found[-1] if found else None


def save_dir(final: Path, write) -> None:
    """Write a directory through a dot-temporary beside it, then rename it into place."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except (OSError, RuntimeError) as exc:   # torch.save's failed write is a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)   # give back the space it took
        raise ApmaeError(f"writing {final} failed: disk full or not writable "
                         f"({_first_line(exc)}); the checkpoints before it are intact: free "
                         f"space and rerun the same command with --resume") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_final(out: Path, model: APMAEModel, args: dict) -> None:
    """``OUT/final``: the model's save_pretrained directory and the run's settings."""
    def write(tmp: Path):
        with quiet_hf_progress():
            model.save_pretrained(tmp)
        write_json(tmp / ARGS, args)

    save_dir(out / FINAL, write)


def save_checkpoint(out: Path, step: int, model: APMAEModel, state: dict, args: dict,
                    keep: int) -> None:
    """``OUT/checkpoints/step-NNNNNNN`` (weights, ``state``, settings); only the newest
    ``keep`` checkpoints stay."""
    def write(tmp: Path):
        with quiet_hf_progress():
            model.save_pretrained(tmp)
        torch.save(state, tmp / STATE)
        write_json(tmp / ARGS, args)

    save_dir(out / CHECKPOINTS / f"step-{step:07d}", write)
    for old in sorted((out / CHECKPOINTS).glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_state(ckpt: Path) -> dict:
    """The ``state.pt`` of checkpoint directory ``ckpt`` (on the CPU)."""
    return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)


def restore(ckpt: Path, state: dict, model: APMAEModel, optimizer, scheduler,
            gen: torch.Generator, rank: int, world: int, device: str) -> None:
    """Load checkpoint ``ckpt`` (its ``state`` from :func:`load_state`) into the model, the
    optimizer, the scheduler, this rank's masking RNG ``gen`` and torch's RNGs."""
    model.load_state_dict(load_file(ckpt / "model.safetensors", device=str(device)))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if int(state["world_size"]) == world:
        gen.set_state(state["mask_rng"][rank])
    else:
        log.warning("checkpoint was written by %s rank(s), this run has %d: masks after "
                    "the resume differ from an uninterrupted run", state["world_size"], world)
    torch.set_rng_state(state["torch_rng"])
    if device.startswith("cuda") and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
