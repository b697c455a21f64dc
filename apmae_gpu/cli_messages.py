"""One line for an exception the stages did not turn into an :class:`ApmaeError` (the CLI's
last resort, before the traceback goes to a log file)."""

from __future__ import annotations

import errno
import json


def describe(exc: BaseException) -> tuple[str, int]:
    """One line for an exception that is not an ApmaeError, and the exit code: 2 for the
    expected failures (I/O, permissions, damaged files, bad model configs), 1 otherwise."""
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    name = type(exc).__name__
    where = f": {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
    if isinstance(exc, PermissionError):
        return f"permission denied{where}", 2
    if isinstance(exc, FileNotFoundError):
        return f"no such file or directory{where}", 2
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on the device{where}", 2
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start})", 2
    if isinstance(exc, json.JSONDecodeError):
        return f"a JSON file is damaged ({exc.msg}, line {exc.lineno})", 2
    if "arrow" in type(exc).__module__.lower() or "parquet" in first.lower():
        return f"a parquet file is damaged or unreadable ({first or name})", 2
    if isinstance(exc, OSError):
        return f"{exc.strerror or first or name}{where}", 2
    if isinstance(exc, MemoryError):
        return "out of memory", 2
    return f"unexpected {name}" + (f": {first}" if first else ""), 1
