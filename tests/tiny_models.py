"""Tiny seeded models the tests build and save (no downloads)."""

from __future__ import annotations

import torch

from apmae_gpu.model.network import APMAEModel, preset_config

# A micro AP-MAE over 64x64 maps with 8x8 patches: still 36 lower-triangle patches.
MICRO = dict(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=2, head_dim=16, intermediate_size=64, decoder_hidden_size=32,
             decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_head_dim=16,
             decoder_intermediate_size=64)


def micro_model(seed: int = 0, **kw) -> APMAEModel:
    """The ``MICRO`` model (``kw`` override its settings), seeded with ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return APMAEModel(preset_config("tiny", **{**MICRO, **kw})).eval()


def save_tiny_apmae(path, image_size: int, patch_size: int):
    """A seeded, one-layer AP-MAE checkpoint for maps of ``image_size`` (saved at ``path``)."""
    micro_model(image_size=image_size, patch_size=patch_size,
                num_hidden_layers=1).save_pretrained(path)
    return path
