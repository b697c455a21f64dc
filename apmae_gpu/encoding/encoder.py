"""Encoding: every analysis map -> its AP-MAE embedding, in ``RUN/embeddings.zarr``.

``RUN/embeddings.zarr`` is a Zarr v3 group:

``embeddings``
    float16 ``[layers, heads, inferences, dim]``, chunks ``(1, 1, block, dim)``: one head's
    embeddings are one contiguous column of chunks, so clustering reads a head in one go.
    Missing maps (an inference without some head) stay NaN.
``inference_id``
    int64 ``[inferences]``: the analysis inferences with maps, ascending.

Attributes: ``checkpoint``, ``checkpoint_sha256``, ``pool``, ``block``, ``n_committed`` (the
commit point) and ``complete``.

Writes go through :class:`EmbeddingWriter`, which buffers whole inferences and writes them a
``block`` at a time, aligned to the chunk grid (no chunk is ever rewritten), then advances
``n_committed``.  Reopening trims whatever a killed process wrote past the commit point, so
a rerun continues where the last commit left off.  :func:`encode` drives it from the maps
store; capture can drive it directly with :func:`encode_inference_batch` to capture and
encode in one pass without keeping the maps.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import zarr

from apmae_gpu.capture import ranks
from apmae_gpu.core import layout
from apmae_gpu.core.config import EncodeConfig, section
from apmae_gpu.core.devices import autocast, resolve_device
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import update_manifest
from apmae_gpu.core.logs import progress
from apmae_gpu.core.store import MapStore, chunk_codecs, has_checksum
from apmae_gpu.model import checkpoints

log = logging.getLogger("apmae_gpu.encoding.encoder")

EMBEDDINGS = layout.EMBEDDINGS_ZARR
POOLS = ("cls", "mean")
# Host buffer budget for one block of inferences ([layers, heads, block, dim] float16).
BLOCK_BUDGET_BYTES = 1 << 30


def default_block(n_layers: int, n_heads: int, dim: int, budget: int = BLOCK_BUDGET_BYTES) -> int:
    """Inferences per chunk and per commit: the largest power of two whose block of all
    heads' embeddings fits ``budget`` bytes, within [16, 1024] (1024 x 512 x fp16 = 1 MiB
    chunks; ~0.75 GB of host buffer for a 720-head model)."""
    per_inference = max(1, n_layers * n_heads * dim * 2)
    block = 1 << max(0, int(np.floor(np.log2(max(1, budget // per_inference)))))
    return int(min(1024, max(16, block)))


def checkpoint_fingerprint(checkpoint: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint's weights file (``model.safetensors``), or of its config
    when no weights file is found (a resume must use the same weights)."""
    checkpoint = Path(checkpoint)
    files = sorted(checkpoint.glob("*.safetensors")) or sorted(checkpoint.glob("config.json"))
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- writer
class EmbeddingWriter:
    """Append-only, crash-safe writer of ``RUN/embeddings.zarr``.

    ``append(inference_ids [b], embeddings [b, layers, heads, dim])`` buffers whole
    inferences (ids strictly ascending across calls) and writes every full ``block`` (chunk
    aligned) followed by the commit point; ``close()`` writes the last partial block and
    marks the group complete.  ``committed`` / ``committed_ids`` say what is durable.
    """

    def __init__(self, run: str | os.PathLike, n_layers: int, n_heads: int, dim: int,
                 block: int | None = None, attrs: dict | None = None, restart: bool = False):
        self.final_path = Path(run) / EMBEDDINGS
        self.path = self.final_path
        self.shape_lhd = (int(n_layers), int(n_heads), int(dim))
        _finish_swap(self.final_path)
        if restart and self.path.exists():
            # never destroy good embeddings before their replacement is complete: encode
            # beside them and swap in close()
            self.path = self.final_path.with_name(f".{EMBEDDINGS}.restart")
            log.info("re-encoding into %s; %s stays until it is complete", self.path.name,
                     self.final_path.name)
            shutil.rmtree(self.path, ignore_errors=True)
        if not self.path.exists():
            self._create(block or default_block(n_layers, n_heads, dim), attrs or {})
        self.group = zarr.open_group(self.path, mode="r+")
        # every chunk is written, even an all-NaN one: a missing chunk always means damage
        self.emb = zarr.open_array(self.path / "embeddings", mode="r+",
                                   config={"write_empty_chunks": True})
        self.ids = self.group["inference_id"]
        L, H, _, D = self.emb.shape
        if (L, H, D) != self.shape_lhd:
            raise ApmaeError(f"{self.path} holds [{L}, {H}, *, {D}] embeddings, not "
                             f"[{n_layers}, {n_heads}, *, {dim}] (use --restart)")
        self.block = int(self.emb.chunks[2])
        if block is not None and int(block) != self.block:
            log.warning("keeping the existing block of %d inferences (asked %d)", self.block, block)
        self._recover()
        self._pending_ids: list[np.ndarray] = []
        self._pending: list[np.ndarray] = []

    def _create(self, block: int, attrs: dict) -> None:
        L, H, D = self.shape_lhd
        tmp = self.path.with_name(f".{self.path.name}.creating")
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(tmp, mode="w", zarr_format=3,
                                attributes={**attrs, "block": block, "n_committed": 0,
                                            "complete": False})
        group.create_array("embeddings", shape=(L, H, 0, D), chunks=(1, 1, block, D),
                           dtype="float16", fill_value=np.nan, compressors=chunk_codecs(1),
                           dimension_names=("layer", "head", "inference", "dim"))
        group.create_array("inference_id", shape=(0,), chunks=(max(block, 4096),), dtype="int64",
                           fill_value=-1, dimension_names=("inference",))
        os.replace(tmp, self.path)

    def _recover(self) -> None:
        """Trim both arrays to the commit point; drop temp files of killed writes."""
        n = int(self.group.attrs.get("n_committed", 0))
        for root, _dirs, files in os.walk(self.path):
            for f in files:
                if f.endswith(".partial"):
                    os.unlink(os.path.join(root, f))
        if self.emb.shape[2] < n or self.ids.shape[0] < n:
            raise ApmaeError(f"{self.path}: fewer rows than committed ({n}); the store is damaged "
                             f"(use --restart)")
        if self.emb.shape[2] != n or self.ids.shape[0] != n:
            log.warning("dropping %d uncommitted inferences from %s", self.emb.shape[2] - n,
                        self.path.name)
            self.emb.resize((*self.emb.shape[:2], n, self.emb.shape[3]))
            self.ids.resize((n,))
        self.committed = n
        self.committed_ids = (np.asarray(self.ids[:n], dtype=np.int64) if n
                              else np.empty(0, np.int64))
        self._last_id = int(self.committed_ids[-1]) if n else -1

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def append(self, inference_ids, embeddings) -> int:
        """Buffer ``embeddings`` ([b, layers, heads, dim], numpy or torch) of
        ``inference_ids`` ([b], ascending, after every id appended before); write every full
        block.  Returns the number of committed inferences."""
        ids = np.asarray(inference_ids, dtype=np.int64).reshape(-1)
        if hasattr(embeddings, "detach"):
            embeddings = embeddings.detach().float().cpu().numpy()
        emb = np.asarray(embeddings)
        if emb.shape != (len(ids), *self.shape_lhd[:2], self.shape_lhd[2]):
            shape = ", ".join(map(str, self.shape_lhd))
            raise ValueError(f"expected embeddings [{len(ids)}, {shape}], "
                             f"got {emb.shape}")
        if len(ids) == 0:
            return self.committed
        if ids[0] <= self._last_id or np.any(np.diff(ids) <= 0):
            raise ValueError("inference ids must be strictly ascending across appends")
        self._pending_ids.append(ids)
        self._pending.append(emb.astype(np.float16))
        self._last_id = int(ids[-1])
        while self._n_pending() >= self._to_boundary():
            self._write(self._to_boundary())
        return self.committed

    def _n_pending(self) -> int:
        return sum(len(i) for i in self._pending_ids)

    def _to_boundary(self) -> int:
        return (self.committed // self.block + 1) * self.block - self.committed

    def _write(self, n: int) -> None:
        ids = np.concatenate(self._pending_ids)
        emb = np.concatenate(self._pending)
        take_ids, take = ids[:n], emb[:n]
        self._pending_ids = [ids[n:]] if len(ids) > n else []
        self._pending = [emb[n:]] if len(ids) > n else []
        c = self.committed
        L, H, D = self.shape_lhd
        self.emb.resize((L, H, c + n, D))
        self.ids.resize((c + n,))
        self.emb[:, :, c:c + n, :] = np.ascontiguousarray(take.transpose(1, 2, 0, 3))
        self.ids[c:c + n] = take_ids
        self.group.attrs.update({"n_committed": c + n})  # the commit point
        self.committed = c + n
        self.committed_ids = np.concatenate([self.committed_ids, take_ids])

    def close(self, complete: bool = True) -> None:
        """Write what is buffered (the last, partial block) and mark the group complete."""
        n = self._n_pending()
        if n:
            self._write(n)
        if complete:
            self.group.attrs.update({"complete": True})
            if self.path != self.final_path:
                _swap_in(self.path, self.final_path)
                self.path = self.final_path


def _swap_in(new: Path, final: Path) -> None:
    """Replace ``final`` by the complete ``new`` (two renames; :func:`_finish_swap` completes
    a swap a crash interrupted)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _finish_swap(final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    if not old.exists():
        return
    if not final.exists():
        new = final.with_name(f".{final.name}.restart")
        os.replace(new if new.exists() else old, final)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- reading
def open_embeddings(run: str | os.PathLike, require_complete: bool = True):
    """The ``embeddings.zarr`` group of ``run`` (read-only), checked for completeness."""
    path = Path(run) / EMBEDDINGS
    if not path.exists():
        raise ApmaeError(f"{Path(run)}: no {EMBEDDINGS} (run `apmae encode` first)")
    group = zarr.open_group(path, mode="r")
    if require_complete and not group.attrs.get("complete", False):
        raise ApmaeError(f"{path} is incomplete ({group.attrs.get('n_committed', 0)} inferences "
                         f"committed); finish it with `apmae encode`")
    return group


def read_head(path: str | os.PathLike, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """One head's embeddings: ``(inference_id [n] int64, X [n, dim] float32)``, one
    contiguous chunk-column read (``path`` is the ``embeddings.zarr`` directory)."""
    group = zarr.open_group(path, mode="r")
    n = int(group.attrs.get("n_committed", group["inference_id"].shape[0]))
    emb = group["embeddings"]
    # a lost chunk must not read as NaN embeddings (stores with checksums write every chunk)
    for k in range(-(-n // emb.chunks[2]) if has_checksum(emb) else 0):
        key = emb.metadata.encode_chunk_key((layer, head, k, 0))
        if not (Path(path) / "embeddings" / key).is_file():
            raise ApmaeError(f"{path}: chunk embeddings/{key} is missing; rerun `apmae encode "
                             f"--restart` (`apmae check` lists the damage)")
    try:
        ids = np.asarray(group["inference_id"][:n], dtype=np.int64)
        X = np.asarray(emb[layer, head, :n], dtype=np.float32)
    except Exception as exc:  # a decoder's or the checksum's error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ApmaeError(f"{path}: layer {layer} head {head} cannot be read ({first}); rerun "
                         f"`apmae encode --restart`") from None
    return ids, X


# --------------------------------------------------------------------------- the model
def load_encoder(checkpoint: str | os.PathLike, device: str = "cpu"):
    """``APMAEModel.from_pretrained(checkpoint)`` in eval mode on ``device``."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").exists():
        raise ApmaeError(f"{checkpoint}: not an AP-MAE checkpoint (no config.json; train one "
                         f"with `apmae train` or pass --checkpoint)")
    model = checkpoints.load_model(checkpoint)   # damage is a one-line error
    return model.eval().to(device)


def encode_maps(model, maps, pool: str = "cls", batch_size: int = 256):
    """Embeddings of maps: ``maps`` [B, W, W] (numpy or torch, stored values) -> torch
    float32 [B, D] on the model's device.  bf16 autocast on CUDA; batches of ``batch_size``."""
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(maps), batch_size):
            x = maps[start:start + batch_size]
            x = torch.as_tensor(x) if not torch.is_tensor(x) else x
            if device.type == "cuda" and not x.is_cuda:
                x = x.pin_memory().to(device, non_blocking=True)
            out.append(model.encode(x.to(device), pool=pool).float())
    if not out:
        return torch.empty((0, model.config.hidden_size), device=device)
    return torch.cat(out)


def encode_inference_batch(model, maps, pool: str = "cls", batch_size: int = 256) -> np.ndarray:
    """The building block for capture-and-encode in one pass.

    ``maps``: ``[B, layers, heads, W, W]`` stored values of B inferences (numpy or torch,
    on any device).  Returns ``[B, layers, heads, D]`` float16 (numpy), ready for
    ``EmbeddingWriter.append(inference_ids, ...)``.
    """
    B, L, H, W, _ = maps.shape
    flat = maps.reshape(B * L * H, W, W)
    emb = encode_maps(model, flat, pool=pool, batch_size=batch_size)
    return emb.reshape(B, L, H, -1).to("cpu").numpy().astype(np.float16)


# --------------------------------------------------------------------------- streaming
def open_writer(run: str | os.PathLike, checkpoint: str | os.PathLike, model, n_layers: int,
                n_heads: int, pool: str = "cls", block: int | None = None,
                restart: bool = False) -> tuple[EmbeddingWriter, str]:
    """The run's EmbeddingWriter for ``model``; refuses to mix checkpoints or pools."""
    if pool not in POOLS:
        raise ApmaeError(f"--pool {pool}: expected cls or mean")
    cfg = model.config
    fingerprint = checkpoint_fingerprint(checkpoint)
    attrs = {"checkpoint": str(checkpoint), "checkpoint_sha256": fingerprint, "pool": pool,
             "window": int(cfg.image_size), "scaler": getattr(cfg, "stored_scaler", ""),
             "preset": getattr(cfg, "preset", "custom")}
    writer = EmbeddingWriter(run, n_layers, n_heads, int(cfg.hidden_size), block=block,
                             attrs=attrs, restart=restart)
    old = writer.attrs
    if old.get("checkpoint_sha256") != fingerprint or old.get("pool") != pool:
        raise ApmaeError(f"{writer.path} was encoded with {old.get('checkpoint')} "
                         f"(pool {old.get('pool')}); this asks for {checkpoint} (pool {pool}): "
                         f"pass --restart to re-encode")
    return writer, fingerprint


class StreamingEncoder:
    """Capture and encode in one pass, keeping only the embeddings (paper scale: ~750 GB of
    encodings instead of ~2 TB of maps).

    ``add(inference_ids [B], maps [B, layers, heads, W, W])`` encodes a capture batch
    (stored values, numpy or torch on any device; ids ascending across calls) and appends
    it; whole blocks are committed as they fill.  ``close()`` writes the last partial block,
    marks the group complete and records the manifest's ``encode`` section.  After a crash,
    a new StreamingEncoder on the same run continues: ``committed_ids`` are durable, so
    capture resumes after ``committed_ids[-1]``.

    Each inference's maps are encoded on their own (forward batches never mix inferences),
    so an embedding does not depend on which other inferences a batch holds: a capture rank
    that encodes every attempt that may still be kept stores the same bits as one process
    that encodes only the kept ones.  ``block_budget`` (bytes) picks a smaller block for a
    new group (the shards of a multi-process capture).
    """

    def __init__(self, run: str | os.PathLike, checkpoint: str | os.PathLike, n_layers: int,
                 n_heads: int, pool: str = "cls", device: str = "auto", batch_size: int = 256,
                 block: int | None = None, restart: bool = False,
                 block_budget: int | None = None):
        self.run, self.checkpoint = Path(run), Path(checkpoint)
        self.device = resolve_device(device)
        self.model = load_encoder(self.checkpoint, self.device)
        if block is None and block_budget is not None:
            block = default_block(n_layers, n_heads, int(self.model.config.hidden_size),
                                  block_budget)
        self.pool, self.batch_size = pool, batch_size
        self.writer, self.fingerprint = open_writer(run, checkpoint, self.model, n_layers,
                                                    n_heads, pool, block, restart)
        self.writer.group.attrs.update({"complete": False})
        self.n_maps, self.seconds = 0, 0.0
        self.resumed_from = self.writer.committed

    @property
    def committed_ids(self) -> np.ndarray:
        return self.writer.committed_ids

    def add(self, inference_ids, maps) -> int:
        """Encode and append one batch; returns the number of committed inferences."""
        if maps.shape[-1] != self.model.config.image_size:
            raise ApmaeError(f"{self.checkpoint} encodes {self.model.config.image_size}-wide "
                             f"maps, got {maps.shape[-1]}")
        t0 = time.perf_counter()
        emb = [encode_inference_batch(self.model, maps[b:b + 1], self.pool, self.batch_size)
               for b in range(len(maps))]
        emb = np.concatenate(emb) if emb else np.empty((0, *self.writer.shape_lhd), np.float16)
        committed = self.writer.append(inference_ids, emb)
        self.seconds += time.perf_counter() - t0
        self.n_maps += int(np.prod(maps.shape[:3]))
        return committed

    def close(self) -> Path:
        self.writer.close()
        L, H, D = self.writer.shape_lhd
        update_manifest(self.run, "encode", {
            "mode": "capture", "checkpoint": str(self.checkpoint),
            "checkpoint_sha256": self.fingerprint, "pool": self.pool, "device": self.device,
            "dtype": "bfloat16" if self.device.startswith("cuda") else "float32",
            "inferences": int(self.writer.committed), "layers": L, "heads": H, "dim": D,
            "block": self.writer.block, "maps_encoded": self.n_maps,
            "seconds": round(self.seconds, 2), "resumed_from": int(self.resumed_from)})
        return self.writer.path


# --------------------------------------------------------------------------- the stage
def _refuse_non_finite(maps: np.ndarray, map_ids: np.ndarray, store) -> None:
    """A NaN/inf map would become an all-NaN embedding that clustering drops as missing:
    refuse it, as training does."""
    finite = np.isfinite(maps).reshape(len(maps), -1).all(axis=1)
    if not finite.all():
        bad = int(map_ids[np.argmin(finite)])
        raise ApmaeError(f"{store.maps_path}: NaN or infinite values in map {bad}; refusing to "
                         f"encode it (`apmae check {store.run}` says what to rerun)")


def _prefetch(reader, spans) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """Read span i+1 in a thread while span i is being encoded."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        futures = [pool.submit(reader, *spans[0])] if spans else []
        for i, span in enumerate(spans):
            if i + 1 < len(spans):
                futures.append(pool.submit(reader, *spans[i + 1]))
            yield span, futures[i].result()
            futures[i] = None


class _Blocks:
    """The maps still to encode (inferences ``target[done:]``), a block at a time."""

    def __init__(self, store, index, target, done: int, n_layers: int, n_heads: int, dim: int):
        self.store, self.shape = store, (n_layers, n_heads, dim)
        self.todo = target[done:]
        index = index[index["inference_id"].isin(self.todo)].sort_values("map_id")
        self.pos = np.searchsorted(self.todo, index["inference_id"].to_numpy())
        self.map_ids = index["map_id"].to_numpy(np.int64)
        self.layers = index["layer"].to_numpy(np.int64)
        self.heads = index["head"].to_numpy(np.int64)
        self.n_maps = 0

    def encode(self, model, lo: int, hi: int, pool: str, batch_size: int, bar) -> np.ndarray:
        """Embeddings [hi - lo, layers, heads, dim] float16 of inferences todo[lo:hi]."""
        sel = np.nonzero((self.pos >= lo) & (self.pos < hi))[0]
        buf = np.full((hi - lo, *self.shape), np.nan, np.float16)
        spans = [(s, min(s + batch_size, len(sel))) for s in range(0, len(sel), batch_size)]

        def reader(s, e):
            return self.store.read(self.map_ids[sel[s:e]])

        for (s, e), maps in _prefetch(reader, spans):
            rows = sel[s:e]
            _refuse_non_finite(maps, self.map_ids[rows], self.store)
            emb = encode_maps(model, maps, pool=pool, batch_size=batch_size)
            buf[self.pos[rows] - lo, self.layers[rows], self.heads[rows]] = \
                emb.cpu().numpy().astype(np.float16)
            self.n_maps += len(rows)
            bar.update(len(rows))
        return buf


def _encode_ranked(run, checkpoint, store, model, index, target, n_layers, n_heads, pool,
                   batch_size, block, restart, dist, device) -> Path:
    """torchrun: rank r encodes the blocks ``j`` with ``j % N == r`` into
    ``RUN/shards-encode/r-of-N``; rank 0 appends them in order to the run's own store.
    Blocks are the one-process commits, so the result is the same bit for bit."""
    rank, world, _ = dist
    dim = int(model.config.hidden_size)
    main = Path(run) / EMBEDDINGS
    if restart and rank == 0:
        shutil.rmtree(main, ignore_errors=True)
        shutil.rmtree(Path(run) / layout.ENCODE_SHARDS_DIR, ignore_errors=True)
    ranks.barrier(device)
    committed, blk = 0, block or default_block(n_layers, n_heads, dim)
    if main.exists():
        group = zarr.open_group(main, mode="r")
        committed = int(group.attrs.get("n_committed", 0))
        blk = int(group["embeddings"].chunks[2])
    have = ranks.blocks_in_shards(run, target, blk)
    mine = [j for j in range(committed // blk, -(-target.size // blk))
            if ranks.encode_block_owner(j, world) == rank and j not in have]
    t0 = time.perf_counter()
    if mine:
        fingerprint = checkpoint_fingerprint(checkpoint)
        out = layout.shard_dir(run, rank, world, encode=True)
        writer = EmbeddingWriter(out, n_layers, n_heads, dim, block=blk,
                                 attrs={"checkpoint": str(checkpoint), "pool": pool,
                                        "checkpoint_sha256": fingerprint})
        blocks = _Blocks(store, index, target, 0, n_layers, n_heads, dim)
        bar = progress(total=None, desc=f"encode rank {rank}", unit="map")
        for j in mine:
            lo, hi = j * blk, min((j + 1) * blk, target.size)
            writer.append(target[lo:hi], blocks.encode(model, lo, hi, pool, batch_size, bar))
        writer.close()
        bar.close()
        log.info("rank %d encoded %d maps of %d blocks in %.1f s", rank, blocks.n_maps,
                 len(mine), time.perf_counter() - t0)
    ranks.finish(device)                # every shard is committed; the merge needs no group
    if rank == 0:
        writer, fingerprint = open_writer(run, checkpoint, model, n_layers, n_heads, pool, blk,
                                          False)
        writer.group.attrs.update({"complete": False})
        ranks.merge_encode(run, writer, target)
        writer.close()
        update_manifest(run, "encode", {
            "mode": "store", "checkpoint": str(checkpoint), "checkpoint_sha256": fingerprint,
            "pool": pool, "device": device, "ranks": world,
            "dtype": "bfloat16" if device.startswith("cuda") else "float32",
            "inferences": int(target.size), "layers": n_layers, "heads": n_heads, "dim": dim,
            "block": writer.block, "seconds": round(time.perf_counter() - t0, 2)})
    return main



def encode(run: str | os.PathLike, settings: EncodeConfig | None = None, *,
           checkpoint: str | os.PathLike | None = None, device: str = "auto",
           restart: bool = False, **overrides) -> Path:
    """Encode every analysis map of ``run`` into ``RUN/embeddings.zarr``; resumable.

    ``settings``: the ``encode`` section (:class:`~apmae_gpu.core.config.EncodeConfig`), with
    keyword ``overrides`` of its fields over it.  Reads ``MapStore(run)`` (the ``analysis``
    inferences with maps), batches ``batch_size`` maps per forward pass and writes ``block``
    inferences per commit.  Returns the path.
    """
    run = Path(run)
    cfg = section(EncodeConfig, settings, overrides)
    batch_size, pool, block = cfg.batch_size, cfg.pool, cfg.block
    checkpoint = Path(checkpoint) if checkpoint else run / layout.APMAE_DIR / layout.FINAL_DIR
    device = resolve_device(device)
    store = MapStore(run)
    inf = store.inferences(columns=["inference_id", "split", "has_maps"])
    if inf.empty:
        raise ApmaeError(f"{run}: the maps store holds no inferences")
    target = np.sort(inf.loc[(inf["split"] == "analysis") & inf["has_maps"],
                             "inference_id"].to_numpy(np.int64))
    if target.size == 0:
        raise ApmaeError(f"{run}: no analysis inferences with maps (run `apmae capture "
                         f"--split analysis` first)")
    index = store.index()
    index = index[index["inference_id"].isin(target)]
    n_layers, n_heads = int(index["layer"].max()) + 1, int(index["head"].max()) + 1

    dist = ranks.dist_env()
    if dist is not None:
        device = ranks.rank_device(device, dist[2])
        ranks.init_group(device)
    model = load_encoder(checkpoint, device)
    cfg = model.config
    if cfg.image_size != store.info.window:
        raise ApmaeError(f"{checkpoint} encodes {cfg.image_size}x{cfg.image_size} maps; {run} "
                         f"holds {store.info.window}x{store.info.window}")
    if getattr(cfg, "stored_scaler", store.info.scaler) != store.info.scaler:
        raise ApmaeError(f"{checkpoint} expects maps scaled with {cfg.stored_scaler!r}; {run} "
                         f"stores {store.info.scaler!r}")
    if dist is not None:
        return _encode_ranked(run, checkpoint, store, model, index, target, n_layers, n_heads,
                              pool, batch_size, block, restart, dist, device)
    writer, fingerprint = open_writer(run, checkpoint, model, n_layers, n_heads, pool, block,
                                      restart)
    dim = writer.shape_lhd[2]
    old = writer.attrs
    done = writer.committed_ids
    if done.size and not np.array_equal(done, target[:done.size]):
        raise ApmaeError(f"{writer.path} holds inferences that are not the run's analysis split "
                         f"(capture changed?); pass --restart to re-encode")
    if done.size == target.size and old.get("complete"):
        log.info("%s is complete (%d inferences); nothing to do", writer.path, target.size)
        return writer.path
    if done.size:
        log.info("resuming: %d of %d inferences already encoded", done.size, target.size)
    writer.group.attrs.update({"complete": False})
    t0 = time.perf_counter()
    if (run / layout.ENCODE_SHARDS_DIR).exists():   # blocks a torchrun encode left
        ranks.merge_encode(run, writer, target, complete=False)
        done = writer.committed_ids
    blocks = _Blocks(store, index, target, done.size, n_layers, n_heads, dim)
    bar = progress(total=len(blocks.map_ids), desc="encode", unit="map")
    # Work a block of inferences at a time (host buffer [b, L, H, D]); maps in batches.
    first = writer.block - done.size % writer.block   # commits stay aligned to the chunks
    bounds = sorted({0, blocks.todo.size, *range(first, blocks.todo.size, writer.block)})
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        writer.append(blocks.todo[lo:hi], blocks.encode(model, lo, hi, pool, batch_size, bar))
    writer.close()
    bar.close()
    n_maps = blocks.n_maps
    seconds = time.perf_counter() - t0
    update_manifest(run, "encode", {
        "mode": "store", "checkpoint": str(checkpoint), "checkpoint_sha256": fingerprint,
        "pool": pool,
        "device": device, "dtype": "bfloat16" if device.startswith("cuda") else "float32",
        "inferences": int(target.size), "layers": n_layers, "heads": n_heads, "dim": dim,
        "block": writer.block, "maps_encoded": n_maps, "seconds": round(seconds, 2),
        "maps_per_s": round(n_maps / seconds, 1) if seconds > 0 else None,
        "resumed_from": int(done.size)})
    log.info("encoded %d maps of %d inferences in %.1f s -> %s", n_maps, target.size, seconds,
             writer.path)
    return writer.path
