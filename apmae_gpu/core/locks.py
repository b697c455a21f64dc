"""Writer locks: one writer per run directory (or per shard) at a time, re-entrant within a
process and inherited by the processes it starts."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

# --------------------------------------------------------------------------- writer lock
from apmae_gpu.core import layout
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.core.layout import LOCK_FILE

_LOCK_ENV = "APMAE_HELD_LOCKS"   # locks an ancestor process holds (``pid:path`` entries)


_held: dict[str, list] = {}      # lock path -> [open file, depth] held by this process


def lock_holder(path: Path) -> str:
    """``PID n (command)`` of the process recorded in a lock file, or ``another process``."""
    try:
        info = json.loads(path.read_text() or "{}")
        pid = int(info["pid"])
        os.kill(pid, 0)
        return f"PID {pid} ({info.get('command', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _held_by_ancestor(path: Path) -> bool:
    for entry in os.environ.get(_LOCK_ENV, "").split(os.pathsep):
        pid, _, held = entry.partition(":")
        if held == str(path) and pid.isdigit():
            try:
                os.kill(int(pid), 0)
                return True
            except OSError:
                continue
    return False


def _acquire(path: Path, exclusive: bool, what: str, command: str) -> None:
    key = str(path)
    if key in _held:
        _held[key][1] += 1
        return None
    if _held_by_ancestor(path):
        return None
    try:
        fh = open(path, "a+")
    except OSError as exc:
        raise ApmaeError(f"{path.parent}: cannot write there ({exc.strerror})") from None
    try:
        fcntl.flock(fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(path)
        for _ in range(20):   # the holder records itself just after it takes the lock
            if holder != "another process":
                break
            time.sleep(0.05)
            holder = lock_holder(path)
        if holder == "another process" and path.parent.joinpath(layout.SHARDS_DIR).is_dir():
            holders = [lock_holder(p) for p in sorted(path.parent.glob(f"{layout.SHARDS_DIR}/*/{LOCK_FILE}"))]
            holder = ", ".join(h for h in holders if h != "another process") or holder
        fh.close()
        raise ApmaeError(f"{what} is being written by {holder}; wait for it to finish "
                         f"(this {command} changed nothing)") from None
    if exclusive:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "command": command,
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        fh.flush()
    _held[key] = [fh, 1]
    return None


def _release(path: Path) -> None:
    key = str(path)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        fh = entry[0]
        with contextlib.suppress(OSError):
            fh.seek(0)
            fh.truncate()
        fh.close()   # closing releases the flock (the kernel does the same on a crash)
        del _held[key]


@contextlib.contextmanager
def writer_lock(run: str | os.PathLike, command: str,
                shard: str | os.PathLike | None = None) -> Iterator[Path]:
    """Hold the run's writer lock (``RUN/.apmae.lock``, an advisory ``flock``) for a stage
    that writes; yields the lock file's path.

    One writer per run: a second one fails at once with an :class:`ApmaeError` naming the
    holder's PID and command.  Readers take no lock.  The kernel drops the lock when the
    holder exits or crashes, so a stale lock file never blocks.  Nested calls in one process
    (the pipeline calling the stages) and child processes started by the holder (the
    pipeline's ``torchrun``) reuse it.

    ``shard``: a shard writer (``capture --shard K/N``, a rank writing its own directory)
    locks its shard directory exclusively and the run *shared*: shard writers run side by
    side, each shard has one writer, and whole-run writers wait for all of them.
    """
    run = Path(run).resolve()
    if not run.is_dir():
        raise ApmaeError(f"run directory {run} does not exist")
    run_lock = run / LOCK_FILE
    locks: list[Path] = []
    try:
        if shard is None:
            _acquire(run_lock, True, str(run), command)
            locks.append(run_lock)
        else:
            shard_dir = Path(shard).resolve()
            shard_dir.mkdir(parents=True, exist_ok=True)
            if str(run_lock) not in _held:   # a whole-run holder may write its shards
                _acquire(run_lock, False, str(run), command)
                locks.append(run_lock)
            _acquire(shard_dir / LOCK_FILE, True, str(shard_dir), command)
            locks.append(shard_dir / LOCK_FILE)
        held = [f"{os.getpid()}:{p}" for p in locks if str(p) in _held]
        previous = os.environ.get(_LOCK_ENV)
        os.environ[_LOCK_ENV] = os.pathsep.join(filter(None, [previous, *held]))
        try:
            yield locks[-1] if locks else run_lock
        finally:
            if previous is None:
                os.environ.pop(_LOCK_ENV, None)
            else:
                os.environ[_LOCK_ENV] = previous
    finally:
        for p in reversed(locks):
            _release(p)
