"""Hardening probes (issue 15): one writer per run, no silent blanks, one-line errors.

Each test damages real files or starts real processes, then checks that the user gets one
line (no traceback), that nothing is lost, and that nothing is silently replaced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.locks import LOCK_FILE, writer_lock
from apmae_gpu.core.store import MapStore
from tests.java_fixtures import java_source
from tests.tiny_models import save_tiny_apmae

MODEL = "random:tiny-llama"


def _cli(*args, env=None, timeout=300):
    """Run ``apmae ARGS`` in a real process; (exit code, stdout, stderr)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    p = subprocess.run([sys.executable, "-m", "apmae_gpu.cli", *map(str, args)], env=e,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _main(capsys, *args):
    """Run ``apmae ARGS`` through the CLI's entry point in this process (no interpreter
    start-up); (exit code, stdout, stderr)."""
    from apmae_gpu.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line(stderr: str) -> str:
    """The error line; asserts there is exactly one and no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture(scope="module")
def small_run_dir(tmp_path_factory):
    """84 maps of 64x64 in 6 chunks of 16: 4 train inferences, then 10 analysis ones (2 tasks
    x 2 correct + 2 incorrect, 2 noise), 2 layers x 3 heads.  Read-only."""
    from apmae_gpu.synthetic import synthetic_run

    return synthetic_run(tmp_path_factory.mktemp("small") / "run", n_train=4, n_per_task=2,
                         tasks=("identifiers", "closing_brackets", "noise"))


@pytest.fixture()
def run_copy(small_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run_dir, run)
    return run


# --------------------------------------------------------------------------- 1. writer lock
_HOLD = """
import sys
from apmae_gpu.core.locks import writer_lock
with writer_lock(sys.argv[1], sys.argv[2], shard=sys.argv[3] if len(sys.argv) > 3 else None):
    print("held", flush=True)
    sys.stdin.read()
"""


def _holder(run, command, shard=None):
    args = [sys.executable, "-c", _HOLD, str(run), command] + ([str(shard)] if shard else [])
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_is_refused_naming_the_holder_and_a_crash_releases(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = _holder(run, "apmae capture run --split train")
    try:
        with pytest.raises(ApmaeError) as err, writer_lock(run, "apmae encode run"):
            pass
        assert str(err.value) == (f"{run.resolve()} is being written by PID {holder.pid} "
                                  f"(apmae capture run --split train); wait for it to finish "
                                  f"(this apmae encode run changed nothing)")
    finally:
        holder.send_signal(signal.SIGKILL)   # a crash: the kernel drops the lock
        holder.wait()
    with writer_lock(run, "apmae encode run") as lock:
        assert lock == run.resolve() / LOCK_FILE
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with writer_lock(run, "nested stage"):   # the pipeline calling a stage: reentrant
            pass
    assert lock.read_text() == ""


def test_shard_writers_run_side_by_side_and_hold_off_whole_run_writers(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    a = _holder(run, "apmae capture run --shard 0/2", run / "shards" / "0-of-2")
    b = _holder(run, "apmae capture run --shard 1/2", run / "shards" / "1-of-2")
    try:
        with pytest.raises(ApmaeError, match=f"PID {a.pid} \\(apmae capture run --shard 0/2\\)"):
            with writer_lock(run, "apmae capture run --shard 0/2", shard=run / "shards" / "0-of-2"):
                pass
        with pytest.raises(ApmaeError) as err, writer_lock(run, "apmae merge-shards run"):
            pass
        assert f"PID {a.pid}" in str(err.value) and f"PID {b.pid}" in str(err.value)
    finally:
        for p in (a, b):
            p.communicate("")
    with writer_lock(run, "apmae merge-shards run"):
        pass


def _tasks(path):
    from apmae_gpu.synthetic import synthetic_tasks

    return synthetic_tasks(path, MODEL, n_per_task=8, window=32)


def _snapshot(run):
    store = MapStore(run)
    return store.inferences(), store.index(), store.read(np.arange(store.n_maps))


def test_two_capture_processes_on_one_run_one_refuses_and_the_result_is_uninterrupted(tmp_path):
    from apmae_gpu.capture.maps import capture

    common = ["--model", MODEL, "--device", "cpu", "--batch-size", "4", "--per-task", "3"]
    run = _tasks(tmp_path / "run")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "apmae_gpu.cli", "capture", str(run)]
    first = subprocess.Popen(cmd + ["--split", "train", *common], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(cmd + ["--split", "analysis", *common], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Pause whichever takes the lock first, so that the two overlap whatever the machine.
    lock = run / LOCK_FILE
    deadline = time.time() + 120
    holder = None
    while holder is None and time.time() < deadline:
        try:
            holder = json.loads(lock.read_text() or "null")
        except (OSError, ValueError):
            holder = None
        time.sleep(0.01)
    assert holder is not None
    winner, loser = (first, second) if holder["pid"] == first.pid else (second, first)
    os.kill(winner.pid, signal.SIGSTOP)
    try:
        _, err = loser.communicate(timeout=120)
    finally:
        os.kill(winner.pid, signal.SIGCONT)
    assert loser.returncode == 2
    line = _one_line(err)
    assert line.startswith(f"error: {run.resolve()} is being written by PID {winner.pid} "
                           f"(apmae capture {run} --split ")
    _, err = winner.communicate(timeout=300)
    assert winner.returncode == 0, err[-2000:]
    loser_split = "analysis" if loser is second else "train"
    winner_split = "train" if loser_split == "analysis" else "analysis"
    code, _, err = _cli("capture", run, "--split", loser_split, *common)
    assert code == 0, err[-2000:]

    ref = _tasks(tmp_path / "ref")
    for split in (winner_split, loser_split):
        capture(ref, MODEL, split=split, per_task=3, batch_size=4, device="cpu")
    a, b = _snapshot(ref), _snapshot(run)
    assert len(a[0]) > 0 and a[2].shape[0] > 0
    pd.testing.assert_frame_equal(a[0], b[0])
    pd.testing.assert_frame_equal(a[1], b[1])
    assert np.array_equal(a[2], b[2])
    from apmae_gpu.core.check import check_run  # a real capture's manifest counts match

    assert check_run(run, echo=lambda line: None) == []


# --------------------------------------------------------------------------- 2. integrity
def test_a_deleted_chunk_is_an_error_in_every_reader_and_check_names_it(run_copy, tiny_checkpoint,
                                                                         capsys):
    store = MapStore(run_copy)
    last = store.n_chunks() - 1     # analysis maps, which encode reads
    (run_copy / "maps.zarr" / store.chunk_key(last)).unlink()
    msg = (f"{run_copy / 'maps.zarr'}: chunk c/{last}/0/0 ({store.maps_of_chunk(last)}) is "
           f"missing")
    n = store.n_maps
    for read in (lambda: store.read(np.arange(n)), lambda: store.read([3, 20, n - 1]),
                 lambda: list(store.iter_chunks()), lambda: store.read_chunk(last)):
        with pytest.raises(ApmaeError, match="^" + re.escape(msg)):
            read()
    code, _, err = _main(capsys, "encode", run_copy, "--checkpoint", tiny_checkpoint,
                         "--device", "cpu")
    assert code == 2 and _one_line(err).startswith(f"error: {msg}")
    code, out, _ = _main(capsys, "check", run_copy)
    assert code == 1
    damaged = [ln for ln in out.splitlines() if ln.startswith("damaged:")]
    assert damaged == [f"damaged: {msg} -> rerun capture: move maps.zarr, maps_index.parquet "
                       f"and inferences.parquet aside, then `apmae capture {run_copy} --split "
                       f"train` and `--split analysis` and the stages after them (or capture "
                       f"into a new run)"]


def test_training_refuses_a_missing_chunk(synthetic_run_dir, tmp_path, capsys):
    run_copy = tmp_path / "run"
    shutil.copytree(synthetic_run_dir, run_copy)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"image_size": 64, "patch_size": 16}))
    store = MapStore(run_copy)
    (run_copy / "maps.zarr" / store.chunk_key(0)).unlink()
    code, _, err = _main(capsys, "train", run_copy, "--preset", "tiny", "--steps", "2",
                         "--batch-size", "8", "--device", "cpu", "--model-config", cfg)
    assert code == 2
    assert "chunk c/0/0/0 (maps 0-15) is missing" in _one_line(err)
    assert not (run_copy / "apmae" / "final").exists()


def test_truncated_chunks_are_one_line_errors_with_and_without_checksums(run_copy, tmp_path,
                                                                          monkeypatch, capsys):
    store = MapStore(run_copy)
    assert store.info.checksum and store.info.codec == "zstd(level=1)+crc32c"
    path = run_copy / "maps.zarr" / store.chunk_key(2)
    data = path.read_bytes()
    path.write_bytes(data[:-4] + bytes(b ^ 0xFF for b in data[-4:]))   # only the crc changes
    with pytest.raises(ApmaeError, match=r"chunk c/2/0/0 \(maps 32-47\) is damaged "
                                         r"\(checksum mismatch\)"):
        store.read(np.arange(store.n_maps))
    # a store written before the checksum (zstd only) stays readable, and a truncated chunk
    # is still one line (the decoder's complaint), not a traceback
    from apmae_gpu.core import store as store_mod
    from apmae_gpu.synthetic import synthetic_run

    monkeypatch.setattr(store_mod, "chunk_codecs", lambda level=1: [
        __import__("zarr").codecs.ZstdCodec(level=level)])
    old = synthetic_run(tmp_path / "old", n_train=4, n_per_task=1, tasks=("identifiers",))
    monkeypatch.undo()
    ostore = MapStore(old)
    assert not ostore.info.checksum
    maps = ostore.read(np.arange(ostore.n_maps))
    assert np.isfinite(maps).all()
    p = old / "maps.zarr" / ostore.chunk_key(0)
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ApmaeError, match=r"chunk c/0/0/0 \(maps 0-15\) is damaged \("):
        ostore.read([0, 1])
    code, out, _ = _main(capsys, "check", old)
    assert code == 1 and "chunk c/0/0/0 (maps 0-15) is damaged" in out


def test_damaged_metadata_and_parquet_parts_are_one_line_errors(run_copy, tiny_checkpoint, capsys):
    meta = run_copy / "maps.zarr" / "zarr.json"
    good = meta.read_bytes()
    meta.write_bytes(good[:len(good) // 2])
    code, _, err = _main(capsys, "encode", run_copy, "--checkpoint", tiny_checkpoint,
                         "--device", "cpu")
    assert code == 2
    assert _one_line(err).startswith(f"error: {run_copy / 'maps.zarr'}: its metadata "
                                     f"(zarr.json) is damaged")
    meta.write_bytes(good)
    part = sorted((run_copy / "inferences.parquet").glob("part-*.parquet"))[3]
    part.write_bytes(part.read_bytes()[:50])
    code, _, err = _main(capsys, "encode", run_copy, "--checkpoint", tiny_checkpoint,
                         "--device", "cpu")
    assert code == 2 and _one_line(err).startswith(f"error: {part} is damaged")
    code, out, _ = _main(capsys, "check", run_copy)
    assert code == 1 and f"damaged: {part} is not readable parquet" in out


def test_check_passes_a_sound_run_and_flags_damaged_embeddings(run_copy, tiny_checkpoint, capsys):
    from apmae_gpu.core.check import check_run
    from apmae_gpu.encoding import encoder as encoding

    encoding.encode(run_copy, checkpoint=tiny_checkpoint, device="cpu", block=16)
    lines: list[str] = []
    assert check_run(run_copy, echo=lines.append) == []
    assert lines[-1] == f"{run_copy}: sound"
    assert any(ln.startswith("ok: maps.zarr (") and "checksums verified" in ln for ln in lines)
    chunk = run_copy / "embeddings.zarr" / "embeddings" / "c" / "1" / "2" / "0" / "0"
    chunk.unlink()
    with pytest.raises(ApmaeError, match="chunk embeddings/c/1/2/0/0 is missing"):
        encoding.read_head(run_copy / "embeddings.zarr", 1, 2)
    code, out, _ = _main(capsys, "check", run_copy)
    assert code == 1
    assert [ln for ln in out.splitlines() if ln.startswith("damaged")] == [
        f"damaged: {run_copy / 'embeddings.zarr'}: chunk embeddings/c/1/2/0/0 (layer 1, head 2) "
        f"is missing -> `apmae encode {run_copy} --restart`"]


# --------------------------------------------------------------------------- 3. mine --out
@pytest.fixture(scope="module")
def java_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("java")
    for i in range(3):
        (root / f"Demo{i}.java").write_text(java_source(f"Demo{i}", n_methods=5, seed=i))
    return root


def test_mine_refuses_a_run_with_captures_and_changes_nothing(run_copy, java_dir, capsys):
    (run_copy / "tasks.parquet").write_bytes(b"stand-in")
    before = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")}
    code, _, err = _main(capsys, "mine", "--corpus", java_dir, "--model", MODEL, "--out", run_copy,
                        "--window", "32", "--per-task", "1", "--tasks", "identifiers")
    assert code == 2
    assert _one_line(err) == (f"error: {run_copy} already holds captures (maps.zarr, "
                              f"inferences.parquet, maps_index.parquet); mining again would "
                              f"replace the tasks they point at: use a new --out")
    assert {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")} == before


def test_mine_out_that_is_a_file_or_read_only_fails_first(tmp_path, java_dir, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = _main(capsys, "mine", "--corpus", java_dir, "--model", MODEL, "--out", afile)
    assert code == 2 and _one_line(err) == f"error: --out {afile} is a file, not a run directory"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        code, _, err = _main(capsys, "mine", "--corpus", java_dir, "--model", MODEL, "--out",
                             ro / "run")
        assert code == 2 and _one_line(err) == f"error: --out {ro / 'run'}: {ro} is not writable"
    finally:
        ro.chmod(0o755)


def test_a_failed_mine_leaves_no_run_directory(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "Broken.java").write_text("class {{{ not java")
    out = tmp_path / "new" / "run"
    code, _, err = _main(capsys, "mine", "--corpus", corpus, "--model", MODEL, "--out", out,
                        "--window", "32", "--tasks", "identifiers")
    assert code == 2 and "no task could be mined" in _one_line(err)
    assert not out.exists()


# --------------------------------------------------------------------------- 4/5. encode
def test_encode_refuses_a_nan_map(run_copy, tiny_checkpoint, capsys):
    import zarr

    store = MapStore(run_copy)
    inf = store.inferences()
    first = int(inf.loc[inf.split == "analysis", "inference_id"].min())
    index = store.index()
    bad = int(index[index.inference_id == first].map_id.iloc[2])
    arr = zarr.open_array(run_copy / "maps.zarr", mode="r+")
    m = arr[bad]
    m[5, 1] = np.nan
    arr[bad] = m
    code, _, err = _main(capsys, "encode", run_copy, "--checkpoint", tiny_checkpoint,
                         "--device", "cpu")
    assert code == 2
    assert _one_line(err) == (f"error: {run_copy / 'maps.zarr'}: NaN or infinite values in map "
                              f"{bad}; refusing to encode it (`apmae check {run_copy}` says what "
                              f"to rerun)")


def test_encode_restart_keeps_the_old_embeddings_until_the_new_ones_are_complete(
        run_copy, tiny_checkpoint, tmp_path, capsys):
    from apmae_gpu.encoding import encoder as encoding

    encoding.encode(run_copy, checkpoint=tiny_checkpoint, device="cpu", block=16)
    before = encoding.read_head(run_copy / "embeddings.zarr", 0, 1)
    other = save_tiny_apmae(tmp_path / "other", image_size=64, patch_size=8)
    store = MapStore(run_copy)
    last = store.n_chunks() - 1
    chunk = run_copy / "maps.zarr" / store.chunk_key(last)
    kept = chunk.read_bytes()
    chunk.unlink()
    code, _, err = _main(capsys, "encode", run_copy, "--checkpoint", other, "--device", "cpu",
                         "--restart")
    assert code == 2 and "is missing" in _one_line(err)
    after = encoding.read_head(run_copy / "embeddings.zarr", 0, 1)
    assert np.array_equal(before[0], after[0])
    assert np.array_equal(before[1], after[1], equal_nan=True)
    assert encoding.open_embeddings(run_copy).attrs["checkpoint"] == str(tiny_checkpoint)
    chunk.write_bytes(kept)
    encoding.encode(run_copy, checkpoint=other, device="cpu", restart=True)
    group = encoding.open_embeddings(run_copy)
    assert group.attrs["checkpoint"] == str(other) and group.attrs["complete"]
    assert sorted(p.name for p in run_copy.iterdir() if "embeddings" in p.name) == [
        "embeddings.zarr"]


# --------------------------------------------------------------------------- 6. last resort
def test_unexpected_errors_are_one_line_with_a_log_of_the_traceback(run_copy, monkeypatch,
                                                                    capsys):
    from apmae_gpu import cli
    from apmae_gpu.report import build as report

    def boom(run, notebook=False):
        raise RuntimeError("something nobody expected\nsecond line")

    monkeypatch.setattr(report, "report", boom)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(run_copy)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    line = _one_line(err)
    assert line.startswith("error: unexpected RuntimeError: something nobody expected "
                           f"(traceback: {run_copy / 'logs'}/apmae-")
    log = Path(line.rsplit("(traceback: ", 1)[1].rstrip(")"))
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "second line" in text
    assert text.startswith(f"apmae report {run_copy}\n")


def test_damaged_tasks_and_pipeline_state_and_model_configs_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tasks.parquet").write_bytes(b"PAR1 truncated")
    code, _, err = _main(capsys, "capture", run, "--model", MODEL, "--device", "cpu")
    assert code == 2 and _one_line(err).startswith(f"error: {run / 'tasks.parquet'} is damaged "
                                                   f"or not parquet (")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"model: {MODEL}\nrun: {run}\nstages: [report]\n")
    (run / "pipeline.json").write_text('{"stages": {')
    code, _, err = _main(capsys, "pipeline", "--config", cfg)
    assert code == 2 and _one_line(err).startswith(f"error: {run / 'pipeline.json'} is damaged (")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": "two", "hidden_size": 64,
        "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100}))
    from apmae_gpu.capture import llm

    with pytest.raises(ApmaeError, match=f"^model {model}: cannot load \\("):
        llm.load_model(str(model))


def test_non_utf8_configs_and_alias_bombs_are_refused(tmp_path, capsys):
    from apmae_gpu.core.config import load_config

    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model: caf\xe9\n".encode("latin-1"))
    code, _, err = _main(capsys, "pipeline", "--config", latin)
    assert code == 2 and _one_line(err) == f"error: config {latin}: not UTF-8 text (byte 10)"
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]'] + [
        f'{c}: &{c} [{",".join(["*" + p] * 9)}]' for p, c in zip("abcdefgh", "bcdefghi")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("train:\n  model_config_overrides:\n" + "".join(f"    {ln}\n" for ln in levels))
    with pytest.raises(ApmaeError, match="aliases expand to more than 100000 YAML nodes"):
        load_config(bomb)
    loop = tmp_path / "loop.yaml"
    loop.write_text("train:\n  model_config_overrides: &a {x: *a}\n")
    with pytest.raises(ApmaeError, match="a YAML alias refers to itself"):
        load_config(loop)
    big = tmp_path / "big.yaml"
    big.write_text("train:\n  model_config_overrides:\n    x: [" + ",".join(["1"] * 9000) + "]\n")
    with pytest.raises(ApmaeError, match="at most 16384 allowed"):
        load_config(big)


# --------------------------------------------------------------------------- 7. corpora
def test_corpus_readers_skip_and_count_what_they_cannot_read(tmp_path, java_dir):
    corpus = tmp_path / "corpus"
    shutil.copytree(java_dir, corpus)
    (corpus / "Loop.java").symlink_to("Loop.java")
    (corpus / "Dangling.java").symlink_to("Nowhere.java")
    os.mkfifo(corpus / "Fifo.java")
    out = tmp_path / "run"
    code, _, err = _cli("mine", "--corpus", corpus, "--model", MODEL, "--out", out, "--window",
                        "32", "--per-task", "2", "--tasks", "identifiers", timeout=120)
    assert code == 0, err
    skipped = json.loads((out / "manifest.json").read_text())["mine"]["skipped"]
    assert {k: skipped.get(k) for k in ("symlink_loop", "dangling_symlink", "special_file")} == {
        "symlink_loop": 1, "dangling_symlink": 1, "special_file": 1}

    from apmae_gpu.mining.corpus import TooLarge, Unreadable, open_corpus

    zpath = tmp_path / "src.zip"
    good = java_source("Good", n_methods=3).encode()
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("Good.java", good, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("BadCrc.java", good, compress_type=zipfile.ZIP_STORED)
        zf.writestr("BadDeflate.java", good, compress_type=zipfile.ZIP_DEFLATED)
    raw = bytearray(zpath.read_bytes())
    with zipfile.ZipFile(zpath) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    for name, flip in (("BadCrc.java", 40), ("BadDeflate.java", 3)):
        info = infos[name]
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        raw[start + flip] ^= 0xFF
    zpath.write_bytes(bytes(raw))
    got = dict(open_corpus(str(zpath)).iter_files(seed=0, max_bytes=10_000_000))
    assert got["Good.java"] == good
    assert [type(got[n]).__name__ for n in ("BadCrc.java", "BadDeflate.java")] == [
        "Unreadable", "Unreadable"]
    assert {got[n].reason for n in ("BadCrc.java", "BadDeflate.java")} == {"corrupt_member"}
    small = dict(open_corpus(str(zpath)).iter_files(seed=0, max_bytes=100))
    assert isinstance(small["Good.java"], TooLarge)
    assert not isinstance(small["Good.java"], Unreadable)

    # the time bound: a read that outlasts it is skipped (here a bound of 0 s and 2 pieces)
    from apmae_gpu.mining.corpus import read_bounded

    slow = tmp_path / "Slow.java"
    slow.write_bytes(b"x" * (3 << 20))
    with open(slow, "rb") as f:
        got = read_bounded(f, None, seconds=0.0)
    assert isinstance(got, Unreadable) and got.reason == "slow_read"
    with open(slow, "rb") as f:
        assert read_bounded(f, None) == slow.read_bytes()
    # a truncated JSONL.gz corpus is one line, not a gzip traceback
    gz = tmp_path / "c.jsonl.gz"
    import gzip

    whole = gzip.compress(b"".join(b'{"content": "class A%d {}"}\n' % i for i in range(2000)))
    gz.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ApmaeError, match=f"^corpus {gz}: not readable"):
        open_corpus(str(gz)).ids()


# --------------------------------------------------------------------------- 9. model names
def test_a_mistyped_model_name_fails_in_one_line_without_the_hub(tmp_path, monkeypatch):
    from apmae_gpu.capture import llm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(llm, "_hub_reachable", lambda timeout=2.0: pytest.fail("went online"))
    with pytest.raises(ApmaeError) as err:
        llm.load_tokenizer("bigcode/starcoder2-3bb")
    assert str(err.value) == ("model bigcode/starcoder2-3bb: not a local directory and not in "
                              "the local Hugging Face cache, and HF_HUB_OFFLINE is set (check "
                              "the name)")
    with pytest.raises(ApmaeError, match="and not a valid hub id"):
        llm.load_model("no such/model!")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(llm, "_hub_reachable", lambda timeout=2.0: False)
    with pytest.raises(ApmaeError, match="the hub cannot be reached"):
        llm.load_model("bigcode/starcoder2-3bb")


def test_expected_failures_get_their_own_one_line_messages(tmp_path):
    import errno as errno_mod

    import pyarrow.parquet as pq

    from apmae_gpu.cli_messages import describe as _describe

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    caught = []
    for action in (lambda: json.loads('{"a": '), lambda: b"caf\xe9".decode("utf-8"),
                   lambda: pq.read_table(broken), lambda: open(tmp_path / "nope.json"),
                   lambda: (_ for _ in ()).throw(PermissionError(errno_mod.EACCES,
                                                                 "Permission denied",
                                                                 str(tmp_path / "x"))),
                   lambda: (_ for _ in ()).throw(OSError(errno_mod.ENOSPC, "No space left",
                                                         str(tmp_path / "y")))):
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - the point is what _describe makes of it
            caught.append(_describe(exc))
    assert caught[0] == ("a JSON file is damaged (Expecting value, line 1)", 2)
    assert caught[1] == ("a file is not UTF-8 text (unexpected end of data at byte 3)", 2)
    assert caught[2][1] == 2
    assert caught[2][0].startswith("a parquet file is damaged or unreadable (")
    assert caught[3] == (f"no such file or directory: {tmp_path / 'nope.json'}", 2)
    assert caught[4] == (f"permission denied: {tmp_path / 'x'}", 2)
    assert caught[5] == (f"no space left on the device: {tmp_path / 'y'}", 2)
    assert _describe(RuntimeError("boom")) == ("unexpected RuntimeError: boom", 1)


def test_check_notes_a_writer_at_work(run_copy):
    from apmae_gpu.core.check import check_run

    holder = _holder(run_copy, "apmae encode run")
    try:
        lines: list[str] = []
        assert check_run(run_copy, echo=lines.append) == []
        assert lines[0] == (f"note: PID {holder.pid} (apmae encode run) is writing {run_copy} "
                            f"now; what it is writing may show as damaged")
    finally:
        holder.communicate("")


# --------------------------------------------------------------------------- issue 22
# 1. a run's identity
_IDENTITY_PROBES = [
    ("--model", "random:tiny-gpt2", "--model 'random:tiny-llama'; this capture asks for "
                                    "'random:tiny-gpt2'"),
    ("--dtype", "bfloat16", "--dtype 'float32'; this capture asks for 'bfloat16'"),
    ("--seed", "1", "--seed 0; this capture asks for 1"),
    ("--heads", "layerwise:0.5", "--heads 'all'; this capture asks for 'layerwise:0.5'"),
]   # a raised --per-task is captured, a lowered one refused: tests/test_requota.py


def test_a_second_capture_under_other_settings_is_refused_and_changes_nothing(tmp_path, capsys):
    run = _tasks(tmp_path / "run")
    common = ["capture", run, "--device", "cpu", "--batch-size", "4"]
    code, _, err = _main(capsys, *common, "--model", MODEL, "--per-task", "1")
    assert code == 0, err
    before = _snapshot(run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["identity"]["model"] == MODEL and manifest["identity"]["seed"] == 0
    assert manifest["identity"]["analysis"] == {"heads": "all", "per_task": 1}
    for option, value, shown in _IDENTITY_PROBES:
        model = value if option == "--model" else MODEL
        extra = ["--per-task", "1"] + ([] if option == "--model" else [option, value])
        code, _, err = _main(capsys, *common, "--model", model, *extra)
        assert code == 2, (option, err)
        where = f"the analysis split of {run}" if option in ("--heads", "--per-task") else run
        was = shown.split(";")[0].split(" ", 1)[1]
        assert _one_line(err) == (f"error: {where} was captured with {shown}: a run holds the "
                                  f"maps of one setting (rerun with {was}, or mine into a new "
                                  f"--out for the new one)")
    after = _snapshot(run)
    pd.testing.assert_frame_equal(before[0], after[0])
    assert np.array_equal(before[2], after[2])
    # the recorded settings resume (and add nothing: the quota is met)
    code, _, err = _main(capsys, *common, "--model", MODEL, "--per-task", "1")
    assert code == 0, err
    pd.testing.assert_frame_equal(before[0], _snapshot(run)[0])


# 5. bounds on every numeric setting
def _numeric(annotation) -> bool:
    import typing

    if annotation in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(annotation) if a is not type(None))


def _bounds_within(annotation) -> list:
    import typing

    out = []
    for a in typing.get_args(annotation):
        if typing.get_origin(a) is typing.Annotated:
            for m in a.__metadata__:   # a Field(...) inside Annotated holds its bounds
                out += list(getattr(m, "metadata", [m]))
        out += _bounds_within(a)
    return out


def test_every_numeric_setting_has_a_bound_or_is_documented_unbounded():
    import annotated_types as at
    from pydantic import BaseModel

    from apmae_gpu.core import config as C

    seen = []
    for model in [C.PipelineConfig, C.CaptureSplitConfig, *C.SECTION_OF]:
        for name, f in model.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                continue
            if not _numeric(f.annotation):
                continue
            key = f"{C.SECTION_OF.get(model, model.__name__)}.{name}"
            seen.append(key)
            meta = list(f.metadata) + _bounds_within(f.annotation)
            bounded = any(isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt)) for m in meta)
            assert bounded or C.UNBOUNDED.get(key), f"{key}: no bound and no reason in UNBOUNDED"
    assert len(seen) > 40 and "classify.learning_rate" in seen and "PipelineConfig.seed" in seen
    with pytest.raises(ApmaeError, match=r"^classify: learning_rate: input should be greater "
                                         r"than 0 \(got -1\.0\)$"):
        C.section(C.ClassifyConfig, settings={"learning_rate": -1.0})
    with pytest.raises(ApmaeError, match=r"stability: seeds\.0: input should be greater than or "
                                         r"equal to 0 \(got -1\)"):
        C.section(C.StabilityConfig, settings={"seeds": [-1]})


def test_out_of_bounds_options_are_refused_in_one_line(run_copy, capsys):
    from apmae_gpu.core.config import MAX_WORKERS_PER_CORE

    code, _, err = _main(capsys, "classify", run_copy, "--learning-rate", "-1")
    assert code == 2 and _one_line(err) == ("error: --learning-rate: input should be greater "
                                            "than 0 (got -1.0)")
    code, _, err = _main(capsys, "cluster", run_copy, "--seed", "-1")
    assert code == 2 and "Invalid value for '--seed': Input should be greater than or equal to 0" \
        in err and "Traceback" not in err
    cap = MAX_WORKERS_PER_CORE * (os.cpu_count() or 1)
    before = sorted(p.name for p in run_copy.iterdir())
    code, _, err = _main(capsys, "cluster", run_copy, "--workers", cap + 1, "--restart")
    assert code == 2
    assert _one_line(err) == (f"error: --workers: value error, at most {cap} local workers on "
                              f"{os.cpu_count()} cores ({MAX_WORKERS_PER_CORE} per core): more "
                              f"only fail (--scheduler ADDRESS uses an existing cluster's "
                              f"workers, however many) (got {cap + 1})")
    assert sorted(p.name for p in run_copy.iterdir()) == before


# 2. check validates what the stages read; classify and report refuse the same damage
def _clusters(run, cluster):
    inf = MapStore(run).inferences()
    ids = inf.loc[inf.split == "analysis", "inference_id"].to_numpy()
    rows = pd.DataFrame([(i, layer, head) for i in ids for layer in range(2) for head in range(3)],
                        columns=["inference_id", "layer", "head"])
    rows["cluster"] = pd.Series(cluster(len(rows)))
    rows.to_parquet(run / "clusters.parquet", index=False)


def test_check_classify_and_report_refuse_cluster_ids_that_are_not_integers(run_copy, capsys):
    from apmae_gpu.core.frames import update_manifest

    update_manifest(run_copy, "capture", {"scaler": "log"})   # report needs a manifest
    _clusters(run_copy, lambda n: np.arange(n, dtype=np.int32) % 3)
    code, out, _ = _main(capsys, "check", run_copy)
    assert code == 0 and out.splitlines()[-1] == f"{run_copy}: sound", out
    path = run_copy / "clusters.parquet"
    rerun = f"`apmae cluster {run_copy} --restart`"
    for cluster, problem in [
            (lambda n: np.where(np.arange(n) == 1, np.nan, 0.0), "column cluster is floating "
                                                                  "point, not an integer type"),
            (lambda n: np.array(["a"] * n), "column cluster is text, not an integer type"),
            (lambda n: pd.array([None] + [1] * (n - 1), dtype="Int32"),
             "column cluster has 1 null value(s)")]:
        _clusters(run_copy, cluster)
        code, out, _ = _main(capsys, "check", run_copy)
        assert code == 1
        assert [ln for ln in out.splitlines() if ln.startswith("damaged")] == [
            f"damaged: {path}: {problem} -> {rerun}"]
        code, _, err = _main(capsys, "classify", run_copy, "--folds", "2", "--iterations", "5")
        assert code == 2 and _one_line(err) == (f"error: {path}: {problem} (see "
                                                f"docs/contracts.md): rerun {rerun}")
        code, _, err = _main(capsys, "report", run_copy)
        assert code == 2 and _one_line(err).startswith(f"error: {path}: {problem} (see ")
    assert not (run_copy / "classify").exists() and not (run_copy / "report").exists()


def test_check_and_report_refuse_a_missing_or_malformed_manifest(run_copy, capsys):
    manifest = run_copy / "manifest.json"
    shutil.copy(_tasks(run_copy.parent / "mined") / "tasks.parquet", run_copy)
    good = {"apmae_gpu": {"apmae_gpu": "x"}, "mine": {"n_tasks": 1}}
    for text, problem in [
            (None, f"damaged: {manifest} is missing"),
            ("[1, 2]", f"damaged: {manifest}: is a JSON list, not an object"),
            (json.dumps({**good, "capture": "x"}),
             f"damaged: {manifest}: section 'capture' is a str, not an object"),
            (json.dumps({**good, "capture": {"splits": {"analysis": {"tasks": {
                "noise": {"attempts": "2", "kept": 2}}}}}}),
             f"damaged: {manifest}: capture.splits.analysis.tasks.noise: attempts and kept must "
             f"be integers")]:
        if text is None:
            manifest.unlink(missing_ok=True)
        else:
            manifest.write_text(text)
        code, out, _ = _main(capsys, "check", run_copy)
        assert code == 1 and problem + " -> " in out, out
        if text is not None:
            code, _, err = _main(capsys, "report", run_copy)
            assert code == 2 and _one_line(err).startswith(f"error: {manifest}: "), err


# 3/4. mining is bounded in time; empty and unusable corpora end alike
def test_one_deep_expression_is_skipped_in_seconds_and_counted(tmp_path, java_dir, capsys):
    from apmae_gpu.mining.tasks import MAX_DEPTH, JavaTargets, too_deep

    corpus = tmp_path / "corpus"
    shutil.copytree(java_dir, corpus)
    terms = 249_000   # ~1 MB: tree-sitter's captures alone ran for minutes on it
    (corpus / "Deep.java").write_text("class Deep { int f(int a) { return "
                                      + " + ".join(["a"] * terms) + "; } }")
    assert (corpus / "Deep.java").stat().st_size < 1_000_000   # under the default size bound
    java = JavaTargets()
    chain = "class C { int f(int a) { return " + " + ".join(["a"] * (MAX_DEPTH - 10)) + "; } }"
    assert not too_deep(java.parse(chain.encode()).root_node)   # within the bound: mined
    out = tmp_path / "run"
    t0 = time.perf_counter()
    code, _, err = _main(capsys, "mine", "--corpus", corpus, "--model", MODEL, "--out", out,
                         "--window", "32", "--per-task", "2", "--tasks", "identifiers")
    assert code == 0, err
    assert time.perf_counter() - t0 < 60   # shared 2-core machine; the query alone took > 300 s
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mine"]["skipped"]["too_deep"] == 1
    assert len(pd.read_parquet(out / "tasks.parquet")) > 0


def test_empty_and_unusable_corpora_end_alike(tmp_path, capsys):
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (broken / "Broken.java").write_text("class {{{ not java")
    # the broken file is counted once as unparsable, and its one candidate (inside the
    # ERROR node) as parse_error: a file with errors loses only what they touch
    for corpus, files, skipped in ((empty, 0, {}),
                                   (broken, 1, {"unparsable": 1, "parse_error": 1})):
        out = tmp_path / f"run-{corpus.name}"
        code, _, err = _main(capsys, "mine", "--corpus", corpus, "--model", MODEL, "--out", out,
                             "--window", "32", "--tasks", "identifiers,noise")
        assert code == 2
        assert _one_line(err) == (f"error: no task could be mined from {corpus} (files read: "
                                  f"{files}, skipped: {skipped})")
        assert not out.exists()


# 6. Ctrl-C and SIGTERM: one line, exit 130, the lock released and cleared
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_capture_says_how_to_resume_and_releases_the_lock(tmp_path, sig):
    run = _tasks(tmp_path / "run")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "apmae_gpu.cli", "capture", run, "--model",
                             MODEL, "--device", "cpu", "--batch-size", "1", "--per-task", "8"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "inferences.parquet").exists():
        time.sleep(0.05)   # a few rounds committed: the capture is under way
    assert proc.poll() is None
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == (
        "interrupted: rerun the same command to resume")
    assert (run / LOCK_FILE).read_text() == ""   # no stale holder named
    with writer_lock(run, "apmae test"):
        pass


# 7. damaged AP-MAE checkpoints: one line; training resumes from the newest intact one
def test_training_resume_passes_over_a_damaged_checkpoint_and_loaders_name_the_damage(run,
                                                                                     caplog):
    from apmae_gpu.encoding.encoder import load_encoder
    from apmae_gpu.model import training
    from tests.tiny_models import MICRO

    def train(steps):
        return training.train(run, preset="tiny", steps=steps, batch_size=16, device="cpu",
                              lr=2e-3, model_config=dict(MICRO), eval_every=3, save_every=3,
                              log_every=3, resume=steps > 6)

    train(6)
    ckpts = run / "apmae" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003", "step-0000006"]
    newest = ckpts / "step-0000006"
    st = newest / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    from apmae_gpu.core.check import check_run

    problems = check_run(run, echo=lambda line: None)
    assert len(problems) == 1 and problems[0].startswith(
        f"damaged: {newest}: model.safetensors: Error while deserializing header")
    assert problems[0].endswith(f"-> delete it: `apmae train {run} --resume` passes over it")
    with pytest.raises(ApmaeError, match=rf"^{re.escape(str(newest))}: damaged AP-MAE checkpoint "
                                         r"\(model.safetensors: Error while deserializing header"):
        load_encoder(newest)
    cfg = json.loads((run / "apmae" / "final" / "config.json").read_text())
    (run / "apmae" / "final" / "config.json").write_text(json.dumps({**cfg, "hidden_size": "x"}))
    with pytest.raises(ApmaeError, match=r"damaged AP-MAE checkpoint \(config.json: hidden_size "
                                         r"is 'x', not a int\)"):
        load_encoder(run / "apmae" / "final")
    result = train(9)
    assert result["resumed_from"].endswith("step-0000003") and result["steps"] == 9
    assert f"checkpoint {newest} is damaged" in caplog.text
    # every checkpoint damaged (a truncated state.pt): one line, nothing trained
    for ckpt in ckpts.iterdir():
        state = ckpt / "state.pt"
        state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(ApmaeError, match=rf"^every checkpoint in {re.escape(str(ckpts))} is "
                                         r"damaged \(newest .*state.pt: "):
        train(12)


# 8. a hand-edited tasks.parquet: one line naming the file, nothing captured
def test_capture_refuses_a_hand_edited_tasks_table(tmp_path, capsys):
    run = _tasks(tmp_path / "run")
    path = run / "tasks.parquet"
    good = pd.read_parquet(path)
    fix = "mine into a new run"
    edits = [
        (lambda t: t.drop(columns=["input_ids"]), "missing column(s) input_ids"),
        (lambda t: t.assign(task=t.task.where(t.index > 0, "no_such_task")),
         "unknown task name(s) no_such_task"),
        (lambda t: t.assign(task_id=t.task_id.where(t.index > 0, 1)), "task_id 1 is repeated"),
        (lambda t: t.assign(input_ids=[ids[:-1] if i == 0 else ids
                                       for i, ids in enumerate(t.input_ids)]),
         "prompts of 31 to 32 tokens"),
        (lambda t: t.assign(input_ids=[[]] * len(t)), "prompts of 0 to 0 tokens"),
        (lambda t: t.assign(input_ids=[np.where(np.arange(len(ids)) == 0, -5, ids)
                                       for ids in t.input_ids]), "a negative token id"),
        (lambda t: t.assign(target_token_id=t.target_token_id.where(t.index > 0, 10**6)),
         "tasks hold token id 1000000"),
    ]
    for edit, problem in edits:
        edit(good.copy()).to_parquet(path, index=False)
        code, _, err = _main(capsys, "capture", run, "--model", MODEL, "--device", "cpu",
                             "--per-task", "1")
        line = _one_line(err)
        assert code == 2 and problem in line and (fix in line or "vocabulary" in line), line
        assert not (run / "inferences.parquet").exists()


class _Payload:
    """Stands for code a pickle would run when loaded."""


# 9. a model whose weights are only a pickle torch will not load safely
def test_a_pickle_only_model_is_refused_in_one_line(tmp_path, capsys):
    import torch

    from apmae_gpu.capture import llm

    model_dir = tmp_path / "pickled"
    cfg = llm.random_config("tiny-llama")
    cfg.save_pretrained(model_dir)
    torch.save({"model.embed_tokens.weight": _Payload()}, model_dir / "pytorch_model.bin")
    run = _tasks(tmp_path / "run")
    code, _, err = _main(capsys, "capture", run, "--model", model_dir, "--device", "cpu",
                         "--per-task", "1")
    assert code == 2
    assert _one_line(err) == (f"error: model {model_dir}: its weights are a pickle that torch "
                              f"refuses to load safely (it names code to run); use a "
                              f"safetensors copy of the model")


# 10. disk full while a checkpoint is written (torch.save into /dev/full: the real error)
def test_disk_full_during_a_checkpoint_write_says_so_and_keeps_the_earlier_ones(run, monkeypatch):
    import torch

    from apmae_gpu.model import checkpoints, training
    from tests.tiny_models import MICRO

    real_save = torch.save
    kw = dict(preset="tiny", batch_size=16, device="cpu", lr=2e-3, model_config=dict(MICRO),
              eval_every=3, save_every=3, log_every=3)
    training.train(run, steps=3, **kw)
    monkeypatch.setattr(checkpoints.torch, "save",
                        lambda obj, path: real_save(obj, "/dev/full"))
    ckpts = run / "apmae" / "checkpoints"
    with pytest.raises(ApmaeError, match=rf"^writing {re.escape(str(ckpts))}/step-0000006 "
                                         r"failed: disk full or not writable \(.*\); the "
                                         r"checkpoints before it are intact"):
        training.train(run, steps=6, resume=True, **kw)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003"]   # no temporary left
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    assert training.train(run, steps=6, resume=True, **kw)["resumed_from"].endswith("step-0000003")


def test_every_stage_refuses_a_manifest_of_the_wrong_shape_in_one_line(tmp_path, capsys):
    run = _tasks(tmp_path / "run")
    manifest = run / "manifest.json"
    for text, problem in (("[1]", "is a JSON list, not an object"),
                          ('{"capture": "x"}', "section 'capture' is a str, not an object")):
        manifest.write_text(text)
        for args in (["capture", run, "--model", MODEL, "--device", "cpu", "--per-task", "1"],
                     ["report", run]):
            code, _, err = _main(capsys, *args)
            assert code == 2 and _one_line(err).startswith(f"error: {manifest}: {problem}"), (
                args, err)
        assert manifest.read_text() == text and not (run / "inferences.parquet").exists()
