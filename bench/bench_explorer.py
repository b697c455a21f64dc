"""Size and load time of the per-head explorer (``RUN/report/explorer.html``).

    python bench/bench_explorer.py                      # both sections
    python bench/bench_explorer.py --sections demo --window 64

Sections (results in bench/results/explorer-<machine>.{json,md}):

``demo``   a synthetic run shaped like the embedded demo (30 layers x 9 heads, 6 correct +
           6 incorrect per task: ~126 analysis inferences with maps of ``--window``
           tokens; embeddings: 8 x 8 block means of each map in the log-min-max space, so
           heads cluster by pattern), clustered by the real stage with the demo's settings
           (``configs/demo.yaml``); then ``write_explorer`` (seconds, bytes) and the page in
           headless Chromium (Playwright): load until ready, open a head, click a cluster.
``paper``  the size bound at paper scale: explorer data at its caps (``--bounds``: layers
           x heads x points; points each, ``explorer_clusters`` clusters each with a
           64-px typical map and examples, prompts of 840 characters) rendered by
           ``render_page``, then the same browser timing.  Real runs are at most this big.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from apmae_gpu import TASKS  # noqa: E402
from apmae_gpu.clustering.heads import cluster  # noqa: E402
from apmae_gpu.core.config import ReportConfig  # noqa: E402
from apmae_gpu.core.frames import update_manifest  # noqa: E402
from apmae_gpu.core.scaling import (  # noqa: E402
    log_minmax,
    scale_maps,  # noqa: E402
    stored_logs,
)
from apmae_gpu.core.store import MapStore  # noqa: E402
from apmae_gpu.encoding.encoder import EmbeddingWriter  # noqa: E402
from apmae_gpu.report.explorer import _png, typical_map  # noqa: E402
from apmae_gpu.report.explorer_page import render_page, write_explorer  # noqa: E402
from apmae_gpu.synthetic import (  # noqa: E402
    PATTERNS,
    causal_softmax,
    pattern_scores,
    synthetic_run,  # noqa: E402
)

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
        "--disable-dev-shm-usage"]


def browser_times(page_path: Path, shots: Path | None = None) -> dict:
    """Seconds to load the page (until its script has run), open the first head and click
    its first cluster, in headless Chromium with every network request refused."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = b.new_page(viewport={"width": 1400, "height": 900})
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(
            ("file:", "data:")) else r.abort())
        t0 = time.perf_counter()
        page.goto(page_path.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=120_000)
        load = time.perf_counter() - t0
        key = page.evaluate("Object.keys(D.heads).sort((a, b) => "
                            "D.heads[b].clusters.length - D.heads[a].clusters.length)[0]")
        t0 = time.perf_counter()
        page.fill("#search", key)
        page.press("#search", "Enter")
        page.locator(".cluster-card").first.click()
        page.wait_for_selector("#examples .example", timeout=60_000)
        head = time.perf_counter() - t0
        if shots:
            page.set_viewport_size({"width": 1280, "height": 1040})
            page.wait_for_timeout(1000)   # Plotly relayouts after a resize
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(shots / "explorer_view.png"))
            for w in (1400, 760):
                page.set_viewport_size({"width": w, "height": 900})
                page.wait_for_timeout(1000)
                page.screenshot(path=str(shots / f"explorer_{w}.png"), full_page=True)
        b.close()
    return {"load_s": round(load, 2), "open_head_and_cluster_s": round(head, 2), "head": key}


def demo_run(root: Path, window: int) -> Path:

    run = synthetic_run(root / "demo", n_layers=30, n_heads=9, window=window, n_train=1,
                        n_per_task=6, chunk_maps=270)
    store = MapStore(run)
    inf = store.inferences(columns=["inference_id", "split"])
    ids = inf.loc[inf["split"] == "analysis", "inference_id"].to_numpy()
    idx = store.index().set_index("inference_id")
    w = EmbeddingWriter(run, 30, 9, 64, block=256)
    lower = torch.ones(window, window, dtype=torch.bool).tril()
    f = window // 8
    for i in ids:
        x = torch.from_numpy(store.read(idx.loc[i, "map_id"].to_numpy()).astype(np.float32))
        logs, keep = stored_logs(x, "log", store.info.floor, valid=lower)
        y = log_minmax(logs, keep).reshape(270, 8, f, 8, f).mean((2, 4)).reshape(30, 9, 64)
        w.append(np.array([i]), y.numpy()[None])
    w.close()
    update_manifest(run, "capture", {"n_layers": 30, "n_heads": 9, "window": window,
                                     "scaler": "log", "model": {"spec": "random:tiny-llama"}})
    cluster(run, workers=1, umap_epochs=200, neighbors=10, min_samples=3, min_cluster_size=5,
            figures=False)
    return run


def bench_demo(window: int, shots: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = demo_run(Path(tmp), window)
        build = time.perf_counter() - t0
        rec = write_explorer(run, run / "report", ReportConfig())
        heads = pd.read_parquet(run / "cluster" / "heads.parquet")
        row = {"section": "demo", "heads": rec["heads"],
               "points_per_head": rec["points_per_head"],
               "clusters_per_head": round(float(heads["n_clusters"].mean()), 2),
               "page_MiB": round(rec["bytes"] / 2**20, 2),
               "json_MiB": round(rec["data_bytes"] / 2**20, 3),
               "write_s": rec["seconds"], "synthetic_run_s": round(build, 1)}
        row.update(browser_times(run / "report" / "explorer.html", shots))
    return row


def paper_data(heads: int, cfg: ReportConfig, layers: int) -> dict:
    """Explorer data at its caps for ``heads`` heads (every count at its maximum)."""

    rng = np.random.default_rng(0)
    pngs = []
    for k in range(12):   # typical maps of real patterns: PNG sizes like a real run's
        p = np.stack([causal_softmax(pattern_scores(PATTERNS[(k + j) % 5], 256, rng))
                      for j in range(4)]).astype(np.float32)
        stored = scale_maps(torch.from_numpy(p), "log").numpy().astype(np.float16)
        pngs.append(_png(typical_map(stored, "log", 2.0 ** -149, cfg.explorer_map_px)))
    n, c = cfg.explorer_points, cfg.explorer_clusters
    words = np.array(["public", "int", "return", "this.", "(", ")", "{", "}", ";", "value",
                      "String", "get", "x", "=", "new", "List<", ">", "if", "for", "i++"])
    text = lambda k: "".join(rng.choice(words, k // 4).tolist())[:k]   # noqa: E731
    inf = {"id": list(range(n)), "task": rng.integers(0, len(TASKS), n).tolist(),
           "correct": [bool(v) for v in rng.integers(0, 2, n)],
           "left": [text(600) for _ in range(n)], "right": [text(240) for _ in range(n)],
           "target": ["value"] * n, "predicted": ["val"] * n}
    per_layer = heads // layers
    grid = np.round(rng.random((layers, per_layer)), 6).tolist()
    hd = {}
    for h in range(heads):
        lab = rng.integers(-1, c, n)
        hd[f"L{h // per_layer}H{h % per_layer}"] = {
            "layer": h // per_layer, "head": h % per_layer, "n_clusters": c + 5,
            "n_points": 110_000, "share_clustered": 0.8, "umap_dims": 8,
            "row": list(range(n)), "x": np.round(rng.random(n), 3).tolist(),
            "y": np.round(rng.random(n), 3).tolist(), "cluster": lab.tolist(),
            "clusters": [{"cluster": k, "size": 5000, "share": 0.04, "n_correct": 2400,
                          "n_incorrect": 2600, "share_correct": 0.48,
                          "task_mix": {t: 450 for t in TASKS}, "sampled": 90,
                          "examples": np.flatnonzero(lab == k)[:cfg.explorer_examples].tolist(),
                          "map": pngs[(h + k) % len(pngs)], "map_members": 64}
                         for k in range(c)], "more_clusters": 5}
    return {"format": 1, "run": "paper-bound", "model": "synthetic", "tasks": list(TASKS),
            "settings": {k: getattr(cfg, k) for k in ReportConfig.model_fields
                         if k.startswith("explorer_")}, "n_layers": layers,
            "n_heads": per_layer, "metrics": {"clusters per head": grid, "share clustered": grid},
            "inferences": inf, "heads": hd, "missing": []}


def bench_paper(heads: int, layers: int, points: int) -> dict:
    cfg = ReportConfig(explorer_points=points)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "explorer.html"
        t0 = time.perf_counter()
        page.write_text(render_page(paper_data(heads, cfg, layers)), encoding="utf-8")
        row = {"section": f"bound ({layers} x {heads // layers} heads)", "heads": heads,
               "points_per_head": cfg.explorer_points,
               "clusters_per_head": cfg.explorer_clusters,
               "page_MiB": round(page.stat().st_size / 2**20, 1), "json_MiB": None,
               "write_s": round(time.perf_counter() - t0, 1), "synthetic_run_s": None}
        row.update(browser_times(page))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="demo,paper")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--bounds", default="30x24x2000,30x9x1430",
                    help="paper bound: layers x heads x points, comma separated (SC2-3B: "
                         "30x24, 2,000 points, the cap; the SmolLM2 study: 30x9, ~1,430)")
    ap.add_argument("--shots", type=Path, default=None, help="save demo screenshots here")
    a = ap.parse_args()
    rows = []
    if "demo" in a.sections:
        rows.append(bench_demo(a.window, a.shots))
        print(rows[-1], flush=True)
    if "paper" in a.sections:
        for bound in a.bounds.split(","):
            layers, per_layer, points = map(int, bound.split("x"))
            rows.append(bench_paper(layers * per_layer, layers, points))
            print(rows[-1], flush=True)
    save("explorer", {"rows": rows}, rows, notes=[
        "shared 2-core VM, no GPU; times include Chromium parsing the inline plotly.min.js",
        f"demo: synthetic maps of window {a.window}; paper bound: every cap at its maximum"])


if __name__ == "__main__":
    main()
