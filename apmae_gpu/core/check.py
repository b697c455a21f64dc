"""``apmae check RUN``: verify a run directory and say what is damaged and what to rerun.

Read-only.  It checks, stage by stage:

- ``manifest.json`` and ``pipeline.json`` parse, the manifest is an object of sections (and
  present once a stage has run);
- ``tasks.parquet`` reads, and it and the result frames have the columns and types
  ``docs/contracts.md`` gives (:mod:`apmae_gpu.core.tables`: cluster ids integral, no nulls);
- the maps store: ``maps.zarr`` metadata, every parquet part of ``maps_index.parquet`` and
  ``inferences.parquet``, that the index names exactly the maps the array holds (map ids
  ``0..n-1``), that every inference's ``n_maps`` matches its index rows, that the manifest's
  per-split counts match the inference rows, and that every committed chunk exists and
  decodes (with its CRC-32C where the store has one);
- ``embeddings.zarr``: metadata, commit point, ids (ascending, analysis inferences with maps),
  every committed chunk present and decodable;
- the result frames (``clusters.parquet``, ``cluster/heads.parquet``, ``classify/*.parquet``,
  ``intervene/results.parquet``, ``evaluate/*.parquet``) read, and the AP-MAE checkpoints
  (``apmae/final``, ``apmae/checkpoints/step-*``) load.

Each problem is one line: what is damaged, then the command that rebuilds it.
:func:`check_run` returns the problems (empty: the run is sound).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr

from apmae_gpu.core import layout, tables
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.locks import LOCK_FILE, lock_holder
from apmae_gpu.core.store import INDEX, INFERENCES, MapStore, has_checksum, part_files, part_rows
from apmae_gpu.model.checkpoints import damage

RECAPTURE = ("rerun capture: move maps.zarr, maps_index.parquet and inferences.parquet "
             "aside, then `apmae capture RUN --split train` and `--split analysis` and the "
             "stages after them (or capture into a new run)")


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class _Report:
    def __init__(self, echo: Callable[[str], None], run: Path):
        self.echo, self.run = echo, run
        self.problems: list[str] = []

    def bad(self, what: str, rerun: str) -> None:
        line = f"damaged: {what} -> {rerun.replace(' RUN ', f' {self.run} ')}"
        self.problems.append(line)
        self.echo(line)

    def ok(self, what: str) -> None:
        self.echo(f"ok: {what}")

    def bad_chunks(self, damaged, store: str, rerun: str, shown: int = 5) -> int:
        """Report the first ``shown`` damaged chunks (an iterable of descriptions), then
        their count; returns how many there were."""
        n = 0
        for n, what in enumerate(damaged, 1):
            if n <= shown:
                self.bad(what, rerun)
        if n > shown:
            self.bad(f"... and {n - shown} more chunks of {store}", rerun)
        return n


def _json(path: Path, rep: _Report, rerun: str) -> dict | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as exc:
        rep.bad(f"{path} ({_first(exc)})", rerun)
        return None
    rep.ok(path.name)
    return data if isinstance(data, dict) else {}


def _parquet(path: Path, rep: _Report, rerun: str, rel: str | None = None) -> int | None:
    if not path.exists():
        return None
    try:
        n = pq.read_table(path).num_rows
    except (OSError, ValueError) as exc:
        rep.bad(f"{path} ({_first(exc)})", rerun)
        return None
    found = tables.problems(path, rel)
    for problem in found:
        rep.bad(f"{path}: {problem}", rerun)
    if not found:
        rep.ok(f"{path.name} ({n} rows)")
    return n if not found else None


MANIFEST_RERUN = "rewrite it by rerunning the last stage, or restore it from a backup"


def _manifest(run: Path, rep: _Report) -> dict:
    """The parsed manifest, or {} after reporting it missing (in a run that has stage
    outputs), unreadable or of the wrong structure."""
    path = run / layout.MANIFEST_JSON
    if not path.exists():
        if (run / layout.TASKS_PARQUET).exists():   # mining writes both
            rep.bad(f"{path} is missing", MANIFEST_RERUN)
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as exc:
        rep.bad(f"{path} ({_first(exc)})", MANIFEST_RERUN)
        return {}
    found = tables.manifest_problems(data)
    for problem in found:
        rep.bad(f"{path}: {problem}", MANIFEST_RERUN)
    if found:
        return {}
    rep.ok(path.name)
    return data


def check_maps(run: Path, rep: _Report, manifest: dict) -> None:
    if not (run / layout.MAPS_ZARR).exists():
        if (run / INFERENCES).exists():
            rep.bad(f"{run / layout.MAPS_ZARR} is missing but {INFERENCES} exists", RECAPTURE)
        return
    try:
        store = MapStore(run)   # read-only: nothing is trimmed or repaired
    except ApmaeError as exc:
        rep.bad(str(exc), RECAPTURE)
        return
    damaged = False
    for d in (INDEX, INFERENCES):
        for p in sorted(part_files(run / d).values()):
            try:
                part_rows(p)
            except ApmaeError:
                rep.bad(f"{p} is not readable parquet", RECAPTURE)
                damaged = True
    if damaged:
        return
    try:
        index = store.index()
        inf = store.inferences()
    except ApmaeError as exc:
        rep.bad(str(exc), RECAPTURE)
        return
    committed = set(part_files(run / INFERENCES))
    extra = sorted(set(part_files(run / INDEX)) - committed)
    if extra:
        rep.echo(f"note: {len(extra)} uncommitted index part(s) (a killed capture); the next "
                 f"`apmae capture` drops them")
    index = index[index.map_id < store.array.shape[0]] if extra else index
    n = int(store.array.shape[0])
    if len(index) and not np.array_equal(np.sort(index.map_id.to_numpy()), np.arange(len(index))):
        rep.bad(f"{run / INDEX}: map ids are not 0..{len(index) - 1}", RECAPTURE)
    elif len(index) > n:
        rep.bad(f"{run / layout.MAPS_ZARR} holds {n} maps but the index names {len(index)}",
                RECAPTURE)
    if not inf.empty:
        per = index.groupby("inference_id").size()
        want = inf.set_index("inference_id").n_maps
        got = per.reindex(want.index, fill_value=0)
        wrong = want.index[(got.to_numpy() != want.to_numpy())]
        if len(wrong) and not manifest.get("capture", {}).get("encoded_with"):
            rep.bad(f"{len(wrong)} inference(s) (first {int(wrong[0])}) do not have the maps "
                    f"their n_maps says", RECAPTURE)
        if inf.inference_id.duplicated().any():
            rep.bad(f"{run / INFERENCES} repeats inference ids", RECAPTURE)
        for split, info in manifest.get("capture", {}).get("splits", {}).items():
            tasks = info.get("tasks") or {}
            if not tasks or "shards" in info:
                continue
            rows = inf[inf.split == split]
            want_attempts = sum(int(t.get("attempts", 0)) for t in tasks.values())
            want_kept = sum(int(t.get("kept", 0)) for t in tasks.values())
            if (len(rows), int(rows.has_maps.sum())) != (want_attempts, want_kept):
                rep.bad(f"manifest says the {split} split has {want_attempts} inferences "
                        f"({want_kept} with maps); {INFERENCES} holds {len(rows)} "
                        f"({int(rows.has_maps.sum())})", RECAPTURE)
    damaged = (f"{run / layout.MAPS_ZARR}: chunk {store.chunk_key(c)} ({store.maps_of_chunk(c)}) "
               f"is {why}" for c in range(store.n_chunks()) if (why := store.verify_chunk(c)))
    if not rep.bad_chunks(damaged, str(run / layout.MAPS_ZARR), RECAPTURE):
        rep.ok(f"maps.zarr ({store.n_maps} maps, {store.n_chunks()} chunks present and "
               f"decoded{', checksums verified' if store.info.checksum else ''}; "
               f"{len(inf)} inferences)")


def check_embeddings(run: Path, rep: _Report) -> None:
    path = run / layout.EMBEDDINGS_ZARR
    rerun = f"`apmae encode {run} --restart`"
    if not path.exists():
        return
    try:
        group = zarr.open_group(path, mode="r")
        emb, ids_arr = group["embeddings"], group["inference_id"]
        n = int(group.attrs.get("n_committed", ids_arr.shape[0]))
        ids = np.asarray(ids_arr[:n], dtype=np.int64)
    except Exception as exc:  # zarr raises many kinds on damaged metadata
        rep.bad(f"{path} ({_first(exc)})", rerun)
        return
    L, H, rows, _ = emb.shape
    if rows < n or len(ids) < n:
        rep.bad(f"{path}: {n} inferences committed but {rows} stored", rerun)
        return
    if n and np.any(np.diff(ids) <= 0):
        rep.bad(f"{path}: inference ids are not ascending", rerun)
    if (run / INFERENCES).exists() and n:
        try:
            inf = MapStore(run).inferences(columns=["inference_id", "split", "has_maps"])
            valid = set(inf.loc[(inf.split == "analysis") & inf.has_maps, "inference_id"])
            if not set(ids.tolist()) <= valid:
                rep.bad(f"{path} holds inferences that are not analysis inferences with maps",
                        rerun)
            elif group.attrs.get("complete") and len(ids) != len(valid):
                rep.bad(f"{path} is marked complete but holds {len(ids)} of the {len(valid)} "
                        f"analysis inferences with maps", rerun)
        except ApmaeError:
            pass   # reported by check_maps
    block = int(emb.chunks[2])

    def damaged():
        for layer in range(L):
            for head in range(H):
                for k in range(-(-n // block)):
                    key = emb.metadata.encode_chunk_key((layer, head, k, 0))
                    why = None
                    if has_checksum(emb) and not (path / "embeddings" / key).is_file():
                        why = "missing"
                    else:
                        try:
                            emb[layer, head, k * block:min((k + 1) * block, n)]
                        except Exception as exc:
                            why = ("checksum mismatch" if "checksum" in str(exc).lower()
                                   else _first(exc))
                    if why:
                        yield (f"{path}: chunk embeddings/{key} (layer {layer}, head {head}) "
                               f"is {why if why == 'missing' else f'damaged ({why})'}")

    if not rep.bad_chunks(damaged(), str(path), rerun):
        state = "complete" if group.attrs.get("complete") else "incomplete (resume: `apmae encode`)"
        rep.ok(f"embeddings.zarr ({n} inferences x {L} layers x {H} heads, {state})")


def check_checkpoints(run: Path, rep: _Report) -> None:
    """``apmae/final`` and every ``apmae/checkpoints/step-*`` load (config.json of the right
    types, a complete safetensors header; :func:`apmae_gpu.model.checkpoints.damage`)."""
    found = [run / layout.APMAE_DIR / layout.FINAL_DIR, *sorted(run.glob("apmae/checkpoints/step-*"))]
    found = [p for p in found if p.is_dir()]
    if not found:
        return
    for ckpt in found:
        why = damage(ckpt)
        if why is None:
            rep.ok(f"{ckpt.relative_to(run)}")
        elif ckpt.name == layout.FINAL_DIR:
            rep.bad(f"{ckpt}: {why}", f"`apmae train {run} --resume` (from the newest intact "
                                      f"checkpoint; or train into a new --out)")
        else:
            rep.bad(f"{ckpt}: {why}", f"delete it: `apmae train {run} --resume` passes over it")


def _note_writer(run: Path, echo: Callable[[str], None]) -> None:
    """Say so when a writer holds the run now (what it is writing may look damaged)."""
    lock = run / LOCK_FILE
    if not lock.exists():
        return
    try:
        with open(lock) as fh:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
    except BlockingIOError:
        echo(f"note: {lock_holder(lock)} is writing {run} now; what it is writing may show "
             f"as damaged")
    except OSError:
        pass


def check_run(run: str | os.PathLike, echo: Callable[[str], None] = print) -> list[str]:
    """Verify ``run``; print one line per finding; return the problems (empty: sound)."""
    run = Path(run)
    if not run.is_dir():
        raise ApmaeError(f"run directory {run} does not exist")
    rep = _Report(echo, run)
    _note_writer(run, echo)
    manifest = _manifest(run, rep)
    _json(run / layout.PIPELINE_JSON, rep, f"delete {run / layout.PIPELINE_JSON}; `apmae pipeline` "
          f"then reruns each stage (complete ones resume)")
    has_captures = (run / layout.MAPS_ZARR).exists() or (run / layout.INFERENCES_PARQUET).exists()
    _parquet(run / layout.TASKS_PARQUET, rep, "mine into a new run (`apmae mine --out NEW ...`): the "
             "captures point at these tasks" if has_captures else f"`apmae mine --out {run} ...`")
    check_maps(run, rep, manifest)
    check_embeddings(run, rep)
    frames = {
        layout.CLUSTERS_PARQUET: f"`apmae cluster {run} --restart`",
        "cluster/heads.parquet": f"`apmae cluster {run} --restart`",
        "classify/metrics.parquet": f"`apmae classify {run}`",
        "classify/head_importance.parquet": f"`apmae classify {run}`",
        "intervene/results.parquet": f"`apmae intervene {run}`",
        "evaluate/evaluation.parquet": f"`apmae evaluate --checkpoint {run}/apmae/final "
                                       f"--data {run}`",
    }
    for rel, rerun in frames.items():
        _parquet(run / rel, rep, rerun, rel)
    check_checkpoints(run, rep)
    echo(f"{run}: {len(rep.problems)} problem(s)" if rep.problems else f"{run}: sound")
    return rep.problems


__all__ = ["check_run"]
