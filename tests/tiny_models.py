"""Tiny seeded models the tests build and save (no downloads)."""

from __future__ import annotations


def save_tiny_apmae(path, image_size: int, patch_size: int):
    """A seeded, one-layer AP-MAE checkpoint for maps of ``image_size`` (saved at ``path``)."""
    import torch

    from apmae_gpu.model import APMAEModel, preset_config

    torch.manual_seed(0)
    model = APMAEModel(preset_config("tiny", image_size=image_size, patch_size=patch_size,
                                     hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     head_dim=16, intermediate_size=64, decoder_hidden_size=32,
                                     decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                     decoder_head_dim=16, decoder_intermediate_size=64))
    model.save_pretrained(path)
    return path
