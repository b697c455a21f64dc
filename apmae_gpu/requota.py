"""Raising a split's quota (``--per-task``) in a captured run.

A run captured at quota q holds attempts judged but stored without maps (their class was
full), and its inference ids follow the rounds needed at q.  A run captured at q' > q from the
start keeps some of those attempts, needs more rounds, and numbers them in its own ``(k, task)``
order.  So the split is captured again, at q', into ``RUN/requota-SPLIT/``: a store that
starts as a copy of the other splits' commits (which must all come before the split's), and
is then a plain capture, resumable like any other.  When it is complete it replaces the run's
store (:func:`complete`): a marker file, the identity's ``per_task``, then the three store
paths moved one by one; each step is redone safely by a rerun, so a capture killed at any point
and rerun ends with the store a capture at q' from the start would have written.  Lowering a
quota is refused (:mod:`apmae_gpu.identity`).  Raising the analysis split's quota sets aside
the embeddings of its old maps (``apmae encode`` computes them again); stages after capture
must be rerun, as after any capture (``apmae pipeline`` does).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from apmae_gpu import identity
from apmae_gpu.encoding import EMBEDDINGS
from apmae_gpu.runs import ApmaeError, atomic_path
from apmae_gpu.store import INDEX, INFERENCE_SCHEMA, INFERENCES, MAPS, MapStore

log = logging.getLogger("apmae_gpu.requota")

SETTINGS = "requota.json"
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
    if staging.exists():
        if settings.exists() and json.loads(settings.read_text()).get("per_task") == per_task:
            return staging
        shutil.rmtree(staging)   # a raise to another quota, never applied
    tmp = Path(run) / f".requota-{split}.creating"
    shutil.rmtree(tmp, ignore_errors=True)
    old = MapStore(run)
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
    (tmp / SETTINGS).write_text(json.dumps({"split": split, "per_task": per_task}) + "\n")
    os.replace(tmp, staging)
    return staging


def swap(run: Path, split: str) -> None:
    """Mark the staging capture complete and put its store in place of the run's."""
    with atomic_path(staging_dir(run, split) / DONE) as tmp:
        tmp.write_text("")
    complete(run)


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
