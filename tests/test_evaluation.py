"""AP-MAE evaluation: baselines on the same masks, the table, figures, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from apmae_gpu.cli import main
from apmae_gpu.core import splits
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import read_manifest
from apmae_gpu.core.store import MapStore
from apmae_gpu.model import baselines, evaluation, training
from apmae_gpu.model.network import APMAEModel, pixel_valid_mask
from tests.tiny_models import MICRO, micro_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(path, seed=0, **kw):
    micro_model(seed, **kw).save_pretrained(path)
    return path


def test_visible_mean_baseline_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    patches = torch.rand(2, 36, 64, generator=g)
    valid = pixel_valid_mask(8, 8)
    mask = torch.zeros(2, 36)
    mask[:, ::2] = 1
    pred = baselines.visible_mean_prediction(patches, mask, valid)
    for b in range(2):
        vis = [n for n in range(36) if mask[b, n] == 0]
        for pix in (0, 7, 63):
            vals = [float(patches[b, n, pix]) for n in vis if valid[n, pix]]
            assert abs(float(pred[b, 5, pix]) - np.mean(vals)) < 1e-6
    assert torch.equal(pred[:, 0], pred[:, 35])  # one mean patch per map


def test_both_mse_definitions_on_a_hand_computed_case():
    """4x4 maps, 2x2 patches: a 2x2 grid's 3 lower patches (two diagonal, 1 padded pixel
    each).  Mask the diagonal patch 0 and the full patch 1; error 1 on every valid pixel of
    patch 0, 2 on every pixel of patch 1 (and garbage on the padding, never counted)."""
    model = micro_model(image_size=4, patch_size=2, mask_ratio=0.5)
    assert model.config.num_patches == 3
    target = torch.zeros(1, 3, 4)
    pred = torch.zeros(1, 3, 4)
    valid = model.pixel_valid.bool()            # [3, 4]; patch order (0,0), (1,0), (1,1)
    assert valid.sum(1).tolist() == [3, 4, 3]
    pred[0, 0] = torch.where(valid[0], 1.0, 9.0)
    pred[0, 1] = 2.0
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # valid pixels: (3 * 1 + 4 * 4) / 7; Table 2: the same sum over all 8 masked pixels
    assert float(model.forward_loss(target, pred, mask)) == pytest.approx(19 / 7)
    assert float(model.forward_loss(target, pred, mask, count_padding=True)) == \
        pytest.approx(19 / 8)


def test_evaluate_table_baselines_figures_and_manifest(run, tmp_path):
    a = _checkpoint(tmp_path / "a" / "final", seed=0)
    b = _checkpoint(tmp_path / "b", seed=1)
    table = evaluation.evaluate([a, b], [run], device="cpu", max_maps=60, batch_size=32)
    out = run / "evaluate"  # default: RUN/evaluate of the first --data
    saved = pd.read_parquet(out / "evaluation.parquet")
    assert {"checkpoint", "dataset", "method", "mse_mean", "mse_std", "n_maps"} <= set(saved)
    assert len(saved) == 2 * 1 * 3 and set(saved["method"]) == {"apmae", "visible_mean",
                                                                  "dataset_mean"}
    assert (saved["n_maps"] == len(splits.select_maps(MapStore(run), "validation", 60))).all()
    assert list(saved["checkpoint_name"].unique()) == ["a", "b"]
    # baselines do not depend on the checkpoint (same masks, same input space)
    base = saved[saved["method"] != "apmae"].pivot(index="method", columns="checkpoint_name",
                                                   values="mse_mean")
    assert np.allclose(base["a"], base["b"], rtol=0, atol=0)
    # the model's number equals a direct recomputation on the same maps and masks
    store = MapStore(run)
    sel = splits.select_maps(store, "validation", 60)
    maps = torch.from_numpy(store.read(sel["map_id"].to_numpy()))
    noise = torch.rand(len(sel), 36, generator=torch.Generator().manual_seed(0))
    model = APMAEModel.from_pretrained(b).eval()
    with torch.inference_mode():
        _, pred, mask = model(maps, noise=noise)
        mse = model.forward_loss(model.prepare(maps), pred, mask, per_map=True)
    row = table[(table["checkpoint_name"] == "b") & (table["method"] == "apmae")].iloc[0]
    assert abs(row["mse_mean"] - float(mse.mean())) < 1e-6
    assert row["mse_log_mean"] == pytest.approx(row["mse_mean"])  # log-min-max model
    with torch.inference_mode():
        padded = model.forward_loss(model.prepare(maps), pred, mask, per_map=True,
                                    count_padding=True)
    assert abs(row["mse_padded_mean"] - float(padded.mean())) < 1e-6
    assert row["mse_padded_mean"] < row["mse_mean"]
    per_map = pd.read_parquet(out / "evaluation_maps.parquet")
    assert len(per_map) == 2 * 3 * len(sel) and {"layer", "head", "inference_id"} <= set(per_map)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["reconstruction_a_on_run.png", "reconstruction_b_on_run.png"]
    assert (out / pngs[0]).stat().st_size > 10_000
    assert read_manifest(run)["evaluate"]["split"] == "validation"


def test_validation_split_is_the_one_training_held_out(run):
    training.train(run, preset="tiny", steps=2, batch_size=16, device="cpu", val_fraction=0.25,
                   model_config=MICRO)
    store = MapStore(run)
    _, val_ids, _ = splits.split_maps(store, 0.25)
    sel = splits.select_maps(store, "validation", 10_000)  # fraction read from the manifest
    assert np.array_equal(sel["map_id"].to_numpy(), val_ids)
    train = splits.select_maps(store, "train", 10_000)
    assert not set(train["inference_id"]) & set(sel["inference_id"])
    analysis = splits.select_maps(store, "analysis", 50, seed=1)
    assert len(analysis) == 50 and analysis["map_id"].is_monotonic_increasing


def test_raw_checkpoint_reports_log_space_mse_too(run, tmp_path):
    raw = _checkpoint(tmp_path / "raw", input_scaling="raw")
    table = evaluation.evaluate([raw], [run], out=tmp_path / "ev", device="cpu", max_maps=20,
                                figure_maps=1)
    ap = table[table["method"] == "apmae"].iloc[0]
    assert ap["input_scaling"] == "raw" and ap["mse_log_mean"] != ap["mse_mean"]
    assert (tmp_path / "ev" / "reconstruction_raw_on_run.png").exists()


def test_bad_input_is_a_clear_error(run, tmp_path):
    big = _checkpoint(tmp_path / "big", image_size=128, patch_size=16)
    with pytest.raises(ApmaeError, match="takes 128x128 maps; .* holds 64x64"):
        evaluation.evaluate([big], [run], device="cpu")
    with pytest.raises(ApmaeError, match="no AP-MAE checkpoint"):
        evaluation.evaluate([tmp_path / "nothing"], [run], device="cpu")
    ok = _checkpoint(tmp_path / "ok")
    with pytest.raises(ApmaeError, match="evaluate: split: input should be 'validation', "
                                         "'analysis' or 'all' \\(got 'test'\\)"):
        evaluation.evaluate([ok], [run], split="test", device="cpu")
    empty = tmp_path / "empty"
    MapStore.create_or_open(empty, window=64, scaler="log", fill_value=-18.42, floor=1e-8)
    with pytest.raises(ApmaeError, match="empty"):
        evaluation.evaluate([ok], [empty], device="cpu")


def test_cli_evaluate_takes_several_checkpoints_and_datasets(run, tmp_path, capsys):
    a = _checkpoint(tmp_path / "ck1")
    b = _checkpoint(tmp_path / "ck2", seed=2)
    run2 = tmp_path / "run2"
    shutil.copytree(run, run2)
    main(["evaluate", "--checkpoint", str(a), str(b), "--data", str(run), str(run2),
          "--out", str(tmp_path / "cross"), "--max-maps", "12", "--device", "cpu",
          "--split", "analysis", "--figure-maps", "0"])
    text = capsys.readouterr().out
    assert "Cross-evaluation" in text and "visible_mean" in text
    saved = pd.read_parquet(tmp_path / "cross" / "evaluation.parquet")
    assert len(saved) == 2 * 2 * 3 and set(saved["dataset_name"]) == {"run", "run2"}
    # identical data, identical masks: identical numbers on both datasets
    ap = saved[saved["method"] == "apmae"].pivot(index="checkpoint_name", columns="dataset_name",
                                                 values="mse_mean")
    assert np.allclose(ap["run"], ap["run2"], rtol=0, atol=0)
    assert not list((tmp_path / "cross").glob("*.png"))
