"""Clustering across machines: a real ``dask scheduler`` and two ``dask worker`` processes on
127.0.0.1 (the commands a user runs on each machine), not a LocalCluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from apmae_gpu.clustering import backends as cb
from apmae_gpu.clustering import dask_jobs
from apmae_gpu.clustering import heads as clustering
from tests.test_clustering import FAST, write_embeddings

WAIT = 60  # seconds any one step may take before the test gives up


def _spawn(args, log: Path):
    here = Path(__file__).resolve().parent   # the scheduler unpickles this module's functions
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.fixture()
def scheduler(tmp_path):
    """``dask scheduler`` + two single-threaded ``dask worker`` processes; yields
    ``(address, workers)``."""
    from distributed import Client

    file = tmp_path / "scheduler.json"
    procs = [_spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                     "--no-dashboard", "--scheduler-file", str(file)], tmp_path / "s.log")]
    try:
        deadline = time.time() + WAIT
        while not file.exists() and time.time() < deadline:
            time.sleep(0.1)
        address = json.loads(file.read_text())["address"]
        workers = [_spawn(["distributed.cli.dask_worker", address, "--nthreads", "1",
                           "--nworkers", "1", "--no-dashboard", "--name", f"w{i}",
                           "--host", "127.0.0.1"], tmp_path / f"w{i}.log") for i in range(2)]
        procs += workers
        with Client(address, timeout=WAIT) as client:
            client.wait_for_workers(2, timeout=WAIT)
        yield address, workers
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=WAIT)


@pytest.fixture(scope="module")
def reference(synthetic_run_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("dref") / "run"
    shutil.copytree(synthetic_run_dir, run)
    write_embeddings(run)
    clustering.cluster(run, backend="cpu", figures=False, **FAST)
    return run


def echo_kwargs(**kwargs) -> dict:
    return kwargs


def test_job_keys_named_like_submit_keywords_reach_the_function(scheduler):
    address, _ = scheduler
    jobs = [dict(layer=0, head=1, retries=3, key="k", workers="w")]
    [(job, result)] = list(dask_jobs.run_jobs(echo_kwargs, jobs, scheduler=address))
    assert result == jobs[0]


class SlowClusterer(cb.CpuClusterer):
    """umap-learn + hdbscan, one second slower per head, so a worker can be killed mid-head."""

    def fit(self, X, y=None):
        time.sleep(1.0)
        return super().fit(X, y)


def test_scheduler_with_two_workers_survives_a_killed_worker(scheduler, reference, tmp_path):
    address, workers = scheduler
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "cluster")
    (run / "clusters.parquet").unlink()
    status = run / "cluster" / "status"

    def kill_first_worker():
        deadline = time.time() + WAIT
        while time.time() < deadline and not (status.is_dir() and any(status.iterdir())):
            time.sleep(0.05)
        os.killpg(workers[0].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_first_worker, daemon=True)
    killer.start()
    clustering.cluster(run, backend=SlowClusterer, scheduler=address, figures=False, **FAST)
    killer.join(timeout=WAIT)
    assert workers[0].poll() is not None            # the worker did die mid-run
    heads = pd.read_parquet(run / "cluster" / "heads.parquet")
    assert len(heads) == 6 and (heads.status == "ok").all()
    pd.testing.assert_frame_equal(pd.read_parquet(reference / "clusters.parquet"),
                                  pd.read_parquet(run / "clusters.parquet"))
