"""The op's registrations: torch.library.opcheck and torch.compile(fullgraph=True) on CPU."""
import pytest
import torch

import milora_ext
from milora_ext.workloads import make_problem

OP = torch.ops.milora_ext.gated_lora_linear.default


def samples():
    yield make_problem([3, 0, 4], [1, -1, 0], K=24, N=16, P=2, E=2, R=4, seed=1)
    yield make_problem([1] * 5, [0, 1, 2, 0, -1], K=17, N=9, P=3, E=3, R=3, active_experts=2, seed=2)
    yield make_problem([6], [0], K=16, N=8, P=1, E=1, R=2, bias=False, index_dtype=torch.int32, seed=3)
    yield make_problem([2, 2], [0, 1], K=16, N=8, P=2, E=2, R=4, dtype=torch.bfloat16, seed=4)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("sample", list(range(4)))
def test_opcheck(sample, requires_grad):
    p = list(samples())[sample]
    args = list(p.args())
    if requires_grad:
        for i in (0, 3, 4, 7):
            args[i] = args[i].detach().requires_grad_(True)
    result = torch.library.opcheck(OP, tuple(args))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    p = make_problem([3, 5, 1], [0, 1, -1], K=32, N=24, P=2, E=2, R=4, seed=6)

    def layer(x, w, b, a, bl, off, ids, g):
        return torch.relu(milora_ext.gated_lora_linear(x, w, b, a, bl, off, ids, g)) * 2

    compiled = torch.compile(layer, fullgraph=True)
    args_eager = [t.detach().clone().requires_grad_(True) if i in (0, 3, 4) else t for i, t in enumerate(p.args())]
    args_comp = [t.detach().clone().requires_grad_(True) if i in (0, 3, 4) else t for i, t in enumerate(p.args())]
    y_eager = layer(*args_eager)
    y_comp = compiled(*args_comp)
    torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    for i in (0, 3, 4):
        torch.testing.assert_close(args_comp[i].grad, args_eager[i].grad)


def test_compile_dynamic_shapes():
    torch._dynamo.reset()
    compiled = torch.compile(milora_ext.gated_lora_linear, fullgraph=True, dynamic=True)
    for lens in ([2, 3], [4, 1, 7], [1]):
        p = make_problem(lens, [i % 2 for i in range(len(lens))], K=16, N=8, P=2, E=2, R=4, seed=len(lens))
        torch.testing.assert_close(compiled(*p.args()), milora_ext.gated_lora_linear(*p.args()), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compile_backward_with_non_contiguous_inputs():
    """The fake of gated_lora_linear_backward reports the strides the kernel returns
    (contiguous gradients), so inductor's output asserts hold for strided x / weight / lora_a."""
    torch._dynamo.reset()
    p = make_problem([3, 5, 1], [0, 1, -1], K=32, N=24, P=2, E=2, R=4, seed=6)
    x = p.x.t().contiguous().t()
    w = p.weight.t().contiguous().t()
    a = p.lora_a.transpose(2, 3).contiguous().transpose(2, 3)
    g = p.gates.t().contiguous().t()

    def layer(x, w, a, g):
        return milora_ext.gated_lora_linear(x, w, p.bias, a, p.lora_b, p.seq_offsets, p.adapter_ids, g)

    grads = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, a, g)]  # clone keeps the strides
        assert not any(t.is_contiguous() for t in leaves)
        with torch._inductor.config.patch(force_disable_caches=True):
            fn(*leaves).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for ge, gc in zip(*grads):
        torch.testing.assert_close(gc, ge)
