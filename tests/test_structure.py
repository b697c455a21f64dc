"""The package's shape (issue 14): no import cycle, modules and functions a newcomer can hold
in their head, top-level imports for hard dependencies."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 150
# imported inside functions on purpose: optional or heavy (see ../shared/docs/style.md)
LAZY_OK = {"cuml", "cupy", "cudf", "dask", "dask_cuda", "distributed", "catboost", "shap",
           "matplotlib", "umap", "hdbscan", "sklearn", "nbclient", "nbformat", "datasets",
           "pynvml", "scipy"}


def _cycles_module():
    spec = importlib.util.spec_from_file_location("import_cycles",
                                                  ROOT / "scripts" / "import_cycles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _modules():
    return sorted((ROOT / "apmae_gpu").glob("*.py"))


def test_no_import_cycle_in_the_package():
    cyc = _cycles_module()
    graph = cyc.import_graph()
    assert "capture" in graph["pipeline"] and "ranks" in graph["encoding"]   # it reads imports
    assert cyc.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [("a", "b", "c")]
    assert cyc.cycles(graph) == []


def test_modules_and_functions_stay_small():
    big, long = [], []
    for path in [*_modules(), *(ROOT / "bench").glob("*.py")]:
        text = path.read_text()
        if path.parent.name == "apmae_gpu" and len(text.splitlines()) > MAX_MODULE_LINES:
            big.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name}")
    assert big == [] and long == []


def test_hard_dependencies_are_imported_at_the_top():
    """Inside a function only optional/heavy packages, or (in cli.py, for its start-up time
    and runs.py, which the CLI imports before parsing) the stage modules and their deps."""
    offenders = []
    for path in _modules():
        if path.name in ("cli.py", "runs.py"):
            continue
        tree = ast.parse(path.read_text())
        top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import)
               for a in n.names}
        top |= {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                for name in names:
                    root = name.split(".")[0]
                    if root not in LAZY_OK:
                        offenders.append(f"{path.name}:{fn.name} imports {name}")
    assert offenders == []


def test_compare_runs_finds_a_changed_value_and_ignores_paths_and_timings(tmp_path, capsys):
    import numpy as np
    import pandas as pd
    import zarr

    spec = importlib.util.spec_from_file_location("compare_runs",
                                                  ROOT / "bench" / "compare_runs.py")
    cmp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cmp)
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        (run / "cluster").mkdir(parents=True)
        pd.DataFrame({"dataset": [str(run), name], "mse": [0.5, 0.25],
                      "seconds": [1.0 if name == "a" else 9.0, 2.0]}).to_parquet(
            run / "cluster" / "heads.parquet")
        zarr.create_array(str(run / "maps.zarr"), shape=(3, 2), dtype="f2", chunks=(2, 2))[:] = \
            np.arange(6, dtype="f2").reshape(3, 2)
        runs.append(run)
    assert cmp.main([str(runs[0]), str(runs[1])]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0 difference(s)"
    zarr.open_array(str(runs[1] / "maps.zarr"), mode="r+")[2, 1] = -0.0   # 5 -> -0
    frame = pd.read_parquet(runs[1] / "cluster" / "heads.parquet")
    frame.loc[1, "mse"] = 0.2500001
    frame.to_parquet(runs[1] / "cluster" / "heads.parquet")
    assert cmp.main([str(runs[0]), str(runs[1])]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("DIFF  cluster/heads.parquet") and out[1] == "DIFF  maps.zarr/"
    assert out[-1] == "2 difference(s)"
