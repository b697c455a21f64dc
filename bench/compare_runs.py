"""Compare every result table (and store) of two runs: the check behind "same seed, same
results" for refactors.

    python bench/compare_runs.py RUN_A RUN_B [--ignore-cols seconds,...]

Every parquet file (or parquet directory) under RUN_A is read with its twin under RUN_B and
compared exactly (column order, dtypes, values; NaN equals NaN) after dropping timing columns
and writing each run's own path and name as RUN;
every Zarr array of maps.zarr and embeddings.zarr is compared bit for bit.  Prints one line per
table and exits 1 when anything differs or is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import zarr

TIMING = ("seconds", "wall", "elapsed", "time_s", "duration", "started", "finished",
          "tasks_per_second")


def tables(run: Path) -> list[Path]:
    """Parquet files and parquet directories (datasets) under RUN, relative to it."""
    out = []
    for p in sorted(run.rglob("*.parquet")):
        if any(parent.suffix == ".parquet" for parent in p.relative_to(run).parents):
            continue   # a part of a parquet directory: compared with its directory
        out.append(p.relative_to(run))
    return out


def _timing(col: str, extra: tuple[str, ...]) -> bool:
    return any(t in col.lower() for t in TIMING + extra)


def _anonymous(frame: pd.DataFrame, run: Path) -> pd.DataFrame:
    """The run's own path and name in text columns replaced by ``RUN``."""
    for col in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[col]) and \
                not pd.api.types.is_bool_dtype(frame[col]):
            frame[col] = frame[col].astype(object).map(lambda v: ("RUN" if v == run.name else
                                                   v.replace(str(run), "RUN"))
                                        if isinstance(v, str) else v)
    return frame


def compare_table(a: Path, b: Path, runs: tuple[Path, Path], extra: tuple[str, ...]
                  ) -> str | None:
    fa = _anonymous(pq.read_table(a).to_pandas(), runs[0])
    fb = _anonymous(pq.read_table(b).to_pandas(), runs[1])
    drop = [c for c in fa.columns if _timing(str(c), extra)]
    fa, fb = fa.drop(columns=drop), fb.drop(columns=[c for c in drop if c in fb.columns])
    try:
        pd.testing.assert_frame_equal(fa, fb, check_exact=True)
    except AssertionError as exc:
        return str(exc).splitlines()[0][:200]
    return None


def arrays(root: Path) -> dict[str, object]:
    """Every array of a Zarr store (the store itself when it is one array)."""
    group = zarr.open(str(root), mode="r")
    if isinstance(group, zarr.Array):
        return {"": group}
    found = {}

    def walk(g, prefix=""):
        for name, arr in g.arrays():
            found[prefix + name] = arr
        for name, sub in g.groups():
            walk(sub, prefix + name + "/")
    walk(group)
    return found


def equal_arrays(x, y, rows: int = 4096) -> bool:
    """Bit for bit, a slab of ``rows`` along the first axis at a time."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if not x.shape:
        return np.array_equal(np.asarray(x[...]).view(np.uint8), np.asarray(y[...]).view(np.uint8))
    for start in range(0, x.shape[0], rows):
        a, b = np.asarray(x[start:start + rows]), np.asarray(y[start:start + rows])
        if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--ignore-cols", default="", help="more column-name parts to ignore")
    args = ap.parse_args(argv)
    extra = tuple(c for c in args.ignore_cols.split(",") if c)
    bad = 0
    for rel in tables(args.a):
        other = args.b / rel
        why = "missing" if not other.exists() else compare_table(args.a / rel, other,
                                                                 (args.a, args.b), extra)
        bad += why is not None
        print(f"{'DIFF' if why else 'same'}  {rel}" + (f": {why}" if why else ""))
    for rel in sorted(set(tables(args.b)) - set(tables(args.a))):
        bad += 1
        print(f"DIFF  {rel}: only in {args.b}")
    for store in ("maps.zarr", "embeddings.zarr"):
        if not (args.a / store).exists():
            continue
        xa, xb = arrays(args.a / store), arrays(args.b / store)
        for name in sorted(set(xa) | set(xb)):
            same = name in xa and name in xb and equal_arrays(xa[name], xb[name])
            bad += not same
            print(f"{'same' if same else 'DIFF'}  {store}/{name}")
    print(f"{bad} difference(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
