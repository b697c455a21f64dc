"""Independent jobs (one per head) run in-process or on dask workers.

:func:`run_jobs` runs ``fn(**job)`` for every job: in-process with one worker, else on a
``dask.distributed.LocalCluster`` (CPU: one single-threaded process per worker), a
``dask_cuda.LocalCUDACluster`` (cuml: one worker per GPU) or an existing scheduler
(``--scheduler ADDRESS``).  The clustering stage (:mod:`apmae_gpu.clustering.heads`) and its studies
(:mod:`apmae_gpu.clustering.studies`) use it.  What workers buy on a small machine is measured in
`bench/results/cluster.md` (the ``demo`` section).  dask and distributed are imported only
when workers are used.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.logs import progress

# the clustering stage's logger: its jobs' lines read as one stage's
log = logging.getLogger("apmae_gpu.clustering.heads")


@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None = None, backend: str = "cpu"):
    """A dask ``Client``: to ``scheduler`` if given, else a ``LocalCUDACluster`` (cuml, one
    worker per GPU) or a process ``LocalCluster`` with single-threaded workers (seeded
    umap-learn runs on one thread; heads are the parallel unit)."""
    from distributed import Client, LocalCluster

    if scheduler:
        client = Client(scheduler)
        cluster = None
    elif backend == "cuml":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise ApmaeError("--backend cuml with --workers > 1 needs dask-cuda "
                             "(pip install 'apmae_gpu[gpu]')") from None
        import cupy

        n_gpu = cupy.cuda.runtime.getDeviceCount()
        if workers > n_gpu:
            log.info("one worker per GPU: %d workers instead of %d", n_gpu, workers)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(n_gpu)]
        cluster = LocalCUDACluster(CUDA_VISIBLE_DEVICES=ids[:min(workers, n_gpu)],
                                   dashboard_address=None)
        client = Client(cluster)
    else:
        cores = os.cpu_count() or 1
        if workers > cores:
            log.warning("%d workers on %d cores: heads will share cores", workers, cores)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
    try:
        log.info("dask: %d workers (%s)", len(client.scheduler_info().get("workers", {})),
                 scheduler or ("LocalCUDACluster" if backend == "cuml" else "LocalCluster"))
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def call_job(fn: Callable, job: dict):
    """``fn(**job)``: what a dask worker runs for one job."""
    return fn(**job)


def run_jobs(fn: Callable, jobs: list[dict], workers: int = 1, scheduler: str | None = None,
             backend: str = "cpu", desc: str = "heads") -> Iterator[tuple[dict, object]]:
    """Run ``fn(**job)`` for every job: in-process when ``workers == 1`` and no scheduler is
    given, else on dask.  Yields ``(job, result)`` as they finish; ``result`` is the
    exception when the job itself died (e.g. a killed worker)."""
    bar = progress(total=len(jobs), desc=desc, unit="head")
    try:
        if workers <= 1 and not scheduler:
            for job in jobs:
                try:
                    result = fn(**job)
                except Exception as exc:  # noqa: BLE001
                    result = exc
                bar.update(1)
                yield job, result
            return
        from distributed import as_completed

        with dask_client(workers, scheduler, backend) as client:
            # the job travels as one argument: its own keys (``retries``, ...) must reach fn,
            # not client.submit's keywords of the same name
            futures = {client.submit(call_job, fn, job, pure=False): job for job in jobs}
            for future in as_completed(futures):
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001 - KilledWorker, lost data...
                    result = exc
                bar.update(1)
                yield futures.pop(future), result
    finally:
        bar.close()
