"""Encoding: the chunk-aligned, crash-safe embeddings writer and `encode` with a tiny
untrained AP-MAE on the 64x64 synthetic run (resume after a crash, equality with
model.encode, the capture building block)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.encoding import encoder as encoding
from apmae_gpu.encoding.encoder import EmbeddingWriter


def _emb(ids, L=2, H=3, D=8):
    """Embeddings whose values encode (inference, layer, head, dim)."""
    ids = np.asarray(ids)
    return (ids[:, None, None, None] * 0.01 + np.arange(L)[None, :, None, None]
            + np.arange(H)[None, None, :, None] * 0.1
            + np.arange(D)[None, None, None, :] * 0.001).astype(np.float32)


# --------------------------------------------------------------------------- writer
def test_writer_commits_whole_aligned_blocks(tmp_path):
    w = EmbeddingWriter(tmp_path, 2, 3, 8, block=4)
    ids = np.arange(0, 22, 2)                       # 11 inferences, in uneven appends
    committed = [w.append(ids[a:b], _emb(ids[a:b])) for a, b in ((0, 3), (3, 4), (4, 9), (9, 11))]
    assert committed == [0, 4, 8, 8]                # only whole blocks before close
    w.close()
    g = zarr.open_group(tmp_path / "embeddings.zarr", mode="r")
    assert g["embeddings"].shape == (2, 3, 11, 8) and g["embeddings"].chunks == (1, 1, 4, 8)
    assert g["embeddings"].dtype == np.float16
    np.testing.assert_array_equal(g["inference_id"][:], ids)
    expected = _emb(ids).astype(np.float16).transpose(1, 2, 0, 3)
    np.testing.assert_array_equal(g["embeddings"][:], expected)
    assert g.attrs["complete"] and g.attrs["n_committed"] == 11
    got_ids, X = encoding.read_head(tmp_path / "embeddings.zarr", 1, 2)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(X, _emb(ids)[:, 1, 2].astype(np.float16).astype(np.float32))


def test_writer_drops_uncommitted_rows_after_a_kill(tmp_path):
    w = EmbeddingWriter(tmp_path, 2, 3, 8, block=4)
    w.append(np.arange(6), _emb(np.arange(6)))     # 4 committed, 2 buffered (lost in a kill)
    # a kill in the middle of the next block's write: arrays grown and written, no commit
    w.emb.resize((2, 3, 8, 8))
    w.emb[:, :, 4:8] = 9.0
    w.ids.resize((8,))
    del w
    w = EmbeddingWriter(tmp_path, 2, 3, 8)
    assert w.committed == 4 and w.emb.shape[2] == 4 and w.ids.shape == (4,)
    np.testing.assert_array_equal(w.committed_ids, np.arange(4))
    w.append(np.arange(4, 10), _emb(np.arange(4, 10)))
    w.close()
    g = zarr.open_group(tmp_path / "embeddings.zarr", mode="r")
    expected = _emb(np.arange(10)).astype(np.float16).transpose(1, 2, 0, 3)
    np.testing.assert_array_equal(g["embeddings"][:], expected)


def test_writer_validates(tmp_path):
    w = EmbeddingWriter(tmp_path, 2, 3, 8, block=4)
    w.append([5, 6], _emb([5, 6]))
    with pytest.raises(ValueError, match="ascending"):
        w.append([6, 7], _emb([6, 7]))
    with pytest.raises(ValueError, match="expected embeddings"):
        w.append([8], np.zeros((1, 2, 3, 9)))
    with pytest.raises(ApmaeError, match="use --restart"):
        EmbeddingWriter(tmp_path, 2, 4, 8)
    with pytest.raises(ApmaeError, match="incomplete"):
        encoding.open_embeddings(tmp_path)
    assert encoding.default_block(30, 24, 512) == 1024
    assert encoding.default_block(40, 48, 512) == 512       # 1 GiB of host buffer at most


# --------------------------------------------------------------------------- encode
def _analysis(run):
    from apmae_gpu.core.store import MapStore

    store = MapStore(run)
    inf = store.inferences()
    ids = np.sort(inf.loc[inf["split"] == "analysis", "inference_id"].to_numpy())
    idx = store.index()
    return store, ids, idx[idx["inference_id"].isin(ids)]


def test_encode_matches_model_encode(run, tiny_checkpoint):
    encoding.encode(run, checkpoint=tiny_checkpoint, batch_size=50, device="cpu", block=32)
    store, ids, idx = _analysis(run)
    g = encoding.open_embeddings(run)
    assert g["embeddings"].shape == (2, 3, len(ids), 32)
    np.testing.assert_array_equal(g["inference_id"][:], ids)
    assert g.attrs["pool"] == "cls" and g.attrs["checkpoint"] == str(tiny_checkpoint)
    model = encoding.load_encoder(tiny_checkpoint)
    pick = idx.sample(12, random_state=0)
    with torch.inference_mode():
        ref = model.encode(torch.as_tensor(store.read(pick["map_id"].to_numpy())), pool="cls")
    pos = np.searchsorted(ids, pick["inference_id"].to_numpy())
    got = g["embeddings"][:][pick["layer"].to_numpy(), pick["head"].to_numpy(), pos]
    np.testing.assert_allclose(got.astype(np.float32), ref.numpy(), rtol=2e-3, atol=2e-3)
    manifest = json.loads((run / "manifest.json").read_text())["encode"]
    assert manifest["maps_encoded"] == len(idx) and manifest["inferences"] == len(ids)
    assert manifest["resumed_from"] == 0 and manifest["dtype"] == "float32"
    # idempotent rerun; other pool or checkpoint needs --restart
    encoding.encode(run, checkpoint=tiny_checkpoint, device="cpu")
    with pytest.raises(ApmaeError, match="pass --restart"):
        encoding.encode(run, checkpoint=tiny_checkpoint, pool="mean", device="cpu")


def test_encode_resumes_after_a_crash(run, tiny_checkpoint, monkeypatch, tmp_path):
    full = tmp_path / "full"
    shutil.copytree(run, full)
    encoding.encode(full, checkpoint=tiny_checkpoint, batch_size=64, device="cpu", block=16)

    real = encoding.encode_maps
    calls = {"n": 0}

    def crashing(*args, **kwargs):           # the process dies in the 7th forward batch
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(encoding, "encode_maps", crashing)
    with pytest.raises(KeyboardInterrupt):
        encoding.encode(run, checkpoint=tiny_checkpoint, batch_size=64, device="cpu", block=16)
    g = zarr.open_group(run / "embeddings.zarr", mode="r")
    done = g.attrs["n_committed"]
    assert 0 < done < 126 and done % 16 == 0 and not g.attrs["complete"]
    monkeypatch.setattr(encoding, "encode_maps", real)
    encoding.encode(run, checkpoint=tiny_checkpoint, batch_size=64, device="cpu")
    manifest = json.loads((run / "manifest.json").read_text())["encode"]
    assert manifest["resumed_from"] == done
    assert manifest["maps_encoded"] == (126 - done) * 6
    a = zarr.open_group(run / "embeddings.zarr", mode="r")
    b = zarr.open_group(full / "embeddings.zarr", mode="r")
    np.testing.assert_array_equal(a["inference_id"][:], b["inference_id"][:])
    np.testing.assert_allclose(a["embeddings"][:].astype(np.float32),
                               b["embeddings"][:].astype(np.float32), atol=2e-3)


def test_capture_and_encode_in_one_pass(run, tiny_checkpoint):
    """The building block capture calls per batch: maps [B, L, H, W, W] in, embeddings
    written; a crash loses only the uncommitted tail and a new encoder continues."""
    store, ids, idx = _analysis(run)
    idx = idx.sort_values("map_id")

    def batch(lo, hi):
        sel = idx[idx["inference_id"].isin(ids[lo:hi])]
        return torch.as_tensor(store.read(sel["map_id"].to_numpy())).reshape(hi - lo, 2, 3, 64, 64)

    model = encoding.load_encoder(tiny_checkpoint)
    maps = batch(0, 3)
    out = encoding.encode_inference_batch(model, maps, pool="mean", batch_size=4)
    assert out.shape == (3, 2, 3, 32) and out.dtype == np.float16
    with torch.inference_mode():
        ref = model.encode(maps[1, 1], pool="mean").numpy()      # inference 1, layer 1
    np.testing.assert_allclose(out[1, 1].astype(np.float32), ref, atol=2e-3, rtol=2e-3)

    enc = encoding.StreamingEncoder(run, tiny_checkpoint, 2, 3, pool="mean", device="cpu",
                                    block=8)
    for lo in range(0, 20, 5):
        enc.add(ids[lo:lo + 5], batch(lo, lo + 5))
    assert enc.writer.committed == 16                    # killed here: 4 buffered are lost
    del enc
    enc = encoding.StreamingEncoder(run, tiny_checkpoint, 2, 3, pool="mean", device="cpu")
    np.testing.assert_array_equal(enc.committed_ids, ids[:16])
    enc.add(ids[16:30], batch(16, 30))
    enc.close()
    got_ids, X = encoding.read_head(run / "embeddings.zarr", 1, 1)
    np.testing.assert_array_equal(got_ids, ids[:30])
    with torch.inference_mode():
        ref = model.encode(batch(0, 30)[:, 1, 1], pool="mean").numpy()
    np.testing.assert_allclose(X, ref, atol=3e-3, rtol=3e-3)
    manifest = json.loads((run / "manifest.json").read_text())["encode"]
    assert manifest["mode"] == "capture" and manifest["resumed_from"] == 16
    with pytest.raises(ApmaeError, match="pass --restart"):
        encoding.StreamingEncoder(run, tiny_checkpoint, 2, 3, pool="cls", device="cpu")


def test_encode_errors(run, tiny_checkpoint, tmp_path):
    with pytest.raises(ApmaeError, match="not an AP-MAE checkpoint"):
        encoding.encode(run, device="cpu")
    with pytest.raises(ApmaeError, match="encode: pool: input should be 'cls' or 'mean'"):
        encoding.encode(run, checkpoint=tiny_checkpoint, pool="max", device="cpu")
    with pytest.raises(ApmaeError, match="no maps.zarr"):
        encoding.encode(tmp_path / "empty", checkpoint=tiny_checkpoint, device="cpu")


@pytest.mark.gpu
def test_cuda_bf16_encode_matches_cpu(run, tiny_checkpoint):
    store, ids, idx = _analysis(run)
    maps = torch.as_tensor(store.read(idx["map_id"].to_numpy()[:64]))
    cpu = encoding.encode_maps(encoding.load_encoder(tiny_checkpoint, "cpu"), maps).cpu()
    gpu = encoding.encode_maps(encoding.load_encoder(tiny_checkpoint, "cuda"), maps).cpu()
    cos = torch.nn.functional.cosine_similarity(cpu, gpu, dim=1)
    assert cos.min() > 0.99                                    # bf16 autocast vs fp32
