"""Manifest and frames I/O: atomic writes, the manifest (one JSON object with a section per
stage), frame loading (cudf when present, pandas otherwise) and parquet reading with
one-line errors."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from apmae_gpu.core import layout
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.logs import (
    versions,
)


# --------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary name starts with a dot, so dataset readers (pyarrow, cudf) skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_parquet(df, path: str | os.PathLike, **kwargs) -> None:
    """Write a pandas frame to ``path`` atomically (never a half-written file)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False, **kwargs)


def _json_default(o: Any) -> Any:
    try:

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --------------------------------------------------------------------------- manifest
MANIFEST = layout.MANIFEST_JSON


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(run: str | os.PathLike) -> dict:
    path = Path(run) / MANIFEST
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ApmaeError(f"{path}: not valid JSON ({exc})") from None
    # a hand-edited manifest of the wrong shape: one line here, not an error deep in a stage
    fix = "restore it from a backup (`apmae check` lists what else is damaged)"
    if not isinstance(manifest, dict):
        raise ApmaeError(f"{path}: is a JSON {type(manifest).__name__}, not an object: {fix}")
    for key, value in manifest.items():
        if key != "updated" and not isinstance(value, dict):
            raise ApmaeError(f"{path}: section {key!r} is a {type(value).__name__}, not an "
                             f"object: {fix}")
    return manifest


def update_manifest(run: str | os.PathLike, section: str, data: dict, replace: bool = True) -> dict:
    """Set ``manifest[section]`` (or merge into it with ``replace=False``), atomically."""
    path = Path(run) / MANIFEST
    with file_lock(path):
        manifest = read_manifest(run)
        manifest.setdefault("apmae_gpu", versions())
        if replace or section not in manifest:
            manifest[section] = data
        else:
            manifest[section].update(data)
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(path, manifest)
    return manifest


# --------------------------------------------------------------------------- frames
def frame_backend(prefer: str = "auto"):
    """The dataframe library to load result frames with: cudf when present (and a GPU is
    visible), pandas otherwise.  ``prefer`` is ``auto``, ``cudf`` or ``pandas``."""
    if prefer in ("auto", "cudf"):
        try:
            import cudf  # noqa: F401

            return cudf
        except Exception:  # ImportError, or a CUDA runtime error without a GPU
            if prefer == "cudf":
                raise ApmaeError("cudf was asked for but cannot be imported here") from None
    return pd


def load_frame(path: str | os.PathLike, prefer: str = "auto", columns: list[str] | None = None):
    """Read a parquet file or a directory of parquet parts with cudf or pandas."""
    path = Path(path)
    if not path.exists():
        raise ApmaeError(f"{path} does not exist")
    lib = frame_backend(prefer)
    return lib.read_parquet(path, columns=columns)


def read_parquet(path: str | os.PathLike, what: str = "", **kwargs):
    """``pandas.read_parquet`` whose failures on a damaged file are one-line errors."""
    path = Path(path)
    if not path.exists():
        raise ApmaeError(f"{path} is missing{f' ({what})' if what else ''}")
    try:
        return pd.read_parquet(path, **kwargs)
    except (OSError, ValueError) as exc:   # pyarrow's ArrowInvalid is a ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ApmaeError(f"{path} is damaged or not parquet ({first})") from None
