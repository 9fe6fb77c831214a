#!/usr/bin/env bash
# Device check of the CUDA kernels, for a GPU machine with no network (16 cores, nvcc, a
# python3 with torch): build in place, CUDA tests, compute-sanitizer memcheck on small
# calls (if the tool is there and works), benchmark. Usage: scripts/gpu_check.sh OUTDIR
#
# Every stage runs under a time limit (8 minutes in all at most); its exit status and
# duration go to OUTDIR/summary.txt and a failing stage does not stop the later ones.
# OUTDIR receives at most 7 files: summary.txt, build.log, tests.log, sanitizer.log,
# bench.log, bench.json, bench_table.md.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MILORA_CUDA=1 MILORA_CUDA_ARCH_LIST=${MILORA_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
T0=$(date +%s)

# stage NAME LIMIT_S CMD...: runs CMD, tees its output to OUT/NAME.log, records its status
stage() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - start ))s$([ $rc = 124 ] && echo ' (TIMED OUT)')" | tee -a "$SUMMARY"
  return $rc
}

{
  echo "gpu_check $(date -Is) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())' 2>&1
  "$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -1
} | tee -a "$SUMMARY"

stage build 170 "$PY" setup.py build_ext --inplace
BUILD_RC=$?

if [ $BUILD_RC -eq 0 ]; then
  XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 4")
  stage tests 105 "$PY" -m pytest tests/test_cuda_gated_lora_linear.py -q -ra -p no:cacheprovider $XDIST

  CS=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  if [ -x "$CS" ]; then
    FILTER=()
    "$CS" --help 2>/dev/null | grep -q -- "--kernel-name" && FILTER=(--kernel-name kns=milora)
    stage sanitizer 65 "$CS" --tool memcheck --error-exitcode 3 --print-limit 20 ${FILTER[@]+"${FILTER[@]}"} \
      "$PY" benchmarks/sanitizer_case.py
  else
    echo "sanitizer: skipped (compute-sanitizer not found)" | tee -a "$SUMMARY"
  fi

  stage bench 100 "$PY" benchmarks/gpu_check.py --out "$OUT"
else
  echo "tests, sanitizer, bench: skipped (build failed)" | tee -a "$SUMMARY"
fi
echo "total: $(( $(date +%s) - T0 ))s" | tee -a "$SUMMARY"
