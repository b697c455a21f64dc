"""The embeddings side of merging a multi-process ``capture --encode-with``.

Every shard (``RUN/shards/K-of-N``) holds its own ``embeddings.zarr``, keyed by the shard's
inference ids, with the embedding of every attempt that may still be kept when the shard
captured it (a superset of the kept ones).  :class:`EmbeddingMerge` writes the kept ones
into ``RUN/embeddings.zarr`` under their run ids, through the same
:class:`~apmae_gpu.encoding.encoder.EmbeddingWriter` (same block) one process uses, so the group
holds the same bits.  A killed merge resumes like a killed one-process capture: the run's
inference commits past the last embedding commit point are rolled back and merged again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import zarr

from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import read_manifest, update_manifest
from apmae_gpu.encoding.encoder import EMBEDDINGS, open_writer
from apmae_gpu.model.network import APMAEConfig

log = logging.getLogger("apmae_gpu.capture.ranks")


def roll_back_unencoded(store, split: str, committed_ids) -> None:
    """Drop this split's commits from the first batch with a kept inference whose embedding
    a crash lost (embeddings commit in blocks, inference rows per batch); the rerun recomputes
    those batches exactly and skips the inferences already encoded.  ``store``: a
    :class:`~apmae_gpu.core.store.MapStore` (a capture's, or the run's during a merge)."""
    upto = int(committed_ids[-1]) if len(committed_ids) else -1
    parts = {seq: pq.read_table(p, columns=["inference_id", "split", "batch", "has_maps"]).to_pandas()
             for seq, p in store.parts().items()}
    lost = [df[(df.split == split) & df.has_maps & (df.inference_id > upto)].batch.min()
            for df in parts.values()]
    lost = [b for b in lost if pd.notna(b)]
    if not lost:
        return
    first = min(lost)
    drop = [seq for seq, df in parts.items() if (df.split == split).all() and (df.batch >= first).all()]
    log.warning("re-capturing %d batches whose embeddings were not committed", len(drop))
    store.drop_commits(drop)


class ShardEmbeddings:
    """The committed embeddings of one shard, read a block at a time (rounds are merged in
    nearly the order the shard captured them, so one cached block serves many rounds)."""

    def __init__(self, shard: Path, fingerprint: str):
        self.path = Path(shard) / EMBEDDINGS
        self.pos: dict[int, int] = {}
        self.cached: tuple[int, np.ndarray | None] = (-1, None)
        if not self.path.exists():
            return
        group = zarr.open_group(self.path, mode="r")
        if group.attrs.get("checkpoint_sha256") != fingerprint:
            raise ApmaeError(f"{self.path} was encoded with {group.attrs.get('checkpoint')}, not "
                             "the checkpoint of the plan; rerun the capture")
        self.n = int(group.attrs.get("n_committed", 0))
        self.emb = group["embeddings"]
        self.block = int(self.emb.chunks[2])
        ids = np.asarray(group["inference_id"][:self.n], dtype=np.int64)
        self.pos = {int(i): p for p, i in enumerate(ids)}

    def get(self, inference_id: int) -> np.ndarray | None:
        """``[layers, heads, dim]`` float16 of a shard inference id, None if not stored."""
        p = self.pos.get(int(inference_id))
        if p is None:
            return None
        j = p // self.block
        if self.cached[0] != j:
            lo = j * self.block
            self.cached = (j, np.asarray(self.emb[:, :, lo:min(lo + self.block, self.n), :]))
        return self.cached[1][:, :, p - j * self.block, :]


class EmbeddingMerge:
    """Collects the kept inferences' embeddings of a merge, round by round."""

    def __init__(self, run: Path, dst, split: str, extra: dict, dirs: list[Path],
                 n_layers: int, n_heads: int):
        self.run, self.dirs = Path(run), dirs
        self.checkpoint, self.pool = Path(extra["encode_with"]), extra.get("pool") or "cls"
        if not (self.checkpoint / "config.json").exists():
            raise ApmaeError(f"{self.checkpoint}: the shards were encoded with this AP-MAE "
                             "checkpoint, which is gone (no config.json); merge where it exists")
        model = SimpleNamespace(config=APMAEConfig.from_pretrained(self.checkpoint))
        self.writer, self.fingerprint = open_writer(run, self.checkpoint, model, n_layers,
                                                    n_heads, self.pool)
        self.writer.group.attrs.update({"complete": False})
        self.resumed_from = self.writer.committed
        roll_back_unencoded(dst, split, self.writer.committed_ids)
        ids = self.writer.committed_ids
        self.upto = int(ids[-1]) if len(ids) else -1
        self.shards = [ShardEmbeddings(d, self.fingerprint) for d in dirs]
        self._ids: list[int] = []
        self._emb: list[np.ndarray] = []

    def take(self, shard: int, shard_id: int, new_id: int) -> None:
        """A kept inference: shard ``shard``'s ``shard_id`` becomes the run's ``new_id``."""
        emb = self.shards[shard].get(shard_id)
        if emb is None:
            raise ApmaeError(f"{self.dirs[shard]}: inference {shard_id} should have its "
                             "embedding stored; rerun the capture (it resumes), then merge")
        if new_id > self.upto:          # not committed before a killed merge
            self._ids.append(new_id)
            self._emb.append(emb)

    def flush(self) -> None:
        """Append the round's embeddings (before its inference rows are committed)."""
        if self._ids:
            self.writer.append(np.asarray(self._ids, np.int64), np.stack(self._emb))
        self._ids, self._emb = [], []

    def close(self) -> None:
        """Write the last block, mark the group complete, record the ``encode`` section."""
        self.writer.close()
        L, H, D = self.writer.shape_lhd
        shards = [read_manifest(d).get("encode", {}) for d in self.dirs]
        first = next((s for s in shards if s), {})
        update_manifest(self.run, "encode", {
            "mode": "capture", "checkpoint": str(self.checkpoint),
            "checkpoint_sha256": self.fingerprint, "pool": self.pool,
            "device": first.get("device"), "dtype": first.get("dtype"),
            "inferences": int(self.writer.committed), "layers": L, "heads": H, "dim": D,
            "block": self.writer.block, "shards": len(self.dirs),
            "maps_encoded": int(sum(s.get("maps_encoded", 0) for s in shards)),
            "seconds": round(sum(s.get("seconds", 0.0) for s in shards), 2),
            "resumed_from": int(self.resumed_from)})
