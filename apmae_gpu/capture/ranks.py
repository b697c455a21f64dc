"""Capture on several processes (torchrun ranks or ``--shard K/N``), with a result that does
not depend on how many there are.

Rounds
    Each task's candidates are in a seeded order (see :class:`RoundPlan`); round ``k`` of a
    task is its candidates ``[k*B, (k+1)*B)`` (``B`` = ``--batch-size``), one forward batch of
    one task.  A round's content depends on nothing but the seed, the tasks and ``B``, so a
    prompt is always computed in the same batch, whichever process computes it.

The keep rule (one process and N processes alike)
    An attempt is kept when its class is still short of the quota among the task's earlier
    attempts in candidate order (analysis: correct / incorrect, ``N`` each; noise: the first
    ``2N``, a task's total; train: the first ``N`` correct).  Round ``k`` is *needed* when the rounds before
    it do not meet the task's quota.  One process computes exactly the needed rounds, in the
    order ``(k, task)``, and commits one round per commit.

N processes
    Round ``k`` of the task at position ``t`` in ``TASKS`` belongs to rank ``(k + t) % N``.
    Every rank writes its rounds to ``RUN/shards/K-of-N`` and learns the others' outcomes by
    reading their committed inference parts (a shared filesystem).  Under torchrun a rank
    computes a round only once it is certainly needed (whatever the unknown earlier rounds
    hold) and waits otherwise; with ``--shard`` (processes that may not run at the same time)
    a rank computes every round that is possibly needed given what it knows, so nothing is
    ever missing.  A rank stores the maps of every attempt that may still be kept (with
    ``--encode-with``: their embeddings, in the shard's ``embeddings.zarr``; see
    :mod:`apmae_gpu.encoding.merge`).
    :func:`apmae_gpu.capture.merge.merge_capture` then appends, in ``(k, task)`` order, exactly the needed rounds with
    the keep rule applied to the complete outcomes: the same inference rows, ids, maps and
    map order (or embeddings) as one process.  Surplus rounds and maps stay out of the run (counted in the
    manifest).  Each merge commit is one round, so a killed merge reruns to the same result.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import zarr

from apmae_gpu import TASKS
from apmae_gpu.core import layout
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.frames import atomic_path
from apmae_gpu.core.store import INFERENCES

log = logging.getLogger("apmae_gpu.capture.ranks")

UNKNOWN, INCORRECT, CORRECT, NONE = -1, 0, 1, 2
POLL_SECONDS = 0.05


# --------------------------------------------------------------------------- process group
def dist_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when launched by torchrun with more than one
    process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


# A rank that waits longer than this in a collective (a barrier, DDP's all-reduce) fails with
# an error naming the timeout, instead of NCCL's silent 10-minute default.  The ranks never
# wait across the merge (rank 0 merges after every rank has left the group), so the timeout
# only has to cover the uneven end of the ranks' own work.
TIMEOUT_ENV = "APMAE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800
# "1": every local rank on cuda:0 with gloo (NCCL refuses two ranks on one GPU); for checking
# torchrun on a one-GPU machine, not for speed.
ONE_GPU_ENV = "APMAE_RANKS_ON_ONE_GPU"


def group_timeout() -> timedelta:
    """The process group's collective timeout (``APMAE_DIST_TIMEOUT_S``, default 30 min)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ApmaeError(f"{TIMEOUT_ENV}={raw}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def ranks_on_one_gpu() -> bool:
    return os.environ.get(ONE_GPU_ENV, "0") == "1"


def backend(device: str) -> str:
    """nccl for ranks on their own GPUs; gloo on CPU and with ``APMAE_RANKS_ON_ONE_GPU=1``."""
    return "nccl" if device.startswith("cuda") and not ranks_on_one_gpu() else "gloo"


def init_group(device: str) -> bool:
    """Join torchrun's process group (see :func:`backend`) with an explicit timeout, if not
    joined yet; returns whether this call joined it."""
    if dist.is_initialized():
        return False
    dist.init_process_group(backend=backend(device), timeout=group_timeout())
    return True


def barrier(device: str) -> None:
    if backend(device) == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def finish(device: str) -> None:
    """Wait for every rank (each has committed its own work), then leave the process group:
    what follows (rank 0's merge) runs outside it, so no rank waits on a long merge."""
    barrier(device)
    dist.destroy_process_group()


def rank_device(device: str, local_rank: int) -> str:
    """Each rank on its own GPU (``cuda`` -> ``cuda:LOCAL_RANK``), or every rank on
    ``cuda:0`` with ``APMAE_RANKS_ON_ONE_GPU=1``."""
    if device == "cuda":
        index = 0 if ranks_on_one_gpu() else local_rank
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    return device


# --------------------------------------------------------------------------- the plan
@dataclass
class RoundPlan:
    """Per task its candidates (task ids, seeded order, capped by max_attempts)."""

    split: str
    quota: int
    batch: int
    order: dict[str, np.ndarray]
    capped: dict[str, bool]

    @classmethod
    def build(cls, tasks: pd.DataFrame, split: str, quota: int, batch: int, seed: int,
              max_attempts: int | None, used_elsewhere: set) -> RoundPlan:
        names = ["random_masking"] if split == "train" else [t for t in TASKS
                                                             if t in set(tasks.task)]
        order, capped = {}, {}
        tasks = split_rows(tasks, split, used_elsewhere)
        for task in names:
            ids = tasks.loc[tasks.task == task, "task_id"].to_numpy()
            ids = np.random.default_rng([seed, 11, TASKS.index(task)]).permutation(np.sort(ids))
            capped[task] = max_attempts is not None and len(ids) > max_attempts
            order[task] = ids[:max_attempts] if max_attempts is not None else ids
        return cls(split, quota, batch, order, capped)

    def n_rounds(self, task: str) -> int:
        return math.ceil(len(self.order[task]) / self.batch)

    def attempts(self, task: str, k: int) -> np.ndarray:
        return np.arange(k * self.batch, min((k + 1) * self.batch, len(self.order[task])))

    def save(self, path: Path, extra: dict) -> None:
        if path.exists():
            return
        data = {"split": self.split, "quota": self.quota, "batch": self.batch,
                "candidates": {t: int(len(o)) for t, o in self.order.items()},
                "created_ns": time.time_ns(), **extra}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")


def plan_path(run: Path, split: str) -> Path:
    return Path(run) / layout.SHARDS_DIR / f"plan-{split}.json"


def check_plan(run: Path, plan: RoundPlan, seed: int, encode_with: str | None = None) -> None:
    """A rerun must plan the same rounds as the shards already written."""
    path = plan_path(run, plan.split)
    if not path.exists():
        return
    old = json.loads(path.read_text())
    if old["batch"] != plan.batch or old.get("seed") != seed or old["quota"] != plan.quota:
        raise ApmaeError(f"{path}: the shards were captured with --batch-size {old['batch']}, "
                         f"--seed {old.get('seed')}, --per-task {old['quota']}; rerun with those "
                         "(or merge them first with `apmae merge-shards`)")
    if old.get("encode_with") != encode_with:
        raise ApmaeError(f"{path}: the shards were captured with --encode-with "
                         f"{old.get('encode_with')}, not {encode_with}; rerun with that")


def split_rows(tasks: pd.DataFrame, split: str, used_elsewhere: set) -> pd.DataFrame:
    """The rows of ``tasks`` that ``split`` may prompt: mined for it (or for no split, in
    tables mined before the ``split`` column), not prompted by another split, and not from a
    source file another split prompted (``used_elsewhere``: task ids)."""
    keep = np.ones(len(tasks), bool)
    if "split" in tasks.columns:
        keep &= (tasks["split"].isna() | (tasks["split"] == split)).to_numpy()
    if used_elsewhere:
        used = tasks["task_id"].isin(list(used_elsewhere)).to_numpy()
        files = tasks["task"].ne("noise").to_numpy()
        sources = set(tasks.loc[used & files, "source"])
        keep &= ~used & ~(tasks["source"].isin(sources).to_numpy() & files)
    return tasks[keep]


# --------------------------------------------------------------------------- the keep rule
def kept_target(split: str, task: str, per_task: int) -> int:
    """Inferences a split keeps of one task: ``train`` per_task correct ones; ``analysis``
    per_task correct + per_task incorrect, and for noise (no correctness) the same total."""
    return per_task if split == "train" else 2 * per_task


def _met(task: str, split: str, quota: int, c: int, i: int, a: int) -> bool:
    """Whether a task's quota is met by ``c`` correct, ``i`` incorrect of ``a`` attempts."""
    if split == "train":
        return c >= quota
    if task == "noise":
        return a >= kept_target(split, task, quota)
    return c >= quota and i >= quota


def keeps(task: str, split: str, quota: int, code: int, c: int, i: int, a: int) -> bool:
    """Whether an attempt with outcome ``code`` is kept after ``c`` correct / ``i`` incorrect
    of ``a`` earlier attempts (the rule capture has always applied)."""
    if split == "train":
        return code == CORRECT and c < quota
    if task == "noise":
        return a < kept_target(split, task, quota)
    return c < quota if code == CORRECT else i < quota


def outcome_code(correct) -> int:
    if correct is None or (isinstance(correct, float) and math.isnan(correct)) or correct is pd.NA:
        return NONE
    return CORRECT if bool(correct) else INCORRECT


class Outcomes:
    """What is known of every candidate's outcome, per task (``UNKNOWN`` until committed
    somewhere: the run's own store or any shard)."""

    def __init__(self, plan: RoundPlan, run: Path):
        self.plan, self.run = plan, Path(run)
        self.codes = {t: np.full(len(o), UNKNOWN, np.int8) for t, o in plan.order.items()}
        # per task: prefix counts [correct, incorrect, unknown] of codes[:i], valid for i <= lo
        self._prefix = {t: (np.zeros((3, 1), np.int64), 0) for t in self.codes}
        self._lo = {t: 0 for t in self.codes}       # rounds before it are all known
        self._read: set[Path] = set()
        self.refresh()

    def record(self, task: str, attempt: int, code: int) -> None:
        self.codes[task][attempt] = code
        arr, valid = self._prefix[task]
        self._prefix[task] = (arr, min(valid, attempt))

    def refresh(self) -> int:
        """Read inference parts committed since the last call; returns how many."""
        new = 0
        for src in [self.run, *layout.shard_dirs(self.run)]:
            d = src / INFERENCES
            if not d.is_dir():
                continue
            for p in sorted(d.glob("part-*.parquet")):
                if p in self._read:
                    continue
                try:
                    df = pq.read_table(p, columns=["split", "task", "attempt",
                                                   "correct"]).to_pandas()
                except FileNotFoundError:   # rolled back by its shard meanwhile
                    continue
                df = df[df.split == self.plan.split]
                for row in df.itertuples():
                    if row.task in self.codes and row.attempt < len(self.codes[row.task]):
                        self.record(row.task, int(row.attempt), outcome_code(row.correct))
                self._read.add(p)
                new += 1
        return new

    # ------------------------------------------------------------------ predicates
    def _counts(self, task: str, upto: int, optimistic: bool = False) -> tuple[int, int, int, int]:
        """(correct, incorrect, known, unknown) among the first ``upto`` candidates, from
        prefix sums kept per task (recomputed only past the first changed position)."""
        arr, valid = self._prefix[task]
        codes = self.codes[task]
        if upto > valid + 4 * self.plan.batch:
            arr = np.zeros((3, len(codes) + 1), np.int64)
            for row, code in enumerate((CORRECT, INCORRECT, UNKNOWN)):
                np.cumsum(codes == code, out=arr[row, 1:])
            valid = len(codes)
            self._prefix[task] = (arr, valid)
        base = min(upto, valid)
        c, i, u = (int(x) for x in arr[:, base])
        rest = codes[base:upto]
        if rest.size:
            c, i, u = (c + int((rest == CORRECT).sum()), i + int((rest == INCORRECT).sum()),
                       u + int((rest == UNKNOWN).sum()))
        return c, i, upto - u, u

    def first_open(self, task: str) -> int:
        """The lowest round with an unknown attempt (``n_rounds`` when every one is known)."""
        lo = self._lo[task]
        while lo < self.plan.n_rounds(task) and self.round_known(task, lo):
            lo += 1
        self._lo[task] = lo
        return lo

    def met_before(self, task: str, k: int, optimistic: bool = False) -> bool:
        """Whether the rounds before ``k`` meet the quota: surely (lower bound, the default)
        or if every unknown attempt among them were of use (``optimistic``)."""
        p = self.plan
        c, i, a, u = self._counts(task, k * p.batch, optimistic)
        if not optimistic:
            return _met(task, p.split, p.quota, c, i, a)
        if p.split == "train" or task == "noise":
            return _met(task, p.split, p.quota, c + u, i + u, a + u)
        return (c + u >= p.quota and i + u >= p.quota
                and max(0, p.quota - c) + max(0, p.quota - i) <= u)

    def round_known(self, task: str, k: int) -> bool:
        return bool((self.codes[task][self.plan.attempts(task, k)] != UNKNOWN).all())

    def may_keep(self, task: str, attempt: int, code: int) -> bool:
        """Whether an attempt may be kept given what is known of the earlier ones (exact when
        every earlier attempt is known)."""
        c, i, a, _ = self._counts(task, attempt, False)
        return keeps(task, self.plan.split, self.plan.quota, code, c, i, a)

    def task_done(self, task: str) -> bool:
        """No further round of ``task`` can be needed."""
        lo = self.first_open(task)
        return lo >= self.plan.n_rounds(task) or self.met_before(task, lo)

    def needed_rounds(self) -> list[tuple[int, int, str]]:
        """``(k, task position, task)`` of every needed round, in commit order; every round
        before the last needed one of a task must be known."""
        out = []
        for t, task in enumerate(self.plan.order):
            for k in range(self.plan.n_rounds(task)):
                if self.met_before(task, k):
                    break
                if not self.round_known(task, k):
                    raise ApmaeError(f"{self.plan.split} split: round {k} of task {task} was not "
                                     "captured by any shard; rerun the capture (it resumes), "
                                     "then merge")
                out.append((k, TASKS.index(task), task))
        return sorted(out)


# --------------------------------------------------------------------------- scheduling
def owner(k: int, task: str, world: int) -> int:
    return (k + TASKS.index(task)) % world


def next_round(known: Outcomes, rank: int, world: int, wait: bool) -> tuple[str, int] | None:
    """The next round this rank computes, or None when no round of any task can be needed.

    ``wait`` (every rank runs at once): only a round that is needed whatever the unknown
    earlier rounds hold, polling the other shards until one is or every task is done.
    Otherwise (or with one rank, which knows everything): every possibly needed round."""
    plan = known.plan
    if world > 1:
        known.refresh()          # what the other shards committed meanwhile
    while True:
        best = None
        for task in plan.order:
            for k in range(known.first_open(task), plan.n_rounds(task)):
                if best is not None and (k, TASKS.index(task)) >= best[0]:
                    break
                if known.met_before(task, k, optimistic=wait and world > 1):
                    break
                if owner(k, task, world) == rank and not known.round_known(task, k):
                    best = ((k, TASKS.index(task)), task, k)
                    break
        if best is not None:
            return best[1], best[2]
        if not (wait and world > 1) or all(known.task_done(t) for t in plan.order):
            return None
        time.sleep(POLL_SECONDS)
        known.refresh()


def summary(known: Outcomes) -> dict:
    """Per task: attempts, kept, correct, incorrect, candidates, status (as one process)."""
    p = known.plan
    out = {}
    for task, codes in known.codes.items():
        n = 0
        for k in range(p.n_rounds(task)):
            if known.met_before(task, k):
                break
            n = int(p.attempts(task, k)[-1]) + 1
        c = i = a = kc = ki = kn = 0
        for code in codes[:n]:
            if keeps(task, p.split, p.quota, int(code), c, i, a):
                kn += 1
                kc += int(code == CORRECT)
                ki += int(code == INCORRECT)
            c, i, a = c + int(code == CORRECT), i + int(code == INCORRECT), a + 1
        met = _met(task, p.split, p.quota, c, i, a)
        capped = p.capped.get(task, False) and n == len(codes)
        status = "quota met" if met else ("max attempts" if capped else "candidates exhausted")
        out[task] = {"attempts": n, "kept": kn, "correct": kc, "incorrect": ki,
                     "candidates": int(len(codes)), "status": status}
    return out


# --------------------------------------------------------------------------- encode


def encode_block_owner(j: int, world: int) -> int:
    return j % world


def blocks_in_shards(run: Path, target: np.ndarray, block: int) -> dict[int, tuple[Path, int]]:
    """Block number -> (shard's embeddings.zarr, position in it) of every committed block."""
    out = {}
    for d in layout.shard_dirs(run, encode=True):
        path = d / layout.EMBEDDINGS_ZARR
        if not path.exists():
            continue
        group = zarr.open_group(path, mode="r")
        n = int(group.attrs.get("n_committed", 0))
        ids = np.asarray(group["inference_id"][:n], dtype=np.int64)
        for pos in range(0, n, block):
            j = int(np.searchsorted(target, ids[pos])) // block
            out.setdefault(j, (path, pos))
    return out


def merge_encode(run: Path, writer, target: np.ndarray, complete: bool = True) -> int:
    """Append the shards' blocks to the run's writer in order (resumable), then remove the
    shards; returns the number of inferences appended.  ``complete=False`` stops at the
    first missing block (one process encodes the rest)."""
    block = writer.block
    have = blocks_in_shards(run, target, block)
    n_blocks = math.ceil(target.size / block)
    appended = 0
    for j in range(writer.committed // block, n_blocks):
        if j not in have and not complete:
            break
        if j not in have:
            raise ApmaeError(f"block {j} of the embeddings was not encoded by any rank; rerun "
                             "`apmae encode` (it resumes)")
        path, pos = have[j]
        group = zarr.open_group(path, mode="r")
        n = min(block, target.size - j * block)
        ids = np.asarray(group["inference_id"][pos:pos + n])
        emb = np.asarray(group["embeddings"][:, :, pos:pos + n, :]).transpose(2, 0, 1, 3)
        if not np.array_equal(ids, target[j * block:j * block + n]):
            raise ApmaeError(f"{path}: block {j} holds other inferences (capture changed?); "
                             "remove RUN/shards-encode and rerun `apmae encode`")
        writer.append(ids, emb)
        appended += n
    shutil.rmtree(Path(run) / layout.ENCODE_SHARDS_DIR, ignore_errors=True)
    return appended
