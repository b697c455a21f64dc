"""The package's shape (issues 14 and 24): the stages are folders in the pipeline's order and
no stage imports a later one; one module (core/layout.py) names every file of a run; no import
cycle; modules and functions a newcomer can hold in their head; top-level imports for hard
dependencies, bench included."""

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
           "pynvml", "scipy", "playwright", "pynndescent"}
# the stages' folders, in the order one run's data flows through them (core below them all)
STAGES = ["core", "mining", "capture", "model", "encoding", "clustering", "classification",
          "intervention", "report"]
# the arrows from a stage to a later one, each with its reason
LATER_STAGE_ARROWS = {
    ("mining.tasks", "capture.llm"): "mining cuts prompts with the target model's tokenizer",
    ("mining.prompts", "capture.llm"): "the reference loaders' windows count the same tokens",
    ("capture.maps", "encoding.encoder"): "capture --encode-with streams maps into the encoder",
    ("capture.maps", "encoding.merge"): "a resumed one-pass capture rolls back unencoded rows",
    ("capture.merge", "encoding.merge"): "merging one-pass shards merges their embeddings",
    ("capture.requota", "encoding.encoder"): "a raised quota re-encodes in the same pass",
    ("core.check", "model.checkpoints"): "apmae check loads each checkpoint as training wrote it",
}


def _cycles_module():
    spec = importlib.util.spec_from_file_location("import_cycles",
                                                  ROOT / "scripts" / "import_cycles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _modules():
    return sorted(p for p in (ROOT / "apmae_gpu").rglob("*.py") if "__pycache__" not in p.parts)


def _docstrings(tree) -> set[int]:
    return {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}


def test_no_import_cycle_in_the_package():
    cyc = _cycles_module()
    graph = cyc.import_graph()
    assert "capture.maps" in graph["pipeline"]                          # it reads imports
    assert "capture.ranks" in graph["encoding.encoder"]
    assert cyc.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [("a", "b", "c")]
    assert cyc.cycles(graph) == []


def test_modules_and_functions_stay_small():
    big, long = [], []
    for path in [*_modules(), *(ROOT / "bench").glob("*.py")]:
        text = path.read_text()
        if "apmae_gpu" in path.parts and len(text.splitlines()) > MAX_MODULE_LINES:
            big.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name}")
    assert big == [] and long == []


def test_hard_dependencies_are_imported_at_the_top():
    """Inside a function only optional/heavy packages, or (in cli.py, for ``apmae --help``'s
    start-up time) the stage modules; the bench scripts too."""
    offenders = []
    for path in [*_modules(), *(ROOT / "bench").glob("*.py")]:
        if path.relative_to(ROOT).as_posix() == "apmae_gpu/cli.py":
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


def test_the_stages_are_folders_each_naming_its_entry_point():
    import importlib

    pkg = ROOT / "apmae_gpu"
    assert sorted(p.name for p in pkg.iterdir() if (p / "__init__.py").exists()) == sorted(STAGES)
    flat = sorted(p.stem for p in pkg.glob("*.py"))
    assert flat == ["__init__", "cli", "cli_messages", "cli_options", "pipeline", "runs",
                    "synthetic"]
    for stage in STAGES:
        mod = importlib.import_module(f"apmae_gpu.{stage}")
        assert mod.__doc__ and mod.__all__, stage
        for name in mod.__all__:                     # every entry point resolves
            assert callable(getattr(mod, name)), (stage, name)
        for sub in (pkg / stage).glob("*.py"):       # names read without the folder's prefix
            assert not sub.stem.startswith(stage.rstrip("s")[:5] + "_"), sub
    import apmae_gpu

    for name in ("TASKS", "task_rank", "mine", "train", "cluster", "classify", "load_frame",
                 "read_manifest", "frame_backend"):
        assert getattr(apmae_gpu, name) is not None
    from apmae_gpu.runs import frame_backend, load_frame, read_manifest  # documented before

    assert load_frame is apmae_gpu.load_frame and read_manifest and frame_backend


def _later_stage_arrows(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    found = set()
    for mod, deps in graph.items():
        stage = mod.split(".")[0]
        for dep in deps:
            dstage = dep.split(".")[0]
            if stage in STAGES and dstage in STAGES and STAGES.index(dstage) > STAGES.index(stage):
                found.add((mod, dep))
    return found


def test_no_stage_imports_a_later_stage_except_the_named_arrows():
    assert _later_stage_arrows(_cycles_module().import_graph()) == set(LATER_STAGE_ARROWS)
    # the check sees an arrow to a later stage, and not one to an earlier stage or from the CLI
    assert _later_stage_arrows({"core.store": {"report.build", "core.layout"},
                                "report.build": {"core.store"}, "cli": {"report.build"}}) == \
        {("core.store", "report.build")}


def _run_file_offenders(text: str) -> list[str]:
    """String constants (not docstrings) naming a run file, and path joins with a run folder,
    outside core/layout.py."""
    from apmae_gpu.core import layout

    names = layout.run_files()
    files = {v for v in names.values() if "." in v}
    folders = {v for v in names.values() if "." not in v}
    tree = ast.parse(text)
    docs = _docstrings(tree)
    joined = {id(side) for n in ast.walk(tree) if isinstance(n, ast.BinOp)
              and isinstance(n.op, ast.Div) for side in (n.left, n.right)}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            if n.value in files or (n.value in folders and id(n) in joined):
                out.append(f"{n.lineno}: {n.value!r}")
    return out


def test_run_file_names_are_spelled_only_in_the_layout_module():
    offenders = []
    for path in _modules():
        if path.relative_to(ROOT).as_posix() == "apmae_gpu/core/layout.py":
            continue
        offenders += [f"{path.relative_to(ROOT)}:{o}" for o in _run_file_offenders(
            path.read_text())]
    assert offenders == []
    # the check finds a literal and a join (negative controls)
    assert _run_file_offenders('x = run / "maps.zarr"\ny = run / "classify"\nz = "classify"\n') \
        == ["1: 'maps.zarr'", "2: 'classify'"]


def test_contracts_show_the_layout_and_name_no_file_it_lacks():
    import re

    from apmae_gpu.core import layout

    text = (ROOT / "docs" / "contracts.md").read_text()
    table = text.split("<!-- layout:begin -->\n", 1)[1].split("\n<!-- layout:end -->", 1)[0]
    assert table == layout.contracts_table()
    named = set(re.findall(r"[A-Za-z_]+\.(?:parquet|zarr|jsonl|json|html)\b", text))
    inside_checkpoint = {"config.json", "training_args.json"}      # an AP-MAE checkpoint's own
    assert named - set(layout.run_files().values()) - inside_checkpoint == {"pyarrow.parquet"}


def _private_reach(text: str) -> list[str]:
    """Imports of another module's private names, and ``module._name`` on imported modules."""
    tree = ast.parse(text)
    mods, out = set(), []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("apmae_gpu"):
            for a in n.names:
                mods.add(a.asname or a.name)
                if a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"{n.lineno}: imports {a.name}")
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in mods \
                and n.attr.startswith("_") and not n.attr.startswith("__"):
            out.append(f"{n.lineno}: {n.value.id}.{n.attr}")
    return out


def test_no_module_reaches_into_another_modules_private_names():
    offenders = [f"{p.relative_to(ROOT)}:{o}" for p in _modules() for o in _private_reach(
        p.read_text())]
    assert offenders == []
    assert _private_reach("from apmae_gpu.core.locks import _held\nfrom apmae_gpu.capture import "
                          "maps\nmaps._register()\nmaps.capture()\n") == \
        ["1: imports _held", "3: maps._register"]


def test_module_paths_named_outside_python_files_exist():
    """Shell scripts, the Docker files and the docs name modules (``from apmae_gpu.X import
    Y``, ``-m apmae_gpu.X``, ``apmae_gpu.X.name``): each must still import after a move."""
    import importlib
    import re

    texts = [p.read_text() for p in [*(ROOT / "scripts").glob("*.sh"), *(ROOT / "docker").iterdir(),
                                     ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                                     *(ROOT / "bench").glob("*.md"), ROOT / ".ci" / "run"]
             if p.is_file()]
    named = set()
    for text in texts:
        named |= set(re.findall(r"from (apmae_gpu(?:\.\w+)+) import (\w+)", text))
        named |= {(m, None) for m in re.findall(r"-m (apmae_gpu(?:\.\w+)+)", text)}
    assert ("apmae_gpu.mining.corpus", "default_jdk_src") in named      # setup.sh's check
    missing = []
    for mod, name in sorted(named, key=str):
        try:
            m = importlib.import_module(mod)
            if name is not None:
                getattr(m, name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{mod} {name}: {exc}")
    assert missing == []
