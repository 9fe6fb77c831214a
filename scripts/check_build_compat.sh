#!/usr/bin/env bash
# Builds milora with an old toolchain, as on the GPU image: a fresh venv (python3 -m venv),
# torch, setuptools 65.5, no ninja (torch's BuildExtension then compiles serially), CPU
# kernels only (MILORA_CUDA=0), in a throwaway copy of the tree; then imports it and runs
# the op once. Usage:
#   scripts/check_build_compat.sh [WORKDIR]
# Environment: TORCH_SPEC (default torch==2.13.0), WHEEL_DIR (a directory of local wheels
# searched first, default /opt/wheels), SETUPTOOLS_SPEC (default setuptools==65.5.0).
# About 5 minutes on 2 cores (mostly the serial compile). Exit status 0 = it works.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
SETUPTOOLS_SPEC=${SETUPTOOLS_SPEC:-setuptools==65.5.0}
WHEEL_DIR=${WHEEL_DIR:-/opt/wheels}
FIND=()
[ -d "$WHEEL_DIR" ] && FIND=(--find-links "$WHEEL_DIR")

python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
pip install -q ${FIND[@]+"${FIND[@]}"} "$TORCH_SPEC" wheel numpy
# Recent torch wheels require setuptools >= 77; the GPU image's venv keeps the 65.5 that
# python3.11's venv bundles. Force it back, as there.
pip install -q --no-deps --force-reinstall "$SETUPTOOLS_SPEC" 2>&1 | grep -v "dependency conflicts\|requires setuptools" || true
pip uninstall -q -y ninja 2>/dev/null || true
# Hide a system ninja too: a `ninja` first on PATH that fails makes torch fall back to its
# serial (setuptools) compile, as on a machine without ninja.
mkdir -p "$WORK/no-ninja"
printf '#!/bin/sh\nexit 127\n' > "$WORK/no-ninja/ninja"
chmod +x "$WORK/no-ninja/ninja"
export PATH="$WORK/no-ninja:$PATH"
python - <<'PY'
import importlib.util, setuptools, torch
from torch.utils.cpp_extension import is_ninja_available
print("setuptools", setuptools.__version__, "torch", torch.__version__, "ninja", is_ninja_available())
assert not is_ninja_available(), "ninja must be absent for this check"
PY

# A copy of the sources only (no build outputs, no venvs).
mkdir -p "$WORK/tree"
(cd "$SRC" && tar --exclude=./build --exclude='./.venv*' --exclude='*.so' --exclude=.git -cf - .) | (cd "$WORK/tree" && tar xf -)
cd "$WORK/tree"
start=$(date +%s)
MILORA_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} python setup.py build_ext --inplace > "$WORK/build.log" 2>&1 || {
  tail -40 "$WORK/build.log"; echo "check_build_compat: BUILD FAILED (log: $WORK/build.log)"; exit 1; }
echo "check_build_compat: build took $(( $(date +%s) - start ))s"
(cd / && PYTHONPATH="$WORK/tree" python - <<'PY'
import torch, milora_ext
from milora_ext.workloads import make_problem
p = make_problem([2, 3], [0, -1], K=16, N=8, P=1, E=2, R=4)
y = milora_ext.gated_lora_linear(*p.args())
torch.testing.assert_close(y, milora_ext.gated_lora_linear_ref(*p.args()), rtol=1e-5, atol=1e-5)
print("check_build_compat: OK (setuptools 65.5, no ninja)")
PY
)
