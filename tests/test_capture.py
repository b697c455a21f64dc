"""Capture: the stored maps are the model's own attention (equal to eager attention), the
judgement equals a plain forward pass, splits keep their quotas, and a killed capture rerun
gives exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from apmae_gpu.capture import llm
from apmae_gpu.capture.maps import (
    capture,
    choose_heads,
    forward_with_maps,
    merge_shards,
    scale_maps,
)
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.scaling import FLOOR, LOG_FILL
from apmae_gpu.core.store import MapStore
from apmae_gpu.synthetic import synthetic_tasks

FAMILIES = ["random:tiny-llama", "random:tiny-starcoder2", "random:tiny-gpt2"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return request.param, llm.load_model(request.param, device="cpu", seed=1)


def _eager_attentions(lm, ids):
    lm.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = lm(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        lm.set_attn_implementation("sdpa")
    return torch.stack(out.attentions, dim=1)  # [B, L, H, T, T]


def test_maps_equal_eager_attention(model):
    name, lm = model
    fam = llm.family(lm)
    ids = torch.randint(0, 49152, (3, 48), generator=torch.Generator().manual_seed(0))
    ref = _eager_attentions(lm, ids)
    logits, maps = forward_with_maps(lm, fam, ids, [None] * fam.n_layers, "none")
    assert maps.shape == (3, fam.n_layers, fam.n_heads, 48, 48) and maps.dtype == torch.float16
    got = maps.float()
    assert (got - ref).abs().max().item() < 1e-3, name          # float16 rounding only
    assert torch.allclose(got.sum(-1), torch.ones(()), atol=2e-3)  # rows are distributions
    assert (got.triu(1) == 0).all()                              # causal
    # The forward pass itself is the model's: logits equal the plain sdpa forward.
    with torch.inference_mode():
        plain = lm(input_ids=ids).logits[:, -1]
    assert torch.allclose(logits, plain, atol=1e-4)


def test_log_scaler_and_head_subsets_match_eager(model):
    name, lm = model
    fam = llm.family(lm)
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = _eager_attentions(lm, ids)
    heads = choose_heads([5, 9], fam.n_layers, fam.n_heads, 0.5, seed=3)
    _, maps = forward_with_maps(lm, fam, ids, heads, "log")
    assert maps.shape[2] == 2
    for layer in range(fam.n_layers):
        for b in range(2):
            for j, h in enumerate(heads[layer][b].tolist()):
                expect = _log_store(ref[b, layer, h])
                err = (maps[b, layer, j].float() - expect).abs() / expect.abs().clamp_min(1)
                assert err.max() < 2e-3, (name, layer, h)   # fp16's relative rounding
    assert torch.isfinite(maps).all()


def _log_store(p: torch.Tensor) -> torch.Tensor:
    """What a ``log`` store holds for probabilities ``p`` [..., T, T]: ln p, and LOG_FILL
    for p = 0 and above the diagonal."""
    T = p.shape[-1]
    out = torch.where(p > 0, torch.log(p.clamp_min(FLOOR)), torch.tensor(LOG_FILL))
    return out.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), LOG_FILL)


def test_log_normalize_follows_the_reference_definition():
    rng = np.random.default_rng(0)
    T = 16
    s = rng.standard_normal((3, T, T)) * 4
    s[0, 5, :3] = -1e9  # exact zeros inside the lower triangle
    mask = np.tril(np.ones((T, T), bool))
    p = np.where(mask, np.exp(s - np.where(mask, s, -np.inf).max(-1, keepdims=True)), 0)
    p = p / p.sum(-1, keepdims=True)
    got = scale_maps(torch.tensor(p, dtype=torch.float32), "log_normalize").numpy()
    with np.errstate(divide="ignore"):
        lp = np.log(p.astype(np.float32))
    for m in range(3):
        finite = np.isfinite(lp[m]) & mask
        lo = lp[m][finite].min()
        ref = np.where(finite, (lp[m] - lo) / (-lo), 0.0)
        np.testing.assert_allclose(got[m], ref, atol=1e-5)
    assert got.min() == 0.0 and got.max() == pytest.approx(1.0)


# --------------------------------------------------------------------------- runs
def _task_run(path: Path, lm_name: str, n_per_task: int = 6, window: int = 32, seed: int = 0):
    return synthetic_tasks(path, lm_name, n_per_task=n_per_task, window=window, seed=seed)


@pytest.fixture(scope="module")
def analysis_run(tmp_path_factory):
    run = _task_run(tmp_path_factory.mktemp("cap") / "run", "random:tiny-llama")
    capture(run, "random:tiny-llama", split="analysis", per_task=2, batch_size=3, device="cpu")
    return run


def test_analysis_split_is_balanced_and_judged_like_a_plain_forward(analysis_run):
    store = MapStore(analysis_run)
    inf = store.inferences()
    kept = inf[inf.has_maps]
    counts = kept.groupby(["task", "correct"], dropna=False).size()
    for task in ("identifiers", "closing_brackets", "random_masking"):
        assert counts[(task, True)] == 2 and counts[(task, False)] == 2
    # noise: a task's total (2 x per_task), without correctness
    assert kept[kept.task == "noise"].correct.isna().all() and (kept.task == "noise").sum() == 4
    # Judgement == a plain forward pass of the same model on the stored prompt.
    lm = llm.load_model("random:tiny-llama", device="cpu", seed=0)
    ids = torch.tensor(np.stack(inf.input_ids.to_list()).astype(np.int64))
    with torch.inference_mode():
        logits = lm(input_ids=ids).logits[:, -1]
    pred = logits.argmax(-1).numpy()
    assert (inf.predicted_token_id.to_numpy() == pred).all()
    has = inf.target_token_id.to_numpy() >= 0
    assert (inf.correct[has].astype(bool).to_numpy() == (pred[has] == inf.target_token_id[has])).all()
    logp = torch.log_softmax(logits, -1)
    tgt = torch.tensor(inf.target_token_id.clip(lower=0).to_numpy())
    np.testing.assert_allclose(inf.target_logprob[has], logp[has, tgt[has]].numpy(), rtol=1e-4)
    rank = (logits > logits.gather(1, tgt[:, None])).sum(-1).numpy()
    assert (inf.target_rank[has].to_numpy() == rank[has]).all()
    # Every kept inference has all 2 x 4 maps, indexed in (layer, head) order.
    index = store.index()
    assert len(index) == store.n_maps == len(kept) * 8
    for _, g in index.groupby("inference_id"):
        assert list(zip(g.layer, g["head"])) == [(l, h) for l in range(2) for h in range(4)]
    assert set(index.inference_id) == set(kept.inference_id)


def test_stored_maps_equal_eager_maps_of_the_stored_prompt(analysis_run):
    store = MapStore(analysis_run)
    inf = store.inferences()
    row = inf[inf.has_maps].iloc[0]
    index = store.index()
    sel = index[index.inference_id == row.inference_id]
    maps = store.read(sel.map_id.to_numpy()).astype(np.float32)
    lm = llm.load_model("random:tiny-llama", device="cpu", seed=0)
    ref = _eager_attentions(lm, torch.tensor(np.asarray([row.input_ids]), dtype=torch.long))[0]
    expect = _log_store(ref).reshape(-1, 32, 32).numpy()
    upper = np.triu(np.ones((32, 32), bool), 1)
    assert (np.abs(maps - expect) / np.maximum(np.abs(expect), 1)).max() < 2e-3
    assert (maps[:, upper] == np.float16(LOG_FILL)).all()


def test_train_split_takes_a_quarter_of_each_layers_heads(tmp_path):
    run = _task_run(tmp_path / "run", "random:tiny-llama", n_per_task=16)
    capture(run, "random:tiny-llama", split="analysis", per_task=1, batch_size=4, device="cpu")
    capture(run, "random:tiny-llama", split="train", per_task=3, batch_size=4, device="cpu")
    store = MapStore(run)
    inf = store.inferences()
    train = inf[inf.split == "train"]
    assert set(train.task) == {"random_masking"}
    assert train[train.has_maps].correct.all() and train.has_maps.sum() == 3
    # Splits never share a task row.
    assert not set(train.task_id) & set(inf[inf.split == "analysis"].task_id)
    index = store.index().merge(train[["inference_id"]], on="inference_id")
    per_layer = index.groupby(["inference_id", "layer"]).size()
    assert (per_layer == 1).all()  # round(0.25 * 4) = 1 head per layer
    man = json.loads((run / "manifest.json").read_text())["capture"]
    assert set(man["splits"]) == {"train", "analysis"}
    assert man["splits"]["train"]["tasks"]["random_masking"]["kept"] == 3
    assert man["scaler"] == "log" and man["fill_value"] == LOG_FILL and man["floor"] == FLOOR


def _run_cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "apmae_gpu.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _snapshot(run: Path):
    store = MapStore(run)
    return store.inferences(), store.index(), store.read(np.arange(store.n_maps))


def test_killed_capture_resumes_to_the_uninterrupted_result(tmp_path):
    ref = _task_run(tmp_path / "ref", "random:tiny-llama", n_per_task=14, window=32)
    args = ["--model", "random:tiny-llama", "--per-task", "6", "--batch-size", "1",
            "--device", "cpu"]
    proc = _run_cli(["capture", str(ref), *args])
    assert proc.wait(timeout=300) == 0, proc.stdout.read().decode()[-2000:]

    run = _task_run(tmp_path / "killed", "random:tiny-llama", n_per_task=14, window=32)
    proc = _run_cli(["capture", str(run), *args])
    parts = run / "inferences.parquet"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("part-*.parquet"))) >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "capture finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list(parts.glob("part-*.parquet")))
    proc = _run_cli(["capture", str(run), *args])
    assert proc.wait(timeout=300) == 0, proc.stdout.read().decode()[-2000:]
    a, b = _snapshot(ref), _snapshot(run)
    assert partial < len(a[0])
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    assert np.array_equal(a[2], b[2])


def test_disk_full_keeps_committed_batches_valid(tmp_path, monkeypatch):
    run = _task_run(tmp_path / "run", "random:tiny-llama", n_per_task=6)
    calls = {"n": 0}
    original = MapStore.commit

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return original(self, *a, **k)

    monkeypatch.setattr(MapStore, "commit", failing)
    with pytest.raises(ApmaeError, match="No space left on device.*rerun"):
        capture(run, "random:tiny-llama", per_task=2, batch_size=2, device="cpu")
    monkeypatch.setattr(MapStore, "commit", original)
    store = MapStore(run, writable=True)
    assert store.inferences().batch.max() == 1  # batches 0 and 1 committed, intact
    capture(run, "random:tiny-llama", per_task=2, batch_size=2, device="cpu")
    ref = _task_run(tmp_path / "ref", "random:tiny-llama", n_per_task=6)
    capture(ref, "random:tiny-llama", per_task=2, batch_size=2, device="cpu")
    pd.testing.assert_frame_equal(_snapshot(ref)[0], _snapshot(run)[0])


def test_shards_merge_into_one_valid_store(tmp_path):
    run = _task_run(tmp_path / "run", "random:tiny-llama", n_per_task=8)
    for k in (0, 1):
        capture(run, "random:tiny-llama", per_task=2, batch_size=4, device="cpu", shard=f"{k}/2")
    merge_shards(run)
    store = MapStore(run)
    inf, index = store.inferences(), store.index()
    assert inf.inference_id.is_unique and not (run / "shards" / "0-of-2").exists()
    assert set(index.inference_id) == set(inf[inf.has_maps].inference_id)
    assert inf.task_id.is_unique  # the shards prompted disjoint rows
    kept = inf[inf.has_maps & (inf.task == "identifiers")]
    assert kept.correct.sum() == 2 and (~kept.correct.astype(bool)).sum() == 2


@pytest.mark.parametrize("problem,message", [
    ("no_run", "does not exist"),
    ("no_tasks", "tasks.parquet is missing"),
    ("bad_heads", "--heads"),
    ("other_scaler", "captured with --scaler 'log'; this capture asks for 'none'"),
    ("context", "context of 16"),
])
def test_bad_input_is_a_clear_error(problem, message, tmp_path):
    run = tmp_path / "run"
    model = "random:tiny-llama"
    kwargs = dict(per_task=1, batch_size=2, device="cpu")
    if problem == "no_tasks":
        run.mkdir()
    elif problem in ("bad_heads", "other_scaler"):
        _task_run(run, model, n_per_task=2)
        if problem == "bad_heads":
            kwargs["heads"] = "layerwise:2"
        else:
            capture(run, model, **kwargs)
            kwargs["scaler"] = "none"
    elif problem == "context":
        _task_run(run, model, n_per_task=2)
        cfg = llm.random_config("tiny-llama")
        cfg.max_position_embeddings = 16
        from transformers import AutoModelForCausalLM

        small = tmp_path / "small"
        AutoModelForCausalLM.from_config(cfg).save_pretrained(small)
        model = str(small)
    with pytest.raises(ApmaeError, match=message):
        capture(run, model, **kwargs)


def test_capture_and_encode_in_one_pass_equals_capture_then_encode(tmp_path, tiny_apmae,
                                                                   monkeypatch, caplog):
    from apmae_gpu.encoding import encoder as encoding

    kw = dict(per_task=2, batch_size=2, device="cpu")
    stored = _task_run(tmp_path / "stored", "random:tiny-llama", n_per_task=8)
    capture(stored, "random:tiny-llama", **kw)
    encoding.encode(stored, checkpoint=tiny_apmae, device="cpu")

    # One pass, killed in the middle of an embedding block.
    one = _task_run(tmp_path / "one", "random:tiny-llama", n_per_task=8)
    original = encoding.StreamingEncoder.add
    calls = {"n": 0}

    def crashing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # blocks of 3: inference 3 sits in the uncommitted block
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(encoding.StreamingEncoder, "add", crashing)
    monkeypatch.setattr(encoding, "default_block", lambda *a, **k: 3)
    with pytest.raises(KeyboardInterrupt):
        capture(one, "random:tiny-llama", encode_with=tiny_apmae, **kw)
    monkeypatch.setattr(encoding.StreamingEncoder, "add", original)
    capture(one, "random:tiny-llama", encode_with=tiny_apmae, **kw)
    assert "re-capturing" in caplog.text  # rows whose embeddings were lost were redone

    a, b = MapStore(stored).inferences(), MapStore(one).inferences()
    pd.testing.assert_frame_equal(a.drop(columns="n_maps"), b.drop(columns="n_maps"))
    assert MapStore(one).n_maps == 0 and (b.n_maps == 0).all()
    ids_a, xa = encoding.read_head(stored / "embeddings.zarr", 1, 3)
    ids_b, xb = encoding.read_head(one / "embeddings.zarr", 1, 3)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(xa.astype(np.float32), xb.astype(np.float32), atol=2e-3)
    with pytest.raises(ApmaeError, match="analysis split"):
        capture(one, "random:tiny-llama", split="train", encode_with=tiny_apmae, **kw)
