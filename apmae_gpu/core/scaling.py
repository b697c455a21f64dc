"""Scaling of attention maps: how capture stores them and how AP-MAE reads them.

The paper log-scales attention; the authors' reference package feeds AP-MAE its
``log_normalize`` of every map (``p`` one causal, row-stochastic map, computed in float32):

    x = ln p;  m = min of the finite x (p = 0 gives -inf, counted as 0, so m is the
    smallest log-probability that is not zero);  y = (x - m) / (-m);  p = 0 -> y = 0.

Since ``p[0, 0] = 1`` in a causal map, ``max x = 0`` and ``y`` lies in [0, 1].

Stored forms (``maps.zarr``, float16, chosen by ``apmae capture --scaler``):

``log`` (default)   ``ln p`` itself where ``p > 0``; ``p = 0`` and the upper triangle hold
                    :data:`LOG_FILL` (-104), below the log of the smallest positive float32
                    (``ln 2**-149 = -103.28``), so no probability is ever floored and the
                    reference transform can be computed exactly from the stored values
                    (fp16 keeps ``ln p`` to a relative 2**-11, so ``y`` to about 1e-3).
                    Runs captured before this form used a floor of 1e-8 (``floor`` in the
                    store's attributes); their maps are read as they were written.
``log_normalize``   ``y`` itself (the reference's input, computed on the device).
``none``            ``p`` itself (fp16 flushes p < 6e-8 to 0).

:func:`log_minmax` is the one implementation of the reference transform on stored values;
the model (``APMAEModel.prepare``, ``APMAEModel.patch_logs``) and the evaluation's log-space
comparison use it.
"""

from __future__ import annotations

import math
import typing

import torch

from apmae_gpu.core.config import CaptureConfig
from apmae_gpu.core.errors import ApmaeError

SCALERS = typing.get_args(CaptureConfig.model_fields["scaler"].annotation)   # the config's
FLOOR = 2.0 ** -149            # the smallest positive float32: no softmax output is below it
LOG_FILL = -104.0              # p = 0 and the upper triangle in a ``log`` store
LEGACY_FLOOR = 1e-8            # the floor of ``log`` stores written before FLOOR
FILL_VALUES = {"log": LOG_FILL, "log_normalize": 0.0, "none": 0.0}


def zero_threshold(floor: float) -> float:
    """Stored ``log`` values at or below this are probabilities of zero (the fill): half a
    unit below ``ln(floor)``, far beyond fp16's rounding of the smallest stored logarithm."""
    return math.log(floor) - 0.5


def scale_maps(p: torch.Tensor, scaler: str) -> torch.Tensor:
    """Scale probabilities ``p`` [..., T, T] (float32, causal) as the module doc says;
    nothing NaN or infinite comes out."""
    T = p.shape[-1]
    upper = torch.ones(T, T, dtype=torch.bool, device=p.device).triu(1)
    if scaler == "log":
        zero = (p <= 0) | upper
        return torch.log(p.clamp_min(FLOOR)).masked_fill(zero, LOG_FILL)
    if scaler == "log_normalize":
        keep = (p > 0) & ~upper
        return log_minmax(torch.log(p.clamp_min(FLOOR)), keep, dims=(-2, -1))
    if scaler == "none":
        return p.masked_fill(upper, 0.0)
    raise ApmaeError(f"unknown scaler {scaler!r}; choose from {', '.join(SCALERS)}")


def log_minmax(logs: torch.Tensor, keep: torch.Tensor, dims=(-2, -1)) -> torch.Tensor:
    """The reference's ``(x - m) / (-m)`` over ``dims``, ``m`` the minimum of ``logs`` where
    ``keep`` (the non-zero probabilities); 0 elsewhere.  A map whose kept values are all 0
    (every row one-hot) gives 0, where the reference divides 0 by 0."""
    m = log_range_min(logs, keep, dims)
    return torch.where(keep, rescale_logs(logs, m), torch.zeros_like(logs))


def log_range_min(logs: torch.Tensor, keep: torch.Tensor, dims=(-2, -1)) -> torch.Tensor:
    """``m`` of :func:`log_minmax`: the minimum of ``logs`` where ``keep`` over ``dims``
    (kept as size-1 dimensions)."""
    big = torch.finfo(logs.dtype).max
    return torch.where(keep, logs, big).amin(dim=dims, keepdim=True)


def rescale_logs(logs: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``(x - m) / (-m)`` of :func:`log_minmax` for every value of ``logs``, ``m`` from
    :func:`log_range_min` (also for values that are not the map's own, e.g. predictions)."""
    return (logs - m) / (-m).clamp_min(1e-6)


def stored_logs(x: torch.Tensor, stored_scaler: str, floor: float,
                valid: torch.Tensor | bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored values ``x`` (float32) -> (``ln p``, mask of the non-zero probabilities
    within ``valid``) for a ``log`` or ``none`` store."""
    if stored_scaler == "log":
        return x, (x > zero_threshold(floor)) & valid
    if stored_scaler == "none":
        return x.clamp_min(FLOOR).log(), (x > 0) & valid
    raise ApmaeError(f"no log-probabilities can be recovered from {stored_scaler!r} maps")
