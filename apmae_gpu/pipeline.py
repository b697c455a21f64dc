"""The whole study from one config: mine -> capture (train, analysis) -> train -> evaluate ->
encode -> cluster -> classify -> intervene -> report.

A stage whose outputs are complete and whose settings (and those of every stage before it)
are unchanged is skipped, so a rerun after a kill resumes; the stages themselves resume from
their own checkpoints.  ``RUN/pipeline.json`` records each stage's settings key, status and
time; the end prints where the report is, the headline numbers and time per stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from apmae_gpu.capture import maps as capture
from apmae_gpu.classification import classifier as classification
from apmae_gpu.clustering import heads as clustering
from apmae_gpu.core import layout
from apmae_gpu.core.config import STAGES, PipelineConfig, load_config
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import read_manifest, update_manifest, write_json
from apmae_gpu.core.layout import check_out_dir
from apmae_gpu.core.locks import writer_lock
from apmae_gpu.encoding import encoder as encoding
from apmae_gpu.intervention import ablation as intervention
from apmae_gpu.mining import tasks as mining
from apmae_gpu.model import evaluation, training
from apmae_gpu.report import build as report

log = logging.getLogger("apmae_gpu.pipeline")

STATE = layout.PIPELINE_JSON

# What each stage must have left for it to count as complete.
OUTPUTS = {
    "mine": [layout.TASKS_PARQUET],
    "capture_train": [layout.MAPS_ZARR, layout.INFERENCES_PARQUET],
    "capture_analysis": [layout.MAPS_ZARR, layout.INFERENCES_PARQUET],
    "train": ["apmae/final/config.json"],
    "evaluate": ["evaluate/evaluation.parquet"],
    "encode": [layout.EMBEDDINGS_ZARR],
    "cluster": [layout.CLUSTERS_PARQUET],
    "classify": ["classify/metrics.parquet", "classify/head_importance.parquet"],
    "intervene": ["intervene/results.parquet"],
    "report": ["report/index.html"],
}
# The config sections each stage depends on (besides the top-level model/seed).
SECTIONS = {
    "mine": ["mine"], "capture_train": ["capture"], "capture_analysis": ["capture"],
    "train": ["train"], "evaluate": ["evaluate"], "encode": ["encode"], "cluster": ["cluster"],
    "classify": ["classify"], "intervene": ["intervene"], "report": ["report"],
}


def stage_order(cfg: PipelineConfig) -> list[str]:
    """The stages in the order they run: with ``capture.encode_analysis`` the analysis split
    is captured after AP-MAE training, encoded in the same pass, and ``encode`` is not run."""
    order = list(STAGES)
    if cfg.capture.encode_analysis:
        order.remove("capture_analysis")
        order.remove("encode")
        order.insert(order.index("train") + 1, "capture_analysis")
    return order


def stage_keys(cfg: PipelineConfig) -> dict[str, str]:
    """A key per stage that changes when its settings, or any earlier stage's, change."""
    keys, prev = {}, json.dumps({"model": cfg.model, "seed": cfg.seed}, sort_keys=True)
    dump = cfg.model_dump(mode="json")
    for stage in stage_order(cfg):
        # the number of processes never changes a capture's or encoding's result
        part = {s: {k: v for k, v in dump[s].items() if not (k == "nproc" and s != "train")}
                for s in SECTIONS[stage]}
        prev = hashlib.sha256((prev + json.dumps(part, sort_keys=True)).encode()).hexdigest()[:16]
        keys[stage] = prev
    return keys


def _complete(run: Path, stage: str) -> bool:
    if not all((run / p).exists() for p in OUTPUTS[stage]):
        return False
    if stage.startswith("capture_"):
        split = stage.split("_", 1)[1]
        return split in read_manifest(run).get("capture", {}).get("splits", {})
    return True


# --------------------------------------------------------------------------- stages
# Each runner passes its stage the config section; a stage on several processes is the
# stage's command under torchrun, reading the same section from the config used (the
# settings as resolved, base files merged: RUN/CONFIG_USED).
CONFIG_USED = layout.PIPELINE_CONFIG_JSON


def _mine(cfg: PipelineConfig, run: Path, fresh: bool) -> None:
    if fresh and (run / layout.MAPS_ZARR).exists():
        raise ApmaeError(f"the mine settings changed but {run} already holds captured maps; "
                         "use a new --out")
    mining.mine(run, cfg.mine, model=cfg.model, seed=cfg.seed,
                trust_remote_code=cfg.trust_remote_code, capture=cfg.capture,
                intervene=cfg.intervene)


def _capture(split: str):
    def run_split(cfg: PipelineConfig, run: Path, fresh: bool) -> None:
        c = cfg.capture
        one_pass = split == "analysis" and c.encode_analysis
        encode_with = run / layout.APMAE_DIR / layout.FINAL_DIR if one_pass else None
        if c.nproc > 1:
            argv = ["capture", str(run), "--model", cfg.model, "--split", split]
            argv += ["--encode-with", str(encode_with)] if encode_with is not None else []
            return _torchrun(cfg, run, c.nproc, argv, f"capture of the {split} split")
        capture.capture(run, cfg.model, c, split=split, device=cfg.device, seed=cfg.seed,
                        trust_remote_code=cfg.trust_remote_code, encode_with=encode_with)
    return run_split


def _torchrun(cfg: PipelineConfig, run: Path, nproc: int, argv: list[str], what: str) -> None:
    """Run ``apmae ARGV --config RUN/CONFIG_USED`` on ``nproc`` processes of one machine
    (torch's launcher): the command reads its settings from the config used, written here."""
    write_json(run / CONFIG_USED, cfg.model_dump(mode="json"))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "apmae_gpu.cli", *argv,
            "--config", str(run / CONFIG_USED)]
    log.info("launching %s", " ".join(argv))
    if subprocess.call(argv) != 0:
        raise ApmaeError(f"distributed {what} failed (see its output above)")


def _train(cfg: PipelineConfig, run: Path, fresh: bool) -> None:
    out = run / layout.APMAE_DIR
    if fresh and out.exists():
        log.info("train settings changed: starting AP-MAE training afresh")
        shutil.rmtree(out)
    resume = (out / layout.CHECKPOINTS_DIR).exists() and any((out / layout.CHECKPOINTS_DIR).iterdir())
    if cfg.train.nproc > 1:
        argv = ["train", str(run)] + ["--resume"] * resume
        return _torchrun(cfg, run, cfg.train.nproc, argv, "AP-MAE training")
    training.train(run, cfg.train, resume=resume, device=cfg.device, seed=cfg.seed)


def _evaluate(cfg: PipelineConfig, run: Path, fresh: bool) -> None:
    e = cfg.evaluate
    evaluation.evaluate([run / layout.APMAE_DIR / layout.FINAL_DIR, *map(Path, e.checkpoints)],
                        [run, *map(Path, e.data)], e, out=run / layout.EVALUATE_DIR, device=cfg.device,
                        seed=cfg.seed)


def _encode(cfg: PipelineConfig, run: Path, fresh: bool) -> None:
    if cfg.encode.nproc > 1:
        argv = ["encode", str(run)] + ["--restart"] * fresh
        return _torchrun(cfg, run, cfg.encode.nproc, argv, "encoding")
    encoding.encode(run, cfg.encode, device=cfg.device, restart=fresh)


def _cluster(cfg: PipelineConfig, run: Path, fresh: bool) -> None:
    clustering.cluster(run, cfg.cluster, seed=cfg.seed, restart=fresh)


def _classify(cfg: PipelineConfig, run: Path, fresh: bool) -> None:
    classification.classify(run, cfg.classify, seed=cfg.seed)


def _intervene(cfg: PipelineConfig, run: Path, fresh: bool) -> None:
    intervention.intervene(run, cfg.intervene, model=cfg.model, device=cfg.device, seed=cfg.seed)


def _report(cfg: PipelineConfig, run: Path, fresh: bool) -> None:
    report.report(run, cfg.report)


RUNNERS = {"mine": _mine, "capture_train": _capture("train"),
           "capture_analysis": _capture("analysis"), "train": _train, "evaluate": _evaluate,
           "encode": _encode, "cluster": _cluster, "classify": _classify,
           "intervene": _intervene, "report": _report}


# --------------------------------------------------------------------------- summary
def headlines(run: Path) -> dict:
    """The numbers a reader wants first, read back from the stages' outputs."""
    out: dict = {}
    man = read_manifest(run)
    if "mine" in man:
        out["tasks mined"] = sum(man["mine"].get("counts", {}).values())
    splits = man.get("capture", {}).get("splits", {})
    for split, info in splits.items():
        tasks = info.get("tasks", {})
        out[f"{split} inferences kept / prompted"] = (
            f"{sum(t['kept'] for t in tasks.values())} / {sum(t['attempts'] for t in tasks.values())}")
    ev = run / layout.EVALUATE_DIR / layout.EVALUATION_PARQUET
    if ev.exists():
        df = pd.read_parquet(ev)
        df = df[df.dataset.astype(str) == str(df.dataset.iloc[0])]
        out["AP-MAE reconstruction MSE"] = "; ".join(
            f"{r.method} {r.mse_mean:.4g}" for r in df.itertuples())
    heads = run / layout.CLUSTER_DIR / layout.HEADS_PARQUET
    if heads.exists():
        h = pd.read_parquet(heads)
        ok = h[h.status == "ok"]
        out["heads clustered (ok / all)"] = f"{len(ok)} / {len(h)}"
        if len(ok):
            out["clusters per head (mean)"] = round(float(ok.n_clusters.mean()), 2)
            out["maps clustered (mean share)"] = round(float(ok.share_clustered.mean()), 3)
    metrics = run / layout.CLASSIFY_DIR / layout.METRICS_PARQUET
    if metrics.exists():
        m = pd.read_parquet(metrics)
        # the task where CatBoost beats the majority class by most (accuracy alone would
        # favour a task where nearly every answer is right)
        cb = m[m.method == "catboost"].set_index("task")
        maj = m[m.method == "majority"].set_index("task").accuracy_mean
        if len(cb):
            gain = (cb.accuracy_mean - maj.reindex(cb.index).fillna(0.0)).sort_values(
                ascending=False, kind="stable")
            task = gain.index[0]
            best = cb.loc[task]
            out["best correctness classifier"] = (f"{task}: {best.accuracy_mean:.3f} "
                                                  f"[{best.ci_low:.3f}, {best.ci_high:.3f}]")
            if task in maj.index:
                out["  majority baseline there"] = round(float(maj.loc[task]), 3)
    res = run / layout.INTERVENE_DIR / layout.RESULTS_PARQUET
    if res.exists():
        r = pd.read_parquet(res)
        if len(r):
            best = r.sort_values("net_change", ascending=False).iloc[0]
            out["best intervention"] = (f"{best.task}, {best.group} heads, k={best.k}: net "
                                        f"{int(best.net_change):+d} of {int(best.n)}")
    return out


def _disk_usage(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_pipeline(config: str | Path, out: str | Path | None = None) -> dict:
    """Run (or resume) every configured stage, holding the run's writer lock; returns the
    pipeline summary."""
    cfg = load_config(config)
    run = Path(out or cfg.run)
    check_out_dir(run)
    run.mkdir(parents=True, exist_ok=True)
    with writer_lock(run, f"apmae pipeline --config {config}"):
        return _run_stages(cfg, run, config)


def _run_stages(cfg: PipelineConfig, run: Path, config) -> dict:
    keys = stage_keys(cfg)
    state_path = run / STATE
    try:
        state = json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}
    except (ValueError, OSError) as exc:
        raise ApmaeError(f"{state_path} is damaged ({exc}); delete it to rerun every stage "
                         f"(complete ones resume from their outputs)") from None
    stages = [s for s in stage_order(cfg) if s in cfg.stages]
    console = Console(stderr=True)
    os.environ.setdefault("APMAE_PROGRESS", "0")  # one display: the pipeline's own
    t_start = time.perf_counter()
    log.info("pipeline %s -> %s (%d stages)", config, run, len(stages))
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn(
            "{task.completed}/{task.total} stages"), TimeElapsedColumn(), console=console,
            transient=False) as bar:
        task = bar.add_task("pipeline", total=len(stages))
        for stage in stages:
            prev = state["stages"].get(stage, {})
            if prev.get("status") == "done" and prev.get("key") == keys[stage] and _complete(run, stage):
                state["stages"][stage] = {**prev, "skipped": True}
                bar.advance(task)
                log.info("%s: complete, skipped", stage)
                continue
            fresh = prev.get("key") not in (None, keys[stage])
            bar.update(task, description=f"pipeline: {stage}")
            t0 = time.perf_counter()
            state["stages"][stage] = {"key": keys[stage], "status": "running"}
            write_json(state_path, state)
            RUNNERS[stage](cfg, run, fresh)
            state["stages"][stage] = {"key": keys[stage], "status": "done", "skipped": False,
                                      "seconds": round(time.perf_counter() - t0, 1)}
            write_json(state_path, state)
            bar.advance(task)
        bar.update(task, description="pipeline: done")
    seconds = time.perf_counter() - t_start
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    summary = {
        "config": str(config), "run": str(run), "seconds": round(seconds, 1),
        "stages": state["stages"], "headlines": headlines(run),
        "peak_rss_mib": round(peak), "disk_mib": round(_disk_usage(run) / 2**20, 1),
        "report": str(run / layout.REPORT_DIR / layout.INDEX_HTML) if (run / layout.REPORT_DIR / layout.INDEX_HTML).exists() else None,
        "config_used": cfg.model_dump(mode="json"),
    }
    state.update({k: v for k, v in summary.items() if k != "stages"})
    write_json(state_path, state)
    update_manifest(run, "pipeline", summary)

    table = Table(title=f"apmae pipeline: {run}", show_lines=False)
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    for stage in stages:
        s = state["stages"].get(stage, {})
        table.add_row(stage, "skipped (complete)" if s.get("skipped") else s.get("status", "-"),
                      f"{s.get('seconds', 0):.1f}")
    table.add_row("total", "", f"{seconds:.1f}")
    out_console = Console()
    out_console.print(table)
    for key, value in summary["headlines"].items():
        out_console.print(f"  {key}: {value}")
    out_console.print(f"  peak memory {summary['peak_rss_mib']} MiB, run size "
                      f"{summary['disk_mib']} MiB")
    if summary["report"]:
        out_console.print(f"  report: {summary['report']}")
    return summary


__all__ = ["run_pipeline", "stage_keys", "headlines", "STAGES"]
