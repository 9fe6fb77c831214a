"""Gradients of gated_lora_linear: gradcheck in float64, and the reference's autograd in every dtype."""
import pytest
import torch

import milora_ext
from milora_ext import gated_lora_linear_ref
from milora_ext.workloads import make_problem

from milora_ext.accuracy import assert_within_torch_error

GRAD_NAMES = ["x", "weight", "bias", "lora_a", "lora_b", "gates"]
GRAD_POS = [0, 1, 2, 3, 4, 7]


def leaves(problem, which):
    args = list(problem.args())
    for name, pos in zip(GRAD_NAMES, GRAD_POS):
        if name in which:
            args[pos] = args[pos].detach().clone().requires_grad_(True)
    return args


@pytest.mark.parametrize(
    "seq_lens, ids, active",
    [
        ([2, 0, 3, 1], [1, 0, -1, 1], None),  # empty sequence, base-only sequence, shared adapter
        ([1, 1, 1], [0, 1, 2], 1),  # decode-like with zero gates (their gradient is still defined)
    ],
)
def test_gradcheck_float64(seq_lens, ids, active):
    p = make_problem(seq_lens, ids, K=7, N=5, P=3, E=3, R=2, active_experts=active, dtype=torch.float64, seed=1)
    args = leaves(p, GRAD_NAMES)
    inputs = tuple(args[i] for i in GRAD_POS)

    def f(x, w, b, a, bl, g):
        return milora_ext.gated_lora_linear(x, w, b, a, bl, p.seq_offsets, p.adapter_ids, g)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "seq_lens, ids, active",
    [
        ([5, 0, 9, 1, 3], [1, 0, -1, 2, 1], 2),
        ([1] * 8, [0, 1, 2, 3, 0, 1, -1, 2], None),
    ],
)
def test_gradients_match_reference(dtype, seq_lens, ids, active):
    p = make_problem(seq_lens, ids, K=48, N=40, P=4, E=3, R=8, active_experts=active, dtype=dtype, seed=3)
    grad_out = torch.randn(sum(seq_lens), 40, generator=torch.Generator().manual_seed(9)).to(dtype)

    def grads(fn, **kw):
        args = leaves(p, GRAD_NAMES)
        fn(*args, **kw).backward(grad_out.to(args[0].dtype))
        return [args[i].grad for i in GRAD_POS]

    def upcast(t):
        return t.double() if t.is_floating_point() else t

    p64 = type(p)(*[None if t is None else upcast(t) for t in p.args()])
    got = grads(milora_ext.gated_lora_linear)
    args64 = leaves(p64, GRAD_NAMES)
    gated_lora_linear_ref(*args64).backward(grad_out.double())
    truth = [args64[i].grad for i in GRAD_POS]
    same = grads(gated_lora_linear_ref)
    for name, g, t, s in zip(GRAD_NAMES, got, truth, same):
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == s.dtype, name
        assert_within_torch_error(g, t, s, what=f"d{name}")


def test_only_requested_gradients_are_computed():
    p = make_problem([3, 2], [0, 1], K=16, N=8, P=2, E=2, R=4)
    args = leaves(p, ["lora_a", "gates"])
    milora_ext.gated_lora_linear(*args).sum().backward()
    assert args[3].grad is not None and args[7].grad is not None
    assert args[0].grad is None and args[1].grad is None and args[4].grad is None


def test_zero_gate_gradient_is_the_true_gradient():
    # d y / d gate is B A x even for a gate that is 0 (the expert was skipped in the forward).
    p = make_problem([4], [0], K=16, N=8, P=1, E=2, R=4, dtype=torch.float64)
    gates = torch.tensor([[0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    y = milora_ext.gated_lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.seq_offsets, p.adapter_ids, gates)
    y.sum().backward()
    expected = ((p.x @ p.lora_a[0, 0].t()) @ p.lora_b[0, 0].t()).sum()
    torch.testing.assert_close(gates.grad[0, 0], expected)
    assert gates.grad[0, 0].abs() > 0


def test_gradcheck_without_bias():
    # With bias None the autograd node has one input edge fewer: every later gradient must
    # still land on its own input.
    p = make_problem([3, 2], [1, 0], K=6, N=4, P=2, E=2, R=2, dtype=torch.float64, bias=False, seed=4)

    def f(x, w, a, bl, g):
        return milora_ext.gated_lora_linear(x, w, None, a, bl, p.seq_offsets, p.adapter_ids, g)

    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (p.x, p.weight, p.lora_a, p.lora_b, p.gates))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    gates_only = p.gates.detach().clone().requires_grad_(True)
    f(p.x, p.weight, p.lora_a, p.lora_b, gates_only).sum().backward()
    assert gates_only.grad is not None and gates_only.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "seq_lens, ids, zero_seq",
    [
        ([2, 0, 3, 1], [1, 0, -1, 1], 3),  # the last sequence has all gates 0
        ([1, 1, 1], [0, 0, 1], 1),  # decode-like, shared adapter, one sequence with gates 0
    ],
)
def test_double_backward_gradgradcheck(seq_lens, ids, zero_seq):
    """Double backward is real (not autograd's deprecated fallback): second derivatives
    w.r.t. every input, also the gates of a sequence whose gates are all zero."""
    p = make_problem(seq_lens, ids, K=5, N=4, P=2, E=2, R=2, dtype=torch.float64, seed=2)
    p.gates[zero_seq] = 0.0
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.gates))

    def f(x, w, b, a, bl, g):
        return milora_ext.gated_lora_linear(x, w, b, a, bl, p.seq_offsets, p.adapter_ids, g)

    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_double_backward_matches_reference_for_zero_gate_sequences():
    # A gradient penalty ||dL/dx||^2 differentiated w.r.t. the gates: the sequence with all
    # gates 0 still has a non-zero second-order gradient (dx depends on its gates).
    p = make_problem([3, 2], [0, 0], K=8, N=6, P=1, E=2, R=3, dtype=torch.float64, seed=5)
    p.gates[1] = 0.0
    results = []
    for fn in (milora_ext.gated_lora_linear, gated_lora_linear_ref):
        x = p.x.detach().clone().requires_grad_(True)
        g = p.gates.detach().clone().requires_grad_(True)
        y = fn(x, p.weight, p.bias, p.lora_a, p.lora_b, p.seq_offsets, p.adapter_ids, g)
        (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(dx.square().sum(), g)
        results.append(gg)
    torch.testing.assert_close(results[0], results[1])
    assert results[0][1].abs().min() > 0
