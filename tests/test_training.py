"""AP-MAE training: split by inference, resumable loader, checkpoints, bad input, resume
after a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from apmae_gpu.cli import main
from apmae_gpu.core import splits
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import read_manifest
from apmae_gpu.core.store import MapStore
from apmae_gpu.model import training
from apmae_gpu.model.checkpoints import latest_checkpoint
from apmae_gpu.model.loader import MapLoader
from tests.tiny_models import MICRO

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(run, **kw):
    args = dict(preset="tiny", steps=6, batch_size=16, device="cpu", lr=2e-3,
                model_config=dict(MICRO), eval_every=3, save_every=3, log_every=1)
    args.update(kw)
    return training.train(run, **args)


# --------------------------------------------------------------------------- split
def test_validation_mask_is_hash_based_nested_and_order_free():
    ids = np.arange(20_000)
    held = splits.validation_mask(ids, 0.1)
    assert 0.09 < held.mean() < 0.11
    assert not (splits.validation_mask(ids, 0.05) & ~held).any()  # nested
    perm = np.random.default_rng(0).permutation(ids.size)
    assert np.array_equal(splits.validation_mask(ids[perm], 0.1), held[perm])
    assert splits.validation_mask(np.arange(3), 0.01).sum() == 1  # tiny runs still validate
    assert not splits.validation_mask(ids, 0.0).any()
    with pytest.raises(ApmaeError, match="val-fraction"):
        splits.validation_mask(ids, 1.5)


def test_split_is_by_inference(synthetic_run_dir):
    store = MapStore(synthetic_run_dir)
    train_ids, val_ids, counts = splits.split_maps(store, 0.2)
    index = store.index().set_index("map_id")
    inf = store.inferences().set_index("inference_id")
    t_inf = set(index.loc[train_ids, "inference_id"])
    v_inf = set(index.loc[val_ids, "inference_id"])
    assert t_inf and v_inf and not (t_inf & v_inf)
    assert (inf.loc[list(t_inf | v_inf), "split"] == "train").all()
    # every map of a held-out inference is held out
    assert len(val_ids) == int(index["inference_id"].isin(v_inf).sum())
    assert counts["n_val_inferences"] == len(v_inf) and counts["n_train_maps"] == len(train_ids)


# --------------------------------------------------------------------------- loader
def test_loader_order_is_deterministic_resumable_and_covers_each_map_once(synthetic_run_dir):
    store = MapStore(synthetic_run_dir)
    ids, _, _ = splits.split_maps(store, 0.1)
    loader = MapLoader(store, ids, batch_size=7, seed=3, buffer_maps=32)
    spe = loader.steps_per_epoch(0)
    assert spe == len(ids) // 7
    order0 = loader.epoch_order(0)
    assert len(set(order0.tolist())) == len(order0) and set(order0) <= set(ids)
    assert not np.array_equal(order0, loader.epoch_order(1))  # reshuffled each epoch
    assert not np.array_equal(order0, np.sort(order0))  # shuffled at all
    it = loader.batches(0)
    first = [next(it) for _ in range(spe + 3)]
    it.close()
    for step, epoch, maps in first:
        e, b = loader.locate(step)
        assert e == epoch
        expect = store.read(loader.epoch_order(e)[b * 7:(b + 1) * 7])
        assert np.array_equal(maps, expect)
    it = loader.batches(spe - 2)  # resume two steps before the epoch ends
    again = [next(it) for _ in range(5)]
    it.close()
    for (s1, e1, m1), (s2, e2, m2) in zip(first[spe - 2:], again):
        assert (s1, e1) == (s2, e2) and np.array_equal(m1, m2)
    # two ranks read disjoint chunks and take the same number of steps
    r0 = MapLoader(store, ids, batch_size=7, seed=3, rank=0, world=2, buffer_maps=32)
    r1 = MapLoader(store, ids, batch_size=7, seed=3, rank=1, world=2, buffer_maps=32)
    o0, o1 = r0.epoch_order(0), r1.epoch_order(0)
    assert len(o0) == len(o1) == r0.steps_per_epoch(0) * 7
    assert not set(o0 // 16) & set(o1 // 16)  # chunk_maps = 16 in the fixture


# --------------------------------------------------------------------------- training
def test_train_writes_model_checkpoints_metrics_and_manifest(run):
    summary = _train(run, steps=24, eval_every=12, save_every=12, log_every=2)
    out = run / "apmae"
    final = out / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["model_type"] == "apmae" and cfg["image_size"] == 64
    assert not {"steps", "lr", "batch_size"} & set(cfg)  # run settings live apart
    args = json.loads((out / "training_args.json").read_text())
    assert args["steps"] == 24 and args["batch_size"] == 16 and args["weight_decay"] == 0.05
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000012",
                                                                       "step-0000024"]
    state = torch.load(out / "checkpoints/step-0000024/state.pt", weights_only=True)
    assert state["step"] == 24 and {"optimizer", "scheduler", "mask_rng", "data"} <= set(state)
    a = load_file(final / "model.safetensors")
    b = load_file(out / "checkpoints/step-0000024/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(2, 25, 2))
    assert train_recs[-1]["loss"] < 0.5 * train_recs[0]["loss"]  # it learns
    lrs = [r["lr"] for r in train_recs]
    assert max(lrs) <= 2e-3 + 1e-12 and lrs[-1] == 0.0  # warm-up, cosine to zero
    assert [r["step"] for r in recs if r["kind"] == "val"] == [12, 24]
    assert all(r["maps_per_s"] > 0 for r in train_recs)
    manifest = read_manifest(run)["train"]
    assert manifest["steps"] == 24 and manifest["val_loss"] == summary["val_loss"]
    assert manifest["n_train_maps"] + manifest["n_val_maps"] == 240
    assert manifest["val_visible_mean"] > 0 and manifest["parameters"]["total"] > 0
    # the final model loads and encodes stored maps
    from apmae_gpu.model.network import APMAEModel

    model = APMAEModel.from_pretrained(final)
    maps = torch.from_numpy(MapStore(run).read([0, 1, 2]))
    assert model.encode(maps).shape == (3, 32)
    # a second run into the same directory needs --resume
    with pytest.raises(ApmaeError, match="pass --resume"):
        _train(run, steps=24)
    # resuming a finished run is a no-op; another preset or config is refused
    assert _train(run, steps=24, resume=True, eval_every=12, save_every=12,
                  log_every=2)["steps"] == 24
    with pytest.raises(ApmaeError, match="differs from the requested"):
        _train(run, steps=30, resume=True, model_config={**MICRO, "hidden_size": 64})
    with pytest.raises(ApmaeError, match="batch_size=16"):
        _train(run, steps=30, resume=True, batch_size=8, eval_every=12, save_every=12)
    # more steps on a finished run: continues from its last checkpoint
    longer = _train(run, steps=28, resume=True, eval_every=12, save_every=12, log_every=2)
    assert longer["resumed_from"].endswith("step-0000024") and longer["steps"] == 28
    assert latest_checkpoint(run / "apmae").name == "step-0000028"


def test_bad_input_fails_before_any_step(run, tmp_path):
    with pytest.raises(ApmaeError, match="holds 64x64 maps; preset 'tiny' takes 256x256"):
        training.train(run, preset="tiny", steps=2, device="cpu")
    with pytest.raises(ApmaeError, match="unknown AP-MAE config keys: patchsize"):
        _train(run, model_config={**MICRO, "patchsize": 4})
    with pytest.raises(ApmaeError, match="exceeds the"):
        _train(run, batch_size=100_000)
    assert not (run / "apmae").exists()
    empty = tmp_path / "empty"
    MapStore.create_or_open(empty, window=64, scaler="log", fill_value=-18.42, floor=1e-8)
    with pytest.raises(ApmaeError, match="empty"):
        _train(empty)
    # a NaN in a training map (written behind the store's back)
    store = MapStore(run, writable=True)
    ids, _, _ = splits.split_maps(store, 0.1)
    bad = store.array[int(ids[5])]
    bad[10, 3] = np.nan
    store.array[int(ids[5])] = bad
    with pytest.raises(ApmaeError, match=f"NaN or infinite values in map.*{int(ids[5])}"):
        _train(run, steps=4)
    assert not (run / "apmae" / "checkpoints").exists()


def test_non_finite_loss_stops_with_a_clear_error(run):
    with pytest.raises(ApmaeError, match="non-finite training loss"):
        _train(run, steps=8, lr=1e30, save_every=100, eval_every=100)
    assert not list((run / "apmae").glob("checkpoints/step-*"))


def test_resume_after_sigkill_gives_the_uninterrupted_weights(run, tmp_path):
    # the CLI's defaults for what it does not set (log_every)
    steps, common = 150, dict(steps=150, batch_size=8, save_every=5, eval_every=50,
                              log_every=None, lr=1e-3)
    _train(run, out=tmp_path / "straight", **common)
    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps(MICRO))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "apmae_gpu.cli", "train", str(run), "--preset", "tiny",
           "--model-config", str(cfg), "--steps", str(steps), "--batch-size", "8",
           "--save-every", "5", "--eval-every", "50", "--lr", "1e-3", "--device", "cpu",
           "--threads", "1", "--out", str(killed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "APMAE_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while latest_checkpoint(killed) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    at_kill = int(latest_checkpoint(killed).name.split("-")[1])
    assert at_kill < steps and not (killed / "final").exists()
    summary = _train(run, out=killed, resume=True, **common)
    assert summary["resumed_from"] is not None
    a = load_file(tmp_path / "straight/final/model.safetensors")
    b = load_file(killed / "final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def train_steps(out):
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return pd.DataFrame([r for r in recs if r["kind"] == "train"])

    s, k = train_steps(tmp_path / "straight"), train_steps(killed)
    assert list(k["step"]) == list(s["step"])  # nothing lost, nothing doubled
    assert np.allclose(k["loss"], s["loss"], rtol=0, atol=0)


def test_cli_train_prints_a_summary_and_reports_bad_input(run, tmp_path, capsys):
    cfg = tmp_path / "micro.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in MICRO.items()))
    main(["train", str(run), "--preset", "tiny", "--model-config", str(cfg), "--steps", "3",
          "--batch-size", "8", "--device", "cpu"])
    assert "validation MSE" in capsys.readouterr().out
    assert (run / "apmae/final/model.safetensors").exists()
    with pytest.raises(SystemExit) as exc:
        main(["train", str(run), "--preset", "paper", "--steps", "2", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "error: " in capsys.readouterr().err


@pytest.mark.gpu
def test_train_on_cuda_in_bf16(run):
    summary = _train(run, device="cuda", steps=6)
    assert summary["precision"] == "bf16-autocast" and summary["device"].startswith("cuda")
    assert np.isfinite(summary["final_loss"])
