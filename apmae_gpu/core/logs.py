"""Logging, progress bars, crash logs and the versions/machine a run records.

The CLI imports this module before it parses its arguments, so numpy, pandas, torch and
transformers are imported inside the few functions that use them: ``apmae --help`` stays
fast."""

from __future__ import annotations

import logging
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from tqdm.auto import tqdm

from apmae_gpu import __version__
from apmae_gpu.core import layout

log = logging.getLogger("apmae_gpu")


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

    if disable is None:
        env = os.environ.get("APMAE_PROGRESS")
        disable = env == "0" or not (sys.stderr.isatty() or env == "1")
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                **kwargs)




def crash_log(run: str | os.PathLike | None, argv: list[str], text: str) -> Path:
    """Write ``text`` (a traceback) to ``RUN/logs/`` (or a temp directory when there is no
    writable run) and return the file's path."""
    name = f"apmae-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    body = f"apmae {' '.join(argv)}\n{versions()}\n\n{text}"
    dirs = [Path(run) / layout.CRASH_LOG_DIR] if run is not None and Path(run).is_dir() else []
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
