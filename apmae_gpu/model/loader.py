"""Batches of stored maps for AP-MAE training: deterministic, resumable, whole-chunk reads.

Whole Zarr chunks are read in a background thread.  Each epoch the chunks are permuted
(seed, epoch), dealt to the ranks, grouped into windows of ``buffer_maps`` maps and shuffled
within a window (or, with ``shuffle=False``, kept in store order there: batches of
consecutive maps, mostly of one prompt, as the reference trains).  The order of the maps is therefore a pure function of (seed, epoch, rank),
so a resumed run skips straight to its step: no replay, nothing seen twice or lost.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.store import MapStore


class MapLoader:
    """Deterministic, resumable batches ``[B, W, W]`` float16 from whole-chunk reads.

    ``batches(start_step)`` yields ``(step, maps)`` forever (epoch after epoch); the batch of a
    given step is the same whether the iteration started at 0 or at that step.
    """

    def __init__(self, store: MapStore, map_ids: np.ndarray, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, buffer_maps: int = 2048, workers: int = 1,
                 prefetch: int = 2, shuffle: bool = True):
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.rank, self.world, self.workers, self.prefetch = rank, world, workers, prefetch
        self.shuffle = shuffle
        self.ids = np.sort(np.asarray(map_ids, dtype=np.int64))
        cm = store.info.chunk_maps
        chunk_of = self.ids // cm
        self.chunks, starts, self.counts = np.unique(chunk_of, return_index=True,
                                                     return_counts=True)
        self.chunk_ids = np.split(self.ids, starts[1:])  # train map ids of each chunk
        self.window_chunks = max(1, buffer_maps // cm)
        self._epoch_steps: list[int] = []
        if self.steps_per_epoch(0) == 0:
            raise ApmaeError(f"batch size {batch_size} x {world} rank(s) exceeds the "
                             f"{self.ids.size} training maps; lower --batch-size")

    def _rank_chunks(self, epoch: int, rank: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        return perm[rank::self.world]

    def steps_per_epoch(self, epoch: int) -> int:
        """Batches every rank can fill in ``epoch`` (the same on all ranks)."""
        while len(self._epoch_steps) <= epoch:
            e = len(self._epoch_steps)
            n = min(int(self.counts[self._rank_chunks(e, r)].sum()) for r in range(self.world))
            self._epoch_steps.append(n // self.batch_size)
        return self._epoch_steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a global step."""
        epoch = 0
        while step >= self.steps_per_epoch(epoch):
            step -= self.steps_per_epoch(epoch)
            epoch += 1
        return epoch, step

    def _windows(self, epoch: int) -> list[np.ndarray]:
        """This rank's windows of ``epoch``: the map ids of each window (shuffled there unless
        ``shuffle`` is off)."""
        mine = self._rank_chunks(epoch, self.rank)
        out = []
        for w, start in enumerate(range(0, len(mine), self.window_chunks)):
            window = mine[start:start + self.window_chunks]
            ids = np.concatenate([self.chunk_ids[c] for c in window])
            if not self.shuffle:
                out.append(ids)
                continue
            rng = np.random.default_rng([self.seed, epoch, self.rank, w])
            out.append(ids[rng.permutation(ids.size)])
        return out

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Map ids this rank trains on in ``epoch``, in order (``steps_per_epoch * B`` of them);
        the batch of step ``s`` of the epoch is ``order[s * B:(s + 1) * B]``."""
        order = np.concatenate(self._windows(epoch))
        return order[:self.steps_per_epoch(epoch) * self.batch_size]

    def _read_window(self, ids: np.ndarray, pool) -> np.ndarray:
        """Maps of ``ids`` (in that order) [len(ids), W, W] float16, reading each touched chunk
        once, whole, and copying every map once, straight to its place (in ``pool``'s threads
        when given)."""
        cm, w = self.store.info.chunk_maps, self.store.info.window
        chunk_of = ids // cm
        order = np.argsort(chunk_of, kind="stable")
        chunks, starts = np.unique(chunk_of[order], return_index=True)
        groups = np.split(order, starts[1:])  # positions (in ids and out) of each chunk's maps
        out = np.empty((ids.size, w, w), np.float16)

        def read(k: int) -> None:
            c = int(chunks[k])
            block = self.store.read_chunk(c)   # checked: present and intact
            for pos in groups[k]:
                m = block[ids[pos] - c * cm]
                if ((m.view(np.uint16) & 0x7C00) == 0x7C00).any():
                    raise ApmaeError(f"{self.store.maps_path}: NaN or infinite values in map "
                                     f"{int(ids[pos])}; refusing to train on it")
                out[pos] = m

        if pool:
            list(pool.map(read, range(len(chunks))))
        else:
            for k in range(len(chunks)):
                read(k)
        return out

    def _produce(self, start_step: int, out: queue.Queue, stop: threading.Event) -> None:
        """Background thread: put (epoch, first_position, maps) windows on ``out``."""
        pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        try:
            epoch, batch = self.locate(start_step)
            skip = batch * self.batch_size
            while not stop.is_set():
                need = self.steps_per_epoch(epoch) * self.batch_size
                pos = 0
                for ids in self._windows(epoch):
                    if pos >= need or stop.is_set():
                        break
                    lo, hi = max(skip - pos, 0), min(ids.size, need - pos)
                    if lo < hi:
                        item = (epoch, self._read_window(ids[lo:hi], pool))
                        while not stop.is_set():
                            try:
                                out.put(item, timeout=0.1)
                                break
                            except queue.Full:
                                continue
                    pos += ids.size
                epoch, skip = epoch + 1, 0
        except Exception as exc:  # handed to the consumer, which re-raises it
            while not stop.is_set():
                try:
                    out.put(("error", exc), timeout=0.1)
                    break
                except queue.Full:
                    continue
        finally:
            if pool:
                pool.shutdown(wait=False)

    def batches(self, start_step: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(step, epoch, maps [B, W, W] float16)`` from ``start_step`` on."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(start_step, q, stop), daemon=True,
                                  name="apmae-loader")
        thread.start()
        step, b = start_step, self.batch_size
        carry: np.ndarray | None = None
        carry_epoch = -1
        try:
            while True:
                item = q.get()
                if item[0] == "error":
                    raise item[1]
                epoch, maps = item
                if carry is not None and carry_epoch == epoch and len(carry):
                    maps = np.concatenate([carry, maps])
                start = 0
                while maps.shape[0] - start >= b:
                    yield step, epoch, maps[start:start + b]
                    step, start = step + 1, start + b
                carry, carry_epoch = maps[start:], epoch
        finally:
            stop.set()
            thread.join(timeout=5)
