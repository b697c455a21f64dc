"""AP-MAE model: geometry, input transform, masking, decoder wiring, loss, encode, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.model.network import (
    APMAEConfig,
    APMAEModel,
    parameter_counts,
    pixel_valid_mask,
    preset_config,
    train_flops_per_map,
    tril_patch_grid,
)
from apmae_gpu.synthetic import synthetic_maps
from tests.tiny_models import micro_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def maps():
    x, _ = synthetic_maps(6, 64, seed=3)
    return torch.from_numpy(x)  # stored values: ln(max(p, 1e-8)), float16


# --------------------------------------------------------------------------- config
def test_paper_preset_matches_table_1():
    c = preset_config("paper")
    assert (c.image_size, c.patch_size, c.mask_ratio, c.num_patches) == (256, 32, 0.5, 36)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (
        24, 512, 16, 2048)
    assert (c.decoder_num_hidden_layers, c.decoder_hidden_size, c.decoder_num_attention_heads,
            c.decoder_intermediate_size) == (8, 512, 8, 2048)
    with torch.device("meta"):
        counts = parameter_counts(APMAEModel(c))
    assert 100e6 < counts["encoder"] < 102.5e6  # paper: ~101M
    assert 25e6 < counts["decoder"] < 27e6  # paper: ~25M
    assert 17e9 <= train_flops_per_map(c) <= 22e9
    tiny, small = preset_config("tiny"), preset_config("small")
    assert train_flops_per_map(tiny) < train_flops_per_map(small) < train_flops_per_map(c)
    assert tiny.image_size == small.image_size == 256


def test_config_errors_are_clear():
    with pytest.raises(ApmaeError, match="unknown preset 'huge'"):
        preset_config("huge")
    with pytest.raises(ApmaeError, match="unknown AP-MAE config keys: hiden_size"):
        preset_config("tiny", hiden_size=3)
    with pytest.raises(ApmaeError, match="not a multiple of patch_size"):
        preset_config("tiny", image_size=60, patch_size=8)
    with pytest.raises(ApmaeError, match="input_scaling"):
        preset_config("tiny", input_scaling="sqrt")


# --------------------------------------------------------------------------- geometry
def test_lower_triangle_geometry():
    rc = tril_patch_grid(8)
    assert rc.shape == (36, 2) and bool((rc[:, 1] <= rc[:, 0]).all())
    valid = pixel_valid_mask(8, 8)
    assert int(valid.sum()) == 64 * 65 // 2  # exactly the map's lower triangle
    m = micro_model()
    x = torch.randn(2, 64, 64)
    lower = torch.ones(64, 64).tril().bool()
    back = m.unpatchify(m.patchify(x))
    assert torch.equal(back[:, lower], x[:, lower])
    # the upper-triangle patches are dropped entirely
    assert float(back[:, 0:8, 8:].abs().sum()) == 0.0


def test_input_transform_is_lower_triangle_min_max_of_log(maps):
    m = micro_model()
    x = maps[:2].float().numpy()
    got = m.transform(maps[:2]).numpy()
    lower = np.tril(np.ones((64, 64), bool))
    for k in range(2):
        lo, hi = x[k][lower].min(), x[k][lower].max()
        ref = np.where(lower, (x[k] - lo) / (hi - lo), 0.0)
        np.testing.assert_allclose(got[k], ref, atol=1e-6)
    # values above the diagonal of the stored map never matter
    poked = maps[:2].clone()
    poked[:, ~torch.from_numpy(lower)] = 5.0
    assert torch.equal(m.transform(poked), m.transform(maps[:2]))
    raw = micro_model(input_scaling="raw").transform(maps[:1]).numpy()[0]
    np.testing.assert_allclose(raw, np.where(lower, np.exp(x[0]), 0.0), rtol=1e-6, atol=1e-9)
    # rows of a causal softmax sum to one
    np.testing.assert_allclose(raw.sum(1), 1.0, atol=2e-2)


def test_wrong_window_is_a_clear_error():
    with pytest.raises(ApmaeError, match="takes 64x64 maps, got 32x32"):
        micro_model()(torch.zeros(1, 32, 32))


# --------------------------------------------------------------------------- MAE steps
def test_random_masking_keeps_the_lowest_noise():
    m = micro_model()
    x = torch.randn(3, 36, 5)
    noise = torch.rand(3, 36)
    vis, mask, restore = m.random_masking(x, 0.5, noise)
    assert vis.shape == (3, 18, 5) and mask.shape == (3, 36)
    assert torch.equal(mask.sum(1), torch.full((3,), 18.0))
    assert torch.equal(mask, m.mask_from_noise(noise))
    for b in range(3):
        keep = torch.sort(torch.argsort(noise[b])[:18]).values
        assert torch.equal(torch.nonzero(mask[b] == 0).flatten(), keep)
        # the visible tokens are exactly the kept positions' tokens
        assert torch.equal(torch.sort(vis[b], dim=0).values, torch.sort(x[b, keep], dim=0).values)
    assert torch.equal(torch.gather(torch.argsort(noise, 1), 1, restore),
                       torch.arange(36).expand(3, -1))


def test_decoder_gets_encoded_patches_at_their_positions_and_mask_tokens_elsewhere(maps):
    """The reference package's defect: its decoder scattered mask tokens over the visible
    positions, so no encoded patch reached the decoder."""
    m = micro_model()
    with torch.no_grad():
        m.mask_token.normal_()  # make mask tokens distinguishable
    seen = {}
    hook = m.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    noise = torch.rand(4, 36, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            patches = m.prepare(maps[:4])
            latent, mask, _ = m.forward_encoder(patches, 0.5, noise)
            m.forward_decoder(latent, _)
    finally:
        hook.remove()
    x = seen["x"]  # [B, 1+N, Dd]
    pos = m.decoder_pos_embed[0]
    enc = m.decoder_embed(latent)
    assert torch.allclose(x[:, 0], enc[:, 0] + pos[0], atol=1e-6)
    for b in range(4):
        visible = torch.nonzero(mask[b] == 0).flatten()
        masked = torch.nonzero(mask[b] == 1).flatten()
        # visible tokens come in ascending-noise order from the encoder
        order = visible[torch.argsort(noise[b, visible])]
        assert torch.allclose(x[b, 1 + order], enc[b, 1:] + pos[1 + order], atol=1e-6)
        assert torch.allclose(x[b, 1 + masked], m.mask_token[0, 0] + pos[1 + masked], atol=1e-6)


def test_prediction_of_masked_patches_depends_on_visible_patch_tokens(maps):
    """Change one visible patch: the decoder's predictions for masked patches change even
    when the CLS token path is removed (attention from mask tokens to encoded tokens)."""
    m = micro_model()
    noise = torch.rand(1, 36, generator=torch.Generator().manual_seed(2))
    patches = m.prepare(maps[:1])
    with torch.no_grad():
        latent, mask, restore = m.forward_encoder(patches, 0.5, noise)
        latent2 = latent.clone()
        latent2[:, 1] += 1.0  # one encoded visible patch
        latent2[:, 0] = latent[:, 0]  # CLS unchanged
        p1, p2 = m.forward_decoder(latent, restore), m.forward_decoder(latent2, restore)
    masked = mask[0] == 1
    assert (p1[0, masked] - p2[0, masked]).abs().max() > 1e-4


def test_loss_counts_masked_patches_and_lower_triangle_pixels_only(maps):
    m = micro_model()
    noise = torch.rand(3, 36, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loss, pred, mask = m(maps[:3], noise=noise)
    target = m.prepare(maps[:3])
    valid = pixel_valid_mask(8, 8).numpy()
    t, p, mk = target.numpy(), pred.numpy(), mask.numpy()
    per_map = []
    for b in range(3):
        num = den = 0.0
        for n in range(36):
            if mk[b, n] == 1:
                d = (p[b, n] - t[b, n])[valid[n]]
                num += float((d.astype(np.float64) ** 2).sum())
                den += int(valid[n].sum())
        per_map.append(num / den)
    assert abs(float(loss) - np.mean(per_map)) < 1e-6
    assert np.allclose(m.forward_loss(target, pred, mask, per_map=True).numpy(), per_map, atol=1e-6)
    # visible patches and pixels above the diagonal never count
    p2 = pred.clone()
    p2[mask == 0] += 3.0
    diag = torch.nonzero(tril_patch_grid(8)[:, 0] == tril_patch_grid(8)[:, 1]).flatten()
    p2[:, diag[:, None], ~pixel_valid_mask(8, 8)[diag[0]]] += 5.0
    assert torch.allclose(m.forward_loss(target, p2, mask), loss, atol=1e-7)
    p3 = pred.clone()
    b, n = torch.nonzero(mask == 1)[0]
    # the bottom-right pixel of a patch is always valid: move it further from the target
    p3[b, n, -1] = target[b, n, -1] + (pred - target)[b, n, -1].abs() + 1.0
    assert float(m.forward_loss(target, p3, mask)) > float(loss)


def test_attention_equals_explicit_softmax_attention(monkeypatch):
    m = micro_model()
    attn = m.blocks[0].attn
    x = torch.randn(2, 19, 32)
    b, t, _ = x.shape
    qkv = attn.qkv(x).view(b, t, 3, 2, 16).permute(2, 0, 3, 1, 4)
    w = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / 4.0, dim=-1)
    ref = attn.proj((w @ qkv[2]).transpose(1, 2).reshape(b, t, 32))
    assert torch.allclose(attn(x), ref, atol=1e-5)
    # the heads' outputs come from one F.scaled_dot_product_attention call: the explicit softmax
    sdpa, outs = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: outs.append(sdpa(*a, **k)) or outs[-1])
    attn(x)
    assert len(outs) == 1 and torch.allclose(outs[0], w @ qkv[2], atol=1e-5)


# --------------------------------------------------------------------------- encode
def test_encode_cls_and_mean(maps):
    m = micro_model()
    with torch.inference_mode():
        cls = m.encode(maps)
        mean = m.encode(maps, pool="mean")
        single = torch.cat([m.encode(maps[i:i + 1]) for i in range(len(maps))])
        tokens = m._encode_tokens(m.patch_embed(m.prepare(maps)) + m.pos_embed[:, 1:])
    assert cls.shape == mean.shape == (6, 32)
    assert torch.allclose(cls, single, atol=1e-5)  # no masking, no batch effects
    assert torch.allclose(cls, tokens[:, 0]) and torch.allclose(mean, tokens[:, 1:].mean(1))
    assert not torch.allclose(cls[0], cls[1])
    with pytest.raises(ApmaeError, match="pool"):
        m.encode(maps, pool="max")


def test_save_pretrained_round_trip(tmp_path, maps):
    from transformers import AutoModel

    m = micro_model(input_scaling="raw")
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "apmae" and cfg["input_scaling"] == "raw"
    assert "steps" not in cfg and "lr" not in cfg  # no run settings in the model config
    for loaded in (APMAEModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, APMAEModel) and isinstance(loaded.config, APMAEConfig)
        a_cfg, b_cfg = loaded.config.to_dict(), m.config.to_dict()
        a_cfg.pop("_name_or_path"), b_cfg.pop("_name_or_path")
        assert a_cfg == b_cfg
        a, b = m.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(loaded.pixel_valid, m.pixel_valid)
        noise = torch.rand(6, 36, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            assert torch.equal(loaded.eval()(maps, noise=noise)[1], m(maps, noise=noise)[1])
            assert torch.equal(loaded.encode(maps), m.encode(maps))


@pytest.mark.gpu
def test_cuda_bf16_autocast_matches_cpu_fp32(maps):
    m = micro_model()
    noise = torch.rand(6, 36, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        loss, pred, _ = m(maps, noise=noise)
        emb = m.encode(maps)
        g = m.to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gloss, gpred, _ = g(maps.cuda(), noise=noise.cuda())
            gemb = g.encode(maps.cuda())
    assert abs(float(gloss) - float(loss)) < 0.02 * float(loss) + 1e-3
    assert F.cosine_similarity(gemb.float().cpu(), emb).min() > 0.99
    assert (gpred.float().cpu() - pred).abs().max() < 0.1
