"""A run directory and the small things every stage shares.

One run is one directory (``RUN``); each stage reads what the stages before it wrote there
and adds its own files.  This module holds: the error type the CLI turns into a one-line
message, atomic writes, the manifest (one JSON object with a section per stage), frame
loading (cudf when present, pandas otherwise), device resolution and version reporting.

Layout of a run (files are contracts; stages add to them, never rename them)::

    RUN/manifest.json            versions, corpus, model, seeds, counts; one section per stage
    RUN/tasks.parquet            mined completion tasks                       (mining)
    RUN/inferences.parquet/      one row per prompted inference (parquet parts)  (capture)
    RUN/maps.zarr                float16 maps [n, window, window]             (capture)
    RUN/maps_index.parquet/      map_id -> inference_id, layer, head          (capture)
    RUN/apmae/                   AP-MAE checkpoints and metrics               (training)
    RUN/evaluate/                evaluation.parquet and figures               (evaluation)
    RUN/embeddings.zarr          [layers, heads, inferences, dim] float16     (encoding)
    RUN/clusters.parquet         inference_id, layer, head, cluster           (clustering)
    RUN/classify/                metrics.parquet, head_importance.parquet     (classification)
    RUN/intervene/               results.parquet and figures                  (intervention)
    RUN/report/index.html        the report                                   (report)

The CLI imports this module before it parses its arguments, so numpy, pandas, tqdm, torch
and transformers are imported inside the few functions that use them: ``apmae --help``
stays fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

from apmae_gpu import __version__

log = logging.getLogger("apmae_gpu")


class ApmaeError(Exception):
    """An error a user can act on; the CLI prints it as one line and exits non-zero."""


INTERRUPTED = "interrupted: rerun the same command to resume"


def on_sigterm(signum, frame) -> None:
    """The CLI's SIGTERM handler: unwind as after Ctrl-C (locks released, temporary files
    removed, the one line :data:`INTERRUPTED`, exit 130)."""
    raise KeyboardInterrupt()


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
        import numpy as np

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
MANIFEST = "manifest.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
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
    with _locked(path):
        manifest = read_manifest(run)
        manifest.setdefault("apmae_gpu", versions())
        if replace or section not in manifest:
            manifest[section] = data
        else:
            manifest[section].update(data)
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(path, manifest)
    return manifest


# --------------------------------------------------------------------------- versions
_VERSIONED = (
    "torch", "transformers", "tokenizers", "zarr", "numcodecs", "tree-sitter", "tree-sitter-java",
    "pandas", "pyarrow", "numpy", "scikit-learn", "umap-learn", "hdbscan", "catboost", "shap",
    "dask", "distributed", "datasets", "cuml-cu13", "cudf-cu13", "cupy-cuda13x", "dask-cuda",
)


def versions() -> dict[str, str]:
    out = {"apmae_gpu": __version__, "python": platform.python_version(),
           "platform": platform.platform()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------- devices
def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is visible, else ``cpu``; validates explicit names."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ApmaeError(f"--device {device}: no CUDA GPU is visible to torch")
    if device != "cpu" and not device.startswith("cuda"):
        raise ApmaeError(f"--device {device}: expected auto, cpu or cuda[:N]")
    return device


def describe_machine() -> dict[str, Any]:
    """CPU cores, memory and GPU (if any), for benchmark and manifest records."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "machine": platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:  # pragma: no cover
        pass
    return info


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
    import pandas

    return pandas


def load_frame(path: str | os.PathLike, prefer: str = "auto", columns: list[str] | None = None):
    """Read a parquet file or a directory of parquet parts with cudf or pandas."""
    path = Path(path)
    if not path.exists():
        raise ApmaeError(f"{path} does not exist")
    lib = frame_backend(prefer)
    return lib.read_parquet(path, columns=columns)


# --------------------------------------------------------------------------- logging
def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("apmae_gpu")
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False,
                              console=_stderr_console())
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # Libraries that are loud at INFO.
    for name in ("transformers", "datasets", "numba", "distributed", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _stderr_console():
    return Console(stderr=True)


def progress(iterable=None, total=None, desc: str = "", unit: str = "it", disable: bool | None = None,
             **kwargs):
    """A tqdm progress bar on stderr, quiet when stderr is not a terminal and APMAE_PROGRESS
    is unset (so CI logs stay short)."""
    from tqdm.auto import tqdm

    if disable is None:
        env = os.environ.get("APMAE_PROGRESS")
        disable = env == "0" or not (sys.stderr.isatty() or env == "1")
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                **kwargs)


@contextlib.contextmanager
def quiet_hf_progress():
    """Hide transformers' progress bars (per-tensor "Loading weights", per-file saves) for the
    duration: they break the pipeline's single display.  The previous state is restored."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- writer lock
LOCK_FILE = ".apmae.lock"
_LOCK_ENV = "APMAE_HELD_LOCKS"   # locks an ancestor process holds (``pid:path`` entries)
_held: dict[str, list] = {}      # lock path -> [open file, depth] held by this process


def _lock_holder(path: Path) -> str:
    """``PID n (command)`` of the process recorded in a lock file, or ``another process``."""
    try:
        info = json.loads(path.read_text() or "{}")
        pid = int(info["pid"])
        os.kill(pid, 0)
        return f"PID {pid} ({info.get('command', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _held_by_ancestor(path: Path) -> bool:
    for entry in os.environ.get(_LOCK_ENV, "").split(os.pathsep):
        pid, _, held = entry.partition(":")
        if held == str(path) and pid.isdigit():
            try:
                os.kill(int(pid), 0)
                return True
            except OSError:
                continue
    return False


def _acquire(path: Path, exclusive: bool, what: str, command: str) -> None:
    key = str(path)
    if key in _held:
        _held[key][1] += 1
        return None
    if _held_by_ancestor(path):
        return None
    try:
        fh = open(path, "a+")
    except OSError as exc:
        raise ApmaeError(f"{path.parent}: cannot write there ({exc.strerror})") from None
    try:
        fcntl.flock(fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(path)
        for _ in range(20):   # the holder records itself just after it takes the lock
            if holder != "another process":
                break
            time.sleep(0.05)
            holder = _lock_holder(path)
        if holder == "another process" and path.parent.joinpath("shards").is_dir():
            holders = [_lock_holder(p) for p in sorted(path.parent.glob(f"shards/*/{LOCK_FILE}"))]
            holder = ", ".join(h for h in holders if h != "another process") or holder
        fh.close()
        raise ApmaeError(f"{what} is being written by {holder}; wait for it to finish "
                         f"(this {command} changed nothing)") from None
    if exclusive:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "command": command,
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        fh.flush()
    _held[key] = [fh, 1]
    return None


def _release(path: Path) -> None:
    key = str(path)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        fh = entry[0]
        with contextlib.suppress(OSError):
            fh.seek(0)
            fh.truncate()
        fh.close()   # closing releases the flock (the kernel does the same on a crash)
        del _held[key]


@contextlib.contextmanager
def writer_lock(run: str | os.PathLike, command: str,
                shard: str | os.PathLike | None = None) -> Iterator[Path]:
    """Hold the run's writer lock (``RUN/.apmae.lock``, an advisory ``flock``) for a stage
    that writes; yields the lock file's path.

    One writer per run: a second one fails at once with an :class:`ApmaeError` naming the
    holder's PID and command.  Readers take no lock.  The kernel drops the lock when the
    holder exits or crashes, so a stale lock file never blocks.  Nested calls in one process
    (the pipeline calling the stages) and child processes started by the holder (the
    pipeline's ``torchrun``) reuse it.

    ``shard``: a shard writer (``capture --shard K/N``, a rank writing its own directory)
    locks its shard directory exclusively and the run *shared*: shard writers run side by
    side, each shard has one writer, and whole-run writers wait for all of them.
    """
    run = Path(run).resolve()
    if not run.is_dir():
        raise ApmaeError(f"run directory {run} does not exist")
    run_lock = run / LOCK_FILE
    locks: list[Path] = []
    try:
        if shard is None:
            _acquire(run_lock, True, str(run), command)
            locks.append(run_lock)
        else:
            shard_dir = Path(shard).resolve()
            shard_dir.mkdir(parents=True, exist_ok=True)
            if str(run_lock) not in _held:   # a whole-run holder may write its shards
                _acquire(run_lock, False, str(run), command)
                locks.append(run_lock)
            _acquire(shard_dir / LOCK_FILE, True, str(shard_dir), command)
            locks.append(shard_dir / LOCK_FILE)
        held = [f"{os.getpid()}:{p}" for p in locks if str(p) in _held]
        previous = os.environ.get(_LOCK_ENV)
        os.environ[_LOCK_ENV] = os.pathsep.join(filter(None, [previous, *held]))
        try:
            yield locks[-1] if locks else run_lock
        finally:
            if previous is None:
                os.environ.pop(_LOCK_ENV, None)
            else:
                os.environ[_LOCK_ENV] = previous
    finally:
        for p in reversed(locks):
            _release(p)


# --------------------------------------------------------------------------- run directories
def check_out_dir(out: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse an output run directory that cannot be one: a file, or not writable (one
    line, before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ApmaeError(f"{what} {out} is a file, not a run directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ApmaeError(f"{what} {out}: {probe} is not writable")
    return out


CAPTURED = ("maps.zarr", "inferences.parquet", "maps_index.parquet", "embeddings.zarr", "shards")


def check_mine_out(out: str | os.PathLike) -> Path:
    """Refuse to mine into ``out`` when it cannot be a run directory or already holds
    captures (a new tasks.parquet would leave them pointing at task ids that are gone)."""
    out = check_out_dir(out)
    held = [name for name in CAPTURED if (out / name).exists()]
    if held:
        raise ApmaeError(f"{out} already holds captures ({', '.join(held)}); mining again would "
                         f"replace the tasks they point at: use a new --out")
    return out


@contextlib.contextmanager
def new_run_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Create ``out`` if needed; when the block fails and ``out`` was created here, remove
    it again if it holds nothing but the lock file (a failed mine leaves no empty run)."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if created and out.is_dir():
            left = [p for p in out.iterdir() if p.name != LOCK_FILE]
            if not left:
                with contextlib.suppress(OSError):
                    (out / LOCK_FILE).unlink(missing_ok=True)
                    out.rmdir()
        raise


def read_parquet(path: str | os.PathLike, what: str = "", **kwargs):
    """``pandas.read_parquet`` whose failures on a damaged file are one-line errors."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise ApmaeError(f"{path} is missing{f' ({what})' if what else ''}")
    try:
        return pd.read_parquet(path, **kwargs)
    except (OSError, ValueError) as exc:   # pyarrow's ArrowInvalid is a ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ApmaeError(f"{path} is damaged or not parquet ({first})") from None


def crash_log(run: str | os.PathLike | None, argv: list[str], text: str) -> Path:
    """Write ``text`` (a traceback) to ``RUN/logs/`` (or a temp directory when there is no
    writable run) and return the file's path."""
    name = f"apmae-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    body = f"apmae {' '.join(argv)}\n{versions()}\n\n{text}"
    dirs = [Path(run) / "logs"] if run is not None and Path(run).is_dir() else []
    dirs.append(Path(tempfile.gettempdir()) / "apmae-logs")
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            path = d / name
            path.write_text(body)
            return path
        except OSError:
            continue
    return Path(os.devnull)
