"""Every ISA level of the CPU LoRA kernels this machine runs (runtime dispatch, csrc/cpu/isa.h)
against the plain PyTorch reference, on fresh random inputs; and the level switches."""
import math
import subprocess
import sys

import pytest
import torch

import milora_ext
from milora_ext import gated_lora_linear_ref
from milora_ext.cpu import LEVELS
from milora_ext.workloads import MIXES, adapter_mix, make_problem

from milora_ext.accuracy import check_against_reference
from _subprocess_env import child_env

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SUPPORTED = milora_ext.supported_cpu_capabilities()


@pytest.fixture(params=LEVELS)
def level(request):
    if request.param not in SUPPORTED:
        pytest.skip(f"this CPU runs up to {milora_ext.max_cpu_capability()}, not {request.param}")
    previous = milora_ext.set_cpu_capability(request.param)
    threads = torch.get_num_threads()
    # 4 threads even on a 2-core machine: a one-adapter batch has fewer work items than that,
    # so the shrink's split over K and the expand's narrow column chunks run.
    torch.set_num_threads(4)
    try:
        yield request.param
    finally:
        torch.set_num_threads(threads)
        milora_ext.set_cpu_capability(previous)


def run(problem, level):
    y = milora_ext.gated_lora_linear(*problem.args())
    assert milora_ext.cpu_capability() == level
    if y.dtype != torch.float64:
        check_against_reference(y, problem.args())
        return
    # float64: PyTorch's own float64 result is the truth itself (its error is 0), so op_checks'
    # bound is a fixed 4 ulp of max|y|; a different summation order of the K-long base product and
    # the E*R-long LoRA sum differs by ~sqrt(length) ulp, on every level alike (the ATen GEMM too).
    truth = gated_lora_linear_ref(*problem.args(), compute_dtype=torch.float64)
    K = problem.x.shape[-1]
    E, R = problem.lora_a.shape[1], problem.lora_a.shape[2]
    scale = max(truth.abs().max().item(), 1.0) if truth.numel() else 1.0
    bound = 4 * torch.finfo(torch.float64).eps * math.sqrt(K + E * R) * scale
    assert (y - truth).abs().max().item() <= bound if y.numel() else True


@pytest.mark.parametrize("dtype", DTYPES)
def test_batches(level, dtype):
    cases = [
        ([3, 0, 5, 0, 2], [1, 0, 2, 1, -1], 3),      # empty sequences, adapter -1
        ([1] * 16, list(range(16)), 16),              # decode, distinct adapters
        ([1] * 16, [0] * 16, 1),                      # decode, 16 sequences sharing one adapter (K split, packed)
        ([1], [0], 1),                                # one token, one adapter (K split, dot tiles)
        ([100, 37, 64], [2, 0, 1], 3),                # prefill below the GEMM route (tiles)
        ([200, 1, 1, 1, 1, 3], [0, 1, 2, 3, 0, -1], 4),  # skewed lengths
    ]
    for i, (lens, ids, P) in enumerate(cases):
        run(make_problem(lens, ids, K=1100, N=83, P=P, E=2, R=8, active_experts=1 + i % 2, dtype=dtype, seed=i), level)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lists_at_the_tile_thresholds(level, dtype):
    # bfloat16 on amx: the expand takes tiles from 16 tokens, the shrink from 32. Lists on both
    # sides of each, as one sequence (consecutive rows) and as every other decode sequence (rows
    # gathered), the last 16-token block partial where the length allows. Every expert is active,
    # so each adapter's tokens form one list (a list is one adapter and one set of active experts).
    for n in (15, 16, 17, 31, 32, 33):
        run(make_problem([n, 2], [0, 1], K=300, N=200, P=2, E=2, R=16, active_experts=2, dtype=dtype,
                         seed=n), level)
        run(make_problem([1] * (2 * n), [i % 2 for i in range(2 * n)], K=300, N=200, P=2, E=2, R=16,
                         active_experts=2, dtype=dtype, seed=100 + n), level)


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_sizes_ranks_experts(level, dtype):
    # K, N and R off every vector width (and K below / above the 32-element bf16 dot step)
    for K, N, R, E in [(257, 129, 5, 3), (31, 17, 33, 2), (70, 40, 3, 70), (1029, 45, 16, 1)]:
        run(make_problem([3, 1, 19, 1, 23], [0, 1, 0, 2, -1], K=K, N=N, P=3, E=E, R=R,
                         active_experts=max(1, E // 2), dtype=dtype, seed=K + R), level)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_lists_in_wide_column_chunks(level, dtype):
    # Lists on the AMX expand take their expand in chunks of N / threads on levels that ask for it
    # (amx, bfloat16): with 4 threads and N = 1100, four chunks of 288 columns, the last one 236
    # wide (a partial 16-column tile), beside a short list on the usual chunks. The AMX expand
    # steps 64 columns at a time, so the chunks' last steps hold 2 (288), 3 (236 of N = 1100;
    # 165 of 1029), 1 (196 of 1060) and 4 (183 of 1047) 16-column blocks, the last one partial.
    run(make_problem([70, 3, 65], [0, 1, 0], K=300, N=1100, P=2, E=2, R=16, active_experts=2,
                     dtype=dtype, seed=5), level)
    for N in (1029, 1060, 1047):
        run(make_problem([130], [0], K=96, N=N, P=1, E=1, R=7, dtype=dtype, seed=N), level)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_tiles_and_panel_packing(level, dtype):
    # Two adapters interleaved over 140 decode sequences: each adapter's token list is 70 long
    # but no run of batch-adjacent sequences is, so the LoRA term stays on the hand-written
    # tiles (packed shrink and expand) rather than the ATen GEMM route. The ranks put the panel
    # packing's 8 x 8 register blocks (R = 16, 32) next to the element-wise rest (R = 24's
    # last 8 rows with bfloat16 pairs, R = 7 below one block); K and N are off every width.
    ids = [0, 1] * 70
    for K, N, R in [(1029, 83, 16), (515, 200, 24), (257, 61, 7), (96, 40, 32)]:
        run(make_problem([1] * 140, ids, K=K, N=N, P=2, E=2, R=R, active_experts=1 + R % 2, dtype=dtype,
                         seed=K + R), level)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mix", MIXES)
def test_popularity_mixes(level, dtype, mix):
    g = torch.Generator().manual_seed(3)
    ids = adapter_mix(24, 8, mix, g)
    for tokens_per_seq in (1, 9):
        run(make_problem([tokens_per_seq] * 24, ids, K=600, N=97, P=8, E=4, R=16, active_experts=2,
                         dtype=dtype, seed=11 + tokens_per_seq), level)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gates_and_base_rows_are_exactly_base(level, dtype):
    p = make_problem([4, 2, 7, 3], [0, 1, 0, -1], K=640, N=48, P=2, E=3, R=8, active_experts=2, dtype=dtype)
    p.gates[1] = 0  # sequence 1: all gates zero
    y = milora_ext.gated_lora_linear(*p.args())
    # The base product is the op's own with no adapter (ATen's, or bfloat16 on amx the tiles of
    # csrc/cpu/base_amx.h), itself judged against the reference.
    no_adapter = p.args_without_adapters()
    base = milora_ext.gated_lora_linear(*no_adapter)
    check_against_reference(base, no_adapter)
    torch.testing.assert_close(y[4:6], base[4:6], rtol=0, atol=0)
    torch.testing.assert_close(y[13:], base[13:], rtol=0, atol=0)
    check_against_reference(y, p.args())


def test_levels_agree_on_one_adapter_decode():
    # float32, one shared adapter: every level within float32 rounding of the others
    p = make_problem([1] * 16, [0] * 16, K=4096, N=256, P=1, E=1, R=16, dtype=torch.float32, seed=5)
    previous = milora_ext.cpu_capability()
    try:
        ys = {}
        for lv in SUPPORTED:
            milora_ext.set_cpu_capability(lv)
            ys[lv] = milora_ext.gated_lora_linear(*p.args())
    finally:
        milora_ext.set_cpu_capability(previous)
    for lv, y in ys.items():
        torch.testing.assert_close(y, ys["default"], rtol=1e-5, atol=1e-4, msg=lambda m: f"level {lv}: {m}")


def test_set_cpu_capability_rejects_unknown_levels():
    with pytest.raises(ValueError, match="not one of"):
        milora_ext.set_cpu_capability("avx9000")
    above = LEVELS[len(SUPPORTED):]
    for lv in above:
        with pytest.raises(ValueError, match="above what this CPU"):
            milora_ext.set_cpu_capability(lv)


def test_environment_variable_forces_a_lower_level(tmp_path):
    code = "import milora_ext; print(milora_ext.cpu_capability(), milora_ext.max_cpu_capability())"
    env = child_env(MILORA_CPU_CAPABILITY="default")
    run = dict(env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    out = subprocess.run([sys.executable, "-c", code], **run)
    assert out.stdout.split() == ["default", milora_ext.max_cpu_capability()]
    env["MILORA_CPU_CAPABILITY"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], **run)
    assert out.stdout.split() == [milora_ext.max_cpu_capability()] * 2
    assert "MILORA_CPU_CAPABILITY=bogus" in out.stderr
