"""gated_lora_linear on CPU against the plain PyTorch reference, on fresh random inputs."""
import pytest
import torch

import milora_ext
from milora_ext.workloads import MIXES, adapter_mix, make_problem

from milora_ext.accuracy import check_against_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def run(problem):
    y = milora_ext.gated_lora_linear(*problem.args())
    check_against_reference(y, problem.args())
    return y


def own_base(p):
    """The op's base product (every adapter -1): ATen's, or for bfloat16 on amx the tiles of
    csrc/cpu/base_amx.h; judged against the reference here, so that rows compared with it
    exactly are compared with a checked product."""
    args = p.args_without_adapters()
    base = milora_ext.gated_lora_linear(*args)
    check_against_reference(base, args)
    return base


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "seq_lens, ids, P",
    [
        pytest.param([], [], 2, id="no-sequences"),
        pytest.param([0, 0], [0, 1], 2, id="T0-empty-sequences"),
        pytest.param([3, 0, 5, 0, 2], [1, 0, 2, 1, -1], 3, id="empty-sequences-between"),
        pytest.param([4, 6, 1], [-1, -1, -1], 2, id="all-adapters-minus-1"),
        pytest.param([1] * 16, list(range(16)), 16, id="decode-distinct"),
        pytest.param([100, 37, 64], [2, 0, 1], 3, id="prefill"),
        pytest.param([200, 1, 1, 1, 1, 3], [0, 1, 2, 3, 0, -1], 4, id="skewed-lengths"),
        pytest.param([5, 5], [0, 0], 1, id="one-adapter-shared"),
        # batch-adjacent sequences of one adapter (and expert set) adding up to 128+ tokens: the
        # GEMM route with per-sequence gates; a run broken by another adapter and by base rows
        pytest.param([50, 60, 25, 3, 80, 40, 1, 140], [0, 0, 0, 1, 1, -1, 0, 0], 2, id="gemm-runs"),
        pytest.param([1] * 70, [0] * 70, 1, id="decode-70-sharing-one-adapter"),
        pytest.param([1] * 130, [0] * 130, 1, id="decode-130-sharing-one-adapter"),
    ],
)
def test_batches(dtype, seq_lens, ids, P):
    run(make_problem(seq_lens, ids, K=99, N=83, P=P, E=2, R=8, dtype=dtype, seed=len(seq_lens)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [1, 2, 3, 8])
@pytest.mark.parametrize("R", [1, 7, 16, 33, 128])
def test_experts_and_ranks(dtype, E, R):
    # Adapter 0 holds 22 tokens in short sequences (tiles) and a 130-token sequence (ATen GEMM
    # route), adapters 1 and 2 one token each (dot tiles).
    lens = [3, 1, 19, 1, 130]
    run(make_problem(lens, [0, 1, 0, 2, 0], K=75, N=43, P=3, E=E, R=R, active_experts=max(1, E // 2), dtype=dtype, seed=E * 1000 + R))


@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_sizes(dtype):
    # K and N not multiples of any vector width; R not a multiple of 8; packed (23 tokens)
    # and dot (7 tokens) tiles in one call.
    run(make_problem([7, 1, 23], [1, -1, 0], K=257, N=129, P=2, E=3, R=5, dtype=dtype, seed=7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("tokens_per_seq", [1, 9])
def test_popularity_mixes(dtype, mix, tokens_per_seq):
    g = torch.Generator().manual_seed(3)
    S, P = 24, 8
    ids = adapter_mix(S, P, mix, g)
    run(make_problem([tokens_per_seq] * S, ids, K=130, N=97, P=P, E=4, R=16, active_experts=2, dtype=dtype, seed=11))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_gates_zero_is_exactly_base(dtype):
    p = make_problem([4, 2, 7], [0, 1, 0], K=64, N=48, P=2, E=3, R=8, active_experts=0, dtype=dtype)
    assert (p.gates == 0).all()
    y = milora_ext.gated_lora_linear(*p.args())
    torch.testing.assert_close(y, own_base(p), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_base_only_rows_are_exactly_base(dtype):
    p = make_problem([3, 5, 2], [-1, 0, -1], K=64, N=48, P=1, E=2, R=4, dtype=dtype)
    y = milora_ext.gated_lora_linear(*p.args())
    base = own_base(p)
    torch.testing.assert_close(y[:3], base[:3], rtol=0, atol=0)
    torch.testing.assert_close(y[8:], base[8:], rtol=0, atol=0)
    assert (y[3:8] - base[3:8]).abs().max() > 1e-2, "the LoRA term of the adapted sequence is missing"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_off_experts_and_base_rows_are_never_read(dtype):
    # NaN in every expert whose gate is 0 and in the slot no sequence uses: a kernel that
    # skips their work (as the contract says) stays finite and equals the reference without them.
    p = make_problem([6, 1, 4], [0, 1, -1], K=64, N=32, P=3, E=4, R=8, active_experts=2, dtype=dtype, seed=5)
    clean_a, clean_b = p.lora_a.clone(), p.lora_b.clone()
    for s, adapter in enumerate(p.adapter_ids.tolist()):
        if adapter < 0:
            continue
        for e in range(4):
            if p.gates[s, e] == 0:
                p.lora_a[adapter, e] = float("nan")
                p.lora_b[adapter, e] = float("nan")
    p.lora_a[2] = float("nan")
    p.lora_b[2] = float("nan")
    y = milora_ext.gated_lora_linear(*p.args())
    assert torch.isfinite(y).all()
    clean = (p.x, p.weight, p.bias, clean_a, clean_b, p.seq_offsets, p.adapter_ids, p.gates)
    check_against_reference(y, clean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_dims_int32_indices_no_bias(dtype):
    p = make_problem([5, 5, 5], [1, 0, -1], K=40, N=24, P=2, E=2, R=4, dtype=dtype, bias=False, index_dtype=torch.int32)
    x3 = p.x.view(3, 5, 40)
    y = milora_ext.gated_lora_linear(x3, *p.args()[1:])
    assert y.shape == (3, 5, 24)
    check_against_reference(y.reshape(15, 24), p.args())


def test_non_contiguous_inputs():
    p = make_problem([4, 3], [1, 0], K=48, N=32, P=2, E=2, R=6)
    x_nc = torch.randn(48, 7)[:, :7].t()  # [7, 48], stride (1, 7)
    w_nc = p.weight.t().contiguous().t()  # [32, 48] non-contiguous view
    a_nc = p.lora_a.transpose(2, 3).contiguous().transpose(2, 3)
    args = (x_nc, w_nc, p.bias, a_nc, p.lora_b, p.seq_offsets, p.adapter_ids, p.gates)
    assert not x_nc.is_contiguous() and not w_nc.is_contiguous() and not a_nc.is_contiguous()
    check_against_reference(milora_ext.gated_lora_linear(*args), args)


def test_per_token_routing_is_one_sequence_per_token():
    # MOELoRA-style: every token its own sequence, adapter and top-2 of 4 experts.
    T = 19
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(-1, 3, (T,), generator=g).tolist()
    run(make_problem([1] * T, ids, K=64, N=64, P=3, E=4, R=8, active_experts=2, seed=9))


def test_large_decode_shape_matches_reference():
    # The benchmark's decode shape (K = N = 4096, R = 16) on 4 tokens.
    run(make_problem([1] * 4, [0, 1, 2, 3], K=4096, N=4096, P=4, E=4, R=16, active_experts=2, dtype=torch.bfloat16))
