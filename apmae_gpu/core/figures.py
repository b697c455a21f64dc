"""One way to draw and save figures for the whole package.

:func:`pyplot` imports matplotlib lazily (it is slow to import and most commands draw
nothing) on the non-interactive Agg backend; :func:`save_figure` writes a PNG atomically
(a temporary file beside it, then ``os.replace``: a killed run never leaves half a PNG) and
closes the figure.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from apmae_gpu.core.frames import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """``fig.savefig(path, **savefig_kwargs)`` written atomically, then close ``fig``.

    The format defaults to the path's suffix (the temporary file has none)."""
    path = Path(path)
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, **savefig_kwargs)
    finally:
        pyplot().close(fig)
    return path


def png_bytes(fig, **savefig_kwargs) -> bytes:
    """``fig`` as PNG bytes (to embed in a page), then close it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", **savefig_kwargs)
    finally:
        pyplot().close(fig)
    return buf.getvalue()
