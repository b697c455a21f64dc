"""The ``apmae`` command line: one subcommand per stage, plus ``pipeline``.

Each command only parses its options and calls the stage's function; the work lives in the
stage modules.  Errors a user can act on (:class:`ApmaeError`) print as one line on stderr
with exit code 2; so do expected failures of the system (I/O, permissions, damaged files).
Anything else prints one line with the path of a log file holding the traceback (exit 1).
Every command that writes into a run holds the run's writer lock (``runs.writer_lock``).
"""

from __future__ import annotations

import contextlib
import os
import errno
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from apmae_gpu import TASKS, __version__
from apmae_gpu.runs import ApmaeError, crash_log, setup_logging, writer_lock

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
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="The target LLM's weights: auto (bfloat16 "
                                       "on CUDA, float32 elsewhere), float32 (the reference's "
                                       "choice for StarCoder2), bfloat16 or float16.")]


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


_STATE: dict = {"run": None, "argv": []}   # the run a command works on (for the crash log)


def _uses(run) -> None:
    _STATE["run"] = Path(run)


@contextlib.contextmanager
def _writing(run, shard=None):
    """Hold RUN's writer lock for this command (none when RUN does not exist yet: the stage
    reports that itself)."""
    _uses(run)
    if not Path(run).is_dir():
        yield
        return
    command = " ".join(["apmae", *_STATE["argv"]])
    with writer_lock(run, command, shard=shard):
        yield


def _writing_ranked(run, shard=None):
    """The writer lock of a command that torchrun may launch on several ranks: rank 0 holds
    RUN's lock for the whole group (its other ranks write only their own shard directories
    and rank 0 merges them), as in training; ``--shard K/N`` processes lock their shard."""
    if shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _writing(run) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    return _writing(run, shard=shard)


def _split_csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# --------------------------------------------------------------------------- mine
@app.command()
def mine(
    corpus: Annotated[str, typer.Option("--corpus", help="Java sources: a directory of .java files, "
                                        "a .zip/.jar of sources, a .jsonl/.parquet file with a "
                                        "`content` column, or hf:<dataset id>.")],
    model: Annotated[str, typer.Option("--model", help="Tokenizer source: smollm2 (embedded), an HF "
                                       "id or directory, a .gguf file, or random:<shape>.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    tasks: Annotated[str, typer.Option("--tasks", help="all, or a comma list of: " + ", ".join(TASKS))] = "all",
    per_task: Annotated[int, typer.Option("--per-task", min=1, help="Analysis rows to mine per task.")] = 100,
    train_per_task: Annotated[int, typer.Option("--train-per-task", min=0, help="Random-masking rows "
                                                "for AP-MAE training, from files the analysis rows "
                                                "never come from.")] = 100,
    train_corpus: Annotated[Optional[str], typer.Option("--train-corpus", help="Mine the training "
                                                        "rows from this corpus instead (e.g. a "
                                                        "dataset's train split while --corpus is "
                                                        "its test split).")] = None,
    type_identifiers: Annotated[bool, typer.Option("--type-identifiers", help="Also mask type "
                                                   "identifiers in the identifiers task (the "
                                                   "reference takes identifier nodes only).")] = False,
    window: Annotated[int, typer.Option("--window", min=16, help="Prompt length in tokens.")] = 256,
    seed: SeedOpt = 0,
    per_file: Annotated[int, typer.Option("--per-file", min=1, help="At most this many rows per task "
                                          "from one file (spreads tasks over files).")] = 1,
    dedup: Annotated[bool, typer.Option("--dedup/--no-dedup", help="Skip exact duplicate files "
                                        "(SHA-256 of the content).")] = True,
    max_files: Annotated[Optional[int], typer.Option("--max-files", help="Stop after this many files.")] = None,
    max_file_bytes: Annotated[int, typer.Option("--max-file-bytes", help="Skip larger files.")] = 1_000_000,
    content_column: Annotated[str, typer.Option("--content-column", help="Column holding the source "
                                                "text in JSONL/Parquet/HF corpora.")] = "content",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub "
                                                    "tokenizer's own code to run.")] = False,
) -> None:
    """Mine Java completion tasks with tree-sitter into RUN/tasks.parquet."""
    from apmae_gpu import mining
    from apmae_gpu.runs import check_mine_out, new_run_dir

    check_mine_out(out)
    with new_run_dir(out), _writing(out):
        mining.mine(corpus=corpus, model=model, out=out, tasks=tasks, per_task=per_task,
                    window=window, seed=seed, per_file=per_file, dedup=dedup,
                    max_files=max_files, max_file_bytes=max_file_bytes,
                    content_column=content_column, trust_remote_code=trust_remote_code,
                    train_per_task=train_per_task, train_corpus=train_corpus,
                    type_identifiers=type_identifiers)


# --------------------------------------------------------------------------- capture
@app.command()
def capture(
    run: RunArg,
    model: Annotated[str, typer.Option("--model", help="The target LLM (see `apmae mine --help`).")],
    split: Annotated[str, typer.Option("--split", help="train (random masking, correct only, 25% of "
                                       "the heads of each layer) or analysis (every task, all "
                                       "heads, balanced correct/incorrect).")] = "analysis",
    per_task: Annotated[int, typer.Option("--per-task", min=1, help="train: inferences to keep; "
                                          "analysis: N correct and N incorrect per task (2N "
                                          "for noise).")] = 10,
    heads: Annotated[Optional[str], typer.Option("--heads", help="all, or layerwise:FRACTION "
                                                 "(default: layerwise:0.25 for train, all for "
                                                 "analysis).")] = None,
    scaler: Annotated[str, typer.Option("--scaler", help="log, log_normalize or none.")] = "log",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per forward pass.")] = 8,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    max_attempts: Annotated[Optional[int], typer.Option("--max-attempts", help="Stop prompting a "
                                                        "task after this many attempts.")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="K/N: this process is rank K "
                                                 "of N started by a scheduler (SLURM arrays); "
                                                 "merge with `apmae merge-shards`. Under "
                                                 "torchrun ranks need no --shard.")] = None,
    device_map: Annotated[Optional[str], typer.Option("--device-map", help="e.g. auto: spread a "
                                                      "model larger than one GPU.")] = None,
    chunk_maps: Annotated[int, typer.Option("--chunk-maps", min=1, help="Maps per Zarr chunk.")] = 32,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    encode_with: Annotated[Optional[Path], typer.Option("--encode-with", help="AP-MAE checkpoint: "
                                                        "encode the analysis maps in the same "
                                                        "pass and keep only their embeddings "
                                                        "(paper scale).")] = None,
    pool: Annotated[str, typer.Option("--pool", help="With --encode-with: cls or mean.")] = "cls",
    dtype: DtypeOpt = "auto",
) -> None:
    """Prompt the LLM on mined tasks, judge its next token and store every head's scaled
    attention map in RUN/maps.zarr."""
    from apmae_gpu import capture as capture_mod
    from apmae_gpu import ranks

    kn = capture_mod._parse_shard(shard)
    dist = ranks.dist_env()
    if kn is None and dist is not None:   # a torchrun rank writes its own shard
        kn = dist[:2]
    shard_dir = None if kn is None else Path(run) / "shards" / f"{kn[0]}-of-{kn[1]}"
    with _writing_ranked(run, shard=shard_dir):
        capture_mod.capture(run=run, model=model, split=split, per_task=per_task, heads=heads,
                            scaler=scaler, batch_size=batch_size, device=device, seed=seed,
                            max_attempts=max_attempts, shard=shard, device_map=device_map,
                            chunk_maps=chunk_maps, trust_remote_code=trust_remote_code,
                            encode_with=encode_with, pool=pool, dtype=dtype)


@app.command("merge-shards")
def merge_shards(run: RunArg) -> None:
    """Merge the shards of `apmae capture --shard K/N` (or of an interrupted torchrun capture)
    into RUN's own store: the run one process would have written."""
    from apmae_gpu import capture as capture_mod

    with _writing(run):
        capture_mod.merge_shards(run)


# --------------------------------------------------------------------------- train
@app.command()
def train(
    run: RunArg,
    preset: Annotated[str, typer.Option("--preset", help="paper, small or tiny.")] = "small",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Maps per step (per rank).")] = 64,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: base "
                                                "x global batch / 50; base 1.5e-4 for paper as "
                                                "in the paper, 1.5e-3 small, 3e-3 tiny).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Checkpoint directory (default "
                                                "RUN/apmae).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Ablation: train on raw probabilities "
                                      "instead of log-scaled maps.")] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of inferences held "
                                                "out for validation.")] = 0.1,
    model_config: Annotated[Optional[Path], typer.Option("--model-config", help="JSON/YAML file "
                                                         "of AP-MAE config keys that differ from "
                                                         "the preset (e.g. image_size, "
                                                         "patch_size).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", min=0, help="Linear "
                                                        "warm-up steps (default 5% of --steps)."
                                                        )] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", min=1, help="Checkpoint "
                                                      "every N steps (default steps/10, at most "
                                                      "2000).")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", min=1, help="Validation "
                                                      "MSE every N steps (default steps/10).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for "
                                                   "torch (default: torch's choice; 1 on "
                                                   "machines with at most 2 cores).")] = None,
) -> None:
    """Train AP-MAE on RUN/maps.zarr (train split); torchrun for several GPUs."""
    import os

    from apmae_gpu import training

    # under torchrun, rank 0 holds the lock for the job
    lock = _writing_ranked(run)
    _uses(run)
    with lock:
        summary = training.train(run=run, preset=preset, steps=steps, batch_size=batch_size,
                                 lr=lr, resume=resume, out=out, raw=raw, device=device, seed=seed,
                                 compile=compile, val_fraction=val_fraction,
                                 model_config=model_config, warmup_steps=warmup_steps,
                                 save_every=save_every, eval_every=eval_every, threads=threads)
    if summary.get("val_loss") is not None and os.environ.get("RANK", "0") == "0":
        typer.echo(f"AP-MAE {summary['preset']}: {summary['steps']} steps, validation MSE "
                   f"{summary['val_loss']:.4g} (mean of visible patches "
                   f"{summary.get('val_visible_mean', float('nan')):.4g}); model in "
                   f"{summary['final']}")


# --------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    checkpoint: Annotated[list[Path], typer.Option("--checkpoint", help="One or more AP-MAE "
                                                   "checkpoint directories.")],
    data: Annotated[list[Path], typer.Option("--data", help="One or more run directories.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default "
                                                "RUN/evaluate of the first --data).")] = None,
    split: Annotated[str, typer.Option("--split", help="Which maps: validation (held-out train "
                                       "inferences), analysis or all.")] = "validation",
    max_maps: Annotated[int, typer.Option("--max-maps", help="Evaluate at most this many maps per "
                                          "dataset.")] = 5000,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 256,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    figure_maps: Annotated[int, typer.Option("--figure-maps", min=0, help="Maps per "
                                             "reconstruction figure (0: no figure).")] = 4,
) -> None:
    """Reconstruction MSE of every checkpoint on every dataset, with baselines."""
    from apmae_gpu import evaluation

    lock = _writing(data[0]) if data and out is None else contextlib.nullcontext()
    with lock:
        evaluation.evaluate(checkpoints=checkpoint, data=data, out=out, split=split,
                            max_maps=max_maps, batch_size=batch_size, device=device, seed=seed,
                            figure_maps=figure_maps)


# --------------------------------------------------------------------------- encode
@app.command()
def encode(
    run: RunArg,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="AP-MAE checkpoint "
                                                       "(default RUN/apmae/final).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 256,
    pool: Annotated[str, typer.Option("--pool", help="cls or mean (of patch tokens).")] = "cls",
    device: DeviceOpt = "auto",
    block: Annotated[Optional[int], typer.Option("--block", min=1, help="Inferences per chunk and "
                                                 "per commit (default: by memory, <= 1024).")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard RUN/embeddings.zarr and "
                                          "encode from scratch.")] = False,
) -> None:
    """Encode every analysis map into RUN/embeddings.zarr [layers, heads, inferences, dim]."""
    from apmae_gpu import encoding

    _uses(run)
    with _writing_ranked(run):
        encoding.encode(run=run, checkpoint=checkpoint, batch_size=batch_size, pool=pool,
                        device=device, block=block, restart=restart)


# --------------------------------------------------------------------------- cluster
@app.command()
def cluster(
    run: RunArg,
    backend: Annotated[str, typer.Option("--backend", help="auto, cuml or cpu.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", min=1, help="Dask workers (one per GPU "
                                         "with cuml).")] = 1,
    umap_dims: Annotated[int, typer.Option("--umap-dims")] = 8,
    neighbors: Annotated[int, typer.Option("--neighbors")] = 20,
    min_dist: Annotated[float, typer.Option("--min-dist")] = 0.05,
    metric: Annotated[str, typer.Option("--metric")] = "cosine",
    min_samples: Annotated[int, typer.Option("--min-samples")] = 20,
    min_cluster_size: Annotated[int, typer.Option("--min-cluster-size")] = 25,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="Address of an existing "
                                                     "dask scheduler.")] = None,
    seed: SeedOpt = 0,
    heads: Annotated[Optional[str], typer.Option("--heads", help="all (default), N (a seeded "
                                                 "sample) or L:H,L:H.")] = None,
    retries: Annotated[int, typer.Option("--retries", min=0, help="Retries of a failing head "
                                         "(with the next seed) before it is recorded failed.")] = 1,
    knn: Annotated[str, typer.Option("--knn", help="cpu backend's neighbour search: auto "
                                     "(exact torch kNN below 4096 points, and at any size on a "
                                     "GPU; NN-descent otherwise), nndescent or torch.")] = "auto",
    filter_max_distance: Annotated[Optional[float], typer.Option(
        "--filter-max-distance", help="Earlier paper's filter: drop clusters whose mean "
        "intra-cluster UMAP distance exceeds this (e.g. 1.0).")] = None,
    filter_min_size: Annotated[Optional[int], typer.Option(
        "--filter-min-size", help="Earlier paper's filter: drop clusters smaller than this.")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Discard finished heads.")] = False,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Write the PNG "
                                          "figures.")] = True,
    umap_epochs: Annotated[Optional[int], typer.Option("--umap-epochs", min=1, help="UMAP "
                                                       "epochs (default umap-learn's: 500 below "
                                                       "10k points, 200 above).")] = None,
) -> None:
    """UMAP + HDBSCAN per head into RUN/clusters.parquet, heads spread over dask workers."""
    from apmae_gpu import clustering

    with _writing(run):
        clustering.cluster(run=run, backend=backend, workers=workers, umap_dims=umap_dims,
                           neighbors=neighbors, min_dist=min_dist, metric=metric,
                           min_samples=min_samples, min_cluster_size=min_cluster_size,
                           scheduler=scheduler, seed=seed, heads=heads, retries=retries,
                           knn=knn, filter_max_distance=filter_max_distance,
                           filter_min_size=filter_min_size, restart=restart, figures=figures,
                           umap_epochs=umap_epochs)


# --------------------------------------------------------------------------- classify
@app.command()
def classify(
    run: RunArg,
    folds: Annotated[int, typer.Option("--folds", min=2)] = 10,
    gpu: Annotated[str, typer.Option("--gpu", help="auto, yes or no: CatBoost task_type GPU.")] = "auto",
    seed: SeedOpt = 0,
    iterations: Annotated[int, typer.Option("--iterations", min=1, help="CatBoost trees (at most, "
                                            "with early stopping).")] = 1000,
    depth: Annotated[int, typer.Option("--depth", min=1, max=16)] = 6,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = 0.1,
    early_stopping: Annotated[int, typer.Option("--early-stopping", min=0, help="Rounds without "
                                                "improvement on the eval split (0: off).")] = 25,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Share of each training "
                                                 "fold held out for early stopping.")] = 0.1,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma list of tasks (default: "
                                                 "every labelled task).")] = None,
    shap_on: Annotated[str, typer.Option("--shap-on", help="oof (each inference explained by the "
                                         "fold model that did not train on it) or full (one "
                                         "model fitted on all data).")] = "oof",
    one_hot_max_size: Annotated[Optional[int], typer.Option(
        "--one-hot-max-size", min=1, help="One-hot encode heads with at most this many clusters "
        "instead of target statistics (default: CatBoost's; 16 is ~30x faster on CPU).")] = None,
    max_ctr_complexity: Annotated[Optional[int], typer.Option(
        "--max-ctr-complexity", min=1, help="Most heads combined in one categorical feature "
                                            "combination (default: CatBoost's).")] = None,
    boosting_type: Annotated[Optional[str], typer.Option(
        "--boosting-type", help="Plain or Ordered (default: CatBoost's choice, Ordered on "
                                "small CPU data sets; Plain is cheaper per tree).")] = None,
) -> None:
    """CatBoost per task on per-head cluster ids; SHAP head importance."""
    from apmae_gpu import classification

    with _writing(run):
        classification.classify(run=run, folds=folds, gpu=gpu, seed=seed, iterations=iterations,
                                depth=depth, learning_rate=learning_rate,
                                early_stopping_rounds=early_stopping, eval_fraction=eval_fraction,
                                tasks=_split_csv(tasks) if tasks else None, shap_on=shap_on,
                                one_hot_max_size=one_hot_max_size,
                                max_ctr_complexity=max_ctr_complexity,
                                boosting_type=boosting_type)


# --------------------------------------------------------------------------- intervene
@app.command()
def intervene(
    run: RunArg,
    task: Annotated[Optional[str], typer.Option("--task", help="One task (default: every task "
                                                "the classifier ranked).")] = None,
    k: Annotated[str, typer.Option("--k", help="Comma list of head counts.")] =
        "1,2,5,10,20,50,100,200,400,600,800",
    per_group: Annotated[int, typer.Option("--per-group", min=1, help="N originally correct and N "
                                           "originally incorrect held-out inferences.")] = 50,
    model: Annotated[Optional[str], typer.Option("--model", help="The target LLM (default: the "
                                                 "one recorded in the manifest).")] = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    seed: SeedOpt = 0,
    groups: Annotated[str, typer.Option("--groups", help="Comma list of head groups: positive, "
                                        "negative, zero, random, importance.")] =
        "positive,negative,zero,random",
    multi_token: Annotated[bool, typer.Option("--multi-token", help="Judge greedy completion of "
                                              "the whole target (KV cache), exact match, "
                                              "instead of the first token.")] = False,
    rank_by: Annotated[str, typer.Option("--rank-by", help="What ranks the positive/negative "
                                         "groups: shap_parts (the reference: mean of the "
                                         "positive / negative parts of the SHAP values), "
                                         "mean_shap (signed mean) or extreme_shap.")] = "shap_parts",
    dtype: DtypeOpt = "auto",
) -> None:
    """Zero the heads SHAP selects while generating, and count what flips."""
    from apmae_gpu import intervention

    try:
        ks = [int(x) for x in _split_csv(k)]
    except ValueError:
        raise ApmaeError(f"--k {k}: expected a comma list of integers") from None
    with _writing(run):
        intervention.intervene(run=run, task=task, k=ks, per_group=per_group, model=model,
                               device=device, batch_size=batch_size, seed=seed,
                               groups=_split_csv(groups), multi_token=multi_token,
                               rank_by=rank_by, dtype=dtype)


# --------------------------------------------------------------------------- report / pipeline
@app.command()
def report(
    run: RunArg,
    notebook: Annotated[bool, typer.Option("--notebook", help="Also execute notebooks/"
                                           "findings.ipynb on the run (needs nbclient); "
                                           "keeps RUN/report/findings.ipynb.")] = False,
) -> None:
    """Write RUN/report/index.html: one self-contained page over the whole run."""
    from apmae_gpu import report as report_mod

    with _writing(run):
        report_mod.report(run, notebook=notebook)


@app.command()
def check(run: RunArg) -> None:
    """Verify RUN: stores (every chunk present and intact), parquet files, manifest counts.
    Prints what is damaged and which stage to rerun; exit 1 when something is."""
    from apmae_gpu import check as check_mod

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
    run: RunArg,
    dims: Annotated[str, typer.Option("--dims", help="Comma list of UMAP dimensions.")] = "2,4,8,16",
    heads: Annotated[str, typer.Option("--heads", help="N heads spread over the model (seeded), "
                                       "all, or L:H,L:H.")] = "8",
    trials: Annotated[int, typer.Option("--trials", min=1, help="Subsamples x UMAP seeds per "
                                        "head.")] = 3,
    max_points: Annotated[int, typer.Option("--max-points", min=10, help="Subsample size per "
                                            "trial (trustworthiness is O(n^2)).")] = 5000,
    neighbors: Annotated[int, typer.Option("--neighbors", help="UMAP n_neighbors.")] = 20,
    min_dist: Annotated[float, typer.Option("--min-dist")] = 0.05,
    metric: Annotated[str, typer.Option("--metric")] = "cosine",
    trust_neighbors: Annotated[Optional[int], typer.Option("--trust-neighbors", help="k of the "
                                                           "trustworthiness score (default: "
                                                           "--neighbors).")] = None,
    backend: Annotated[str, typer.Option("--backend", help="auto, cuml or cpu.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", min=1)] = 1,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler")] = None,
    seed: SeedOpt = 0,
) -> None:
    """Trustworthiness of UMAP per number of dimensions, to choose --umap-dims."""
    from apmae_gpu import cluster_studies

    try:
        dims_list = tuple(int(d) for d in _split_csv(dims))
    except ValueError:
        raise ApmaeError(f"--dims {dims}: expected a comma list of integers") from None
    with _writing(run):
        cluster_studies.trust(run=run, dims=dims_list, heads=heads, trials=trials,
                              max_points=max_points, neighbors=neighbors, min_dist=min_dist,
                              metric=metric, trust_neighbors=trust_neighbors, backend=backend,
                              workers=workers, scheduler=scheduler, seed=seed)


@app.command()
def stability(
    run: RunArg,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma list of other seeds.")] = "1,2,3",
    heads: Annotated[str, typer.Option("--heads", help="N heads (seeded sample), all, or "
                                       "L:H,L:H.")] = "16",
    backend: Annotated[str, typer.Option("--backend", help="auto, cuml or cpu.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", min=1)] = 1,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler")] = None,
    stable_at: Annotated[float, typer.Option("--stable-at", help="Mean Jaccard at which a "
                                             "cluster counts as stable.")] = 0.75,
) -> None:
    """Cluster stability: recluster heads with other seeds; ARI per head, Jaccard per cluster."""
    from apmae_gpu import cluster_studies

    try:
        seed_list = tuple(int(s) for s in _split_csv(seeds))
    except ValueError:
        raise ApmaeError(f"--seeds {seeds}: expected a comma list of integers") from None
    with _writing(run):
        cluster_studies.stability(run=run, seeds=seed_list, heads=heads, backend=backend,
                                  workers=workers, scheduler=scheduler, stable_at=stable_at)


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
    from apmae_gpu import cluster_figures

    with _writing(run):
        paths = cluster_figures.cluster_maps(run=run, layer=layer, head=head, cluster=cluster_id,
                                             n=n)
    for path in paths:
        typer.echo(str(path))


# --------------------------------------------------------------------------- entry point
_VARIADIC = {"evaluate": ("--checkpoint", "--data")}


def _expand_variadic(argv: list[str]) -> list[str]:
    """Let ``--checkpoint A B --data X Y`` mean ``--checkpoint A --checkpoint B ...`` (click
    options take one value each)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    names = _VARIADIC.get(command or "", ())
    if not names:
        return argv
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg.startswith("-"):
            current = arg if arg in names else None
            if current is None:
                out.append(arg)
            continue
        if current is not None:
            out += [current, arg]
        else:
            out.append(arg)
    return out


def _describe(exc: BaseException) -> tuple[str, int]:
    """One line for an exception that is not an ApmaeError, and the exit code: 2 for the
    expected failures (I/O, permissions, damaged files, bad model configs), 1 otherwise."""
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    name = type(exc).__name__
    where = f": {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
    if isinstance(exc, PermissionError):
        return f"permission denied{where}", 2
    if isinstance(exc, FileNotFoundError):
        return f"no such file or directory{where}", 2
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on the device{where}", 2
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start})", 2
    if isinstance(exc, json.JSONDecodeError):
        return f"a JSON file is damaged ({exc.msg}, line {exc.lineno})", 2
    if "arrow" in type(exc).__module__.lower() or "parquet" in first.lower():
        return f"a parquet file is damaged or unreadable ({first or name})", 2
    if isinstance(exc, OSError):
        return f"{exc.strerror or first or name}{where}", 2
    if isinstance(exc, MemoryError):
        return "out of memory", 2
    return f"unexpected {name}" + (f": {first}" if first else ""), 1


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    _STATE["argv"] = argv
    try:
        code = app(args=_expand_variadic(argv), prog_name="apmae", standalone_mode=False)
        if isinstance(code, int) and code:   # typer.Exit(N) comes back as a return value
            sys.exit(code)
    except ApmaeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
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
        message, code = _describe(exc)
        path = crash_log(_STATE["run"], argv, traceback.format_exc())
        typer.echo(f"error: {message} (traceback: {path})", err=True)
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
