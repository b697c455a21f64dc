"""The maps store of a run: ``maps.zarr`` plus its two parquet tables, committed together.

``RUN/maps.zarr``
    A Zarr v3 array of float16 maps, shape ``[n, window, window]``, chunked along ``n``
    (``chunk_maps`` maps per chunk, whole maps inside a chunk) and compressed with zstd.
    Attributes hold the window, the scaler, its floor and the upper-triangle fill value.
``RUN/maps_index.parquet/``
    ``map_id`` (row in ``maps.zarr``), ``inference_id``, ``layer``, ``head``.
``RUN/inferences.parquet/``
    One row per prompted inference (``has_maps`` says whether its maps were stored).

Both tables are directories of parquet *parts* (``part-000042.parquet``), which pandas,
pyarrow and cudf read as one table.  A commit writes the maps first, then the index part,
then the inference part; the inference part is the commit point.  Opening the store for
writing drops whatever a killed process left past the last commit (an index part without
its inference part, maps past the last indexed row, temporary files), so a rerun continues
from exactly the last commit: no hole, no duplicate.

Integrity: stores created now carry a CRC-32C of every chunk (Zarr v3's ``crc32c`` codec
after zstd), and every read checks that the committed chunks it touches exist, so a deleted
chunk is an error instead of maps of fill values, and a truncated or altered chunk is a
one-line :class:`ApmaeError` naming the chunk instead of a decoder traceback.  Older stores
(zstd only) stay readable; for them a damaged chunk is caught by the decoder.
``apmae check RUN`` (:mod:`apmae_gpu.core.check`) verifies a whole run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from apmae_gpu.core import layout
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import atomic_path

log = logging.getLogger("apmae_gpu.core.store")

MAPS = layout.MAPS_ZARR
INDEX = layout.MAPS_INDEX_PARQUET
INFERENCES = layout.INFERENCES_PARQUET
_PART = re.compile(r"^part-(\d{6,})\.parquet$")

INDEX_SCHEMA = pa.schema([("map_id", pa.int64()), ("inference_id", pa.int64()),
                          ("layer", pa.int16()), ("head", pa.int16())])

# One row per prompted inference (capture writes every attempt; ``has_maps`` marks those
# whose maps are stored).  ``correct`` is null for the noise task.
INFERENCE_SCHEMA = pa.schema([
    ("inference_id", pa.int64()),
    ("split", pa.string()),
    ("task", pa.string()),
    ("task_id", pa.int64()),          # row of tasks.parquet (-1: none)
    ("batch", pa.int64()),            # forward batch it was judged in (resume bookkeeping)
    ("attempt", pa.int64()),          # position in the split's candidate order
    ("input_ids", pa.list_(pa.int32())),
    ("target_token_id", pa.int64()),  # -1: no target (noise)
    ("predicted_token_id", pa.int64()),
    ("correct", pa.bool_()),
    ("target_logprob", pa.float32()),
    ("target_rank", pa.int64()),      # 0 = the model's top choice; -1: no target
    ("predicted_logprob", pa.float32()),
    ("has_maps", pa.bool_()),
    ("n_maps", pa.int32()),
])

# Default chunking: 32 whole maps per chunk (4 MiB raw at 256x256 fp16).  See
# bench/results/capture-cpu2.md (persistence) for the measurement behind it.
DEFAULT_CHUNK_MAPS = 32
DEFAULT_ZSTD_LEVEL = 1


@dataclass(frozen=True)
class StoreInfo:
    window: int
    scaler: str
    fill_value: float
    floor: float | None
    chunk_maps: int
    codec: str
    checksum: bool = False   # chunks carry a crc32c (stores created since the checksum)


def part_files(directory: Path) -> dict[int, Path]:
    if not directory.is_dir():
        return {}
    out = {}
    for p in directory.iterdir():
        m = _PART.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _why(exc: BaseException) -> str:
    return "checksum mismatch" if "checksum" in str(exc).lower() else _first_line(exc)


def part_rows(path: Path) -> int:
    """Rows of one parquet part (from its footer); a damaged part is an ApmaeError."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError) as exc:
        raise ApmaeError(f"{path} is damaged ({_first_line(exc)}); `apmae check "
                         f"{path.parent.parent}` says what to rerun") from None


def read_parts(directory: Path, columns: list[str] | None = None) -> pa.Table:
    """All parts of a parquet directory as one table; a damaged part is an ApmaeError."""
    try:
        return pq.read_table(directory, columns=columns)
    except (OSError, ValueError) as exc:
        for p in sorted(part_files(directory).values()):
            part_rows(p)
            try:
                pq.read_table(p, columns=columns)
            except (OSError, ValueError) as exc2:
                raise ApmaeError(f"{p} is damaged ({_first_line(exc2)}); `apmae check "
                                 f"{directory.parent}` says what to rerun") from None
        raise ApmaeError(f"{directory} cannot be read ({_first_line(exc)})") from None


def chunk_codecs(zstd_level: int = DEFAULT_ZSTD_LEVEL) -> list:
    """Bytes-to-bytes codecs of new stores: zstd, then a CRC-32C of the compressed chunk."""
    return [ZstdCodec(level=zstd_level), Crc32cCodec()]


def has_checksum(array) -> bool:
    return any(c.to_dict().get("name") == "crc32c" for c in array.metadata.codecs)


def open_zarr_array(path: Path, mode: str = "r"):
    """``zarr.open_array`` whose damaged metadata is a one-line ApmaeError.  Writers write
    every chunk, even one that equals the fill value, so that a missing chunk always means
    damage."""
    try:
        kwargs = {"config": {"write_empty_chunks": True}} if mode != "r" else {}
        return zarr.open_array(path, mode=mode, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ApmaeError(f"{path}: its metadata (zarr.json) is damaged "
                         f"({_first_line(exc)})") from None


def _clean_tmp(directory: Path) -> None:
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(".") and (p.name.endswith(".tmp") or ".partial" in p.name):
                p.unlink(missing_ok=True)


class MapStore:
    """Append-only, crash-safe store of attention maps for one run."""

    def __init__(self, run: str | os.PathLike, writable: bool = False):
        self.run = Path(run)
        self.maps_path = self.run / MAPS
        self.index_dir = self.run / INDEX
        self.inf_dir = self.run / INFERENCES
        if not self.maps_path.exists():
            raise ApmaeError(f"{self.run}: no {MAPS} (run `apmae capture` first)")
        self.array = open_zarr_array(self.maps_path, mode="r+" if writable else "r")
        attrs = dict(self.array.attrs)
        try:
            self.info = StoreInfo(window=int(attrs["window"]), scaler=attrs["scaler"],
                                  fill_value=float(attrs["fill_value"]), floor=attrs.get("floor"),
                                  chunk_maps=int(self.array.chunks[0]),
                                  codec=attrs.get("codec", ""), checksum=has_checksum(self.array))
        except (KeyError, TypeError, ValueError) as exc:
            raise ApmaeError(f"{self.maps_path}: its attributes are damaged (missing or "
                             f"invalid {_first_line(exc)})") from None
        self.writable = writable
        if writable:
            self._recover()
        self._refresh()

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create_or_open(cls, run: str | os.PathLike, window: int, scaler: str, fill_value: float,
                       floor: float | None, chunk_maps: int = DEFAULT_CHUNK_MAPS,
                       zstd_level: int = DEFAULT_ZSTD_LEVEL) -> MapStore:
        """Open the run's store for appending, creating it on first use.  An existing store
        must have the same window and scaler (one store per run)."""
        run = Path(run)
        path = run / MAPS
        if path.exists():
            store = cls(run, writable=True)
            if store.info.window != window or store.info.scaler != scaler:
                raise ApmaeError(
                    f"{path} holds {store.info.window}x{store.info.window} maps scaled with "
                    f"{store.info.scaler!r}; this capture asks for {window}x{window} with "
                    f"{scaler!r} (use another RUN)")
            return store
        run.mkdir(parents=True, exist_ok=True)
        codec = f"zstd(level={zstd_level})+crc32c"
        tmp = run / f".{MAPS}.creating"
        if tmp.exists():
            shutil.rmtree(tmp)
        zarr.create_array(
            store=str(tmp), shape=(0, window, window), chunks=(chunk_maps, window, window),
            dtype="float16", fill_value=fill_value, compressors=chunk_codecs(zstd_level),
            zarr_format=3, dimension_names=("map", "query", "key"),
            attributes={"window": window, "scaler": scaler, "fill_value": fill_value,
                        "floor": floor, "codec": codec,
                        "description": "attention maps (scaled softmax probabilities), "
                                       "rows = query positions, columns = key positions"},
        )
        os.replace(tmp, path)
        return cls(run, writable=True)

    def _recover(self) -> None:
        """Drop everything past the last commit (see module docstring)."""
        for d in (self.index_dir, self.inf_dir):
            d.mkdir(parents=True, exist_ok=True)
            _clean_tmp(d)
        committed = part_files(self.inf_dir)
        for seq, p in part_files(self.index_dir).items():
            if seq not in committed:
                log.warning("dropping uncommitted index part %s", p.name)
                p.unlink()
        # Remove chunk temp files a killed zarr write may have left.
        for root, _dirs, files in os.walk(self.maps_path):
            for f in files:
                if f.endswith(".partial"):
                    os.unlink(os.path.join(root, f))
        n = self._count_index_rows()
        if self.array.shape[0] != n:
            if self.array.shape[0] < n:
                raise ApmaeError(f"{self.maps_path}: {self.array.shape[0]} maps but the index "
                                 f"names {n}; the store is damaged")
            log.warning("trimming %d uncommitted maps", self.array.shape[0] - n)
            self.array.resize((n, self.info.window, self.info.window))

    def _count_index_rows(self) -> int:
        return sum(part_rows(p) for p in part_files(self.index_dir).values())

    def _refresh(self) -> None:
        self.n_maps = self._count_index_rows() if self.index_dir.exists() else 0
        seqs = part_files(self.inf_dir)
        self.next_seq = (max(seqs) + 1) if seqs else 0

    # ------------------------------------------------------------------ writing
    def commit(self, maps: np.ndarray | None, index: pd.DataFrame | None,
               inferences: pd.DataFrame, inference_schema: pa.Schema | None = None) -> None:
        """Append ``maps`` ([m, W, W] float16, rows in ``index`` order) with their index rows
        (``inference_id, layer, head``; ``map_id`` is assigned here) and the inference rows,
        as one commit."""
        if not self.writable:
            raise RuntimeError("store opened read-only")
        W = self.info.window
        m = 0 if maps is None else int(maps.shape[0])
        if index is None:
            index = pd.DataFrame({c: [] for c in ("inference_id", "layer", "head")})
        if len(index) != m:
            raise ValueError(f"{m} maps but {len(index)} index rows")
        seq = self.next_seq
        start = self.n_maps
        if m:
            if maps.shape[1:] != (W, W) or maps.dtype != np.float16:
                raise ValueError(f"maps must be float16 [m, {W}, {W}], got {maps.dtype} {maps.shape}")
            if not np.isfinite(maps).all():
                raise ApmaeError("refusing to store NaN or infinite map values")
            self.array.resize((start + m, W, W))
            self.array[start:start + m] = maps
        idx = pa.table({
            "map_id": pa.array(np.arange(start, start + m, dtype=np.int64)),
            "inference_id": pa.array(np.asarray(index["inference_id"], dtype=np.int64)),
            "layer": pa.array(np.asarray(index["layer"], dtype=np.int16)),
            "head": pa.array(np.asarray(index["head"], dtype=np.int16)),
        }, schema=INDEX_SCHEMA)
        with atomic_path(self.index_dir / f"part-{seq:06d}.parquet") as tmp:
            pq.write_table(idx, tmp)
        table = pa.Table.from_pandas(inferences, schema=inference_schema, preserve_index=False)
        with atomic_path(self.inf_dir / f"part-{seq:06d}.parquet") as tmp:
            pq.write_table(table, tmp)
        self.n_maps = start + m
        self.next_seq = seq + 1

    def parts(self) -> dict[int, Path]:
        """Committed inference parts by commit number."""
        return part_files(self.inf_dir)

    def drop_commits(self, seqs) -> None:
        """Remove whole commits that stored no maps (used to roll back inference rows whose
        embeddings a crash lost); commits with maps cannot be dropped."""
        index_parts = part_files(self.index_dir)
        for seq in sorted(seqs, reverse=True):
            ip = index_parts.get(seq)
            if ip is not None and part_rows(ip):
                raise ValueError(f"commit {seq} stored maps; it cannot be dropped")
            self.parts()[seq].unlink()
            if ip is not None:
                ip.unlink()
        self._refresh()

    # ------------------------------------------------------------------ reading
    def index(self, columns: list[str] | None = None) -> pd.DataFrame:
        if not part_files(self.index_dir):
            return pd.DataFrame({f.name: pd.Series(dtype=f.type.to_pandas_dtype())
                                 for f in INDEX_SCHEMA})
        return read_parts(self.index_dir, columns=columns).to_pandas().sort_values(
            "map_id", kind="stable").reset_index(drop=True)

    def inferences(self, columns: list[str] | None = None) -> pd.DataFrame:
        if not part_files(self.inf_dir):
            return pd.DataFrame()
        return read_parts(self.inf_dir, columns=columns).to_pandas().sort_values(
            "inference_id", kind="stable").reset_index(drop=True)

    def read(self, map_ids) -> np.ndarray:
        """Maps by id, in the order given ([k, W, W] float16)."""
        ids = np.asarray(map_ids, dtype=np.int64)
        if ids.size == 0:
            return np.empty((0, self.info.window, self.info.window), np.float16)
        if ids.min() < 0 or ids.max() >= self.n_maps:
            raise IndexError(f"map ids out of range [0, {self.n_maps})")
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        uniq, inverse = np.unique(sorted_ids, return_inverse=True)
        if uniq.size and uniq[-1] - uniq[0] + 1 == uniq.size:
            block = self._slab(int(uniq[0]), int(uniq[-1]) + 1)
        else:
            chunks = np.unique(uniq // self.info.chunk_maps)
            for c in chunks:
                self._check_chunk(int(c))
            try:
                block = self.array.get_orthogonal_selection((uniq, slice(None), slice(None)))
            except Exception as exc:  # a decoder's or the checksum's error
                self._diagnose([int(c) for c in chunks], exc)
        out = np.empty((ids.size, self.info.window, self.info.window), np.float16)
        out[order] = block[inverse]
        return out

    def iter_chunks(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_map_id, maps)`` over whole chunks from ``start`` to ``stop``."""
        stop = self.n_maps if stop is None else min(stop, self.n_maps)
        c = self.info.chunk_maps
        pos = start
        while pos < stop:
            end = min(stop, (pos // c + 1) * c)
            yield pos, self._slab(pos, end)
            pos = end

    def read_chunk(self, c: int) -> np.ndarray:
        """The committed maps of chunk ``c`` (checked: present and intact)."""
        cm = self.info.chunk_maps
        return self._slab(c * cm, min((c + 1) * cm, self.n_maps))

    # ------------------------------------------------------------------ integrity
    def chunk_key(self, c: int) -> str:
        return self.array.metadata.encode_chunk_key((int(c), 0, 0))

    def n_chunks(self) -> int:
        return -(-self.n_maps // self.info.chunk_maps)

    def maps_of_chunk(self, c: int) -> str:
        cm = self.info.chunk_maps
        return f"maps {c * cm}-{min((c + 1) * cm, self.n_maps) - 1}"

    def _check_chunk(self, c: int) -> None:
        if c < self.n_chunks() and not (self.maps_path / self.chunk_key(c)).is_file():
            raise ApmaeError(f"{self.maps_path}: chunk {self.chunk_key(c)} "
                             f"({self.maps_of_chunk(c)}) is missing; the store is damaged "
                             f"(`apmae check {self.run}`)")

    def verify_chunk(self, c: int) -> str | None:
        """None when chunk ``c`` is present and decodes (checksum included), else why not
        (``missing`` or ``damaged (...)``)."""
        if not (self.maps_path / self.chunk_key(c)).is_file():
            return "missing"
        cm = self.info.chunk_maps
        try:
            self.array[c * cm:min((c + 1) * cm, self.n_maps)]
        except Exception as exc:  # a decoder's or the checksum's error
            return f"damaged ({_why(exc)})"
        return None

    def _slab(self, lo: int, hi: int) -> np.ndarray:
        cm = self.info.chunk_maps
        chunks = list(range(lo // cm, (hi - 1) // cm + 1)) if hi > lo else []
        for c in chunks:
            self._check_chunk(c)
        try:
            return self.array[lo:hi]
        except Exception as exc:  # a decoder's or the checksum's error
            self._diagnose(chunks, exc)

    def _diagnose(self, chunks: list[int], exc: Exception):
        """Raise a one-line error naming the first chunk of ``chunks`` that does not decode."""
        cm = self.info.chunk_maps
        for c in chunks:
            try:
                self.array[c * cm:min((c + 1) * cm, self.n_maps)]
            except Exception as one:
                why = _why(one)
                raise ApmaeError(f"{self.maps_path}: chunk {self.chunk_key(c)} "
                                 f"({self.maps_of_chunk(c)}) is damaged ({why}); "
                                 f"`apmae check {self.run}` says what to rerun") from None
        raise ApmaeError(f"{self.maps_path}: cannot read maps ({_first_line(exc)})") from None
