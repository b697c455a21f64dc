"""A run's identity: the settings that decide which maps and inferences it holds.

The first capture into a run records them in ``manifest.json``'s ``identity`` section (before
it prompts anything, so a killed first capture has recorded them too); every later capture
compares its own values and refuses, in one line naming the setting and both values, to write
under different ones.  Without this a second ``--model`` (or ``--dtype``, ``--seed``,
``--heads``) would append its maps to the first one's store and the manifest would name only
the last.

Run-wide: the model (its path or name, and the revision or file digest that pins the weights),
the dtype it ran in, the seed (candidate order, head draws, a random model's weights), the
window and the scaler.  Per split: ``heads`` and ``per_task``.  A lower ``per_task`` is
refused too; a higher one is not a difference here: capture recaptures the split at the new
quota (:mod:`apmae_gpu.capture.requota`) and then records it (:func:`set_per_task`).
"""

from __future__ import annotations

from pathlib import Path

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import MANIFEST, file_lock, read_manifest, write_json

SECTION = "identity"

# setting -> how the user sets it (for the message)
OPTIONS = {"model": "--model", "model_revision": "the model's revision", "dtype": "--dtype",
           "seed": "--seed", "window": "the mined --window", "scaler": "--scaler",
           "heads": "--heads", "per_task": "--per-task"}


def from_capture_section(manifest: dict) -> dict:
    """The identity of a run captured before the ``identity`` section existed, from its
    ``capture`` section (what that section holds of it)."""
    cap = manifest.get("capture")
    if not isinstance(cap, dict):
        return {}
    model = cap.get("model")
    out = {"model": model.get("path") or model.get("spec")} if isinstance(model, dict) else {}
    for key in ("model_revision", "dtype", "window", "scaler"):
        if key in cap:
            out[key] = cap[key]
    splits = cap.get("splits") if isinstance(cap.get("splits"), dict) else {}
    for split, info in splits.items():
        if isinstance(info, dict):
            if "seed" in info:
                out.setdefault("seed", info["seed"])
            out[split] = {k: info[k] for k in ("heads", "per_task") if k in info}
    return out


def recorded(run: str | Path) -> dict:
    """The run's recorded identity (``{}`` when nothing was captured yet)."""
    manifest = read_manifest(run)
    if not isinstance(manifest, dict):
        return {}
    old = manifest.get(SECTION)
    return old if isinstance(old, dict) else from_capture_section(manifest)


def set_per_task(run: str | Path, split: str, per_task: int) -> None:
    """Record ``per_task`` as the split's quota (a raised quota, once its capture is in
    place)."""
    path = Path(run) / MANIFEST
    with file_lock(path):
        manifest = read_manifest(run)
        ident = manifest.get(SECTION)
        ident = ident if isinstance(ident, dict) else from_capture_section(manifest)
        if (ident.get(split) or {}).get("per_task") != per_task:
            ident.setdefault(split, {})["per_task"] = per_task
            manifest[SECTION] = ident
            write_json(path, manifest)


def _differences(old: dict, new: dict, split: str) -> list[tuple[str, object, object]]:
    diffs = [(k, old[k], v) for k, v in new.items()
             if k != split and k in old and old[k] is not None and old[k] != v]
    old_split = old.get(split) if isinstance(old.get(split), dict) else {}
    diffs += [(k, old_split[k], v) for k, v in new.get(split, {}).items()
              if k in old_split and old_split[k] != v]
    return diffs


def enforce(run: str | Path, split: str, values: dict) -> dict:
    """Compare ``values`` (run-wide settings, and ``values[split]``: the split's own) with the
    run's recorded identity; record the ones not yet there.  Raises :class:`ApmaeError` naming
    the first setting that differs and both values.  Returns the identity now recorded."""
    path = Path(run) / MANIFEST
    with file_lock(path):
        manifest = read_manifest(run)
        if not isinstance(manifest, dict):
            raise ApmaeError(f"{path} is not a JSON object: restore it or use a new RUN")
        old = manifest.get(SECTION)
        if not isinstance(old, dict):
            old = from_capture_section(manifest)
        diffs = _differences(old, values, split)
        if diffs:
            key, was, now = diffs[0]
            where = f"the {split} split of {run}" if key in values.get(split, {}) else str(run)
            raise ApmaeError(f"{where} was captured with {OPTIONS.get(key, key)} {was!r}; this "
                             f"capture asks for {now!r}: a run holds the maps of one setting "
                             f"(rerun with {was!r}, or mine into a new --out for the new one)")
        merged = {**values, **{k: v for k, v in old.items() if k != split}}
        merged[split] = {**values.get(split, {}), **(old.get(split) or {})}
        if merged != manifest.get(SECTION):
            manifest[SECTION] = merged
            write_json(path, manifest)
    return merged
