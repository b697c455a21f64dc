"""Corpus readers: stream Java source files from a directory, a zip/jar, JSONL, Parquet or a
Hugging Face dataset, in a seeded order, without loading the corpus into memory.

Every reader yields ``(source, data)`` pairs: ``source`` is the file's path or id inside the
corpus, ``data`` its raw bytes (text columns are UTF-8 encoded).  Corpora that allow random
access (directory, zip/jar, JSONL, a non-streamed Hugging Face dataset) are visited in the
order of a seeded hash of each source id, so the same files give the same order whatever
container they come in.  Parquet is visited row group by row group (a seeded permutation of
row groups, then of rows inside each), and a streamed Hugging Face dataset through its own
seeded shuffle buffer: both avoid decoding a row group per file.

SRC forms: ``DIR`` (``*.java`` below it), ``FILE.zip`` / ``FILE.jar``, ``FILE.jsonl``
(``.jsonl.gz`` too), ``FILE.parquet``, ``hf:DATASET[?split=train&streaming=1&data_dir=D]``
where DATASET is a hub id or a local parquet/jsonl file or directory.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import stat
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pyarrow.parquet as pq

from apmae_gpu.core.errors import ApmaeError

log = logging.getLogger("apmae_gpu.mining.corpus")

ID_COLUMNS = ("path", "file_path", "max_stars_repo_path", "file_name", "filename", "id", "sha")
JAVA_SUFFIX = ".java"
# The Heap flags files that are exact or near duplicates of other corpora (The Stack v1/v2,
# RedPajama, GitHub Code) in boolean columns named like these; flagged rows are dropped.  The
# reference drops only the Stack v2 flags (``reference``); ``all`` drops every flag's rows.
DUPLICATE_FLAG_PREFIXES = ("exact_duplicates", "near_duplicates")
REFERENCE_FLAGS = ("exact_duplicates_stackv2", "near_duplicates_stackv2")
DEDUP_FLAGS = ("reference", "all")


def duplicate_flag_columns(names, which: str = "reference") -> list[str]:
    if which == "all":
        return [c for c in names if str(c).startswith(DUPLICATE_FLAG_PREFIXES)]
    return [c for c in names if c in REFERENCE_FLAGS]


def is_flagged_duplicate(row, flags: list[str], counts=None) -> bool:
    """Whether ``row`` is flagged by one of ``flags``; ``counts`` (a Counter) gains one per
    flag set."""
    hit = [c for c in flags if bool(row.get(c))]
    if counts is not None:
        counts.update(hit)
    return bool(hit)


class TooLarge(bytes):
    """Marker payload for a file skipped unread because it is larger than the limit."""


class Unreadable(bytes):
    """Marker payload for a file that cannot be read; ``reason`` is what mining counts it
    as: ``symlink_loop``, ``dangling_symlink``, ``special_file`` (a FIFO, device or socket
    named ``*.java``: never opened for a blocking read), ``corrupt_member`` (bad CRC or
    deflate data in a zip), ``slow_read`` (over the time bound) or ``unreadable``."""

    def __new__(cls, reason: str):
        obj = super().__new__(cls, b"")
        obj.reason = reason
        return obj


# Bound on the time spent reading one file (seconds); the size bound is max_bytes.
READ_SECONDS = 30.0
_PIECE = 1 << 20


def read_bounded(f, max_bytes: int | None, seconds: float = READ_SECONDS) -> bytes:
    """Read a binary stream in pieces, giving up past ``max_bytes`` (TooLarge) or past
    ``seconds`` (Unreadable ``slow_read``)."""
    start = time.monotonic()
    pieces, total = [], 0
    while True:
        piece = f.read(_PIECE)
        if not piece:
            return b"".join(pieces)
        total += len(piece)
        if max_bytes is not None and total > max_bytes:
            return TooLarge()
        if time.monotonic() - start > seconds:
            return Unreadable("slow_read")
        pieces.append(piece)


def order_key(seed: int, source: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{source}".encode(), digest_size=8).digest()


class Corpus:
    """Base class: ``iter_files(seed, max_bytes)`` yields ``(source, bytes)`` in a seeded order."""

    kind = "corpus"

    def __init__(self, spec: str, dedup_flags: str = "reference"):
        self.spec = spec
        self.duplicates_filtered = 0     # rows flagged as duplicates of other corpora
        self.dedup_flags = dedup_flags   # which flags drop a row (DEDUP_FLAGS)
        self.flag_counts: Counter = Counter()   # rows each flag is set on, among those seen

    def describe(self) -> dict:
        out = {"spec": self.spec, "kind": self.kind}
        if self.duplicates_filtered:
            out["duplicates_filtered"] = self.duplicates_filtered
        out["dedup_flags"] = self.dedup_flags
        if self.flag_counts:
            out["duplicates_by_flag"] = dict(self.flag_counts)
        return out

    def iter_files(self, seed: int = 0, max_bytes: int | None = None) -> Iterator[tuple[str, bytes]]:
        raise NotImplementedError


class _RandomAccess(Corpus):
    """Corpora with cheap random access: list ids, sort by seeded hash, read one by one."""

    def ids(self) -> list[str]:
        raise NotImplementedError

    def size(self, source: str) -> int | None:
        return None

    def read(self, source: str) -> bytes:
        raise NotImplementedError

    def read_bounded(self, source: str, max_bytes: int | None) -> bytes:
        """``read`` within the size and time bounds (subclasses stream; this one reads)."""
        data = self.read(source)
        return TooLarge() if max_bytes is not None and len(data) > max_bytes else data

    def iter_files(self, seed: int = 0, max_bytes: int | None = None):
        ids = self.ids()
        for source in sorted(ids, key=lambda s: order_key(seed, s)):
            try:
                size = self.size(source)
            except OSError:
                size = None   # read_bounded says why
            if max_bytes is not None and size is not None and size > max_bytes:
                yield source, TooLarge()
                continue
            yield source, self.read_bounded(source, max_bytes)


class DirCorpus(_RandomAccess):
    kind = "directory"

    def __init__(self, spec: str):
        super().__init__(spec)
        self.root = Path(spec)

    def ids(self) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            for name in filenames:
                if name.endswith(JAVA_SUFFIX):
                    out.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(out)

    def size(self, source: str) -> int | None:
        return (self.root / source).stat().st_size

    def read(self, source: str) -> bytes:
        return self.read_bounded(source, None)

    def read_bounded(self, source: str, max_bytes: int | None) -> bytes:
        """Open without blocking (a FIFO named *.java must not hang), read regular files
        only; symlink loops, dangling symlinks and special files are Unreadable."""
        path = self.root / source
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return Unreadable("symlink_loop")
            if path.is_symlink():
                return Unreadable("dangling_symlink")
            return Unreadable("unreadable")
        with os.fdopen(fd, "rb") as f:
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return Unreadable("special_file")
                if max_bytes is not None and st.st_size > max_bytes:
                    return TooLarge()
                return read_bounded(f, max_bytes)
            except OSError:
                return Unreadable("unreadable")


class ZipCorpus(_RandomAccess):
    kind = "zip"

    def __init__(self, spec: str):
        super().__init__(spec)
        try:
            self.zf = zipfile.ZipFile(spec)
        except (zipfile.BadZipFile, OSError, EOFError):
            raise ApmaeError(f"corpus {spec}: not a readable zip/jar file") from None
        self.infos = {i.filename: i for i in self.zf.infolist()
                      if not i.is_dir() and i.filename.endswith(JAVA_SUFFIX)}

    def ids(self) -> list[str]:
        return sorted(self.infos)

    def size(self, source: str) -> int | None:
        return self.infos[source].file_size

    def read(self, source: str) -> bytes:
        return self.read_bounded(source, None)

    def read_bounded(self, source: str, max_bytes: int | None) -> bytes:
        """A member within the bounds; a corrupt one (bad CRC, bad deflate data, truncated,
        encrypted, unsupported compression) is Unreadable."""
        try:
            with self.zf.open(self.infos[source]) as f:
                return read_bounded(f, max_bytes)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError,
                NotImplementedError):
            return Unreadable("corrupt_member")


class JsonlCorpus(_RandomAccess):
    """One JSON object per line; the text in ``content_column``, the id in the first of
    ID_COLUMNS present (else ``line:N``).  One pass records line offsets; reads seek."""

    kind = "jsonl"

    def __init__(self, spec: str, content_column: str = "content",
                 dedup_flags: str = "reference"):
        super().__init__(spec, dedup_flags)
        self.path = Path(spec)
        self.content_column = content_column
        self._offsets: dict[str, tuple[int, int]] | None = None
        self._gz = spec.endswith(".gz")

    def _open(self):
        return gzip.open(self.path, "rb") if self._gz else open(self.path, "rb")

    def _index(self) -> dict[str, tuple[int, int]]:
        if self._offsets is None:
            try:
                self._offsets = self._scan()
            except (OSError, EOFError, zlib.error) as exc:
                raise ApmaeError(f"corpus {self.spec}: not readable ({exc})") from None
        return self._offsets

    def _scan(self) -> dict[str, tuple[int, int]]:
        offsets: dict[str, tuple[int, int]] = {}
        with self._open() as f:
            pos = 0
            for n, line in enumerate(f):
                source = f"line:{n}"
                try:
                    obj = json.loads(line)
                    source = next((str(obj[c]) for c in ID_COLUMNS
                                   if isinstance(obj, dict) and obj.get(c)), source)
                    if isinstance(obj, dict) and is_flagged_duplicate(
                            obj, duplicate_flag_columns(obj, self.dedup_flags), self.flag_counts):
                        self.duplicates_filtered += 1
                        pos += len(line)
                        continue
                except (json.JSONDecodeError, UnicodeDecodeError):
                    pass
                if source in offsets:
                    source = f"{source}#line:{n}"
                offsets[source] = (pos, len(line))
                pos += len(line)
        return offsets

    def ids(self) -> list[str]:
        return list(self._index())

    def size(self, source: str) -> int | None:
        return self._index()[source][1]

    def read(self, source: str) -> bytes:
        pos, length = self._index()[source]
        with self._open() as f:
            f.seek(pos)
            line = f.read(length)
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return b"\0invalid json"
        return _content_bytes(obj.get(self.content_column) if isinstance(obj, dict) else None)


def _content_bytes(value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", errors="surrogatepass")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return b""


class ParquetCorpus(Corpus):
    kind = "parquet"

    def __init__(self, spec: str, content_column: str = "content",
                 dedup_flags: str = "reference"):
        super().__init__(spec, dedup_flags)
        try:
            self.pf = pq.ParquetFile(spec)
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError
            raise ApmaeError(f"corpus {spec}: not a readable parquet file ({exc})") from None
        names = self.pf.schema_arrow.names
        if content_column not in names:
            raise ApmaeError(f"corpus {spec}: no column {content_column!r} (columns: "
                             f"{', '.join(names)})")
        self.content_column = content_column
        self.id_column = next((c for c in ID_COLUMNS if c in names), None)
        self.flags = duplicate_flag_columns(names, self.dedup_flags)

    def iter_files(self, seed: int = 0, max_bytes: int | None = None):
        rng = np.random.default_rng(seed)
        cols = [self.content_column] + ([self.id_column] if self.id_column else []) + self.flags
        base = 0
        starts = []
        for g in range(self.pf.num_row_groups):
            starts.append(base)
            base += self.pf.metadata.row_group(g).num_rows
        for g in rng.permutation(self.pf.num_row_groups):
            table = self.pf.read_row_group(int(g), columns=cols)
            contents = table.column(self.content_column).to_pylist()
            ids = table.column(self.id_column).to_pylist() if self.id_column else None
            flagged = np.zeros(len(contents), bool)
            for c in self.flags:
                col = np.asarray(table.column(c).fill_null(False).to_pylist(), bool)
                self.flag_counts[c] += int(col.sum())
                flagged |= col
            for r in rng.permutation(len(contents)):
                if flagged[r]:
                    self.duplicates_filtered += 1
                    continue
                source = str(ids[r]) if ids and ids[r] else f"row:{starts[int(g)] + int(r)}"
                data = _content_bytes(contents[r])
                if max_bytes is not None and len(data) > max_bytes:
                    yield source, TooLarge()
                else:
                    yield source, data


class HFCorpus(_RandomAccess):
    """A Hugging Face dataset through ``datasets``: hub id, or a local file/directory."""

    kind = "huggingface"

    def __init__(self, spec: str, content_column: str = "content",
                 dedup_flags: str = "reference"):
        super().__init__(spec, dedup_flags)
        body = spec[3:]
        name, _, query = body.partition("?")
        opts = dict(parse_qsl(query))
        self.name = name
        self.split = opts.get("split", "train")
        self.streaming = opts.get("streaming", "0") in ("1", "true", "yes")
        self.content_column = content_column
        self.ds = self._load(name, opts)
        cols = self.ds.column_names or []
        if cols and content_column not in cols:
            raise ApmaeError(f"corpus {spec}: no column {content_column!r} (columns: "
                             f"{', '.join(cols)})")
        self.id_column = next((c for c in ID_COLUMNS if c in cols), None)
        self.flags = duplicate_flag_columns(cols, self.dedup_flags)
        self.rows = None          # row numbers kept after the duplicate filter (non-streamed)
        if self.flags and not self.streaming:
            flags = self.ds.select_columns(self.flags).to_pandas().fillna(False).astype(bool)
            self.flag_counts.update({c: int(n) for c, n in flags.sum().items()})
            keep = ~flags.any(axis=1).to_numpy()
            self.rows = np.flatnonzero(keep)
            self.duplicates_filtered = int((~keep).sum())

    def _load(self, name: str, opts: dict):
        import datasets  # slow to import, and only Hugging Face corpora need it

        kwargs = dict(split=self.split, streaming=self.streaming)
        if opts.get("data_dir"):
            kwargs["data_dir"] = opts["data_dir"]
        path = Path(name)
        try:
            if path.exists():
                files = [str(p) for p in sorted(path.rglob("*"))] if path.is_dir() else [str(path)]
                builder = "json" if any(f.endswith((".jsonl", ".json", ".jsonl.gz"))
                                        for f in files) else "parquet"
                files = [f for f in files if f.endswith((".parquet", ".jsonl", ".json", ".gz"))]
                return datasets.load_dataset(builder, data_files=files, **kwargs)
            return datasets.load_dataset(name, **kwargs)
        except Exception as exc:  # datasets raises many kinds (hub, network, format)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ApmaeError(f"corpus {self.spec}: cannot load the dataset ({first})") from None

    def describe(self) -> dict:
        return {**super().describe(), "split": self.split, "streaming": self.streaming}

    def _row_numbers(self) -> np.ndarray:
        return self.rows if self.rows is not None else np.arange(len(self.ds))

    def ids(self) -> list[str]:
        rows = self._row_numbers()
        if self.id_column:
            col = list(self.ds[self.id_column])
            return [str(col[i]) if col[i] else f"row:{i}" for i in rows]
        return [f"row:{i}" for i in rows]

    def iter_files(self, seed: int = 0, max_bytes: int | None = None):
        if not self.streaming:
            ids = self.ids()
            rows = {s: int(i) for s, i in zip(ids, self._row_numbers())}
            for source in sorted(ids, key=lambda s: order_key(seed, s)):
                data = _content_bytes(self.ds[rows[source]][self.content_column])
                if max_bytes is not None and len(data) > max_bytes:
                    yield source, TooLarge()
                else:
                    yield source, data
            return
        for i, row in enumerate(self.ds.shuffle(seed=seed, buffer_size=10_000)):
            if is_flagged_duplicate(row, self.flags, self.flag_counts):
                self.duplicates_filtered += 1
                continue
            source = str(row.get(self.id_column) or f"row:{i}") if self.id_column else f"row:{i}"
            data = _content_bytes(row.get(self.content_column))
            if max_bytes is not None and len(data) > max_bytes:
                yield source, TooLarge()
            else:
                yield source, data


def open_corpus(spec: str, content_column: str = "content",
                dedup_flags: str = "reference") -> Corpus:
    """Open SRC (see module docstring); a missing or unknown corpus is an ApmaeError.
    ``dedup_flags``: which of The Heap's duplicate flags drop a row (``reference``: the Stack
    v2 ones, as the reference; ``all``)."""
    spec = str(spec)
    if spec.startswith("hf:"):
        return HFCorpus(spec, content_column, dedup_flags)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ApmaeError(f"corpus {spec} does not exist")
    if path.is_dir():
        return DirCorpus(str(path))
    name = path.name.lower()
    if name.endswith((".zip", ".jar")):
        return ZipCorpus(str(path))
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return JsonlCorpus(str(path), content_column, dedup_flags)
    if name.endswith(".parquet"):
        return ParquetCorpus(str(path), content_column, dedup_flags)
    if name.endswith(JAVA_SUFFIX):
        raise ApmaeError(f"corpus {spec} is a single file; pass its directory")
    raise ApmaeError(f"corpus {spec}: unknown kind (expected a directory, .zip, .jar, .jsonl, "
                     ".parquet or hf:<dataset>)")


def resolve_corpus(spec: str) -> str:
    """A corpus spec with ``jdk`` (the JDK's own sources, the embedded default) resolved to
    its src.zip."""
    if spec != "jdk":
        return spec
    path = default_jdk_src()
    if path is None:
        raise ApmaeError("corpus `jdk` needs the JDK sources: `apt-get install openjdk-17-source` "
                         "(Debian/Ubuntu), or give a directory/zip of .java files")
    return path


def default_jdk_src() -> str | None:
    """The JDK's src.zip installed by Debian's openjdk-17-source, if present."""
    for candidate in ("/usr/lib/jvm/openjdk-17/lib/src.zip", "/usr/lib/jvm/openjdk-17/src.zip",
                      "/usr/lib/jvm/java-17-openjdk-amd64/lib/src.zip",
                      "/usr/lib/jvm/java-17-openjdk-arm64/lib/src.zip"):
        if os.path.exists(candidate):
            return candidate
    return None


__all__ = ["Corpus", "open_corpus", "default_jdk_src", "TooLarge", "Unreadable", "order_key",
           "read_bounded"]
