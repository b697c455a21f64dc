"""The per-head explorer page, ``RUN/report/explorer.html``, and its data,
``RUN/report/explorer.json`` (built by :func:`apmae_gpu.report.explorer.explorer_data`).

The page works offline from the file system: Plotly's bundled ``plotly.min.js`` (from the
``plotly`` package) and the data are inline, so it is one file, like ``index.html``.  The
head grid, one head's 2-D scatter and the cluster cards are Plotly figures and plain HTML;
the script only wires them (metric picker, colour-by, filters, head search, clicks).
"""

from __future__ import annotations

import html
import importlib.resources
import json
import logging
import time
from pathlib import Path

from apmae_gpu import __version__
from apmae_gpu.core import layout
from apmae_gpu.core.config import ReportConfig
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import atomic_path
from apmae_gpu.report.explorer import explorer_data

log = logging.getLogger("apmae_gpu.report.build")

EXPLORER = layout.EXPLORER_HTML
EXPLORER_JSON = layout.EXPLORER_JSON


def plotly_js() -> tuple[str, str]:
    """The text and version of Plotly's bundled ``plotly.min.js``."""
    try:
        path = importlib.resources.files("plotly") / "package_data" / "plotly.min.js"
        text = path.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ApmaeError(f"the explorer needs plotly's bundled plotly.min.js "
                         f"(pip install plotly): {exc}") from None
    head = text[:200].split("plotly.js v", 1)
    return text, head[1].split()[0] if len(head) > 1 else "?"


def _inline_json(obj) -> str:
    """JSON safe inside a ``<script>`` element (no ``</`` closes it early)."""
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


def render_page(data: dict) -> str:
    """The explorer's HTML over ``data`` (:func:`apmae_gpu.report.explorer.explorer_data`), with
    Plotly and the data inline; sets ``data["plotly"]`` to Plotly's version."""
    js, data["plotly"] = plotly_js()
    head, rest = (PAGE.replace("%TITLE%", html.escape(f"AP-MAE explorer: {data['run']}"))
                  .replace("%VERSION%", __version__).split("%PLOTLY_JS%"))
    middle, tail = rest.split("%DATA%")
    return "".join((head, js, middle, _inline_json(data), tail))


def write_explorer(run: Path, out_dir: Path, cfg: ReportConfig) -> dict:
    """Write ``explorer.json`` and ``explorer.html`` into ``out_dir``; returns what the
    manifest records (paths, sizes, heads, points, seconds)."""
    t0 = time.perf_counter()
    data = explorer_data(run, cfg)
    page = render_page(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in ((EXPLORER_JSON, json.dumps(data, separators=(",", ":"))),
                       (EXPLORER, page)):
        with atomic_path(out_dir / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
            tmp.chmod(0o644)
    rec = {"path": f"{out_dir.name}/{EXPLORER}", "data": f"{out_dir.name}/{EXPLORER_JSON}",
           "bytes": (out_dir / EXPLORER).stat().st_size,
           "data_bytes": (out_dir / EXPLORER_JSON).stat().st_size,
           "heads": len(data["heads"]), "points_per_head": len(data["inferences"].get("id", [])),
           "missing": data["missing"], "seconds": round(time.perf_counter() - t0, 2)}
    log.info("explorer: %s (%.1f MiB, %d heads, %d points per head, %.1f s)",
             out_dir / EXPLORER, rec["bytes"] / 2**20, rec["heads"], rec["points_per_head"],
             rec["seconds"])
    return rec


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d232b;margin:0;background:#fafafa}
header{padding:14px 20px 4px}h1{font-size:22px;margin:0}header p{margin:2px 0;color:#56606b}
a{color:#1f5fa8}.bar{display:flex;flex-wrap:wrap;gap:8px 16px;align-items:center;padding:6px 20px;
background:#fff;border-top:1px solid #e3e6ea;border-bottom:1px solid #e3e6ea}
.bar label{font-size:13px;color:#56606b}select,input{font:inherit;font-size:13px;padding:2px 4px}
main{display:grid;grid-template-columns:minmax(320px,1fr) minmax(380px,1.3fr);gap:14px;padding:12px 20px}
@media (max-width:900px){main{grid-template-columns:1fr}}
.panel{background:#fff;border:1px solid #e3e6ea;border-radius:6px;padding:8px 12px;min-width:0}
h2{font-size:17px;margin:4px 0}.note{color:#8a4b00;background:#fff4e0;border-left:4px solid #e6a23c;padding:6px 10px;margin:6px 20px}
.muted{color:#56606b;font-size:13px}#cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:8px}
.cluster-card{border:1px solid #e3e6ea;border-radius:5px;padding:6px;cursor:pointer;font-size:12px}
.cluster-card.selected{border-color:#1f5fa8;box-shadow:0 0 0 2px #1f5fa8 inset}
.cluster-card img{width:128px;height:128px;image-rendering:pixelated;display:block;margin:4px 0;border:1px solid #ddd}
.nomap{width:128px;height:128px;display:flex;align-items:center;justify-content:center;background:#f2f4f7;color:#8a939c;text-align:center;margin:4px 0}
.mix{display:flex;height:8px;margin-top:3px}.mix span{display:block;height:8px}
.example{border-top:1px solid #eceef1;padding:6px 0}.example pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;font-size:12px;max-height:9em;overflow:auto;background:#f7f8fa;padding:4px}
.hole{background:#ffe08a;border:1px solid #c99a00;padding:0 3px;font-weight:600}
.ok{color:#1a7f37}.bad{color:#b42318}
</style>
<script>%PLOTLY_JS%</script>
</head><body>
<header><h1>%TITLE%</h1><p id="subtitle"></p>
<p><a href="index.html">back to the report</a> · data: <a href="explorer.json">explorer.json</a></p></header>
<div id="notes"></div>
<div class="bar">
<label>colour heads by <select id="metric"></select></label>
<label>head <input id="search" size="8" placeholder="L12H3"></label>
<label>points by <select id="colorby"><option value="cluster">cluster</option><option value="task">task</option><option value="correct">correct / incorrect</option></select></label>
<label>task <select id="task"><option value="">all</option></select></label>
<label>correctness <select id="correct"><option value="">all</option><option value="1">correct</option><option value="0">incorrect</option></select></label>
<label>min cluster size <input id="minsize" type="number" min="0" value="0" style="width:5em"></label>
<span id="searchmsg" class="muted"></span>
</div>
<main>
<div class="panel"><h2>Heads</h2><p class="muted">layers x heads; hover for a head's numbers, click to open it.</p><div id="grid"></div></div>
<div class="panel" id="headpanel"><h2 id="head-title">No head open</h2><p id="head-facts" class="muted">Click a head in the grid or type one (L12H3).</p>
<div id="scatter"></div></div>
<div class="panel"><h2>Clusters</h2><p class="muted" id="cards-note"></p><div id="cards"></div></div>
<div class="panel"><h2 id="examples-title">Examples</h2><div id="examples" class="muted">Click a cluster or a point.</div></div>
</main>
<footer class="muted" style="padding:0 20px 20px">apmae_gpu %VERSION%, Plotly <span id="plotlyv"></span> (inline)</footer>
<script id="explorer-data" type="application/json">%DATA%</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("explorer-data").textContent);
const $ = id => document.getElementById(id);
const INF = D.inferences, PALETTE = ["#1f77b4","#ff7f0e","#2ca02c","#d62728","#9467bd","#8c564b","#e377c2","#7f7f7f","#bcbd22","#17becf","#393b79","#637939"];
let cur = null, selCluster = null;
$("plotlyv").textContent = D.plotly || "";
$("subtitle").textContent = [D.model, D.run, Object.keys(D.heads).length + " clustered heads",
  (INF.id || []).length + " sampled inferences per head (cap " + D.settings.explorer_points + ")"].filter(Boolean).join(" · ");
for (const m of D.missing) { const p = document.createElement("p"); p.className = "note"; p.textContent = m; $("notes").appendChild(p); }
for (const m of Object.keys(D.metrics)) $("metric").add(new Option(m, m));
if (D.metrics["SHAP importance: mean of tasks"]) $("metric").value = "SHAP importance: mean of tasks";
D.tasks.forEach((t, i) => $("task").add(new Option(t, String(i))));
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const fmt = v => v === null || v === undefined ? "–" : (typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(3) : String(v));
function headFacts(l, h) {
  return Object.keys(D.metrics).map(m => m + ": " + fmt((D.metrics[m][l] || [])[h])).join("<br>");
}
function drawGrid() {
  const m = $("metric").value;
  if (!m) { $("grid").textContent = "no clustered heads"; return; }
  const z = D.metrics[m], L = D.n_layers, H = D.n_heads;
  const text = z.map((row, l) => row.map((v, h) => "L" + l + "H" + h + "<br>" + headFacts(l, h)));
  Plotly.react("grid", [{type: "heatmap", z: z, text: text, hoverinfo: "text", colorscale: "Viridis",
    xgap: 1, ygap: 1, colorbar: {title: {text: m, side: "right"}, thickness: 12}}],
    {margin: {l: 50, r: 10, t: 10, b: 40}, height: Math.max(260, Math.min(700, 18 * L + 80)),
     xaxis: {title: {text: "head"}, dtick: H > 20 ? 4 : 1}, yaxis: {title: {text: "layer"}, dtick: L > 20 ? 4 : 1}},
    {displaylogo: false, responsive: true});
}
$("metric").onchange = drawGrid;
function pointOk(r) {
  const t = $("task").value, c = $("correct").value;
  if (t !== "" && INF.task[r] !== Number(t)) return false;
  if (c !== "" && INF.correct[r] !== (c === "1")) return false;
  return true;
}
function visibleClusters(hd) {
  const min = Number($("minsize").value) || 0;
  return new Set(hd.clusters.filter(c => c.size >= min).map(c => c.cluster));
}
function drawScatter() {
  if (!cur) return;
  const hd = D.heads[cur], by = $("colorby").value, vis = visibleClusters(hd), groups = new Map();
  hd.row.forEach((r, i) => {
    if (!pointOk(r)) return;
    let c = hd.cluster[i];
    if (c >= 0 && !vis.has(c) && hd.clusters.some(x => x.cluster === c)) return;
    const key = by === "cluster" ? (c < 0 ? "noise" : "cluster " + c)
      : by === "task" ? D.tasks[INF.task[r]] : (INF.correct[r] === null ? "no target" : INF.correct[r] ? "correct" : "incorrect");
    if (!groups.has(key)) groups.set(key, {x: [], y: [], idx: [], text: []});
    const g = groups.get(key);
    g.x.push(hd.x[i]); g.y.push(hd.y[i]); g.idx.push(i);
    g.text.push("#" + INF.id[r] + " " + D.tasks[INF.task[r]] + " · " + (c < 0 ? "noise" : "cluster " + c) + " · " +
      (INF.correct[r] === null ? "no target" : INF.correct[r] ? "correct" : "incorrect"));
  });
  const keys = [...groups.keys()].sort((a, b) => (a === "noise") - (b === "noise") || a.localeCompare(b, undefined, {numeric: true}));
  const traces = keys.map((k, j) => {
    const g = groups.get(k), faded = selCluster !== null && by === "cluster" && k !== "cluster " + selCluster;
    return {type: "scatter", mode: "markers", name: k, x: g.x, y: g.y, customdata: g.idx, text: g.text, hoverinfo: "text",
      marker: {size: 6, opacity: faded ? 0.2 : 0.85, color: k === "noise" || k === "no target" ? "#b8bec6" :
        k === "correct" ? "#1a7f37" : k === "incorrect" ? "#b42318" : PALETTE[j % PALETTE.length]}};
  });
  Plotly.react("scatter", traces, {margin: {l: 30, r: 10, t: 10, b: 30}, height: 380, legend: {font: {size: 11}},
    xaxis: {title: {text: hd.umap_dims === 2 ? "UMAP 1" : "PC 1 of UMAP"}, zeroline: false},
    yaxis: {title: {text: hd.umap_dims === 2 ? "UMAP 2" : "PC 2 of UMAP"}, zeroline: false}}, {displaylogo: false, responsive: true});
  $("scatter").removeAllListeners && $("scatter").removeAllListeners("plotly_click");
  $("scatter").on("plotly_click", ev => {
    const i = ev.points[0].customdata, r = hd.row[i], c = hd.cluster[i];
    const card = hd.clusters.find(x => x.cluster === c);
    showExamples("inference #" + INF.id[r] + (c >= 0 ? " (cluster " + c + ")" : " (noise)"),
      [r].concat(card ? card.examples.filter(e => e !== r) : []));
  });
}
function mixBar(mix) {
  const tot = Object.values(mix).reduce((a, b) => a + b, 0) || 1;
  return '<div class="mix" title="' + esc(Object.entries(mix).map(([t, n]) => t + ": " + n).join(", ")) + '">' +
    Object.entries(mix).map(([t, n]) => '<span style="width:' + (100 * n / tot) + '%;background:' +
      PALETTE[D.tasks.indexOf(t) % PALETTE.length] + '"></span>').join("") + "</div>";
}
function drawCards() {
  const hd = D.heads[cur], vis = visibleClusters(hd), t = $("task").value;
  $("cards").innerHTML = "";
  for (const c of hd.clusters) {
    if (!vis.has(c.cluster)) continue;
    if (t !== "" && !c.task_mix[D.tasks[Number(t)]]) continue;
    const div = document.createElement("div");
    div.className = "cluster-card" + (c.cluster === selCluster ? " selected" : "");
    div.dataset.cluster = c.cluster;
    const top = Object.entries(c.task_mix).sort((a, b) => b[1] - a[1]).slice(0, 3).map(([k, n]) => k + " " + n).join(", ");
    div.innerHTML = "<b>cluster " + c.cluster + "</b> · " + c.size + " maps (" + (100 * c.share).toFixed(1) + "%)<br>" +
      "correct: " + (c.share_correct === null ? "–" : (100 * c.share_correct).toFixed(0) + "% of " + (c.n_correct + c.n_incorrect)) +
      (c.map ? '<img class="typical-map" alt="typical map of cluster ' + c.cluster + '" title="mean of ' + c.map_members +
        ' sampled members (log-min-max)" src="' + c.map + '">' : '<div class="nomap">' + (D.missing.some(m => m.startsWith("typical maps")) ?
        "no maps kept" : "no sampled member") + "</div>") + mixBar(c.task_mix) + '<span class="muted">' + esc(top) + "</span>";
    div.onclick = () => selectCluster(c.cluster);
    $("cards").appendChild(div);
  }
  $("cards-note").textContent = hd.clusters.length + " of " + hd.n_clusters + " clusters detailed (largest first" +
    (hd.more_clusters ? "; " + hd.more_clusters + " smaller ones not shown" : "") + "); numbers over every member, maps and examples from the sample.";
}
function selectCluster(c) {
  selCluster = c;
  const card = D.heads[cur].clusters.find(x => x.cluster === c);
  drawCards(); drawScatter();
  showExamples("cluster " + c + " of " + cur, card.examples);
}
function showExamples(title, rows) {
  $("examples-title").textContent = "Examples: " + title;
  rows = rows.filter(pointOk);
  $("examples").innerHTML = rows.length ? "" : "no example passes the filters";
  for (const r of rows) {
    const div = document.createElement("div"), ok = INF.correct[r];
    div.className = "example";
    div.dataset.inference = INF.id[r];
    const hole = INF.target[r] === null ? "⟦hole · no target (noise) · predicted " + JSON.stringify(INF.predicted[r]) + "⟧"
      : "⟦hole · target " + JSON.stringify(INF.target[r]) + " · predicted " + JSON.stringify(INF.predicted[r]) + "⟧";
    div.innerHTML = "<b>#" + INF.id[r] + "</b> " + esc(D.tasks[INF.task[r]]) + " · " +
      (ok === null ? '<span class="muted">no target</span>' : ok ? '<span class="ok">correct</span>' : '<span class="bad">incorrect</span>') +
      "<pre>…" + esc(INF.left[r]) + '<span class="hole">' + esc(hole) + "</span>" + esc(INF.right[r]) + "</pre>";
    $("examples").appendChild(div);
  }
}
function openHead(key) {
  if (!D.heads[key]) { $("searchmsg").textContent = key + ": not a clustered head"; return false; }
  $("searchmsg").textContent = "";
  cur = key; selCluster = null;
  const hd = D.heads[key];
  $("head-title").textContent = "Head " + key + ": " + hd.n_clusters + " clusters";
  $("head-title").dataset.nClusters = hd.n_clusters;
  $("head-facts").innerHTML = "layer " + hd.layer + ", head " + hd.head + " · " + hd.n_points + " maps clustered by UMAP (" + hd.umap_dims +
    " dims) + HDBSCAN, " + (100 * hd.share_clustered).toFixed(1) + "% in a cluster · showing " + hd.row.length + " sampled points<br>" + headFacts(hd.layer, hd.head);
  drawScatter(); drawCards();
  $("examples").textContent = "Click a cluster or a point.";
  return true;
}
$("search").onkeydown = ev => {
  if (ev.key !== "Enter") return;
  const m = /^\s*L\s*(\d+)\s*[H:,\s]\s*H?\s*(\d+)\s*$/i.exec(ev.target.value);
  if (!m) { $("searchmsg").textContent = "type a head as L12H3"; return; }
  openHead("L" + Number(m[1]) + "H" + Number(m[2]));
};
for (const id of ["colorby", "task", "correct", "minsize"]) $(id).onchange = () => {
  if (!cur) return;
  drawScatter(); drawCards();
  const card = D.heads[cur].clusters.find(x => x.cluster === selCluster);
  if (card) showExamples("cluster " + selCluster + " of " + cur, card.examples);
};
drawGrid();
if ($("grid").on) $("grid").on("plotly_click", ev => openHead("L" + ev.points[0].y + "H" + ev.points[0].x));
document.body.dataset.ready = "1";
</script>
</body></html>
"""
