"""Raising a split's quota (``--per-task``) in a captured run.

A run captured at quota q holds attempts judged but stored without maps (their class was
full), and its inference ids follow the rounds needed at q.  A run captured at q' > q from the
start keeps some of those attempts, needs more rounds, and numbers them in its own ``(k, task)``
order.  So the split is captured again, at q', into ``RUN/requota-SPLIT/``: a store that
starts as a copy of the other splits' commits (which must all come before the split's), and
is then a plain capture, resumable like any other, except that a round the run already holds
with every map the new quota keeps is copied rather than prompted (:class:`Reuse`).  When it is complete it replaces the run's
store (:func:`complete`): a marker file, the identity's ``per_task``, then the three store
paths moved one by one; each step is redone safely by a rerun, so a capture killed at any point
and rerun ends with the store a capture at q' from the start would have written.  Lowering a
quota is refused (:mod:`apmae_gpu.capture.identity`).  Raising the analysis split's quota sets aside
the embeddings of its old maps (``apmae encode`` computes them again); stages after capture
must be rerun, as after any capture (``apmae pipeline`` does).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from apmae_gpu.capture import identity, ranks
from apmae_gpu.core import layout
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import atomic_path, read_manifest
from apmae_gpu.core.store import INDEX, INFERENCE_SCHEMA, INFERENCES, MAPS, MapStore
from apmae_gpu.encoding.encoder import EMBEDDINGS

log = logging.getLogger("apmae_gpu.capture.requota")

SETTINGS = layout.REQUOTA_JSON
DONE = "complete"


def staging_dir(run: Path, split: str) -> Path:
    return Path(run) / f"requota-{split}"


def check_raise(run: Path, split: str, old: int, new: int, *, sharded: bool,
                encoding: bool) -> None:
    """Refuse, in one line, a raise this module cannot rebuild exactly."""
    why = None
    if sharded:
        why = "in several processes (run it in one, then shard later captures)"
    elif encoding:
        why = "with --encode-with (capture the new quota into a new run)"
    elif (Path(run) / MAPS).exists():
        inf = MapStore(run).inferences(columns=["inference_id", "split"])
        mine = inf[inf.split == split].inference_id if not inf.empty else inf
        if len(mine) and (inf[inf.split != split].inference_id > mine.min()).any():
            why = "once another split was captured after it (capture the new quota into a new run)"
    if why is not None:
        raise ApmaeError(f"raising --per-task of the {split} split of {run} from {old} to {new} "
                         f"is not possible {why}")


def prepare(run: Path, split: str, per_task: int) -> Path:
    """The staging run for capturing ``split`` at ``per_task``: created (atomically) with a
    copy of the other splits' commits, or reused when a killed raise to the same quota left
    it.  Returns its path."""
    staging = staging_dir(run, split)
    settings = staging / SETTINGS
    old = MapStore(run)
    want = {"split": split, "per_task": per_task, "run_commits": len(old.parts())}
    if staging.exists():
        if settings.exists() and json.loads(settings.read_text()) == want:
            return staging
        shutil.rmtree(staging)   # a raise never applied, to another quota or another run state
    tmp = Path(run) / f".requota-{split}.creating"
    shutil.rmtree(tmp, ignore_errors=True)
    info = old.info
    new = MapStore.create_or_open(tmp, window=info.window, scaler=info.scaler,
                                  fill_value=info.fill_value, floor=info.floor,
                                  chunk_maps=info.chunk_maps)
    index_parts = {int(p.stem.split("-")[1]): p for p in (Path(run) / INDEX).glob("part-*")}
    for seq, part in sorted(old.parts().items()):
        rows = pq.read_table(part).to_pandas()
        if rows.empty or (rows.split == split).all():
            continue
        index = pq.read_table(index_parts[seq]).to_pandas() if seq in index_parts else None
        maps = old.read(index.map_id.to_numpy()) if index is not None and len(index) else None
        new.commit(maps, index if maps is not None else None, rows,
                   inference_schema=INFERENCE_SCHEMA)
    (tmp / SETTINGS).write_text(json.dumps(want) + "\n")
    os.replace(tmp, staging)
    return staging


def swap(run: Path, split: str) -> MapStore:
    """Mark the staging capture complete and put its store in place of the run's; returns
    the run's store."""
    with atomic_path(staging_dir(run, split) / DONE) as tmp:
        tmp.write_text("")
    complete(run)
    return MapStore(run)


def complete(run: Path) -> None:
    """Finish every marked swap a killed capture left (nothing when there is none)."""
    for staging in sorted(Path(run).glob("requota-*")):
        if not (staging / DONE).exists():
            continue
        settings = json.loads((staging / SETTINGS).read_text())
        identity.set_per_task(run, settings["split"], settings["per_task"])
        trash = staging / "replaced"
        trash.mkdir(exist_ok=True)
        if settings["split"] == "analysis" and (Path(run) / EMBEDDINGS).exists():
            os.replace(Path(run) / EMBEDDINGS, trash / EMBEDDINGS)   # the old maps' embeddings
        for name in (INFERENCES, INDEX, MAPS):
            if (staging / name).exists():
                if (Path(run) / name).exists():
                    os.replace(Path(run) / name, trash / name)
                os.replace(staging / name, Path(run) / name)
        shutil.rmtree(staging)
        log.info("the %s split of %s now holds its capture at --per-task %d (rerun the stages "
                 "after capture)", settings["split"], run, settings["per_task"])


class Reuse:
    """The split's attempts in the run's store (at the old quota), for a raise to copy instead
    of prompting again: a round whose every attempt was prompted in the same round (same
    ``--batch-size``) and whose attempts the new quota keeps all have maps is copied (its
    outcomes and maps, which a forward pass would compute bit for bit the same); any other
    round is prompted."""

    def __init__(self, run: Path, split: str, batch_size: int):
        self.store = MapStore(run)
        splits = read_manifest(run).get("capture", {}).get("splits", {})
        inf = self.store.inferences()
        same_rounds = (splits.get(split) or {}).get("batch_size") == batch_size
        inf = inf[inf.split == split] if same_rounds and not inf.empty else inf.iloc[:0]
        self.rows = {(r.task, int(r.attempt)): r for r in inf.itertuples(index=False)}
        index = self.store.index(columns=["map_id", "inference_id"])
        self.map_ids = index.groupby("inference_id").map_id.apply(np.asarray).to_dict()

    def take(self, rnd, known, n_layers: int):
        """``(verdict, maps)`` of round ``rnd`` copied from the store (maps [B, layers, heads,
        T, T] on the CPU, zeros where not kept), or None when it must be prompted."""
        old = [self.rows.get((rnd.task, int(a))) for a in rnd.attempts]
        if any(r is None or r.task_id != t for r, t in zip(old, rnd.task_ids)):
            return None
        keep = []
        for r, a in zip(old, rnd.attempts):
            code = ranks.outcome_code(r.correct)
            keep.append(known.may_keep(rnd.task, int(a), code))
            known.record(rnd.task, int(a), code)
        if any(k and not r.has_maps for k, r in zip(keep, old)):
            return None
        kept = [self.map_ids[r.inference_id] for k, r in zip(keep, old) if k]
        if not kept:
            return None
        W = self.store.info.window
        shape = (n_layers, len(kept[0]) // n_layers, W, W)
        maps = torch.zeros((len(old), *shape), dtype=torch.float16)
        for b, (k, r) in enumerate(zip(keep, old)):
            if k:
                stored = self.store.read(self.map_ids[r.inference_id])
                maps[b] = torch.from_numpy(stored.reshape(shape))
        verdict = {"predicted": np.array([r.predicted_token_id for r in old]),
                   "correct": np.array([ranks.outcome_code(r.correct) == ranks.CORRECT
                                        for r in old]),
                   "target_logprob": np.array([r.target_logprob for r in old], np.float32),
                   "target_rank": np.array([r.target_rank for r in old]),
                   "predicted_logprob": np.array([r.predicted_logprob for r in old], np.float32)}
        return verdict, maps
