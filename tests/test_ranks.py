"""Capture and encode under a real torchrun (gloo, 2 ranks on CPU): the merged run equals the
one-process run bit for bit, also after one rank is killed mid-way and the command rerun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import read_manifest
from apmae_gpu.core.store import MapStore
from apmae_gpu.synthetic import synthetic_tasks

ARGS = ["--model", "random:tiny-llama", "--per-task", "3", "--batch-size", "2", "--device", "cpu"]


def _cli(args, nproc: int = 1):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "-m", "apmae_gpu.cli"] if nproc > 1
                else [sys.executable, "-m", "apmae_gpu.cli"])
    return subprocess.Popen([*launcher, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _ok(proc, timeout=240):
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert rc == 0, proc.stdout.read().decode()[-3000:]


def _snapshot(run: Path):
    store = MapStore(run)
    return store.inferences(), store.index(), store.read(np.arange(store.n_maps))


def _assert_same(a: Path, b: Path):
    x, y = _snapshot(a), _snapshot(b)
    pd.testing.assert_frame_equal(x[0], y[0])
    pd.testing.assert_frame_equal(x[1], y[1])
    assert x[2].shape == y[2].shape and np.array_equal(x[2].view(np.uint16), y[2].view(np.uint16))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: the train split, then the analysis split."""
    run = synthetic_tasks(tmp_path_factory.mktemp("ref") / "run", "random:tiny-llama",
                          n_per_task=14, window=32)
    _ok(_cli(["capture", str(run), "--split", "train", *ARGS]))
    _ok(_cli(["capture", str(run), *ARGS]))
    return run


def test_two_ranks_store_exactly_what_one_process_stores(reference, tmp_path):
    run = synthetic_tasks(tmp_path / "run", "random:tiny-llama", n_per_task=14, window=32)
    _ok(_cli(["capture", str(run), "--split", "train", *ARGS], nproc=2))
    _ok(_cli(["capture", str(run), *ARGS], nproc=2))
    assert not (run / "shards").exists()
    _assert_same(reference, run)
    inf = MapStore(run).inferences()
    kept = inf[inf.has_maps & (inf.split == "analysis") & (inf.task == "identifiers")]
    assert kept.correct.sum() == 3 and (~kept.correct.astype(bool)).sum() == 3


# Runs the CLI under torchrun with a slow rank-0 merge, logging each rank's group settings,
# the merge and each rank's exit (and whether it was still in the group) as JSON lines.
SLOW_MERGE_DRIVER = """
import atexit, json, os, sys, time
import torch.distributed as dist
from apmae_gpu import cli
from apmae_gpu.capture import merge as rank_merge
LOG, RANK = sys.argv.pop(1), int(os.environ["RANK"])
def note(event, **kw):
    with open(LOG, "a") as f:
        f.write(json.dumps({"rank": RANK, "event": event, "t": time.time(), **kw}) + "\\n")
real_init, real_merge = dist.init_process_group, rank_merge.merge_capture
def init(*a, **k):
    note("init", timeout=k["timeout"].total_seconds(), backend=k["backend"])
    return real_init(*a, **k)
def merge(run):
    note("merge start")
    time.sleep(float(os.environ["SLOW_MERGE_S"]))
    out = real_merge(run)
    note("merge end")
    return out
dist.init_process_group, rank_merge.merge_capture = init, merge
atexit.register(lambda: note("exit", in_group=dist.is_initialized()))
cli.main()
"""


def test_ranks_leave_the_group_before_a_merge_longer_than_the_timeout(reference, tmp_path):
    """The group has an explicit (here 6 s) timeout; rank 0 merges for longer than that after
    every rank has left the group, so rank 1 exits during the merge and nothing times out."""
    run = synthetic_tasks(tmp_path / "run", "random:tiny-llama", n_per_task=14, window=32)
    driver, log = tmp_path / "driver.py", tmp_path / "events.jsonl"
    driver.write_text(SLOW_MERGE_DRIVER)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", APMAE_DIST_TIMEOUT_S="6",
               SLOW_MERGE_S="9")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(driver), str(log), "capture", str(run),
                             "--split", "train", *ARGS], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    _ok(proc)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    at = {(e["rank"], e["event"]): e for e in events}
    assert [(e["timeout"], e["backend"]) for e in events if e["event"] == "init"] == \
        [(6.0, "gloo")] * 2
    assert (1, "merge start") not in at
    assert at[(0, "merge end")]["t"] - at[(0, "merge start")]["t"] >= 9 > 6
    assert at[(1, "exit")]["t"] < at[(0, "merge end")]["t"]      # rank 1 left during the merge
    assert not at[(0, "exit")]["in_group"] and not at[(1, "exit")]["in_group"]
    _ok(_cli(["capture", str(run), *ARGS], nproc=2))
    _assert_same(reference, run)


def test_the_group_timeout_is_explicit_and_validated(monkeypatch):
    from apmae_gpu.capture import ranks

    monkeypatch.delenv(ranks.TIMEOUT_ENV, raising=False)
    assert ranks.group_timeout().total_seconds() == ranks.DEFAULT_TIMEOUT_S == 1800
    monkeypatch.setenv(ranks.TIMEOUT_ENV, "7200")
    assert ranks.group_timeout().total_seconds() == 7200
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(ranks.TIMEOUT_ENV, bad)
        with pytest.raises(ApmaeError, match=f"APMAE_DIST_TIMEOUT_S={bad}: expected a positive"):
            ranks.group_timeout()
    monkeypatch.delenv(ranks.ONE_GPU_ENV, raising=False)
    assert (ranks.backend("cuda:3"), ranks.backend("cpu")) == ("nccl", "gloo")
    monkeypatch.setenv(ranks.ONE_GPU_ENV, "1")       # two ranks on one GPU: gloo, cuda:0
    assert ranks.backend("cuda:0") == "gloo"


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(child)
    return None


def _kill_rank_1_midway(run: Path, args: list[str]) -> None:
    """Start ``args`` on 2 torchrun ranks, SIGKILL rank 1 once it committed two parts, and
    check that torchrun stops the group."""
    proc = _cli(args, nproc=2)
    parts = run / "shards" / "1-of-2" / "inferences.parquet"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("part-*.parquet"))) >= 2:
            break
        time.sleep(0.02)
    pid = _rank_pid(proc.pid, 1)
    assert proc.poll() is None and pid is not None, "capture finished before it could be killed"
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0          # torchrun stops the group


def test_a_killed_rank_reruns_to_the_same_run(reference, tmp_path):
    run = synthetic_tasks(tmp_path / "run", "random:tiny-llama", n_per_task=14, window=32)
    _ok(_cli(["capture", str(run), "--split", "train", *ARGS], nproc=2))
    _kill_rank_1_midway(run, ["capture", str(run), *ARGS])
    assert (run / "shards").exists()
    _ok(_cli(["capture", str(run), *ARGS], nproc=2))
    _assert_same(reference, run)


def test_one_process_refuses_a_run_with_unmerged_shards(tmp_path):
    run = synthetic_tasks(tmp_path / "run", "random:tiny-llama", n_per_task=6, window=32)
    (run / "shards" / "0-of-2").mkdir(parents=True)
    proc = _cli(["capture", str(run), *ARGS])
    assert proc.wait(timeout=120) == 2
    assert "unfinished multi-process capture" in proc.stdout.read().decode()
    shutil.rmtree(run / "shards")


def _embeddings(run: Path):
    import zarr

    g = zarr.open_group(run / "embeddings.zarr", mode="r")
    assert g.attrs["complete"]
    return np.asarray(g["inference_id"][:]), np.asarray(g["embeddings"][:])


def test_encode_on_two_ranks_equals_one_process(synthetic_run_dir, tiny_checkpoint, tmp_path):
    runs = {}
    for nproc in (1, 2):
        run = runs[nproc] = tmp_path / f"run{nproc}"
        shutil.copytree(synthetic_run_dir, run)
        _ok(_cli(["encode", str(run), "--checkpoint", str(tiny_checkpoint), "--block", "16",
                  "--batch-size", "32", "--device", "cpu"], nproc=nproc))
    (ids1, e1), (ids2, e2) = _embeddings(runs[1]), _embeddings(runs[2])
    assert ids1.size == 126 and np.array_equal(ids1, ids2)
    assert np.array_equal(e1.view(np.uint16), e2.view(np.uint16))
    assert not (runs[2] / "shards-encode").exists()


def test_pipeline_launches_capture_and_encode_with_torchrun(monkeypatch, tmp_path):
    """Under torchrun the stage's command reads its section from the config used: what each
    rank's stage function receives is exactly the pipeline's section."""
    from apmae_gpu import cli, pipeline
    from apmae_gpu.capture import maps as capture_mod
    from apmae_gpu.core.config import load_config
    from apmae_gpu.encoding import encoder as encoding

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
    keys = pipeline.stage_keys(cfg)
    cfg.capture.nproc = cfg.encode.nproc = 2
    cfg.seed, cfg.capture.batch_size, cfg.capture.analysis.max_attempts = 5, 3, 7
    assert pipeline.stage_keys(cfg) != keys      # (the seed and settings changed)
    cfg.seed, cfg.capture.batch_size, cfg.capture.analysis.max_attempts = 0, 8, 30
    assert pipeline.stage_keys(cfg) == keys      # the process count never changes a result
    cfg.seed, cfg.capture.batch_size = 5, 3
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "apmae_gpu.cli"]
    calls, seen = [], []
    monkeypatch.setattr(capture_mod, "capture", lambda run, model, settings, **kw: seen.append(
        (model, settings, kw)))
    monkeypatch.setattr(encoding, "encode", lambda run, settings, **kw: seen.append(
        (None, settings, kw)))

    def launch(argv):   # one rank's command line, run here as the launcher would
        calls.append(argv)
        cli.main(argv[len(launcher):])
        return 0

    monkeypatch.setattr(pipeline.subprocess, "call", launch)
    pipeline.RUNNERS["capture_train"](cfg, tmp_path, False)
    pipeline.RUNNERS["encode"](cfg, tmp_path, True)
    cfg.capture.encode_analysis = True   # capture and encode in one pass: also on every rank
    pipeline.RUNNERS["capture_analysis"](cfg, tmp_path, False)
    assert [c[:9] for c in calls] == [[*launcher, "capture", str(tmp_path)],
                                      [*launcher, "encode", str(tmp_path)],
                                      [*launcher, "capture", str(tmp_path)]]
    (m0, train, kw0), (_, enc, kw1), (m2, analysis, kw2) = seen
    assert m0 == m2 == cfg.model and kw0["split"] == "train" and kw2["split"] == "analysis"
    assert train.model_dump() == {**cfg.capture.model_dump(), "encode_analysis": False}
    assert analysis == cfg.capture and analysis.analysis.max_attempts == 30
    assert kw0["seed"] == kw2["seed"] == 5 and kw0["device"] == cfg.device
    assert kw2["encode_with"] == tmp_path / "apmae" / "final" and kw0["encode_with"] is None
    assert enc == cfg.encode and kw1["restart"] is True
    monkeypatch.setattr(pipeline.subprocess, "call", lambda argv: 1)
    with pytest.raises(pipeline.ApmaeError, match="distributed encoding failed"):
        pipeline.RUNNERS["encode"](cfg, tmp_path, False)


def test_shard_processes_and_a_killed_merge_give_the_one_process_run(tmp_path, monkeypatch):
    """``--shard K/N`` processes run one after the other (a SLURM array), the merge dies after
    its second commit, ``merge-shards`` again: the one-process run, bit for bit."""
    from apmae_gpu.capture.maps import capture, merge_shards

    kw = dict(per_task=2, batch_size=3, device="cpu")
    ref = synthetic_tasks(tmp_path / "ref", "random:tiny-llama", n_per_task=10, window=32)
    capture(ref, "random:tiny-llama", **kw)
    run = synthetic_tasks(tmp_path / "run", "random:tiny-llama", n_per_task=10, window=32)
    for k in (0, 1):
        capture(run, "random:tiny-llama", shard=f"{k}/2", **kw)
    original, calls = MapStore.commit, {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(MapStore, "commit", dying)
    with pytest.raises(KeyboardInterrupt):
        merge_shards(run)
    monkeypatch.setattr(MapStore, "commit", original)
    assert (run / "shards").exists() and len(MapStore(run).inferences()) > 0
    result = merge_shards(run)
    assert not (run / "shards").exists() and result["shards"] == 2
    _assert_same(ref, run)


def _run_embeddings(run: Path):
    """ids, embeddings (as uint16 bits) and attributes of RUN/embeddings.zarr."""
    import zarr

    g = zarr.open_group(run / "embeddings.zarr", mode="r")
    assert g.attrs["complete"]
    return (np.asarray(g["inference_id"][:]), np.asarray(g["embeddings"][:]).view(np.uint16),
            dict(g.attrs))


def _assert_same_encoded(a: Path, b: Path):
    """Same inference rows, no maps stored, the same embeddings bit for bit."""
    x, y = MapStore(a), MapStore(b)
    pd.testing.assert_frame_equal(x.inferences(), y.inferences())
    assert x.n_maps == y.n_maps == 0
    (ia, ea, aa), (ib, eb, ab) = _run_embeddings(a), _run_embeddings(b)
    assert np.array_equal(ia, ib) and np.array_equal(ea, eb)
    assert aa == ab
    inf = x.inferences()
    assert np.array_equal(ia, np.sort(inf.loc[inf.has_maps, "inference_id"].to_numpy()))


def test_shards_encoding_while_they_capture_merge_to_the_one_process_run(tmp_path, tiny_apmae,
                                                                         monkeypatch, caplog):
    """``--shard K/N --encode-with``: each shard keeps embeddings (no maps); a merge killed
    while a committed round's embedding waits in the writer's block (blocks of 3) reruns to
    the one-process run."""
    from apmae_gpu.capture.maps import capture, merge_shards
    from apmae_gpu.encoding import encoder as encoding

    monkeypatch.setattr(encoding, "default_block", lambda *a, **k: 3)
    kw = {"per_task": 2, "batch_size": 3, "device": "cpu", "encode_with": tiny_apmae}
    ref = synthetic_tasks(tmp_path / "ref", "random:tiny-llama", n_per_task=10, window=32)
    capture(ref, "random:tiny-llama", **kw)
    run = synthetic_tasks(tmp_path / "run", "random:tiny-llama", n_per_task=10, window=32)
    for k in (0, 1):
        capture(run, "random:tiny-llama", shard=f"{k}/2", **kw)
        shard = MapStore(run / "shards" / f"{k}-of-2")
        assert shard.n_maps == 0 and (run / "shards" / f"{k}-of-2" / "embeddings.zarr").exists()
        if k == 0:   # every shard of a split encodes with the same checkpoint, or none does
            with pytest.raises(ApmaeError, match="captured with --encode-with .*final, not None"):
                capture(run, "random:tiny-llama", shard="1/2", per_task=2, batch_size=3,
                        device="cpu")
    original = encoding.EmbeddingWriter.append

    def dying(self, *a, **k):
        if self.path.parent == run and self._n_pending():   # a committed round's embedding
            raise KeyboardInterrupt                          # is still in the buffer
        return original(self, *a, **k)

    monkeypatch.setattr(encoding.EmbeddingWriter, "append", dying)
    with pytest.raises(KeyboardInterrupt):
        merge_shards(run)
    monkeypatch.setattr(encoding.EmbeddingWriter, "append", original)
    assert len(MapStore(run).inferences()) > 0
    result = merge_shards(run)
    assert "re-capturing" in caplog.text   # rounds whose embeddings were lost were redone
    assert not (run / "shards").exists() and result["shards"] == 2
    _assert_same_encoded(ref, run)


@pytest.fixture(scope="module")
def encoded_reference(tmp_path_factory, tiny_apmae):
    """One process: the analysis split captured and encoded in one pass."""
    run = synthetic_tasks(tmp_path_factory.mktemp("enc") / "run", "random:tiny-llama",
                          n_per_task=14, window=32)
    _ok(_cli(["capture", str(run), *ARGS, "--encode-with", str(tiny_apmae)]))
    return run


def test_two_ranks_encoding_while_they_capture_equal_one_process(encoded_reference, tiny_apmae,
                                                                 tmp_path):
    run = synthetic_tasks(tmp_path / "run", "random:tiny-llama", n_per_task=14, window=32)
    _ok(_cli(["capture", str(run), *ARGS, "--encode-with", str(tiny_apmae)], nproc=2))
    assert not (run / "shards").exists()
    _assert_same_encoded(encoded_reference, run)
    inf = MapStore(run).inferences()
    kept = inf[inf.has_maps & (inf.task == "identifiers")]
    assert kept.correct.sum() == 3 and (~kept.correct.astype(bool)).sum() == 3
    assert read_manifest(run)["encode"]["shards"] == 2


def test_a_killed_rank_encoding_while_it_captures_reruns_to_the_same_run(encoded_reference,
                                                                         tiny_apmae, tmp_path):
    run = synthetic_tasks(tmp_path / "run", "random:tiny-llama", n_per_task=14, window=32)
    args = ["capture", str(run), *ARGS, "--encode-with", str(tiny_apmae)]
    _kill_rank_1_midway(run, args)
    assert (run / "shards" / "1-of-2" / "embeddings.zarr").exists()
    _ok(_cli(args, nproc=2))
    assert not (run / "shards").exists()
    _assert_same_encoded(encoded_reference, run)
