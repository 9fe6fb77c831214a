"""CUDA kernels of milora_ext.gated_lora_linear against the PyTorch reference (needs a GPU).

Every test is skipped, with the reason, when no CUDA device is visible or when this build
of milora_ext has no CUDA kernels; collection never touches a GPU. Accuracy rule:
milora_ext.accuracy (the flash-attention rule, justified there).

MILORA_CUDA_TEST_DEVICE=cpu runs the device-independent tests of this file against the CPU
kernel instead (a check of the tests themselves on machines without a GPU); the
CUDA-specific ones (graphs, device-side index sanitising, env switches) are then skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import milora_ext
import _cuda_cases as cc
from milora_ext.workloads import tenant_isolation_problem

DEVICE = os.environ.get("MILORA_CUDA_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"

if ON_CUDA and not torch.cuda.is_available():
    _SKIP = "no CUDA device visible to torch"
elif ON_CUDA and not milora_ext.has_cuda_kernels():
    _SKIP = "this build of milora_ext has no CUDA kernels (build with MILORA_CUDA=1 on a machine with nvcc)"
else:
    _SKIP = None
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA-specific test (MILORA_CUDA_TEST_DEVICE=cpu)")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def run_op(case, **kw):
    return milora_ext.gated_lora_linear(*cc.args(case), **kw)


def make(**kw):
    kw.setdefault("device", DEVICE)
    return cc.make_case(**kw)


# ---- numerics ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("name", [n for n, _ in cc.EDGE_CASES])
def test_edge_cases(name, dtype):
    case = make(dtype=dtype, **dict(cc.EDGE_CASES)[name])
    cc.check_close(run_op(case), case, f"{name} {dtype}")


# The tuning switches of the CUDA dispatcher (gated_lora_linear_cuda.cpp): every path must
# give the same semantics. "prefill" forces the tensor-core prefill path for small T too.
SWITCHES = {
    "prefill_rmw": {"MILORA_PREFILL_EPILOGUE": "rmw", "MILORA_DECODE_MAX_TOKENS": "0"},
    "prefill_preinit": {"MILORA_PREFILL_EPILOGUE": "preinit", "MILORA_DECODE_MAX_TOKENS": "0"},
    "decode_no_pdl": {"MILORA_PDL": "0"},
    "decode_16_rows": {"MILORA_DECODE_ROW_TILES": "1"},
}


@cuda_only
@pytest.mark.parametrize("switch", list(SWITCHES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dt)
@pytest.mark.parametrize("name", [n for n, _ in cc.EDGE_CASES])
def test_edge_cases_other_paths(monkeypatch, name, dtype, switch):
    for k, v in SWITCHES[switch].items():
        monkeypatch.setenv(k, v)
    case = make(dtype=dtype, **dict(cc.EDGE_CASES)[name])
    cc.check_close(run_op(case), case, f"{name} {dtype} {switch}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("E", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("R", [1, 8, 16, 17, 64, 128])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_experts_and_ranks(kind, R, E, dtype):
    lens = [1] * 12 if kind == "decode" else [90, 0, 47, 3]
    case = make(K=192, N=136, E=E, R=R, seq_lens=lens, dtype=dtype, seed=E * 1000 + R)
    cc.check_close(run_op(case), case, f"{kind} E={E} R={R} {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dt)
@pytest.mark.parametrize(
    "T,S",
    [(1, 1), (8, 8), (32, 32), (64, 64), (64, 3), (512, 4), (1000, 7)],
)
def test_model_sized(T, S, dtype):
    """Decode (one token per sequence, each its own adapter) and prefill at hidden size 1024."""
    lens = [1] * T if T == S else cc.skewed_lens(T, S, seed=T)
    case = make(K=1024, N=1536, E=4, R=16, seq_lens=lens, dtype=dtype, zero_gate_frac=0.5, seed=T + S)
    cc.check_close(run_op(case), case, f"T={T} S={S} {dtype}")


@cuda_only
def test_llama_sized_decode_and_prefill():
    for T, lens in [(64, [1] * 64), (4096, [1024] * 4)]:
        case = make(K=4096, N=4096, E=4, R=16, seq_lens=lens, dtype=torch.bfloat16, zero_gate_frac=0.5, seed=T)
        cc.check_close(run_op(case), case, f"4096x4096 T={T}")


@pytest.mark.parametrize("T", list(range(56, 74)))
def test_decode_prefill_boundary_sweep(T):
    case = make(K=160, N=96, E=3, R=16, seq_lens=cc.skewed_lens(T, 5, seed=T), dtype=torch.bfloat16, seed=T)
    cc.check_close(run_op(case), case, f"boundary T={T}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
def test_leading_dims_and_strided_inputs(dtype):
    case = make(K=96, N=72, E=2, R=8, seq_lens=[5, 7], dtype=dtype)
    case["x"] = case["x"].reshape(3, 4, 96)
    cc.check_close(run_op(case), case, "3-d x")
    # non-contiguous views: x transposed twice, gates a strided column slice
    case2 = make(K=96, N=72, E=2, R=8, seq_lens=[5, 7], dtype=dtype, seed=3)
    case2["x"] = case2["x"].t().contiguous().t()
    wide = torch.zeros(2, 4, dtype=torch.float32, device=DEVICE)
    wide[:, ::2] = case2["gates"]
    case2["gates"] = wide[:, ::2]
    assert not case2["x"].is_contiguous() and not case2["gates"].is_contiguous()
    cc.check_close(run_op(case2), case2, "strided views")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dt)
@pytest.mark.parametrize("T", [4, 100])
def test_misaligned_pointers(dtype, T):
    """Tensors whose data does not start on a 16-byte boundary (views at an odd offset)."""
    case = make(K=128, N=64, E=2, R=16, seq_lens=[T // 2, T - T // 2], dtype=dtype)
    for key in ("x", "weight", "lora_a", "lora_b"):
        t = case[key]
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        case[key] = view
    cc.check_close(run_op(case), case, f"misaligned T={T}")


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("K", [4095, 4097, 4100, 4102, 4104, 129, 7, 1])
def test_any_K(K, dtype, misaligned):
    """K % 8 != 0 (the weight rows off the 16-byte grid: CTAs take rows of one offset, x is
    padded) and misaligned views, decode and prefill, adapters -1 and zero gates, odd N."""
    for T, lens in ((5, [1] * 5), (70, [33, 37])):
        case = make(K=K, N=37, E=2, R=16, seq_lens=lens, P=3, adapter_ids=[0, -1, 1, 0, 2][: len(lens)],
                    zero_gate_frac=0.5, dtype=dtype, seed=K)
        if misaligned:
            for key in ("x", "weight", "lora_a", "lora_b"):
                t = case[key]
                view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
                view.copy_(t)
                case[key] = view
        cc.check_close(run_op(case), case, f"K={K} T={T} {dtype} misaligned={misaligned}")


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("lens", [[1] * 10, [3, 1, 9, 2, 6, 1, 12, 4, 2, 5], [5, 7, 3, 40, 9, 2, 13, 1, 20, 30]],
                         ids=["decode", "decode_multi", "prefill"])
@pytest.mark.parametrize("switch", [None] + list(SWITCHES))
def test_tenant_isolation(monkeypatch, switch, lens, dtype, poison):
    """NaN / Inf in another tenant's adapter and input rows, in an unused slot and in experts
    whose gate is 0 leave every other token's output bit-identical, on every path."""
    if switch is not None:
        if not ON_CUDA:
            pytest.skip("CUDA tuning switch")
        for k, v in SWITCHES[switch].items():
            monkeypatch.setenv(k, v)
    bad, clean, protected = tenant_isolation_problem(lens, poison=poison, dtype=dtype, device=DEVICE, seed=7)
    y_clean = milora_ext.gated_lora_linear(*clean.args())
    cc.check_close(y_clean, dict(zip(cc.ARG_NAMES, clean.args())), f"isolation clean {switch}")
    y_bad = milora_ext.gated_lora_linear(*bad.args())
    assert torch.equal(y_bad[protected], y_clean[protected]), f"{switch}: a poisoned adapter reached another token"


def test_deterministic():
    for lens in ([1] * 16, [300, 200]):
        case = make(K=256, N=192, E=3, R=16, seq_lens=lens, dtype=torch.bfloat16)
        assert torch.equal(run_op(case), run_op(case))


# ---- errors ---------------------------------------------------------------------------


@cuda_only
def test_unsupported_dtype_and_sizes_name_the_problem():
    case = make(K=16, N=8, E=1, R=4, seq_lens=[3], dtype=torch.float32)
    c64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in case.items()}
    with pytest.raises(TypeError, match="float64"):
        run_op(c64)
    with pytest.raises(ValueError, match="E = 17"):
        run_op(make(K=16, N=8, E=17, R=4, seq_lens=[3], dtype=torch.float16))
    with pytest.raises(ValueError, match="R = 257"):
        run_op(make(K=16, N=8, E=1, R=257, seq_lens=[3], dtype=torch.float16))


def test_bad_indices_with_checks_raise_clear_errors():
    case = make(K=16, N=8, E=1, R=4, seq_lens=[3, 2], P=2, dtype=torch.float16 if ON_CUDA else torch.float32)
    bad_ids = dict(case, adapter_ids=torch.tensor([0, 5], device=DEVICE))
    with pytest.raises(IndexError, match=r"adapter_ids\[1\] = 5"):
        run_op(bad_ids, check_indices=True)
    bad_off = dict(case, seq_offsets=torch.tensor([0, 4, 3], device=DEVICE))
    with pytest.raises(ValueError, match="must not decrease"):
        run_op(bad_off, check_indices=True)


_BAD_INDEX_SCRIPT = textwrap.dedent(
    """
    import torch, milora_ext
    milora_ext.set_index_checks(False)
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    for dtype, T in [(torch.bfloat16, 5), (torch.float16, 200), (torch.float32, 40), (torch.bfloat16, 64)]:
        K, N, P, E, R = 72, 40, 3, 2, 16
        x = torch.randn(T, K, generator=g).to(dev, dtype)
        w = torch.randn(N, K, generator=g).to(dev, dtype)
        a = torch.randn(P, E, R, K, generator=g).to(dev, dtype)
        b = torch.randn(P, E, N, R, generator=g).to(dev, dtype)
        for offs, ids in [
            ([0, 2, 1, 10**9, -5], [7, -3, 2, 10**6]),
            ([-100, -1, T + 5, T, 3], [0, 1, 2, 3]),
            ([T, 0, T // 2, 0, 1], [2, 2, 2, -1]),
            ([2**40, -(2**40), 3, 4, T], [2**40, -(2**40), 0, 1]),
        ]:
            assert len(offs) == len(ids) + 1
            for idx_dtype in (torch.int32, torch.int64):
                o = torch.tensor([max(min(v, 2**31 - 1), -(2**31)) if idx_dtype == torch.int32 else v for v in offs],
                                 dtype=idx_dtype, device=dev)
                i = torch.tensor([max(min(v, 2**31 - 1), -(2**31)) if idx_dtype == torch.int32 else v for v in ids],
                                 dtype=idx_dtype, device=dev)
                gates = torch.rand(len(ids), E, generator=g).to(dev)
                y = milora_ext.gated_lora_linear(x, w, None, a, b, o, i, gates)
                assert y.shape == (T, N)
    torch.cuda.synchronize()
    print("BAD_INDICES_OK")
    """
)


@cuda_only
def test_garbage_indices_without_checks_do_not_crash(tmp_path):
    """With the host checks off (CUDA-graph mode) garbage offsets / ids must neither fault
    nor hang: the kernels sanitise them on the device. Runs in a subprocess, so a device
    fault could not poison the CUDA context of the other tests; from tmp_path, so that the
    child imports the same milora_ext as this process, not the source tree's."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(
        [sys.executable, "-c", _BAD_INDEX_SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "BAD_INDICES_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# ---- PyTorch integration -----------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    case = make(K=24, N=16, E=2, R=4, seq_lens=[3, 0, 2], dtype=torch.float32)
    if requires_grad:
        for k in ("x", "weight", "bias", "lora_a", "lora_b", "gates"):
            case[k].requires_grad_(True)
    torch.library.opcheck(torch.ops.milora_ext.gated_lora_linear.default, cc.args(case))


def test_gradients_match_reference_autograd():
    case = make(K=48, N=40, E=3, R=8, seq_lens=[4, 0, 9, 1], P=2, dtype=torch.float32)
    leaves = ("x", "weight", "bias", "lora_a", "lora_b", "gates")
    ours = {k: (v.detach().clone().requires_grad_(True) if k in leaves else v) for k, v in case.items()}
    ref = {k: (v.detach().double().requires_grad_(True) if k in leaves else v) for k, v in case.items()}
    gy = torch.randn(14, 40, device=DEVICE, dtype=torch.float64)
    (run_op(ours) * gy.float()).sum().backward()
    (milora_ext.gated_lora_linear_ref(*cc.args(ref)) * gy).sum().backward()
    for k in leaves:
        got, want = ours[k].grad.double(), ref[k].grad
        scale = want.abs().max().item() + 1e-6
        assert (got - want).abs().max().item() <= 1e-4 * scale, f"d{k}"


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_dt)
@pytest.mark.parametrize("T", [8, 200])
def test_cuda_graph_capture_replay(dtype, T):
    """Captured with the host index checks off; replay equals eager bitwise, also after the
    inputs (values, adapter ids, gates) change in place."""
    S = T if T <= 64 else 4
    lens = [1] * T if T == S else [T // 4] * 4
    case = make(K=128, N=96, E=3, R=16, seq_lens=lens, P=S, dtype=dtype)
    prev = milora_ext.set_index_checks(False)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run_op(case)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = run_op(case)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_static, run_op(case))
        # new values in the same buffers
        case["x"].copy_(torch.randn_like(case["x"]))
        case["adapter_ids"].copy_(torch.flip(case["adapter_ids"], [0]))
        case["adapter_ids"][0] = -1
        case["gates"].copy_(torch.rand_like(case["gates"]))
        case["gates"][:, 1] = 0
        graph.replay()
        torch.cuda.synchronize()
        eager = run_op(case)
        assert torch.equal(y_static, eager)
        cc.check_close(y_static, case, "graph replay after input update")
    finally:
        milora_ext.set_index_checks(prev)
