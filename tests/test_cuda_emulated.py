"""The CUDA kernel sources, run on the CPU through the emulator (csrc/cuda/emulation.h).

No GPU needed: the kernels of csrc/cuda/*.cu are compiled as C++ with
-DMILORA_CUDA_EMULATION (CTAs one after another, CUDA threads as std::threads, warp
collectives and mma.sync emulated per the PTX fragment layouts) and driven along the same
paths as the CUDA dispatcher. This checks the kernels' indexing, fragment layouts, routing,
tails and masking on every machine; speed, and what only hardware shows (memory model,
PDL, cuBLAS), are left to tests/test_cuda_gated_lora_linear.py on a GPU.

Skipped, with the reason, when the CUDA headers (cuda_fp16.h) are not installed.
"""
from __future__ import annotations

import pytest
import torch

import _cuda_cases as cc
from milora_ext.workloads import tenant_isolation_problem

try:
    import cuda_emulation

    _INC = cuda_emulation.cuda_include_dir()
except ImportError:  # pragma: no cover
    cuda_emulation, _INC = None, None

pytestmark = pytest.mark.skipif(_INC is None, reason="CUDA headers (cuda_fp16.h) not found; set CUDA_HOME")


@pytest.fixture(scope="module")
def emu():
    return cuda_emulation.load()


def _paths(dtype, T):
    if dtype == torch.float32:
        return ["fp32"]
    paths = ["preinit", "rmw"]
    if 1 <= T <= 64:
        paths.insert(0, "decode")
    return paths


_PARAMS = []
for _name, _kw in cc.EDGE_CASES:
    _T = sum(_kw["seq_lens"])
    for _dt in (torch.bfloat16, torch.float16, torch.float32):
        for _path in _paths(_dt, _T):
            _PARAMS.append(pytest.param(_name, _dt, _path, id=f"{_name}-{str(_dt)[6:]}-{_path}"))


@pytest.mark.parametrize("name,dtype,path", _PARAMS)
def test_emulated_kernels_match_reference(emu, name, dtype, path):
    kw = dict(cc.EDGE_CASES)[name]
    case = cc.make_case(dtype=dtype, **kw)
    y = emu.run(*cc.args(case), path)
    cc.check_close(y, case, f"{name} {dtype} {path}")


@pytest.mark.parametrize("path", ["decode", "decode_rt1"])
@pytest.mark.parametrize("T", [1, 7, 8, 9, 16, 17, 32, 33, 63, 64])
def test_emulated_decode_token_tiles(emu, T, path):
    """Every token-tile width of the fused decode kernel (8, 16, 32, 64 tokens) at its edges,
    with 32 (default) and 16 (decode_rt1) output rows per CTA."""
    case = cc.make_case(K=40, N=36, E=2, R=8, seq_lens=[1] * T, P=max(T // 2, 1), dtype=torch.bfloat16)
    cc.check_close(emu.run(*cc.args(case), path), case, f"{path} T={T}")


@pytest.mark.parametrize("T", [63, 64, 65])
def test_emulated_auto_switch(emu, T):
    """Around the decode / prefill switch (64 tokens) the automatic path agrees with the reference."""
    case = cc.make_case(K=48, N=40, E=2, R=16, seq_lens=cc.skewed_lens(T, 5, seed=T), dtype=torch.float16)
    cc.check_close(emu.run(*cc.args(case), "auto"), case, f"auto T={T}")


def test_emulated_leading_dims(emu):
    case = cc.make_case(K=32, N=24, E=2, R=8, seq_lens=[2, 4], dtype=torch.bfloat16)
    case["x"] = case["x"].reshape(2, 3, 32)
    y = emu.run(*cc.args(case), "auto")
    assert y.shape == (2, 3, 24)
    cc.check_close(y, case, "leading dims")


@pytest.mark.parametrize("path", ["decode", "preinit", "fp32"])
def test_emulated_garbage_indices_stay_in_bounds(emu, path):
    """Garbage offsets / adapter ids (what checks=False lets through) are sanitised on the
    device: the kernels run and rows whose routing is valid are unaffected by the garbage."""
    dtype = torch.float32 if path == "fp32" else torch.bfloat16
    case = cc.make_case(K=48, N=40, E=2, R=8, seq_lens=[3, 4, 5], P=2, dtype=dtype)
    case["seq_offsets"] = torch.tensor([-7, 3, 1_000_000, 2], dtype=torch.int64)
    case["adapter_ids"] = torch.tensor([1, 99, -5], dtype=torch.int64)
    y = emu.run(*cc.args(case), path)
    assert y.shape == (12, 40)
    # Clamped offsets [0, 3, 12, 2]: tokens 0..2 -> sequence 0 (adapter 1); tokens 3..11 ->
    # sequence 1 (the last with start <= t), adapter 99 >= P -> no LoRA: base only.
    good = dict(case)
    good["seq_offsets"] = torch.tensor([0, 3, 12], dtype=torch.int64)
    good["adapter_ids"] = torch.tensor([1, -1], dtype=torch.int64)
    good["gates"] = case["gates"][:2]
    cc.check_close(y, good, f"garbage indices {path}")


_GARBAGE = [
    ([0, 2, 1, 10**9, -5], [7, -3, 2, 10**6]),
    ([-100, -1, 10**6, 3, 3], [0, 1, 2, 3]),
    ([10**6, 0, 3, 0, 1], [2, 2, 2, -1]),
    ([2**40, -(2**40), 3, 4, 5], [2**40, -(2**40), 0, 1]),
]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("which", range(len(_GARBAGE)))
@pytest.mark.parametrize("path,dtype,T", [("decode", torch.bfloat16, 5), ("decode", torch.float16, 64),
                                          ("preinit", torch.bfloat16, 70), ("rmw", torch.float16, 70),
                                          ("fp32", torch.float32, 9)])
def test_emulated_garbage_indices_give_finite_output(emu, path, dtype, T, which, index_dtype):
    """Whatever the indices hold, every route stays in range: no crash, and no read of an
    undefined (NaN-filled) workspace entry or unwritten output."""
    offs, ids = _GARBAGE[which]
    lim = 2**31 - 1 if index_dtype == torch.int32 else 2**62
    case = cc.make_case(K=40, N=24, E=2, R=8, seq_lens=[T], P=3, dtype=dtype)
    case["seq_offsets"] = torch.tensor([max(min(v, lim), -lim) for v in offs], dtype=index_dtype)
    case["adapter_ids"] = torch.tensor([max(min(v, lim), -lim) for v in ids], dtype=index_dtype)
    case["gates"] = torch.rand(len(ids), 2)
    y = emu.run(*cc.args(case), path)
    assert y.shape == (T, 24) and torch.isfinite(y.float()).all()


_ISO_LENS = {"decode": [1] * 10, "decode_multi": [3, 1, 9, 2, 6, 1, 12, 4, 2, 5], "prefill": [5, 7, 3, 40, 9, 2, 13, 1, 20, 30]}
_ISO_PARAMS = [
    (path, dtype, lens)
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
    for lens in _ISO_LENS
    for path in (["fp32"] if dtype == torch.float32 else
                 (["decode", "decode_rt1"] if lens.startswith("decode") else [])
                 + (["preinit", "rmw"] if lens != "decode_multi" else []))
]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("path,dtype,lens", _ISO_PARAMS, ids=[f"{p}-{str(d)[6:]}-{l}" for p, d, l in _ISO_PARAMS])
def test_emulated_tenant_isolation(emu, path, dtype, lens, poison):
    """Every CUDA path: NaN / Inf in another tenant's adapter and input rows, in an unused
    slot and in experts whose gate is 0 leave every other token's output bit-identical
    (milora_ext.workloads.tenant_isolation_problem)."""
    bad, clean, protected = tenant_isolation_problem(_ISO_LENS[lens], poison=poison, dtype=dtype, seed=7)
    y_clean = emu.run(*clean.args(), path)
    cc.check_close(y_clean, dict(zip(cc.ARG_NAMES, clean.args())), f"isolation clean {path}")
    y_bad = emu.run(*bad.args(), path)
    assert torch.equal(y_bad[protected], y_clean[protected]), f"{path}: a poisoned adapter reached another token"


def _misaligned(case, keys):
    """The tensors `keys` as views one element past an aligned start (misaligned pointers)."""
    out = dict(case)
    for key in keys:
        t = case[key]
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        out[key] = buf[1:].view(t.shape)
        out[key].copy_(t)
    return out


@pytest.mark.parametrize("keys", [("x",), ("weight",), ("x", "weight", "lora_a", "lora_b")], ids=["x", "w", "all"])
@pytest.mark.parametrize("K", [64, 60])
@pytest.mark.parametrize("path,T", [("decode", 5), ("preinit", 70), ("rmw", 70), ("fp32", 5)])
def test_emulated_misaligned_views(emu, path, T, K, keys):
    """Operands at odd offsets (and K % 8 != 0): the packing copies a misaligned x into an
    aligned buffer, every other operand falls back to narrower loads on its own; the
    emulator aborts on any misaligned vector access."""
    dtype = torch.float32 if path == "fp32" else torch.bfloat16
    case = _misaligned(cc.make_case(K=K, N=40, E=2, R=16, seq_lens=[T // 2, T - T // 2], dtype=dtype), keys)
    cc.check_close(emu.run(*cc.args(case), path), case, f"misaligned {keys} {path} K={K}")


# ---- K % 8 != 0 and misaligned views: the weight and lora_a streams keep 16-byte loads ----

_ODD_K = [4095, 4097, 4100, 4102, 4104, 129, 7, 1]
_VIEWS = {"aligned": (), "x": ("x",), "w": ("weight",), "all": ("x", "weight", "lora_a", "lora_b")}


def _decode_case(K, dtype, view, N=37, seed=0):
    """Five one-token sequences (adapters 0, -1, 1, 0, 2; half the gates zero) with the
    operands `_VIEWS[view]` as views one element past an aligned start."""
    case = cc.make_case(K=K, N=N, E=2, R=16, seq_lens=[1] * 5, P=3, adapter_ids=[0, -1, 1, 0, 2],
                        zero_gate_frac=0.5, dtype=dtype, seed=seed)
    return _misaligned(case, _VIEWS[view])


@pytest.mark.parametrize("view", list(_VIEWS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("K", _ODD_K)
def test_emulated_unaligned_K_matches_reference(emu, K, dtype, view):
    """Every K % 8 (and K < 8), odd N, adapters -1 and zero gates, aligned and misaligned
    views: the decode path (fp16 / bf16: row groups of one offset from a 16-byte boundary,
    shifted x) and the float32 path (shrink_simt row by row) match the reference."""
    path = "fp32" if dtype == torch.float32 else "decode"
    case = _decode_case(K, dtype, view, seed=K)
    cc.check_close(emu.run(*cc.args(case), path), case, f"K={K} {dtype} {view} {path}")


@pytest.mark.parametrize("path", ["preinit", "rmw"])
@pytest.mark.parametrize("view", ["aligned", "all"])
@pytest.mark.parametrize("K", [4097, 4102, 129, 7])
def test_emulated_unaligned_K_prefill(emu, K, view, path):
    """The prefill shrink reads x from the packing's padded rows (16-byte loads) and a
    misaligned lora_a with scalar loads, for any K."""
    case = cc.make_case(K=K, N=37, E=2, R=16, seq_lens=[33, 37], P=2, adapter_ids=[1, -1], zero_gate_frac=0.25,
                        dtype=torch.float16, seed=K)
    case = _misaligned(case, _VIEWS[view])
    cc.check_close(emu.run(*cc.args(case), path), case, f"prefill K={K} {view} {path}")


@pytest.mark.parametrize("path", ["decode", "decode_rt1"])
@pytest.mark.parametrize("T", [1, 9, 17, 33, 64])
def test_emulated_decode_token_tiles_odd_K(emu, T, path):
    """Every token tile and row tile of the fused kernel with K % 8 != 0 (CTAs on every 8th
    row, x shifted; the largest tiles take one chunk in flight) and a misaligned weight."""
    case = cc.make_case(K=203, N=45, E=2, R=8, seq_lens=[1] * T, P=max(T // 2, 1), dtype=torch.bfloat16, seed=T)
    case = _misaligned(case, ("weight",))
    cc.check_close(emu.run(*cc.args(case), path), case, f"{path} T={T} K=203")


def _active_pairs(case):
    """(token, expert) pairs with an adapter and a non-zero gate, for one-token sequences."""
    ids = case["adapter_ids"].tolist()
    return sum(int((case["gates"][s] != 0).sum()) for s in range(len(ids)) if ids[s] >= 0)


@pytest.mark.parametrize("view", ["aligned", "w", "all"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("K", [4095, 4097, 4100, 4102, 4104, 129])
def test_emulated_streams_use_16_byte_loads(emu, K, dtype, view):
    """The weight (decode kernel) and lora_a (shrink_simt) streams are read with 16-byte loads
    whatever K % 8 and the views' offsets are: at most 7 elements per row before its first
    16-byte boundary and 7 after its last whole 16 bytes go element-wise (the emulator counts
    the bytes each load width reads from each operand). Before, K % 8 != 0 or a misaligned
    weight gave 0 bytes of 16-byte loads here."""
    path = "fp32" if dtype == torch.float32 else "decode"
    case = _decode_case(K, dtype, view, seed=K)
    y = emu.run(*cc.args(case), path)
    cc.check_close(y, case, f"K={K} {dtype} {view}")
    stats = emu.load_stats()
    N, R, size = case["weight"].shape[0], case["lora_a"].shape[2], case["x"].element_size()
    pairs = _active_pairs(case)
    assert pairs > 0
    # every active (token, expert) reads its R rows of lora_a once
    assert stats["lora_a"][16] >= pairs * R * (K - 14) * size, stats["lora_a"]
    if path == "decode":
        assert stats["weight"][16] >= N * (K - 14) * size, stats["weight"]
        # element-wise: <= 14 per row; rows past N are clamped to loaded rows of the same CTA
        # (8 CTAs x 16 rows here at most)
        assert stats["weight"][2] <= 14 * size * 8 * 16, stats["weight"]
        # x (a few KB, L1/L2): two aligned loads + shift at the weight rows' offsets
        assert stats["x"][16] >= 10 * stats["x"][2], stats["x"]


@pytest.mark.parametrize("K", [4097, 4104])
def test_emulated_prefill_x_stream_uses_16_byte_loads(emu, K):
    """The prefill shrink streams x (padded to aligned rows by the packing when K % 8 != 0)
    with 16-byte loads; lora_a goes element-wise there when its rows are misaligned."""
    case = cc.make_case(K=K, N=24, E=2, R=8, seq_lens=[70], P=1, active_experts=1, dtype=torch.bfloat16, seed=K)
    cc.check_close(emu.run(*cc.args(case), "preinit"), case, f"prefill K={K}")
    stats = emu.load_stats()
    T = 70
    assert stats["x"][16] >= T * (K - 8) * 2, stats["x"]
    if K % 8 == 0:
        assert stats["lora_a"][16] > 0 and stats["lora_a"][2] == 0, stats["lora_a"]
