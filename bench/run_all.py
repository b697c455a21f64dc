"""Run every stage's benchmark, then summarise every result into one JSON + Markdown file.

    python bench/run_all.py                   # every bench, standard sizes (CPU: ~1-2 hours)
    python bench/run_all.py --quick           # smoke sizes (minutes; figures less stable)
    python bench/run_all.py --only train,cluster --timeout 3600
    python bench/run_all.py --dry-run         # print the commands only
    python bench/run_all.py --summary-only    # re-summarise bench/results/*.json

Each bench runs in its own process with a time limit (its output goes to
``bench/out/logs/<bench>.log``); a bench that fails or times out is recorded as such and the
others still run.  The benches adapt to the machine (a GPU when torch sees one) and write
``bench/results/<name>[-<machine>].{json,md}``.  Then every ``bench/results/*.json`` (this
run's and earlier ones, each with the machine it came from) is collected into
``bench/results/SUMMARY.json`` and ``SUMMARY.md``: this machine (CPU, GPU, versions), what ran
and how long it took, the ratios against each bench's baseline, and each bench's own table.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the repository on the path: no install needed)

from apmae_gpu.core.devices import describe_machine  # noqa: E402
from apmae_gpu.core.logs import versions  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LOGS = HERE / "out" / "logs"
SUMMARY = "SUMMARY"


@dataclass
class Bench:
    name: str
    script: str
    standard: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)
    what: str = ""


BENCHES = [
    Bench("mine", "bench_mine.py", ["--per-task", "50", "200"], ["--per-task", "20"],
          "tree-sitter mining of the JDK sources: tasks/s, files/s"),
    Bench("capture", "bench_capture.py", [], ["--repeat", "1", "--window", "128"],
          "attention capture + Zarr writes vs plain forward and the reference approach"),
    Bench("train", "bench_train.py", [],
          ["--steps", "1", "--warmup", "0", "--synthetic-inferences", "8",
           "--loader-batches", "5", "--learn-steps", "30"],
          "AP-MAE step throughput and FLOPs vs a reference-style model; loader; tiny learns"),
    Bench("cluster", "bench_cluster.py",
          ["--sections", "jit,umap,knn,hdbscan,demo", "--sizes", "5000,20000"],
          ["--sections", "umap,knn,hdbscan", "--sizes", "2000", "--dim", "128"],
          "per-head UMAP + HDBSCAN cost, kNN recall, the demo-shaped clustering run"),
    Bench("classify", "bench_classify.py", [], ["--quick"],
          "CatBoost CV + baselines + SHAP per task"),
    Bench("intervene", "bench_intervene.py", [],
          ["--models", "random:tiny-llama", "--repeats", "1", "--window", "128"],
          "held-out inferences/s with per-sample head ablation vs no hooks"),
    Bench("explorer", "bench_explorer.py", ["--window", "64"],
          ["--window", "64", "--bounds", "30x9x1430"],
          "report/explorer.html: bytes and Chromium load time, demo-shaped and at the caps"),
]


# --------------------------------------------------------------------------- running
def command(bench: Bench, quick: bool) -> list[str]:
    return [sys.executable, str(HERE / bench.script), *(bench.quick if quick else bench.standard)]


def run_one(bench: Bench, quick: bool, timeout: float) -> dict:
    """Run one bench in a subprocess; returns its status record."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{bench.name}.log"
    cmd = command(bench, quick)
    before = {p: p.stat().st_mtime for p in RESULTS.glob("*.json")}
    t0 = time.perf_counter()
    status = "ok"
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                cwd=HERE.parent, check=False).returncode
            if rc != 0:
                status = f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    seconds = round(time.perf_counter() - t0, 1)
    written = sorted(p.name for p in RESULTS.glob("*.json")
                     if p.stem != SUMMARY and before.get(p) != p.stat().st_mtime)
    if status == "ok" and not written:
        status = "ok, but wrote no result file"
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if status != "ok" else []
    print(f"{bench.name:10s} {status:28s} {seconds:8.1f} s  {', '.join(written)}"
          + (f"  last line: {tail[0][:120]}" if tail else ""), flush=True)
    return {"bench": bench.name, "command": " ".join(
                [str(Path(cmd[1]).relative_to(HERE.parent)), *cmd[2:]]), "status": status,
            "seconds": seconds, "results": written, "log": str(log.relative_to(HERE.parent))}


# --------------------------------------------------------------------------- summarising
def _rows(rec: dict) -> list[dict]:
    for key in ("table", "rows", "cases"):
        if isinstance(rec.get(key), list):
            return [r for r in rec[key] if isinstance(r, dict)]
    return []


def _walk(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}{k}.")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix[:-1], float(obj)


def ratios(name: str, rec: dict) -> list[dict]:
    """Ratios of each bench against its baseline (``x``: how many times better ours is)."""
    out = []

    def add(what, value, baseline):
        if value is not None and not math.isnan(value):
            out.append({"bench": name, "ratio": what, "x": round(value, 3),
                        "baseline": baseline})

    for key, v in _walk(rec.get("figures", {})):
        if "speedup" in key or "_vs_" in key:
            add(key, v, "the reference package's approach")
    learn = rec.get("figures", {}).get("learn") or {}
    if learn.get("val_mse"):
        add(f"{learn.get('preset', 'AP-MAE')} validation MSE: visible-mean baseline / AP-MAE",
            learn["visible_mean_mse"] / learn["val_mse"], "mean of the visible patches")
    rows = _rows(rec)
    for r in rows:
        if r.get("section") == "knn" and r.get("torch_exact_cpu_s"):
            add(f"kNN n={r['n']}: NN-descent s / exact torch kNN s", r["nndescent_s"] /
                r["torch_exact_cpu_s"], "umap-learn's NN-descent")
        if r.get("section") == "hdbscan" and r.get("sklearn_s") and r.get("hdbscan_pkg_s"):
            add(f"HDBSCAN n={r['n']}: scikit-learn s / hdbscan s", r["sklearn_s"] /
                r["hdbscan_pkg_s"], "scikit-learn's HDBSCAN")
        if "accuracy_catboost" in r and r.get("accuracy_logreg"):
            add(f"{r.get('case', '')} n={r.get('n')}: CatBoost / logistic-regression accuracy",
                r["accuracy_catboost"] / r["accuracy_logreg"], "one-hot logistic regression")
    demo = {r.get("workers"): r.get("wall_s") for r in rows if r.get("section") == "demo"}
    if demo.get(1) and demo.get(2):
        add("demo clustering: 1 worker s / 2 workers s", demo[1] / demo[2], "one worker")
    plain = {(r["model"], r["batch"]): r["inferences_per_s"] for r in rows
             if r.get("ablation") == "none" and "inferences_per_s" in r}
    for r in rows:
        key = (r.get("model"), r.get("batch"))
        if (str(r.get("ablation", "")).startswith("per-sample") and r.get("mode") == "first_token"
                and plain.get(key)):
            add(f"{key[0]} batch {key[1]}: ablated / plain inferences per s",
                r["inferences_per_s"] / plain[key], "the same forwards without hooks")
    return out


def _machine_name(m: dict) -> str:
    if not m:
        return "?"
    gpu = f", {m.get('gpu_count', 1)} x {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m.get('cpu', m.get('machine', '?'))} ({m.get('cpu_count', '?')} cores{gpu})"


def summarise(runs: list[dict]) -> dict:
    sys.path.insert(0, str(HERE.parent))

    results, all_ratios = {}, []
    for path in sorted(RESULTS.glob("*.json")):
        if path.stem == SUMMARY:
            continue
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            results[path.stem] = {"error": f"not valid JSON: {exc}"}
            continue
        results[path.stem] = {
            "file": path.name, "machine": rec.get("machine", {}),
            "date": rec.get("date") or time.strftime("%Y-%m-%d %H:%M",
                                                      time.localtime(path.stat().st_mtime)),
            "figures": rec.get("figures", {}), "rows": _rows(rec),
            "notes": [rec["notes"]] if isinstance(rec.get("notes"), str) else rec.get("notes", [])}
        all_ratios += [{**r, "result": path.stem, "machine": _machine_name(rec.get("machine", {}))}
                       for r in ratios(path.stem, rec)]
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": describe_machine(),
               "versions": versions(), "runs": runs, "ratios": all_ratios, "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{SUMMARY}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (RESULTS / f"{SUMMARY}.md").write_text(markdown(summary))
    return summary


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v).replace("|", "\\|")


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = list(dict.fromkeys(c for r in rows for c in r))
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows] + [""])


def markdown(s: dict) -> str:
    v = s["versions"]
    md = ["# Benchmarks: summary", "",
          f"Summarised {s['date']} on {_machine_name(s['machine'])}, "
          f"{s['machine'].get('mem_gib', '?')} GiB; apmae_gpu {v.get('apmae_gpu')}, python "
          f"{v.get('python')}, torch {v.get('torch')}"
          + "".join(f", {k} {v[k]}" for k in ("cuml-cu13", "umap-learn", "hdbscan", "catboost")
                    if k in v) + ".", "",
          ("Each result below names the machine it was measured on. CPU figures come from a "
           "shared machine: read them as lower bounds on throughput."), ""]
    if s["runs"]:
        md += ["## This run", ""] + _table([{k: r[k] for k in ("bench", "status", "seconds",
                                                                "results", "command")}
                                            for r in s["runs"]])
    md += ["## Ratios against the baselines", "",
           "`x`: how many times faster (or better) ours is than the baseline; below 1 it is worse.",
           ""] + (_table([{k: r[k] for k in ("result", "ratio", "x", "baseline", "machine")}
                          for r in s["ratios"]]) or ["(no ratios in the results yet)", ""])
    for name, r in s["results"].items():
        md += [f"## {name}", ""]
        if "error" in r:
            md += [r["error"], ""]
            continue
        md += [f"{_machine_name(r['machine'])}, {r['date']} (`bench/results/{r['file']}`)", ""]
        md += _table(r["rows"]) + [f"- {n}" for n in r["notes"]] + ([""] if r["notes"] else [])
    return "\n".join(md).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke sizes")
    ap.add_argument("--only", default="",
                    help=f"comma-separated benches: {','.join(b.name for b in BENCHES)}")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per bench (default 3600; 900 with --quick)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--summary-only", action="store_true", help="only re-summarise the results")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - {b.name for b in BENCHES})
    if unknown:
        ap.error(f"unknown bench(es) {', '.join(unknown)}; known: "
                 + ", ".join(b.name for b in BENCHES))
    chosen = [b for b in BENCHES if not names or b.name in names]
    if args.dry_run:
        for b in chosen:
            print(f"{b.name:10s} {' '.join(command(b, args.quick)[1:])}    # {b.what}")
        return
    runs = []
    if not args.summary_only:
        timeout = args.timeout or (900 if args.quick else 3600)
        for b in chosen:
            runs.append(run_one(b, args.quick, timeout))
    summary = summarise(runs)
    print(f"\n{len(summary['results'])} results, {len(summary['ratios'])} ratios -> "
          f"{RESULTS / (SUMMARY + '.md')} and {RESULTS / (SUMMARY + '.json')}")
    if any(r["status"] != "ok" for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
