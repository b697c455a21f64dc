"""Mixed precision by device: one autocast for training, evaluation and encoding."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import numpy as np
import torch

from apmae_gpu.core.errors import ApmaeError


def autocast(device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a null context elsewhere (the CPU computes in float32).

    ``device``: a ``torch.device`` or its name (``"cuda:1"``, ``"cpu"``).
    """
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# cuBLAS needs a fixed workspace for deterministic results (torch's reproducibility notes);
# it reads the variable when its handle is created, so set it before the process starts to
# be certain (``deterministic_scope`` sets it when unset, before training's first CUDA op).
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_scope(on: bool):
    """torch's deterministic algorithms (errors where an op has none), cuDNN without
    autotuning and the cuBLAS workspace within the block; the previous state comes back on
    exit.  A no-op when ``on`` is false."""
    if not on:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.benchmark,
             cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.benchmark, cudnn.deterministic = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def to_host(t: torch.Tensor) -> np.ndarray:
    """A tensor's values in host memory as a numpy array.  From CUDA the copy goes through
    pinned memory (torch's caching host allocator reuses it once the array is dropped): on
    the H200 machine a pageable copy of capture maps ran at ~1.5 GB/s, a pinned one at
    ~55 GB/s, which made the host copy 90% of a capture batch (bench/results/capture-h200.md)."""
    if t.device.type != "cuda":
        return t.cpu().numpy()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host.numpy()


# --------------------------------------------------------------------------- devices
def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is visible, else ``cpu``; validates explicit names."""

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ApmaeError(f"--device {device}: no CUDA GPU is visible to torch")
    if device != "cpu" and not device.startswith("cuda"):
        raise ApmaeError(f"--device {device}: expected auto, cpu or cuda[:N]")
    return device


def free_torch_cuda_cache() -> None:
    """Hand the blocks torch's caching allocator holds back to the driver, so cuML / CatBoost
    on the GPU in the same process (after capture, training or kNN) find the memory free."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info
