"""AP-MAE's training recipe: the reference package's choices by default, MAE's as
``improved``, each item a field; checkpoints written before the recipe load as before."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apmae_gpu.core.config import RECIPES, TrainConfig
from apmae_gpu.core.store import MapStore
from apmae_gpu.model import training
from apmae_gpu.model.loader import MapLoader
from apmae_gpu.model.network import APMAEModel, preset_config, sincos_2d, tril_patch_grid
from tests.tiny_models import MICRO, micro_model

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCE = dict(qkv_bias=False, position_embeddings="learned", patch_norm=True)
IMPROVED = dict(qkv_bias=True, position_embeddings="sincos", patch_norm=False)


def test_recipes_resolve_with_single_items_overridden():
    assert TrainConfig().recipe == "reference"
    assert TrainConfig().resolved() == RECIPES["reference"]
    assert RECIPES["reference"] == dict(qkv_bias=False, position_embeddings="learned",
                                        patch_norm=True, weight_decay_all=True,
                                        warmup_fraction=0.0, batch_order="prompt")
    mixed = TrainConfig(recipe="improved", qkv_bias=False, batch_order="prompt").resolved()
    assert mixed == {**RECIPES["improved"], "qkv_bias": False, "batch_order": "prompt"}


def test_reference_model_shapes_and_parameter_groups():
    torch.manual_seed(0)
    ref = APMAEModel(preset_config("tiny", **MICRO, **REFERENCE))
    imp = APMAEModel(preset_config("tiny", **MICRO, **IMPROVED))
    d, dd, pp, n = MICRO["hidden_size"], MICRO["decoder_hidden_size"], 8 * 8, 36
    # no qkv bias; LayerNorm(P*P) -> Linear -> LayerNorm(D); learned N(0, 1) positions
    assert all(b.attn.qkv.bias is None for b in [*ref.blocks, *ref.decoder_blocks])
    assert all(b.attn.qkv.bias is not None for b in imp.blocks)
    assert ref.patch_norm_in.weight.shape == (pp,) and ref.patch_norm_out.weight.shape == (d,)
    assert not hasattr(imp, "patch_norm_in")
    assert ref.pos_embed.shape == (1, n + 1, d) and ref.decoder_pos_embed.shape == (1, n + 1, dd)
    assert ref.pos_embed.requires_grad and ref.decoder_pos_embed.requires_grad
    assert 0.8 < float(ref.pos_embed.detach().std()) < 1.2
    assert not imp.pos_embed.requires_grad
    table = sincos_2d(d, tril_patch_grid(8))
    assert torch.allclose(imp.pos_embed[0, 1:], table.float(), atol=1e-6)
    # parameter counts differ by exactly the qkv biases, the two norms and the positions
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    qkv = sum(b.attn.qkv.out_features for b in [*imp.blocks, *imp.decoder_blocks])
    assert count(ref) - count(imp) == -qkv + 2 * pp + 2 * d + (n + 1) * (d + dd)
    # weight decay on every parameter (reference) or none on biases, norms, tokens (MAE)
    (one,) = training._param_groups(ref, decay_all=True)
    assert one["weight_decay"] == 0.05
    assert {id(p) for p in one["params"]} == {id(p) for p in ref.parameters() if p.requires_grad}
    decay, no_decay = training._param_groups(imp, decay_all=False)
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    names = {id(p): k for k, p in imp.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"cls_token", "mask_token",
                                                         "norm.weight", "norm.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == \
        sum(1 for p in imp.parameters() if p.requires_grad)
    # both encode and reconstruct maps of the same shapes
    maps = torch.rand(2, 64, 64).tril()
    for m in (ref.eval(), imp.eval()):
        loss, pred, mask = m(maps)
        assert pred.shape == (2, n, pp) and mask.shape == (2, n) and torch.isfinite(loss)
        assert m.encode(maps).shape == (2, d)


@pytest.mark.parametrize("recipe", ["reference", "improved"])
def test_training_follows_the_recipe(run, recipe):
    summary = training.train(run, preset="tiny", steps=8, batch_size=16, device="cpu",
                             lr=2e-3, model_config=dict(MICRO), eval_every=8, save_every=8,
                             log_every=1, recipe=recipe)
    out = run / "apmae"
    args = json.loads((out / "training_args.json").read_text())
    cfg = json.loads((out / "final" / "config.json").read_text())
    want = RECIPES[recipe]
    assert {k: cfg[k] for k in REFERENCE} == {k: want[k] for k in REFERENCE}
    assert args["recipe"] == summary["recipe"] == recipe
    assert (args["weight_decay_all"], args["batch_order"]) == (want["weight_decay_all"],
                                                              want["batch_order"])
    assert args["warmup_steps"] == (0 if recipe == "reference" else 1)
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["kind"] == "train"]
    # no warm-up: the first step runs at the cosine's start, not at peak / warm-up steps
    assert lrs[0] == pytest.approx(2e-3 * 0.5 * (1 + np.cos(np.pi / 8)), rel=1e-6) \
        if recipe == "reference" else lrs[0] == pytest.approx(2e-3, rel=1e-6)


def test_checkpoints_without_the_recipe_keys_load_as_before(tmp_path):
    old = micro_model(3)           # the pre-recipe architecture (config defaults)
    old.save_pretrained(tmp_path / "old")
    cfg_path = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("position_embeddings", "patch_norm"):
        cfg.pop(key)
    cfg_path.write_text(json.dumps(cfg))
    loaded = APMAEModel.from_pretrained(tmp_path / "old").eval()
    maps = torch.rand(3, 64, 64).tril()
    with torch.inference_mode():
        assert torch.equal(loaded.encode(maps), old.encode(maps))
    assert loaded.config.position_embeddings == "sincos" and not loaded.config.patch_norm


def test_prompt_order_keeps_consecutive_maps_together(synthetic_run_dir):
    store = MapStore(synthetic_run_dir)
    ids = np.arange(store.n_maps)
    cm = store.info.chunk_maps
    kept = np.concatenate(MapLoader(store, ids, 8, seed=1, shuffle=False)._windows(0))
    mixed = np.concatenate(MapLoader(store, ids, 8, seed=1)._windows(0))
    assert sorted(kept) == sorted(mixed) == list(ids)
    # within every chunk the maps come in store order, one run per chunk
    runs = np.split(kept, np.flatnonzero(np.diff(kept) != 1) + 1)
    assert all(r[0] % cm == 0 for r in runs) and len(runs) <= len(np.unique(kept // cm))
    assert (np.diff(mixed) != 1).sum() > len(runs)
