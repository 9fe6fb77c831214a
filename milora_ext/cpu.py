"""The instruction-set level of the CPU LoRA kernels (runtime dispatch, see csrc/cpu/isa.h).

The kernels are compiled once per level (default, avx2, avx512, avx512_bf16, amx) and the highest
level the machine runs is chosen when the library loads. The environment variable
MILORA_CPU_CAPABILITY (read once, at the first CPU call) forces a lower level;
`set_cpu_capability` switches it in-process (tests use it to run every level).
"""
from __future__ import annotations

from typing import List

import torch

_OPS = torch.ops.milora_ext

# Every level, lowest first.
LEVELS = ("default", "avx2", "avx512", "avx512_bf16", "amx")


def cpu_capability() -> str:
    """The level the CPU kernels use now."""
    return _OPS.cpu_capability()


def max_cpu_capability() -> str:
    """The highest level this machine (and this build) runs."""
    return _OPS.max_cpu_capability()


def supported_cpu_capabilities() -> List[str]:
    """Every level this machine runs, lowest first."""
    return list(LEVELS[: LEVELS.index(max_cpu_capability()) + 1])


def set_cpu_capability(level: str) -> str:
    """Use `level` for the CPU kernels from now on; returns the previous level. Raises a
    ValueError for an unknown level or one above `max_cpu_capability()`."""
    return _OPS.set_cpu_capability(level)
