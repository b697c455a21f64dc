"""The ``apmae`` command line: one subcommand per stage, plus ``pipeline``.

Each command only parses its options and calls the stage's function; the work lives in the
stage modules.  Errors a user can act on (:class:`ApmaeError`) print as one line on stderr
with exit code 2; so do expected failures of the system (I/O, permissions, damaged files).
Anything else prints one line with the path of a log file holding the traceback (exit 1).
Every command that writes into a run holds the run's writer lock (``runs.writer_lock``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from apmae_gpu import __version__
from apmae_gpu.cli_messages import describe
from apmae_gpu.cli_options import (
    ConfigOpt,
    bounds,
    expand_variadic,
    opt,
    pipeline_config,
    section_from,
    top,
    without,
)
from apmae_gpu.core import layout
from apmae_gpu.core.config import (
    CaptureConfig,
    CaptureSplitConfig,
    ClassifyConfig,
    ClusterConfig,
    EncodeConfig,
    EvaluateConfig,
    InterveneConfig,
    MineConfig,
    PipelineConfig,
    ReportConfig,
    StabilityConfig,
    TrainConfig,
    TrustConfig,
)
from apmae_gpu.core.errors import INTERRUPTED, ApmaeError, on_sigterm
from apmae_gpu.core.locks import writer_lock
from apmae_gpu.core.logs import crash_log, setup_logging

app = typer.Typer(
    name="apmae",
    help="Automated attention pattern discovery at scale (AP-MAE): mine Java completion tasks, "
         "capture a code LLM's attention maps, train AP-MAE, cluster patterns per head, classify "
         "correctness, intervene on heads, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

log = logging.getLogger("apmae_gpu")

RunArg = Annotated[Path, typer.Argument(help="The run directory.", show_default=False)]


def device_opt():
    """--device: a run-wide setting, its default the pipeline config's."""
    return opt(PipelineConfig, "device", "--device")


def seed_opt():
    """--seed: a run-wide setting, its default the pipeline config's."""
    return opt(PipelineConfig, "seed", "--seed")
DTYPE_HELP = ("The target LLM's weights: auto (bfloat16 on CUDA, float32 elsewhere), float32 "
              "(the reference's choice for StarCoder2), bfloat16 or float16.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"apmae_gpu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    setup_logging(verbose)


@dataclass
class Invocation:
    """One ``apmae`` command line: its words, and the run it works on (for the writer lock's
    holder line and the crash log)."""

    argv: list[str] = field(default_factory=list)
    run: Path | None = None


_INVOCATION: contextvars.ContextVar[Invocation] = contextvars.ContextVar("apmae_invocation")


def _invocation() -> Invocation:
    """This command's :class:`Invocation` (a fresh one where ``main`` did not start it)."""
    inv = _INVOCATION.get(None)
    if inv is None:
        inv = Invocation()
        _INVOCATION.set(inv)
    return inv


def _uses(run) -> None:
    _invocation().run = Path(run)


@contextlib.contextmanager
def _writing(run, shard=None):
    """Hold RUN's writer lock for this command (none when RUN does not exist yet: the stage
    reports that itself)."""
    _uses(run)
    if not Path(run).is_dir():
        yield
        return
    command = " ".join(["apmae", *_invocation().argv])
    with writer_lock(run, command, shard=shard):
        yield


def _writing_ranked(run, shard=None):
    """The writer lock of a command that torchrun may launch on several ranks: rank 0 holds
    RUN's lock for the whole group (its other ranks write only their own shard directories
    and rank 0 merges them), as in training; ``--shard K/N`` processes lock their shard."""
    if shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _writing(run) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    return _writing(run, shard=shard)


# --------------------------------------------------------------------------- mine
@app.command()
def mine(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", help="Tokenizer source: smollm2 (embedded), an HF "
                                       "id or directory, a .gguf file, or random:<shape>.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    corpus: str = opt(MineConfig, "corpus", "--corpus"),
    tasks: str = opt(MineConfig, "tasks", "--tasks"),
    per_task: Optional[int] = opt(MineConfig, "per_task", "--per-task"),
    rarer_share: float = opt(MineConfig, "rarer_share", "--rarer-share"),
    max_passes: int = opt(MineConfig, "max_passes", "--max-passes"),
    train_per_task: int = opt(MineConfig, "train_per_task", "--train-per-task"),
    train_corpus: Optional[str] = opt(MineConfig, "train_corpus", "--train-corpus"),
    type_identifiers: bool = opt(MineConfig, "type_identifiers", "--type-identifiers"),
    window: int = opt(MineConfig, "window", "--window"),
    seed: int = seed_opt(),
    per_file: int = opt(MineConfig, "per_file", "--per-file"),
    dedup: bool = opt(MineConfig, "dedup", "--dedup/--no-dedup"),
    max_files: Optional[int] = opt(MineConfig, "max_files", "--max-files"),
    max_file_bytes: int = opt(MineConfig, "max_file_bytes", "--max-file-bytes"),
    content_column: str = opt(MineConfig, "content_column", "--content-column"),
    dedup_flags: str = opt(MineConfig, "dedup_flags", "--dedup-flags"),
    trust_remote_code: bool = opt(PipelineConfig, "trust_remote_code", "--trust-remote-code"),
    config: ConfigOpt = None,
) -> None:
    """Mine Java completion tasks with tree-sitter into RUN/tasks.parquet."""
    from apmae_gpu.core.layout import check_mine_out, new_run_dir
    from apmae_gpu.mining import tasks as mining

    pcfg = pipeline_config(config)
    settings = section_from(ctx, MineConfig, locals(), pcfg)
    check_mine_out(out)
    with new_run_dir(out), _writing(out):
        mining.mine(out, settings, model=model, seed=top(ctx, pcfg, "seed", seed),
                    trust_remote_code=top(ctx, pcfg, "trust_remote_code", trust_remote_code),
                    capture=pcfg.capture if pcfg else None,
                    intervene=pcfg.intervene if pcfg else None)


# --------------------------------------------------------------------------- capture
_SPLITS = CaptureConfig()


@app.command()
def capture(
    ctx: typer.Context,
    run: RunArg,
    model: Annotated[str, typer.Option("--model", help="The target LLM (see `apmae mine --help`).")],
    split: Annotated[str, typer.Option("--split", help="train (random masking, correct only, 25% of "
                                       "the heads of each layer) or analysis (every task, all "
                                       "heads, balanced correct/incorrect).")] = "analysis",
    per_task: Annotated[Optional[int], typer.Option(
        "--per-task", **bounds(CaptureSplitConfig.model_fields["per_task"]),
        help=f"train: inferences to keep; analysis: N correct and N incorrect per task (2N for "
             f"noise) (default: the config's, {_SPLITS.train.per_task:,} for train and "
             f"{_SPLITS.analysis.per_task:,} for analysis).")] = None,
    heads: Annotated[Optional[str], typer.Option(
        "--heads", help=f"all, or layerwise:FRACTION (default: {_SPLITS.train.heads} for train, "
                        f"{_SPLITS.analysis.heads} for analysis).")] = None,
    scaler: str = opt(CaptureConfig, "scaler", "--scaler"),
    batch_size: int = opt(CaptureConfig, "batch_size", "--batch-size"),
    device: str = device_opt(),
    seed: int = seed_opt(),
    max_attempts: Annotated[Optional[int], typer.Option(
        "--max-attempts", **bounds(CaptureSplitConfig.model_fields["max_attempts"]),
        help="Stop prompting a task after this many attempts.")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="K/N: this process is rank K "
                                                 "of N started by a scheduler (SLURM arrays); "
                                                 "merge with `apmae merge-shards`. Under "
                                                 "torchrun ranks need no --shard.")] = None,
    device_map: Optional[str] = opt(CaptureConfig, "device_map", "--device-map"),
    chunk_maps: int = opt(CaptureConfig, "chunk_maps", "--chunk-maps"),
    trust_remote_code: bool = opt(PipelineConfig, "trust_remote_code", "--trust-remote-code"),
    encode_with: Annotated[Optional[Path], typer.Option("--encode-with", help="AP-MAE checkpoint: "
                                                        "encode the analysis maps in the same "
                                                        "pass and keep only their embeddings "
                                                        "(paper scale).")] = None,
    pool: str = opt(CaptureConfig, "pool", "--pool"),
    dtype: str = opt(CaptureConfig, "dtype", "--dtype"),
    config: ConfigOpt = None,
) -> None:
    """Prompt the LLM on mined tasks, judge its next token and store every head's scaled
    attention map in RUN/maps.zarr."""
    from apmae_gpu.capture import maps as capture_mod
    from apmae_gpu.capture import ranks

    if split not in ("train", "analysis"):
        raise ApmaeError(f"--split {split}: expected train or analysis")
    pcfg = pipeline_config(config)
    settings = section_from(ctx, CaptureConfig, locals(), pcfg, split=split)
    kn = layout.parse_shard(shard)
    dist = ranks.dist_env()
    if kn is None and dist is not None:   # a torchrun rank writes its own shard
        kn = dist[:2]
    shard_dir = None if kn is None else layout.shard_dir(run, *kn)
    with _writing_ranked(run, shard=shard_dir):
        capture_mod.capture(run, model, settings, split=split,
                            device=top(ctx, pcfg, "device", device),
                            seed=top(ctx, pcfg, "seed", seed), shard=shard,
                            trust_remote_code=top(ctx, pcfg, "trust_remote_code",
                                                   trust_remote_code),
                            encode_with=encode_with)


@app.command("merge-shards")
def merge_shards(run: RunArg) -> None:
    """Merge the shards of `apmae capture --shard K/N` (or of an interrupted torchrun capture)
    into RUN's own store: the run one process would have written."""
    from apmae_gpu.capture import maps as capture_mod

    with _writing(run):
        capture_mod.merge_shards(run)


# --------------------------------------------------------------------------- train
@app.command()
def train(
    ctx: typer.Context,
    run: RunArg,
    preset: str = opt(TrainConfig, "preset", "--preset"),
    steps: int = opt(TrainConfig, "steps", "--steps"),
    batch_size: int = opt(TrainConfig, "batch_size", "--batch-size"),
    lr: Optional[float] = opt(TrainConfig, "lr", "--lr"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Checkpoint directory (default "
                                                "RUN/apmae).")] = None,
    raw: bool = opt(TrainConfig, "raw", "--raw"),
    device: str = device_opt(),
    seed: int = seed_opt(),
    compile: bool = opt(TrainConfig, "compile", "--compile"),
    deterministic: bool = opt(TrainConfig, "deterministic", "--deterministic/--no-deterministic"),
    val_fraction: float = opt(TrainConfig, "val_fraction", "--val-fraction"),
    model_config: Annotated[Optional[Path], typer.Option("--model-config", help="JSON/YAML file "
                                                         "of AP-MAE config keys that differ from "
                                                         "the preset (e.g. image_size, "
                                                         "patch_size).")] = None,
    warmup_steps: Optional[int] = opt(TrainConfig, "warmup_steps", "--warmup-steps"),
    recipe: str = opt(TrainConfig, "recipe", "--recipe"),
    qkv_bias: Optional[bool] = opt(TrainConfig, "qkv_bias", "--qkv-bias/--no-qkv-bias"),
    position_embeddings: Optional[str] = opt(TrainConfig, "position_embeddings",
                                             "--position-embeddings"),
    patch_norm: Optional[bool] = opt(TrainConfig, "patch_norm", "--patch-norm/--no-patch-norm"),
    weight_decay_all: Optional[bool] = opt(TrainConfig, "weight_decay_all",
                                           "--weight-decay-all/--no-weight-decay-all"),
    batch_order: Optional[str] = opt(TrainConfig, "batch_order", "--batch-order"),
    save_every: Optional[int] = opt(TrainConfig, "save_every", "--save-every"),
    eval_every: Optional[int] = opt(TrainConfig, "eval_every", "--eval-every"),
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for "
                                                   "torch (default: torch's choice; 1 on "
                                                   "machines with at most 2 cores).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Train AP-MAE on RUN/maps.zarr (train split); torchrun for several GPUs."""
    from apmae_gpu.model import training

    pcfg = pipeline_config(config)
    settings = section_from(ctx, TrainConfig, locals(), pcfg)
    # under torchrun, rank 0 holds the lock for the job
    lock = _writing_ranked(run)
    _uses(run)
    with lock:
        summary = training.train(run, settings, resume=resume, out=out,
                                 device=top(ctx, pcfg, "device", device),
                                 seed=top(ctx, pcfg, "seed", seed),
                                 model_config=model_config, threads=threads)
    if summary.get("val_loss") is not None and os.environ.get("RANK", "0") == "0":
        typer.echo(f"AP-MAE {summary['preset']}: {summary['steps']} steps, validation MSE "
                   f"{summary['val_loss']:.4g} (mean of visible patches "
                   f"{summary.get('val_visible_mean', float('nan')):.4g}); model in "
                   f"{summary['final']}")


# --------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    ctx: typer.Context,
    checkpoint: Annotated[list[Path], typer.Option("--checkpoint", help="One or more AP-MAE "
                                                   "checkpoint directories.")],
    data: Annotated[list[Path], typer.Option("--data", help="One or more run directories.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default "
                                                "RUN/evaluate of the first --data).")] = None,
    split: str = opt(EvaluateConfig, "split", "--split"),
    max_maps: int = opt(EvaluateConfig, "max_maps", "--max-maps"),
    batch_size: int = opt(EvaluateConfig, "batch_size", "--batch-size"),
    device: str = device_opt(),
    seed: int = seed_opt(),
    figure_maps: int = opt(EvaluateConfig, "figure_maps", "--figure-maps"),
    config: ConfigOpt = None,
) -> None:
    """Reconstruction MSE of every checkpoint on every dataset, with baselines."""
    from apmae_gpu.model import evaluation

    pcfg = pipeline_config(config)
    # --data names every run to evaluate; the section's `data`, the runs beside a pipeline's
    settings = section_from(ctx, EvaluateConfig, without(locals(), "data"), pcfg)
    lock = _writing(data[0]) if data and out is None else contextlib.nullcontext()
    with lock:
        evaluation.evaluate(checkpoint, data, settings, out=out,
                            device=top(ctx, pcfg, "device", device),
                            seed=top(ctx, pcfg, "seed", seed))


# --------------------------------------------------------------------------- encode
@app.command()
def encode(
    ctx: typer.Context,
    run: RunArg,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="AP-MAE checkpoint "
                                                       "(default RUN/apmae/final).")] = None,
    batch_size: int = opt(EncodeConfig, "batch_size", "--batch-size"),
    pool: str = opt(EncodeConfig, "pool", "--pool"),
    device: str = device_opt(),
    block: Optional[int] = opt(EncodeConfig, "block", "--block"),
    restart: Annotated[bool, typer.Option("--restart", help="Discard RUN/embeddings.zarr and "
                                          "encode from scratch.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Encode every analysis map into RUN/embeddings.zarr [layers, heads, inferences, dim]."""
    from apmae_gpu.encoding import encoder as encoding

    pcfg = pipeline_config(config)
    settings = section_from(ctx, EncodeConfig, locals(), pcfg)
    _uses(run)
    with _writing_ranked(run):
        encoding.encode(run, settings, checkpoint=checkpoint,
                        device=top(ctx, pcfg, "device", device), restart=restart)


# --------------------------------------------------------------------------- cluster
def _cluster_opt(name: str, *decls: str, help: str | None = None, **kw):
    return opt(ClusterConfig, name, *decls, help=help, **kw)


BACKEND_HELP = "auto, cuml or cpu."


@app.command()
def cluster(
    ctx: typer.Context,
    run: RunArg,
    backend: str = _cluster_opt("backend", "--backend"),
    workers: int = _cluster_opt("workers", "--workers"),
    umap_dims: int = _cluster_opt("umap_dims", "--umap-dims"),
    neighbors: int = _cluster_opt("neighbors", "--neighbors"),
    min_dist: float = _cluster_opt("min_dist", "--min-dist"),
    metric: str = _cluster_opt("metric", "--metric"),
    min_samples: int = _cluster_opt("min_samples", "--min-samples"),
    min_cluster_size: int = _cluster_opt("min_cluster_size", "--min-cluster-size"),
    scheduler: Optional[str] = _cluster_opt("scheduler", "--scheduler"),
    seed: int = seed_opt(),
    heads: Optional[str] = _cluster_opt("heads", "--heads"),
    retries: int = _cluster_opt("retries", "--retries"),
    knn: str = _cluster_opt("knn", "--knn"),
    filter_max_distance: Optional[float] = _cluster_opt(
        "filter_max_distance", "--filter-max-distance"),
    filter_min_size: Optional[int] = _cluster_opt(
        "filter_min_size", "--filter-min-size"),
    restart: Annotated[bool, typer.Option("--restart", help="Discard finished heads.")] = False,
    figures: bool = _cluster_opt("figures", "--figures/--no-figures"),
    umap_epochs: Optional[int] = _cluster_opt("umap_epochs", "--umap-epochs"),
    deterministic: bool = _cluster_opt("deterministic", "--deterministic/--no-deterministic"),
    config: ConfigOpt = None,
) -> None:
    """UMAP + HDBSCAN per head into RUN/clusters.parquet, heads spread over dask workers."""
    from apmae_gpu.clustering import heads as clustering

    pcfg = pipeline_config(config)
    settings = section_from(ctx, ClusterConfig, locals(), pcfg)
    with _writing(run):
        clustering.cluster(run, settings, seed=top(ctx, pcfg, "seed", seed), restart=restart)


# --------------------------------------------------------------------------- classify
@app.command()
def classify(
    ctx: typer.Context,
    run: RunArg,
    folds: int = opt(ClassifyConfig, "folds", "--folds"),
    gpu: str = opt(ClassifyConfig, "gpu", "--gpu"),
    seed: int = seed_opt(),
    iterations: int = opt(ClassifyConfig, "iterations", "--iterations"),
    depth: int = opt(ClassifyConfig, "depth", "--depth"),
    learning_rate: float = opt(ClassifyConfig, "learning_rate", "--learning-rate"),
    early_stopping_rounds: int = opt(ClassifyConfig, "early_stopping_rounds",
                                      "--early-stopping"),
    eval_fraction: float = opt(ClassifyConfig, "eval_fraction", "--eval-fraction"),
    tasks: Optional[str] = opt(ClassifyConfig, "tasks", "--tasks"),
    shap_on: str = opt(ClassifyConfig, "shap_on", "--shap-on"),
    one_hot_max_size: Optional[int] = opt(
        ClassifyConfig, "one_hot_max_size", "--one-hot-max-size"),
    max_ctr_complexity: Optional[int] = opt(
        ClassifyConfig, "max_ctr_complexity", "--max-ctr-complexity"),
    boosting_type: Optional[str] = opt(
        ClassifyConfig, "boosting_type", "--boosting-type"),
    deterministic: bool = opt(ClassifyConfig, "deterministic", "--deterministic/--no-deterministic"),
    stability_refits: int = opt(ClassifyConfig, "stability_refits", "--stability-refits"),
    stability_top_k: int = opt(ClassifyConfig, "stability_top_k", "--stability-top-k"),
    min_ranking_spearman: float = opt(ClassifyConfig, "min_ranking_spearman",
                                      "--min-ranking-spearman"),
    config: ConfigOpt = None,
) -> None:
    """CatBoost per task on per-head cluster ids; SHAP head importance."""
    from apmae_gpu.classification import classifier as classification

    pcfg = pipeline_config(config)
    settings = section_from(ctx, ClassifyConfig, locals(), pcfg)
    with _writing(run):
        classification.classify(run, settings, seed=top(ctx, pcfg, "seed", seed))


# --------------------------------------------------------------------------- intervene
@app.command()
def intervene(
    ctx: typer.Context,
    run: RunArg,
    task: Optional[str] = opt(InterveneConfig, "task", "--task"),
    k: str = opt(InterveneConfig, "k", "--k"),
    per_group: int = opt(InterveneConfig, "per_group", "--per-group"),
    model: Annotated[Optional[str], typer.Option("--model", help="The target LLM (default: the "
                                                 "one recorded in the manifest).")] = None,
    device: str = device_opt(),
    batch_size: int = opt(InterveneConfig, "batch_size", "--batch-size"),
    seed: int = seed_opt(),
    groups: str = opt(InterveneConfig, "groups", "--groups"),
    multi_token: bool = opt(InterveneConfig, "multi_token", "--multi-token"),
    rank_by: str = opt(InterveneConfig, "rank_by", "--rank-by"),
    dtype: str = opt(InterveneConfig, "dtype", "--dtype"),
    few_heads_k: int = opt(InterveneConfig, "few_heads_k", "--few-heads-k"),
    many_heads_k: int = opt(InterveneConfig, "many_heads_k", "--many-heads-k"),
    config: ConfigOpt = None,
) -> None:
    """Zero the heads SHAP selects while generating, and count what flips."""
    from apmae_gpu.intervention import ablation as intervention

    pcfg = pipeline_config(config)
    settings = section_from(ctx, InterveneConfig, locals(), pcfg)
    with _writing(run):
        intervention.intervene(run, settings, model=top(ctx, pcfg, "model", model),
                               device=top(ctx, pcfg, "device", device),
                               seed=top(ctx, pcfg, "seed", seed))


# --------------------------------------------------------------------------- report / pipeline
@app.command()
def report(
    ctx: typer.Context,
    run: RunArg,
    notebook: bool = opt(ReportConfig, "notebook", "--notebook"),
    explorer_points: int = opt(ReportConfig, "explorer_points", "--explorer-points"),
    explorer_clusters: int = opt(ReportConfig, "explorer_clusters", "--explorer-clusters"),
    explorer_members: int = opt(ReportConfig, "explorer_members", "--explorer-members"),
    explorer_map_px: int = opt(ReportConfig, "explorer_map_px", "--explorer-map-px"),
    explorer_examples: int = opt(ReportConfig, "explorer_examples", "--explorer-examples"),
    config: ConfigOpt = None,
) -> None:
    """Write RUN/report/index.html: one self-contained page over the whole run, and the
    per-head explorer RUN/report/explorer.html (its data: RUN/report/explorer.json)."""
    from apmae_gpu.report import build as report_mod

    settings = section_from(ctx, ReportConfig, locals(), pipeline_config(config))
    with _writing(run):
        report_mod.report(run, settings)


@app.command()
def check(run: RunArg) -> None:
    """Verify RUN: stores (every chunk present and intact), parquet files, manifest counts.
    Prints what is damaged and which stage to rerun; exit 1 when something is."""
    from apmae_gpu.core import check as check_mod

    _uses(run)
    problems = check_mod.check_run(run, echo=typer.echo)
    if problems:
        raise typer.Exit(1)


@app.command()
def pipeline(
    config: Annotated[Path, typer.Option("--config", help="Pipeline config (YAML).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (overrides the "
                                                "config's).")] = None,
) -> None:
    """Run every stage from one config, skipping stages whose outputs are complete."""
    from apmae_gpu import pipeline as pipeline_mod

    pipeline_mod.run_pipeline(config=config, out=out)


# --------------------------------------------------------------------------- clustering studies
@app.command()
def trust(
    ctx: typer.Context,
    run: RunArg,
    dims: str = opt(TrustConfig, "dims", "--dims"),
    heads: str = opt(TrustConfig, "heads", "--heads"),
    trials: int = opt(TrustConfig, "trials", "--trials"),
    max_points: int = opt(TrustConfig, "max_points", "--max-points"),
    neighbors: int = _cluster_opt("neighbors", "--neighbors"),
    min_dist: float = _cluster_opt("min_dist", "--min-dist"),
    metric: str = _cluster_opt("metric", "--metric"),
    trust_neighbors: Optional[int] = opt(TrustConfig, "trust_neighbors", "--trust-neighbors"),
    backend: str = _cluster_opt("backend", "--backend"),
    workers: int = _cluster_opt("workers", "--workers"),
    scheduler: Optional[str] = _cluster_opt("scheduler", "--scheduler"),
    seed: int = seed_opt(),
    config: ConfigOpt = None,
) -> None:
    """Trustworthiness of UMAP per number of dimensions, to choose --umap-dims."""
    from apmae_gpu.clustering import studies as cluster_studies

    pcfg = pipeline_config(config)
    study = section_from(ctx, TrustConfig, locals(), pcfg)
    clusters = section_from(ctx, ClusterConfig, without(locals(), "heads"), pcfg)
    with _writing(run):
        cluster_studies.trust(run, study, clusters, seed=top(ctx, pcfg, "seed", seed))


@app.command()
def stability(
    ctx: typer.Context,
    run: RunArg,
    seeds: str = opt(StabilityConfig, "seeds", "--seeds"),
    heads: str = opt(StabilityConfig, "heads", "--heads"),
    backend: str = _cluster_opt("backend", "--backend"),
    workers: int = _cluster_opt("workers", "--workers"),
    scheduler: Optional[str] = _cluster_opt("scheduler", "--scheduler"),
    stable_at: float = opt(StabilityConfig, "stable_at", "--stable-at"),
    config: ConfigOpt = None,
) -> None:
    """Cluster stability: recluster heads with other seeds; ARI per head, Jaccard per cluster."""
    from apmae_gpu.clustering import studies as cluster_studies

    pcfg = pipeline_config(config)
    study = section_from(ctx, StabilityConfig, locals(), pcfg)
    clusters = section_from(ctx, ClusterConfig, without(locals(), "heads"), pcfg)
    with _writing(run):
        cluster_studies.stability(run, study, clusters)


@app.command("cluster-maps")
def cluster_maps(
    run: RunArg,
    layer: Annotated[int, typer.Option("--layer", min=0)],
    head: Annotated[int, typer.Option("--head", min=0)],
    cluster_id: Annotated[Optional[int], typer.Option("--cluster", help="Cluster id (default: "
                                                      "every cluster of the head).")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Maps per cluster.")] = 16,
) -> None:
    """PNG of the maps within a head's clusters (spread over each cluster) under RUN/cluster/."""
    from apmae_gpu.clustering import figures as cluster_figures

    with _writing(run):
        paths = cluster_figures.cluster_maps(run=run, layer=layer, head=head, cluster=cluster_id,
                                             n=n)
    for path in paths:
        typer.echo(str(path))


# --------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    token = _INVOCATION.set(Invocation(argv=argv))
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        code = app(args=expand_variadic(argv), prog_name="apmae", standalone_mode=False)
        if code == 130:   # typer turns Ctrl-C into Exit(130), returned as a value
            typer.echo(INTERRUPTED, err=True)
        if isinstance(code, int) and code:   # typer.Exit(N) comes back as a return value
            sys.exit(code)
    except ApmaeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # Usage errors from the CLI library (typer vendors click): print its one-line message.
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        # the last resort: one line, and the traceback in a log file
        message, code = describe(exc)
        path = crash_log(_invocation().run, argv, traceback.format_exc())
        typer.echo(f"error: {message} (traceback: {path})", err=True)
        sys.exit(code)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _INVOCATION.reset(token)


if __name__ == "__main__":  # pragma: no cover
    main()
