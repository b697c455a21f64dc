#!/usr/bin/env bash
# One-GPU acceptance check (H100/H200; about 6 of its 8 minutes), from the repository root:
#
#     bench/gpu_check.sh            # runs every step, writes bench/results/*-<gpu>.{json,md}
#     bench/gpu_check.sh --dry-run  # prints the steps and checks their options parse (CPU)
#
# Needs torch (CUDA build), transformers and cupy; anything else as local wheels
# (PIP_FIND_LINKS).  Steps, each with its own time limit, stopping at the first failure:
#   1. parity   bf16 capture of random:starcoder2-3b vs float32 eager attention, 4 prompts
#   2. capture  capture throughput vs the plain forward (bench_capture.py, no reference path)
#   3. train    paper-preset AP-MAE training maps/s and share of the bf16 peak (bench_train.py)
#   4. encode   encode maps/s of a paper-preset AP-MAE (gpu_check.py encode)
#   5. knn      exact torch kNN on CUDA (and cuML UMAP + HDBSCAN if installed; bench_cluster.py)
#   6. summary  bench/results/gpu_check-<gpu>.{json,md}
# PEAK_TFLOPS (default 989: H100 SXM dense bf16; the H200 has the same) sets the peak.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PEAK=${PEAK_TFLOPS:-989}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

STEPS=(
  "parity|90|bench/gpu_check.py parity --model random:starcoder2-3b --prompts 4 --window 256"
  "capture|120|bench/bench_capture.py --model random:starcoder2-3b --batch-size 16 --repeat 3 --reference-batches 0"
  "train|120|bench/bench_train.py --device cuda --steps 20 --warmup 5 --batch-size 256 --peak-tflops ${PEAK} --skip-learn --loader-batches 10"
  "encode|60|bench/gpu_check.py encode --maps 20000 --batch-size 256"
  "knn|60|bench/bench_cluster.py --sections gpu --sizes 20000,110000"
  "summary|30|bench/gpu_check.py summary"
)

die() { echo "gpu_check: $*" >&2; exit 1; }

PARSE_ONLY='
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, args=None, namespace=None):
    parse(self, args, namespace)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'


if [ "$DRY" = 1 ]; then
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    script=${cmd%% *}
    read -r -a argv <<<"${cmd#* }"
    echo "[$name, ${limit}s] $PY $cmd"
    # the step's options must parse: the script runs up to its parse_args(), then stops
    "$PY" -c "$PARSE_ONLY" "$script" "${argv[@]}" >/dev/null || die "step $name: options do not parse"
  done
  echo "gpu_check: dry run ok (${#STEPS[@]} steps)"
  exit 0
fi

command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: no NVIDIA driver on this machine"
nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi sees no GPU"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || die "torch sees no CUDA GPU (a CPU build of torch, or CUDA_VISIBLE_DEVICES hides it)"
"$PY" -c "import transformers" 2>/dev/null || die "transformers is not installed"
"$PY" -c "import cupy" 2>/dev/null || die "cupy is not installed"
"$PY" -c "import apmae_gpu" 2>/dev/null \
  || die "apmae_gpu does not import: pip install --no-deps -e . (and the wheels in PIP_FIND_LINKS)"
mkdir -p bench/out/logs
start=$(date +%s)
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  log=bench/out/logs/gpu_check-$name.log
  echo "gpu_check: $name (at most ${limit}s) ..."
  read -r -a argv <<<"$cmd"
  if ! timeout "$limit" "$PY" "${argv[@]}" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "step $name failed or ran past ${limit}s (log: $log)"
  fi
done
echo "gpu_check: done in $(( $(date +%s) - start ))s; see bench/results/gpu_check-*.md"
