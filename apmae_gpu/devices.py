"""Mixed precision by device: one autocast for training, evaluation and encoding."""

from __future__ import annotations

import contextlib

import torch


def autocast(device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a null context elsewhere (the CPU computes in float32).

    ``device``: a ``torch.device`` or its name (``"cuda:1"``, ``"cpu"``).
    """
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
