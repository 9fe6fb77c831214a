#!/usr/bin/env bash
# Device check of the CUDA kernels, for a GPU machine with no network (16 cores, nvcc, a
# python3 with torch): prerequisites, build in place, CUDA tests, compute-sanitizer
# (memcheck, racecheck, synccheck) on small calls, benchmark. Usage:
#   scripts/gpu_check.sh OUTDIR [--dry-run]
#
# Without a GPU (or with --dry-run) it checks the prerequisites only, says "no GPU" and exits
# 0, so the script itself can be tested anywhere (tests/test_gpu_check_script.py).
# Every stage runs under a time limit, capped by what is left of TOTAL_LIMIT_S (default 600 s);
# its exit status and duration go to OUTDIR/summary.txt and a failing stage does not stop the
# later ones. OUTDIR receives: summary.txt, prereq.log, build.log, tests.log, memcheck.log,
# racecheck.log, synccheck.log, bench.log, bench.json, bench_table.md (bench.json is rewritten
# after every benchmark case, so a timeout keeps what was measured).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [--dry-run]}
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
# CUDA_HOME is not forced: setup.py finds the toolkit itself (its own discovery, reported below).
export MILORA_CUDA=1 MILORA_CUDA_ARCH_LIST=${MILORA_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
T0=$(date +%s)
TOTAL=${TOTAL_LIMIT_S:-600}

note() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME LIMIT_S CMD...: runs CMD (limit capped by the time left), tees its output to
# OUT/NAME.log, records its status
stage() {
  local name=$1 limit=$2 start rc left
  shift 2
  left=$(( TOTAL - ($(date +%s) - T0) ))
  if [ "$left" -lt 15 ]; then note "$name: skipped (total time limit ${TOTAL}s reached)"; return 124; fi
  [ "$limit" -gt "$left" ] && limit=$left
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  note "$name: rc=$rc in $(( $(date +%s) - start ))s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
  return "$rc"
}

# ---- prerequisites (also the whole dry run) -----------------------------------------------
note "gpu_check $(date -Is) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
PREREQ_OK=1
if ! "$PY" - > "$OUT/prereq.log" 2>&1 <<'PY'
import importlib.util, shutil, sys
import torch
from torch.utils.cpp_extension import is_ninja_available
import setuptools
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.is_available(), "setuptools", setuptools.__version__)
print("ninja:", "yes" if is_ninja_available() else "no (torch compiles the sources serially)")
print("pytest:", "yes" if importlib.util.find_spec("pytest") else "no (the tests stage will be skipped)")
print("pytest-xdist:", "yes" if importlib.util.find_spec("xdist") else "no")
print("compute-sanitizer on PATH:", shutil.which("compute-sanitizer") or "no")
if torch.version.cuda is None:
    sys.exit("prerequisite missing: this torch has no CUDA support")
PY
then PREREQ_OK=0; fi
tee -a "$SUMMARY" < "$OUT/prereq.log"
# The CUDA toolkit as setup.py discovers it (evaluating setup.py builds nothing for --name).
CUDA_HOME_FOUND=$(MILORA_CUDA=auto "$PY" setup.py --name 2>&1 |
  sed -n 's/^milora: building the CUDA kernels for .* with \(.*\): .*$/\1/p' | tail -1)
if [ -n "$CUDA_HOME_FOUND" ]; then
  note "CUDA toolkit (setup.py's discovery): $CUDA_HOME_FOUND; $("$CUDA_HOME_FOUND/bin/nvcc" --version 2>&1 | tail -1)"
else
  note "CUDA toolkit: not found by setup.py (set CUDA_HOME, or put nvcc on PATH)"; PREREQ_OK=0
fi
"$PY" -m py_compile benchmarks/gpu_check.py benchmarks/sanitizer_case.py || PREREQ_OK=0
note "prerequisites: $([ $PREREQ_OK = 1 ] && echo ok || echo MISSING)"

HAVE_GPU=0
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && HAVE_GPU=1
if [ $HAVE_GPU = 0 ] || [ $DRY = 1 ]; then
  note "$([ $HAVE_GPU = 0 ] && echo 'no GPU' || echo 'dry run'): prerequisites checked, nothing built or run"
  [ $DRY = 1 ] && [ $PREREQ_OK = 0 ] && exit 1
  exit 0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2 | tee -a "$SUMMARY"

# ---- build: without ninja torch compiles serially, so it gets longer ----------------------
BUILD_LIMIT=200
"$PY" -c 'from torch.utils.cpp_extension import is_ninja_available as n; import sys; sys.exit(0 if n() else 1)' ||
  BUILD_LIMIT=420
stage build $BUILD_LIMIT "$PY" setup.py build_ext --inplace
BUILD_RC=$?

if [ $BUILD_RC -eq 0 ]; then
  if "$PY" -c 'import pytest' 2>/dev/null; then
    XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 4")
    stage tests 105 "$PY" -m pytest tests/test_cuda_gated_lora_linear.py tests/test_training_autocast.py -q -ra -p no:cacheprovider $XDIST
  else
    note "tests: skipped (pytest is not installed here); the benchmark's own correctness checks still run"
  fi

  CS=$(command -v compute-sanitizer || echo "${CUDA_HOME_FOUND:-/usr/local/cuda}/bin/compute-sanitizer")
  if [ -x "$CS" ]; then
    FILTER=()
    "$CS" --help 2>/dev/null | grep -q -- "--kernel-name" && FILTER=(--kernel-name kns=milora)
    # The caching allocator hides out-of-bounds accesses inside its pooled blocks: off here.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage memcheck 70 "$CS" --tool memcheck --error-exitcode 3 --print-limit 20 \
      ${FILTER[@]+"${FILTER[@]}"} "$PY" benchmarks/sanitizer_case.py
    # Shared-memory races (the CTA reductions, the routes tables) and barrier misuse: one
    # small call per path (these tools are slow).
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage racecheck 60 "$CS" --tool racecheck --error-exitcode 3 --print-limit 20 \
      ${FILTER[@]+"${FILTER[@]}"} "$PY" benchmarks/sanitizer_case.py --quick
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage synccheck 45 "$CS" --tool synccheck --error-exitcode 3 --print-limit 20 \
      ${FILTER[@]+"${FILTER[@]}"} "$PY" benchmarks/sanitizer_case.py --quick
  else
    note "sanitizer: skipped (compute-sanitizer not found)"
  fi

  stage bench 120 "$PY" benchmarks/gpu_check.py --out "$OUT"
else
  note "tests, sanitizer, bench: skipped (build failed)"
fi
note "total: $(( $(date +%s) - T0 ))s"
