"""Shared fixtures: seeded synthetic runs and tiny random-weight models (no downloads)."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_run_dir(tmp_path_factory):
    """A small run with a maps store (64x64 maps, 2 layers x 3 heads, train + analysis
    splits over all 11 tasks).  Read-only: copy it before writing into it."""
    from apmae_gpu.synthetic import synthetic_run

    return synthetic_run(tmp_path_factory.mktemp("synthetic") / "run")


@pytest.fixture
def run(tmp_path, synthetic_run_dir):
    """A writable copy of ``synthetic_run_dir`` (at ``tmp_path / "run"``)."""
    dst = tmp_path / "run"
    shutil.copytree(synthetic_run_dir, dst)
    return dst


@pytest.fixture
def one_thread():
    """Torch on one CPU thread for the test (restored after it); use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A seeded one-layer AP-MAE checkpoint for 64x64 maps in 16x16 patches.  Read-only."""
    from tests.tiny_models import save_tiny_apmae

    return save_tiny_apmae(tmp_path_factory.mktemp("ckpt") / "final", image_size=64,
                           patch_size=16)


@pytest.fixture(scope="session")
def tiny_apmae(tmp_path_factory):
    """A seeded one-layer AP-MAE checkpoint for 32x32 maps in 4x4 patches (the capture
    tests' 32-token windows).  Read-only."""
    from tests.tiny_models import save_tiny_apmae

    return save_tiny_apmae(tmp_path_factory.mktemp("apmae") / "final", image_size=32,
                           patch_size=4)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's tokenizer (no FIM tokens); converted once into APMAE_CACHE."""
    from apmae_gpu.capture.llm import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def fim_tokenizer_dir(tmp_path_factory, smol_tokenizer):
    """A tokenizer-only model directory: the embedded tokenizer plus StarCoder2's three FIM
    tokens, so FIM prompts can be tested offline."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("fimtok")
    tok = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<fim_prefix>", "<fim_suffix>",
                                                         "<fim_middle>"]})
    tok.save_pretrained(path)
    return path


E2E_CONFIG = """
model: random:tiny-llama
device: cpu
stages: [capture_train, capture_analysis, train, evaluate, encode, cluster, classify, intervene, report]
capture: {batch_size: 8, train: {per_task: 12, heads: all}, analysis: {per_task: 6}}
train: {preset: tiny, steps: 30, batch_size: 32, model_config_overrides: {image_size: 64, patch_size: 8}}
evaluate: {max_maps: 200}
cluster: {workers: 1, neighbors: 5, min_samples: 2, min_cluster_size: 3, umap_dims: 2}
classify: {folds: 3, iterations: 30, stability_refits: 10}
intervene: {k: [1, 2, 4, 8], per_group: 2}
"""


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory):
    """A complete run through the pipeline (every stage but mining) on a tiny
    random-weight Llama with 64-token prompts whose targets are half right by construction:
    real outputs of every stage, small enough for the test suite.  Read-only."""
    from apmae_gpu.pipeline import run_pipeline
    from apmae_gpu.synthetic import synthetic_tasks

    base = tmp_path_factory.mktemp("e2e")
    run = synthetic_tasks(base / "run", "random:tiny-llama", n_per_task=40, window=64)
    config = base / "tiny.yaml"
    config.write_text(E2E_CONFIG)
    run_pipeline(config, out=run)
    return run
