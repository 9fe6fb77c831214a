"""Builds the CUDA kernel sources as C++ for the CPU emulator (csrc/cuda/emulation.h).

`load()` compiles them once (torch.utils.cpp_extension, cached under build/cuda_emulation)
and returns a module whose `run(x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids,
gates, path)` computes gated_lora_linear on CPU tensors through the real kernels, path one
of "auto", "fp32", "decode", "decode_rt1", "preinit", "rmw"; `load_stats()` then gives, per
operand ("weight", "lora_a", "lora_b", "x": the buffers the kernels read), the bytes its
vector / __ldg loads read by access width ({16: ..., 8: ..., 4: ..., 2: ..., 1: ...}; plain
dereferences are not counted).

Out-of-bounds accesses of the kernels: MILORA_EMULATION_SANITIZE=address builds the
emulator with AddressSanitizer (build/cuda_emulation_asan); run python with
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0
e.g. to run tests/test_cuda_emulated.py under it.
"""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCES = [
    "emu_ext.cpp",
    "emu_decode_kernel.cpp",
    "emu_shrink_simt.cpp",
    "emu_expand_simt.cpp",
    "emu_prefill_shrink.cpp",
    "emu_prefill_expand.cpp",
    "emu_load_stats.cpp",
]


def cuda_include_dir() -> str | None:
    """A directory holding cuda_fp16.h (the emulator needs the CUDA headers, not a GPU)."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates.append("/usr/local/cuda/include")
    for c in candidates:
        if os.path.exists(os.path.join(c, "cuda_fp16.h")):
            return c
    return None


def load(verbose: bool = False):
    from torch.utils.cpp_extension import load as _load

    inc = cuda_include_dir()
    if inc is None:
        raise FileNotFoundError("CUDA headers (cuda_fp16.h) not found: set CUDA_HOME")
    cflags, ldflags, suffix = ["-O1", "-DMILORA_CUDA_EMULATION"], [], ""
    if os.environ.get("MILORA_EMULATION_SANITIZE") == "address":
        cflags += ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
        suffix = "_asan"
    build_dir = os.path.join(ROOT, "build", "cuda_emulation" + suffix)
    os.makedirs(build_dir, exist_ok=True)
    return _load(
        name="milora_cuda_emulation" + suffix,
        sources=[os.path.join(HERE, s) for s in SOURCES] + [os.path.join(ROOT, "csrc", "checks.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc"), inc],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=build_dir,
        with_cuda=False,
        verbose=verbose,
    )
