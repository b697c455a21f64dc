"""Trivial predictors of masked patches that AP-MAE's reconstruction MSE is compared with.

``visible_mean``
    every masked patch predicted as the pixel-wise mean of the map's visible patches;
``dataset_mean``
    every masked patch predicted as the mean patch of its grid position over the evaluated
    maps (an oracle-ish per-position average).

Training logs both on its validation maps; ``apmae evaluate`` reports both beside every
checkpoint, on exactly the masks the model sees.
"""

from __future__ import annotations

import torch

from apmae_gpu.model.network import APMAEModel


def visible_mean_prediction(patches: torch.Tensor, mask: torch.Tensor,
                            valid: torch.Tensor) -> torch.Tensor:
    """Pixel-wise mean of the visible patches, for every patch.

    patches [B, N, P*P], mask [B, N] (1 = masked), valid [N, P*P] -> [B, N, P*P].  A pixel
    position no visible patch covers (above the diagonal of visible diagonal patches only)
    falls back to the mean of all visible valid pixels.
    """
    w = (1.0 - mask.float())[..., None] * valid.float()  # [B, N, P*P]
    num, den = (w * patches).sum(1), w.sum(1)  # [B, P*P]
    scalar = num.sum(1) / den.sum(1).clamp_min(1.0)  # [B]
    mean = torch.where(den > 0, num / den.clamp_min(1e-12), scalar[:, None])
    return mean[:, None, :].expand_as(patches)


def dataset_mean_patches(model: APMAEModel, maps_iter) -> torch.Tensor:
    """Mean patch of every grid position [N, P*P] over the maps ``maps_iter`` yields, in the
    model's input space."""
    total, n = None, 0
    for maps in maps_iter:
        with torch.inference_mode():
            p = model.prepare(maps).double().sum(0)
        total = p if total is None else total + p
        n += maps.shape[0]
    return (total / max(n, 1)).float()


def baseline_mse(model: APMAEModel, maps: torch.Tensor, noise: torch.Tensor,
                 dataset_mean: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-map masked MSE [n] of the baselines on the masks ``noise`` gives ``model``.

    maps [n, W, W] stored values (CPU is fine), noise [n, N].  ``dataset_mean`` [N, P*P]
    defaults to the mean patches of ``maps`` themselves.
    """
    maps = maps.to(model.pixel_valid.device)
    target = model.prepare(maps)
    mask = model.mask_from_noise(noise.to(target.device))
    if dataset_mean is None:
        dataset_mean = target.mean(0)
    preds = {"visible_mean": visible_mean_prediction(target, mask, model.pixel_valid),
             "dataset_mean": dataset_mean.to(target.device)[None].expand_as(target)}
    return {k: model.forward_loss(target, p, mask, per_map=True).cpu() for k, p in preds.items()}
