#!/usr/bin/env bash
# The device check: every GPU path of apmae_gpu on one GPU (H100/H200: at most 8 minutes,
# 16 cores, no network), from anywhere:
#
#     bench/gpu_check.sh                 # every step; bench/results/gpu_check-<gpu>.{json,md}
#     bench/gpu_check.sh --dry-run       # each step, what it needs, its options parsed (CPU)
#     WHEELS=DIR bench/gpu_check.sh      # first install the carried wheels (bench/README.md)
#
# Needs torch (a CUDA build), transformers and cupy; the package's other imports come as
# wheels (WHEELS, installed --no-index --no-deps) or are already installed.  The package
# itself is not installed: every step finds it in this repository.  A step whose library is
# missing (cuML, dask-cuda, CatBoost's GPU build) is reported *not checked*, never passed.
# Results also go to $OUT when it is set.  PEAK_TFLOPS (default 989: H100/H200 SXM dense
# bf16) is the peak the training step is compared with.  LIMIT_PCT (default 100) scales every
# step's time limit (e.g. 115 on a first contact, where model building is not yet measured).
# ONLY="parity intervene" reruns just those steps: the summary reads the other steps' last
# result files in bench/results (a rerun after a fix, within one device lease).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PEAK=${PEAK_TFLOPS:-989}
LIMIT_PCT=${LIMIT_PCT:-100}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

# name | seconds at most | what it needs | command (relative to the repository)
STEPS=(
  "env|15|torch (CUDA), nvidia-smi|bench/gpu_check.py env"
  "parity|60|torch (CUDA), transformers|bench/gpu_check.py parity --model random:starcoder2-3b --prompts 2 --window 256 --qk-scale 8"
  "capture|70|torch (CUDA), transformers, zarr, pyarrow|bench/bench_capture.py --model random:starcoder2-3b --batch-size 4 --repeat 2 --reference-batches 0"
  "capture-encode|30|torch (CUDA), transformers, zarr, pyarrow, pandas|bench/gpu_check.py capture-encode"
  "train|35|torch (CUDA), zarr, pyarrow, pandas|bench/gpu_check.py train --steps 40"
  "train-speed|45|torch (CUDA)|bench/bench_train.py --device cuda --steps 20 --warmup 5 --batch-size 256 --peak-tflops ${PEAK} --skip-learn --loader-batches 10"
  "encode|30|torch (CUDA)|bench/gpu_check.py encode --maps 20000 --batch-size 256"
  "intervene|40|torch (CUDA), transformers|bench/gpu_check.py intervene --model random:starcoder2-3b --prompts 4 --window 64"
  "torchrun|70|torch (CUDA, gloo), transformers, typer|bench/gpu_check.py torchrun"
  "cuml|20|cuml, cupy (else not checked)|bench/gpu_check.py cuml"
  "dask-cuda|25|cuml, dask-cuda, distributed (else not checked)|bench/gpu_check.py dask-cuda"
  "catboost-gpu|20|catboost with GPU support (else not checked)|bench/gpu_check.py catboost-gpu --rows 50000"
  "summary|15|-|bench/gpu_check.py summary --statuses bench/out/gpu_check_statuses.json"
)

die() { echo "gpu_check: $*" >&2; exit 1; }

# Parses every step's options in one process (imports are paid once): each script runs up to
# its parse_args(), then stops; steps are separated by "::".
PARSE_ONLY='
import argparse, os, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, args=None, namespace=None):
    parse(self, args, namespace)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
words, steps = sys.argv[1:], [[]]
for w in words:
    steps.append([]) if w == "::" else steps[-1].append(w)
base = list(sys.path)
for name, script, *argv in (s for s in steps if s):
    sys.path[:] = [os.path.dirname(os.path.abspath(script))] + base
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            sys.exit(f"gpu_check: step {name}: options do not parse")
'

if [ "$DRY" = 1 ]; then
  total=0
  all=()
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit needs cmd <<<"$step"
    read -r -a argv <<<"$cmd"
    echo "[$name, ${limit}s] needs: $needs"
    echo "    $PY $cmd"
    all+=("$name" "${argv[@]}" "::")
    total=$((total + limit))
  done
  "$PY" -c "$PARSE_ONLY" "${all[@]}" >/dev/null || exit 1
  echo "gpu_check: dry run ok (${#STEPS[@]} steps, at most ${total}s)"
  exit 0
fi

if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || die "could not install the wheels in $WHEELS"
fi
command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: no NVIDIA driver on this machine"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || die "torch sees no CUDA GPU (a CPU build of torch, a driver older than 580, or CUDA_VISIBLE_DEVICES hides it)"
mkdir -p bench/out/logs bench/results
statuses=bench/out/gpu_check_statuses.json
echo "{}" >"$statuses"
start=$(date +%s)
failed=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit needs cmd <<<"$step"
  [ "$name" = summary ] && continue
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
  log=bench/out/logs/gpu_check-$name.log
  read -r -a argv <<<"$cmd"
  limit=$(( limit * LIMIT_PCT / 100 ))
  timeout "$limit" "$PY" "${argv[@]}" >"$log" 2>&1
  rc=$?
  case $rc in
    0) status=passed;;
    3) status="not checked";;
    124) status=failed; echo "gpu_check: $name ran past ${limit}s" >>"$log";;
    *) status=failed;;
  esac
  [ "$status" = failed ] && { failed=1; tail -n 15 "$log" >&2; }
  echo "gpu_check: $name: $status ($(( $(date +%s) - start ))s so far; log $log)"
  "$PY" -c 'import json, sys; p, k, v = sys.argv[1:]; d = json.load(open(p)); d[k] = v; json.dump(d, open(p, "w"))' \
    "$statuses" "$name" "$status"
done
read -r -a argv <<<"bench/gpu_check.py summary --statuses $statuses"
timeout 15 "$PY" "${argv[@]}" || failed=1
echo "gpu_check: done in $(( $(date +%s) - start ))s"
exit $failed
