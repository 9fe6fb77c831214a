"""Peak memory of one call, measured the same way for every method of a bench.

CUDA: torch.cuda.max_memory_allocated() during the call minus memory_allocated() before it
(tensors the call allocates: activations, KV cache, temporaries; exact).
CPU: PyTorch keeps no allocator statistics on the CPU, so this samples the process's resident
set size (/proc/self/statm) every ~1 ms from a thread during the call and reports the peak
minus the RSS before it, after returning freed heap memory to the OS (malloc_trim) so that
every method starts from a trimmed heap. Approximate (sampling, allocator caching), but the
same instrument for every method. Where /proc is missing, ru_maxrss growth (a lower bound).
"""
from __future__ import annotations

import ctypes
import os
import resource
import threading
import time
from typing import Callable, Tuple

import torch

CPU_METHOD = "rss_sampled"
CUDA_METHOD = "cuda_max_memory_allocated"

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def method_name(device) -> str:
    return CUDA_METHOD if torch.device(device).type == "cuda" else CPU_METHOD


def peak_during(fn: Callable[[], object], device, interval_s: float = 0.001) -> Tuple[int, object]:
    """(peak bytes above the level before the call, fn's result)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - before, 0), out
    _trim()
    if not os.path.exists("/proc/self/statm"):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = fn()
        return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, 0), out
    before = _rss()
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(interval_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    peak[0] = max(peak[0], _rss())
    return max(peak[0] - before, 0), out


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameter and buffer storages of a module (shared ones once)."""
    seen = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total
