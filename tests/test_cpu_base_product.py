"""The op's own bfloat16 base product on AMX tiles (csrc/cpu/base_amx.h): which calls take it,
its result against the float64 reference (judged by PyTorch's own bfloat16 error), and the
properties a GEMM's blocking can break: no mixing of tokens or columns, and one token's output
the same alone and in a batch."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import milora_ext
from milora_ext.accuracy import check_against_reference
from milora_ext.workloads import make_problem

SUPPORTED = milora_ext.supported_cpu_capabilities()
EVENT = "milora::base_tiles_cpu"


@pytest.fixture
def amx():
    if "amx" not in SUPPORTED:
        pytest.skip(f"this CPU has no AMX tiles (it runs up to {milora_ext.max_cpu_capability()})")
    previous = milora_ext.set_cpu_capability("amx")
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # more threads than column blocks for N = 48: empty work items
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        milora_ext.set_cpu_capability(previous)


def call(args):
    """The op's output and whether its base product ran on the tiles."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = milora_ext.gated_lora_linear(*args)
    return y, any(e.name == EVENT for e in prof.events())


@pytest.mark.parametrize("T", [1, 15, 16, 17, 63, 64, 65, 127, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_tiles_against_reference(amx, T, bias):
    # Token counts around the 16-token blocks and the four blocks a pass over W takes; with and
    # without LoRA work after the base product (two adapters, one sequence each, and adapter -1).
    for N, K in [(48, 640), (16, 32), (272, 1024)]:
        lens = [T - T // 2, T // 2] if T > 1 else [1]
        p = make_problem(lens, [0, 1][:len(lens)], K=K, N=N, P=2, E=2, R=8, active_experts=1,
                         dtype=torch.bfloat16, bias=bias, seed=T * N + K)
        for args in (p.args(), p.args_without_adapters()):
            y, tiles = call(args)
            assert tiles, (T, N, K)
            check_against_reference(y, args)


def test_calls_the_tiles_do_not_take(amx):
    # More tokens than kAmxBaseMaxTokens, K off the 32-value step, N off the 16-column block, a
    # weight that is a transposed view, and float32: ATen's product, and still the right answer.
    w_view = torch.randn(640, 48, dtype=torch.bfloat16).t()  # [48, 640], not contiguous
    cases = [
        (make_problem([129], [0], K=64, N=32, P=1, R=4, dtype=torch.bfloat16), None),
        (make_problem([8], [0], K=48, N=32, P=1, R=4, dtype=torch.bfloat16), None),
        (make_problem([8], [0], K=64, N=40, P=1, R=4, dtype=torch.bfloat16), None),
        (make_problem([8], [0], K=640, N=48, P=1, R=4, dtype=torch.bfloat16), w_view),
        (make_problem([8], [0], K=64, N=32, P=1, R=4, dtype=torch.float32), None),
    ]
    for p, weight in cases:
        args = list(p.args())
        if weight is not None:
            args[1] = weight
        y, tiles = call(tuple(args))
        assert not tiles
        check_against_reference(y, tuple(args))


def test_lower_levels_leave_the_base_product_to_aten():
    # A forced lower level has no product of its own (the bench's forced-level notes say the base
    # product keeps the CPU's best ISA, which is ATen's).
    p = make_problem([16], [0], K=64, N=32, P=1, R=4, dtype=torch.bfloat16)
    previous = milora_ext.set_cpu_capability("default")
    try:
        y, tiles = call(p.args())
    finally:
        milora_ext.set_cpu_capability(previous)
    assert not tiles
    check_against_reference(y, p.args())


def test_no_token_or_column_mixing(amx):
    # A NaN in one token's x and an infinity in one row of W reach only that token's row and that
    # output column; the 16 x 16 transposes and the zero padding of a partial block must keep
    # every other value finite.
    T, N, K = 37, 48, 640
    x = torch.randn(T, K, dtype=torch.bfloat16)
    w = (torch.randn(N, K) / K ** 0.5).to(torch.bfloat16)
    x[20, 300] = float("nan")
    w[33, 5] = float("inf")
    p = make_problem([T], [-1], K=K, N=N, P=1, R=4, dtype=torch.bfloat16, bias=False)
    args = list(p.args())
    args[0], args[1] = x, w
    y, tiles = call(tuple(args))
    assert tiles
    bad = ~torch.isfinite(y)
    assert bad[20].all() and bad[:, 33].all()
    rest = torch.ones_like(bad)
    rest[20] = False
    rest[:, 33] = False
    assert not bad[rest].any()


def test_a_token_alone_and_in_a_batch(amx):
    # Each output is one token's dot products in one order whatever the batch: a decode step's
    # result does not depend on which other requests share it.
    T, N, K = 100, 96, 1024
    p = make_problem([T], [-1], K=K, N=N, P=1, R=4, dtype=torch.bfloat16, bias=True, seed=3)
    batch, tiles = call(p.args())
    assert tiles
    for t in (0, 17, 63, 64, 99):
        args = list(p.args())
        args[0] = p.x[t:t + 1]
        args[5] = torch.tensor([0, 1])
        alone, _ = call(tuple(args))
        assert torch.equal(alone[0], batch[t]), t
