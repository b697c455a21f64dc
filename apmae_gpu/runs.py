"""Compatibility: the names earlier releases documented here (``from apmae_gpu.runs import
load_frame``).  They live in :mod:`apmae_gpu.core.frames` and :mod:`apmae_gpu.core.errors`
now, and ``from apmae_gpu import load_frame`` is the short form."""

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import frame_backend, load_frame, read_manifest, update_manifest

__all__ = ["ApmaeError", "frame_backend", "load_frame", "read_manifest", "update_manifest"]
