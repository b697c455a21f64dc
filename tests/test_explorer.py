"""The per-head explorer (report/explorer.html, report/explorer.json): its data equal the
run's frames, its sample is capped, typical maps are the mean in the log-min-max space, it
says what is missing, and the page works in a real browser with the network off."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from apmae_gpu.core.config import ReportConfig
from apmae_gpu.core.frames import read_manifest
from apmae_gpu.core.scaling import scale_maps
from apmae_gpu.report.explorer import explorer_data, head_key, to_2d, typical_map
from apmae_gpu.synthetic import causal_softmax, pattern_scores

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-quic", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def data(e2e_run):
    path = e2e_run / "report" / "explorer.json"
    assert path.exists(), "the pipeline's report stage did not write the explorer's data"
    return json.loads(path.read_text())


def _png_shape(uri: str) -> tuple[int, ...]:
    import matplotlib.image

    assert uri.startswith("data:image/png;base64,")
    return matplotlib.image.imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).shape


def test_explorer_data_equal_the_runs_frames(data, e2e_run):
    heads = pd.read_parquet(e2e_run / "cluster" / "heads.parquet")
    ok = heads[heads["status"] == "ok"]
    assert sorted(data["heads"]) == sorted(head_key(r.layer, r.head) for r in ok.itertuples())
    clusters = pd.read_parquet(e2e_run / "clusters.parquet")
    summary = pd.read_parquet(e2e_run / "cluster" / "clusters_summary.parquet")
    inf = data["inferences"]
    assert len(inf["id"]) == clusters["inference_id"].nunique()   # 44 < the cap: all of them
    for r in ok.itertuples():
        hd = data["heads"][head_key(r.layer, r.head)]
        assert hd["n_clusters"] == r.n_clusters and hd["n_points"] == r.n_points
        # Each point's cluster is its row of clusters.parquet (after the size/distance filter).
        mine = clusters[(clusters["layer"] == r.layer) & (clusters["head"] == r.head)]
        want = mine.set_index("inference_id")["cluster"].reindex(
            [inf["id"][i] for i in hd["row"]]).to_numpy()
        assert hd["cluster"] == want.tolist()
        assert min(hd["x"]) == 0.0 and max(hd["x"]) == 1.0 and len(hd["y"]) == len(hd["row"])
        kept = summary[(summary["layer"] == r.layer) & (summary["head"] == r.head)
                       & summary["kept"]].set_index("cluster")
        for c in hd["clusters"]:
            s = kept.loc[c["cluster"]]
            assert (c["size"], c["n_correct"], c["n_incorrect"]) == (
                s["size"], s["n_correct"], s["n_incorrect"])
            assert sum(c["task_mix"].values()) == c["size"]
            members = {i for i, k in zip(hd["row"], hd["cluster"]) if k == c["cluster"]}
            assert c["examples"] and set(c["examples"]) <= members
            assert _png_shape(c["map"])[:2] == (64, 64)   # window 64, explorer_map_px 64
    metric = data["metrics"]["clusters per head"]
    assert [[metric[r.layer][r.head] for r in ok.itertuples()]] == [ok["n_clusters"].tolist()]
    imp = pd.read_parquet(e2e_run / "classify" / "head_importance.parquet")
    task = imp["task"].iloc[0]
    row = imp[imp["task"] == task].iloc[0]
    assert data["metrics"][f"SHAP importance: {task}"][row["layer"]][row["head"]] == \
        pytest.approx(row["importance"], rel=1e-5)
    assert read_manifest(e2e_run)["report"]["explorer"]["heads"] == len(ok)


def test_prompts_mark_the_hole_with_target_and_prediction(data, e2e_run):
    inf = data["inferences"]
    rows = pd.read_parquet(e2e_run / "inferences.parquet").set_index("inference_id")
    judged = [i for i, c in enumerate(inf["correct"]) if c is not None]
    assert judged and any(c is None for c in inf["correct"])           # noise has no target
    for i in judged:
        r = rows.loc[inf["id"][i]]
        assert inf["target"][i] and inf["predicted"][i] and inf["left"][i]
        assert (inf["target"][i] == inf["predicted"][i]) == (
            r["target_token_id"] == r["predicted_token_id"]) == bool(r["correct"])


def test_the_point_sample_is_capped_and_shared(e2e_run):
    cfg = ReportConfig(explorer_points=10, explorer_clusters=1, explorer_examples=2,
                       explorer_map_px=16)
    d = explorer_data(e2e_run, cfg)
    assert len(d["inferences"]["id"]) == 10
    assert d["settings"]["explorer_points"] == 10
    for hd in d["heads"].values():
        assert sorted(hd["row"]) == list(range(10))          # the same inferences everywhere
        assert len(hd["clusters"]) <= 1 and hd["more_clusters"] == hd["n_clusters"] - 1
        for c in hd["clusters"]:
            assert len(c["examples"]) <= 2
            assert c["map"] is None or _png_shape(c["map"])[:2] == (16, 16)
    again = explorer_data(e2e_run, cfg)
    assert again["inferences"]["id"] == d["inferences"]["id"]   # seeded


def test_typical_map_is_the_mean_in_log_minmax_space():
    rng = np.random.default_rng(0)
    p = np.stack([causal_softmax(pattern_scores(k, 32, rng)) for k in
                  ("diagonal", "sink", "diagonal")]).astype(np.float32)
    logs = np.log(np.where(p > 0, p, np.nan))
    lower = np.tril(np.ones((32, 32), bool))
    m = np.nanmin(np.where(lower, logs, np.nan), axis=(1, 2), keepdims=True)
    want = np.where(lower & (p > 0), (logs - m) / (-m), 0.0).mean(0)
    stored = scale_maps(torch.from_numpy(p), "log").numpy().astype(np.float16)
    got = typical_map(stored, "log", 2.0 ** -149, 32)
    assert np.isnan(got[~lower]).all()
    np.testing.assert_allclose(got[lower], want[lower], atol=3e-3)
    assert got[lower].max() <= 1 and got[lower].min() >= 0
    small = typical_map(stored, "log", 2.0 ** -149, 8)   # 4 x 4 blocks averaged
    assert small.shape == (8, 8)
    np.testing.assert_allclose(small[3, 0], np.nanmean(got[12:16, 0:4]), atol=1e-6)
    # Negative control: a different set of maps gives a different mean.
    other = typical_map(stored[1:2], "log", 2.0 ** -149, 32)
    assert np.abs(other[lower] - want[lower]).max() > 0.1


def test_2d_layout_of_umap_coordinates():
    rng = np.random.default_rng(1)
    flat = rng.normal(size=(50, 2))
    np.testing.assert_allclose(to_2d(flat)[:, 0], np.round(
        (flat[:, 0] - flat[:, 0].min()) / np.ptp(flat[:, 0]), 3))
    line = np.outer(rng.normal(size=60), rng.normal(size=8))   # rank 1: PC 2 is ~constant
    xy = to_2d(line)
    assert xy.shape == (60, 2) and xy.min() >= 0 and xy.max() <= 1
    assert abs(np.corrcoef(xy[:, 0], line[:, 0])[0, 1]) > 0.999


def test_missing_stages_and_maps_are_named(e2e_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(e2e_run, run, ignore=shutil.ignore_patterns("maps.zarr", "apmae"))
    d = explorer_data(run, ReportConfig())
    assert any(m.startswith("typical maps: this run keeps no attention maps of the") for m in d["missing"])
    assert d["heads"] and all(c["map"] is None for hd in d["heads"].values()
                              for c in hd["clusters"])
    shutil.rmtree(run / "cluster")
    d = explorer_data(run, ReportConfig())
    assert d["heads"] == {} and d["missing"] == [
        "stage not run: cluster (no cluster/heads.parquet in this run)"]


# --------------------------------------------------------------------------- in Chromium
GRID_CELL = """([layer, head]) => {
  const gd = document.getElementById("grid"), fl = gd._fullLayout, r = gd.getBoundingClientRect();
  return {x: r.left + fl._size.l + fl.xaxis.l2p(head), y: r.top + fl._size.t + fl.yaxis.l2p(layer)};
}"""


def test_explorer_in_chromium(e2e_run, data, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="no playwright (pip install 'apmae_gpu[test]')")
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    heads = pd.read_parquet(e2e_run / "cluster" / "heads.parquet")
    target = next(heads[heads["status"] == "ok"].iloc[::-1].itertuples())
    key = head_key(target.layer, target.head)
    page_path = e2e_run / "report" / "explorer.html"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors, remote = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
                ("file:", "data:")) else (remote.append(route.request.url), route.abort()))
            page.goto(page_path.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            # Click the head in the grid (a Plotly heatmap cell).
            xy = page.evaluate(GRID_CELL, [int(target.layer), int(target.head)])
            page.mouse.click(xy["x"], xy["y"])
            page.wait_for_function(f"document.getElementById('head-title').textContent"
                                   f".startsWith('Head {key}:')", timeout=10_000)
            n = page.get_attribute("#head-title", "data-n-clusters")
            assert int(n) == int(target.n_clusters)
            assert page.locator("#scatter .scatterlayer, #scatter canvas").count() > 0
            # Click a cluster: its typical map is an image that decoded; examples show holes.
            page.locator(".cluster-card").first.click()
            img = page.locator(".cluster-card.selected img.typical-map")
            assert img.evaluate("i => i.complete && i.naturalWidth") == 64
            first = page.locator("#examples .example").first
            hole = first.locator(".hole").inner_text()
            inf = data["inferences"]
            row = inf["id"].index(int(first.get_attribute("data-inference")))
            assert hole.startswith("⟦hole")
            if inf["target"][row] is not None:
                assert json.dumps(inf["target"][row]) in hole
            # The correctness filter keeps the cluster's correct examples only.
            page.select_option("#correct", "1")
            shown = page.locator("#examples .example")
            want = [r for r in data["heads"][key]["clusters"][0]["examples"]
                    if inf["correct"][r] is True]
            assert shown.count() == len(want)
            assert page.locator("#examples .example .bad").count() == 0
            page.select_option("#correct", "")
            # The head search box opens a head too; a bad one says so in one line.
            page.fill("#search", "L0H0")
            page.press("#search", "Enter")
            assert page.inner_text("#head-title").startswith("Head L0H0:")
            page.fill("#search", "L99H0")
            page.press("#search", "Enter")
            assert page.inner_text("#searchmsg") == "L99H0: not a clustered head"
            for width in (1280, 720):
                page.set_viewport_size({"width": width, "height": 900})
                page.wait_for_timeout(300)   # Plotly relayouts after a resize
                page.screenshot(path=str(tmp_path / f"explorer_{width}.png"), full_page=True)
                assert (tmp_path / f"explorer_{width}.png").stat().st_size > 10_000
            assert errors == [] and remote == []
        finally:
            browser.close()
