"""Timing helpers shared by every milora benchmark.

Methods are timed interleaved (round-robin over repeats) in one process so that machine
drift hits all of them alike; each reports median, min and max over the repeats. On CUDA
the timings come from CUDA events after a synchronize. An optional cache flush (GPU L2 or
CPU L3) before each timed call makes every call start cold.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Tuple, Callable, Dict, List, Optional

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    samples: List[float]


def _cpu_last_level_cache_bytes() -> int:
    """Size of the largest CPU cache sysfs reports (the L3 on x86), 32 MiB if unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


class _CacheFlusher:
    """Touches a buffer twice the size of the last-level cache (the GPU's L2, the CPU's L3)
    before each timed call, so every call starts with cold caches, as a layer's weights do in
    a model whose other layers ran in between."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            props = torch.cuda.get_device_properties(device)
            size = max(2 * getattr(props, "L2_cache_size", 64 << 20), 64 << 20)
        else:
            size = 2 * _cpu_last_level_cache_bytes()
        self.buf = torch.zeros(size // 4, dtype=torch.float32, device=device)

    def __call__(self):
        if self.cuda:
            self.buf.zero_()
        else:
            # Read, not write: dirty lines would be written back during the timed call.
            self.buf.sum()


def _timed_call(fn: Callable[[], object], device: torch.device, flush: Optional[_CacheFlusher]) -> float:
    if flush is not None:
        flush()
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(
    methods: Dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 10,
    l2_flush: bool = False,
    on_step: Optional[Callable[[], None]] = None,
    rotate: bool = True,
) -> Dict[str, Timing]:
    """Time each method `repeats` times, cycling through the methods on every round.

    rotate: round r starts with method r mod n, so that no method always runs right after the
    same neighbour (warm caches, allocator state). on_step is called after each timed call
    (a progress bar hook)."""
    device = torch.device(device)
    flush = _CacheFlusher(device) if l2_flush else None
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples: Dict[str, List[float]] = {name: [] for name in methods}
    order = list(methods.items())
    for r in range(repeats):
        shift = r % len(order) if (rotate and order) else 0
        for name, fn in order[shift:] + order[:shift]:
            samples[name].append(_timed_call(fn, device, flush))
            if on_step is not None:
                on_step()
    return {
        name: Timing(statistics.median(s), min(s), max(s), s) for name, s in samples.items()
    }


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a's time / b's time in the same round.

    Both were timed in the same rounds of time_interleaved, so each round's ratio compares
    calls made moments apart; its median shrugs off drift between rounds (other tenants of
    the machine, clock changes) that the ratio of the two medians would absorb."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples))


def paired_ratio_spread(a: Timing, b: Timing) -> Tuple[float, float]:
    """Lower and upper quartiles of the per-round ratios of paired_ratio: how much the rounds
    disagree (wide on a busy machine)."""
    r = sorted(x / y for x, y in zip(a.samples, b.samples))
    if len(r) < 2:
        return (r[0], r[0]) if r else (float("nan"), float("nan"))
    q = statistics.quantiles(r, n=4, method="inclusive")
    return q[0], q[2]


def against(value: float, goal: float) -> str:
    """value as a target line prints it beside goal: two decimals, or three where two would read
    the same as the goal (a "1.05x ... goal <= 1.05: MISSED" line that says 1.052)."""
    text = f"{value:.2f}"
    return f"{value:.3f}" if text == f"{goal:.2f}" else text


# Quartile spread of paired ratios above which a missed target's verdict is called uncertain.
NOISY_SPREAD = 0.10


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): with the rounds' spread, what
    tells a busy machine from an op whose time varies on its own."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def noise_note(rec: Dict, speed: bool = False) -> str:
    """'' or one line saying the rounds disagreed too much for the verdict to be trusted, and
    whether the machine was busy (1-minute load average above its core count + 0.5: the bench
    itself keeps up to one thread per core running) or not.

    The record's quartiles are of time ratios (method / base). speed=True states them as the
    target line does for generate, as speed ratios (x base tokens/s: base / method), so the
    spread reads in the units of the number it qualifies."""
    lo, hi = rec.get("ratio_q1"), rec.get("ratio_q3")
    if lo is None or hi is None or not hi - lo > NOISY_SPREAD:
        return ""
    what = "x base tokens/s" if speed else "paired ratios"
    if speed:
        lo, hi = 1 / hi, 1 / lo
    spread = f"per-round {what} spread {lo:.2f}-{hi:.2f} (quartiles) over {rec.get('repeats')} rounds"
    load, cores = rec.get("load_avg"), os.cpu_count() or 1
    if load is not None and load <= cores + 0.5:  # the bench's own threads count too
        return (f"  why: uncertain: {spread} on an idle machine (load average {load:.1f} on {cores} cores); "
                f"rerun with more --repeats")
    busy = f"load average {load:.1f} on {cores} cores, " if load is not None else ""
    return f"  why: the machine was busy ({busy}{spread}); rerun on an idle machine (more --repeats)"


# A LoRA kernel level -> the caps that make the base product run as on a CPU whose best level it is:
# oneDNN's ISA (ONEDNN_MAX_CPU_ISA; below AVX512_CORE oneDNN reports no bfloat16 support and torch's
# bfloat16 linear takes ATen's own GEMM, as on such a CPU), ATen's vector level
# (ATEN_CPU_CAPABILITY) and MKL's (MKL_ENABLE_INSTRUCTIONS: the float32 GEMM).
BASE_CAPS = {
    "default": ("SSE41", "default", "SSE4_2"),
    "avx2": ("AVX2", "avx2", "AVX2"),
    "avx512": ("AVX512_CORE", "avx512", "AVX512"),
    "avx512_bf16": ("AVX512_CORE_BF16", "avx512", "AVX512"),
    "amx": ("AVX512_CORE_AMX", "avx512", "AVX512"),
}


def forced_level_note(rec: Dict, level: Optional[str] = None, best: Optional[str] = None,
                      env: Optional[Dict[str, str]] = None) -> str:
    """'' or one line: on a CPU, the LoRA kernels were forced (MILORA_CPU_CAPABILITY) below the
    machine's best level while the base product was not capped, so the LoRA share of the time is
    larger than on a CPU whose best level that is. level / best / env default to this process's."""
    if not str(rec.get("device", "cpu")).startswith("cpu"):
        return ""
    env = os.environ if env is None else env
    if env.get("ONEDNN_MAX_CPU_ISA"):
        return ""  # the base is capped too: an emulated machine, judged as it is
    if level is None or best is None:
        try:
            import milora_ext

            level, best = milora_ext.cpu_capability(), milora_ext.max_cpu_capability()
        except Exception:  # an old build without the query
            return ""
    if level == best or level not in BASE_CAPS:
        return ""
    onednn, aten, mkl = BASE_CAPS[level]
    return (f"  why: the LoRA kernels were forced to {level} on a CPU whose best level is {best}, but the base "
            f"product was not (oneDNN / MKL still run {best}), so the LoRA share is larger here than on a CPU whose "
            f"best is {level}; emulate one with ONEDNN_MAX_CPU_ISA={onednn} ATEN_CPU_CAPABILITY={aten} "
            f"MKL_ENABLE_INSTRUCTIONS={mkl} MILORA_CPU_CAPABILITY={level}")


def own_base_product_note(device, dtype: Optional[torch.dtype], level: Optional[str] = None) -> str:
    """'' or one line: where milora's CPU kernels run at amx, the op computes a bfloat16 call's base
    product (up to 128 tokens) on its own AMX tiles (csrc/cpu/base_amx.h) rather than through
    F.linear, so a method built on the op gains that product's speed over one built on F.linear
    (the base model itself). level defaults to this process's."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return ""
    if level is None:
        level = _milora_cpu_level()
    if level != "amx":
        return ""
    return ("note: the fused op computes its bfloat16 base product on milora's own AMX tiles (csrc/cpu/base_amx.h, "
            "calls of up to 128 tokens), not through F.linear as the base model and the F.linear-based methods do; "
            "part of the fused op's speed is that product's (the layer bench's 'fused op, no adapters' row shows it alone)")


def measurement_note(rec: Dict, speed: bool = False) -> str:
    """'' or the one line that puts a missed target down to how it was measured rather than to the
    kernel: a forced kernel level beside an uncapped base (forced_level_note), else rounds that
    disagreed (noise_note; speed as there)."""
    return forced_level_note(rec) or noise_note(rec, speed=speed)


def environment(device: torch.device, dtype: Optional[torch.dtype] = None) -> Dict[str, object]:
    """What the numbers were measured on: printed as a header and stored with results."""
    device = torch.device(device)
    env: Dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = _cpu_name()
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # ATen's level (base GEMM side)
        env["milora_cpu_kernels"] = _milora_cpu_level()                  # our LoRA kernels' level
        for cap in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"):  # base caps, if any
            if os.environ.get(cap):
                env[cap] = os.environ[cap]
        env["cpu_flags"] = _cpu_flags()
    if dtype is not None:
        env["dtype"] = str(dtype).replace("torch.", "")
    return env


def _milora_cpu_level() -> str:
    try:
        import milora_ext

        return milora_ext.cpu_capability()
    except Exception as e:  # an old build without the query
        return f"unknown ({type(e).__name__})"


def _cpu_flags() -> str:
    """The SIMD flags that decide which kernels run (from /proc/cpuinfo; '' elsewhere)."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_tile", "amx_bf16")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(w for w in wanted if w in have)
    except OSError:
        pass
    return ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def format_env(env: Dict[str, object]) -> str:
    return " | ".join(f"{k}: {v}" for k, v in env.items())
