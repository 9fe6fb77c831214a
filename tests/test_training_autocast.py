"""Autocast of gated_lora_linear casts like F.linear: float32 operands (x, weight, bias, A, B)
become the autocast dtype, gates stay float32, gradients reach float32 Parameters in float32."""
import pytest
import torch
import torch.nn.functional as F

import milora_ext
from milora_ext import gated_lora_linear, gated_lora_linear_ref


def _case(seed=0, T=11, K=24, N=20, P=3, E=2, R=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(N, K, generator=g) / K ** 0.5)
    b = torch.nn.Parameter(torch.randn(N, generator=g))
    a = torch.nn.Parameter(torch.randn(P, E, R, K, generator=g) / K ** 0.5)
    bb = torch.nn.Parameter(torch.randn(P, E, N, R, generator=g) / R ** 0.5)
    offsets = torch.tensor([0, 3, 3, 8, T])
    ids = torch.tensor([2, 0, -1, 1])
    gates = torch.rand(4, E, generator=g)
    gates[1, 0] = 0.0
    return x, w, b, a, bb, offsets, ids, gates


def _check_autocast_equals_explicit_casts(device, dtype):
    x, w, b, a, bb, offsets, ids, gates = _case()
    if device != "cpu":
        x, w, b, a, bb = [t.detach().to(device).requires_grad_() for t in (x, w, b, a, bb)]
        offsets, ids, gates = offsets.to(device), ids.to(device), gates.to(device)
    gy = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    with torch.autocast(device, dtype=dtype):
        y = gated_lora_linear(x, w, b, a, bb, offsets, ids, gates)
        lin = F.linear(x, w, b)
    assert y.dtype == dtype == lin.dtype  # same output dtype as F.linear under autocast
    y.backward(gy)
    got = [t.grad.clone() for t in (x, w, b, a, bb)]
    assert all(gr.dtype == torch.float32 for gr in got)
    for t in (x, w, b, a, bb):
        t.grad = None
    # the same computation with the casts written out, outside autocast: bit-identical
    y2 = gated_lora_linear(x.to(dtype), w.to(dtype), b.to(dtype), a.to(dtype), bb.to(dtype), offsets, ids, gates)
    assert torch.equal(y, y2)
    y2.backward(gy)
    for g1, t in zip(got, (x, w, b, a, bb)):
        assert torch.equal(g1, t.grad)
    # and close to the float64 truth within the dtype's own error (PyTorch's reference in `dtype`)
    exact = gated_lora_linear_ref(x, w, b, a, bb, offsets, ids, gates, compute_dtype=torch.float64)
    torch_err = (gated_lora_linear_ref(x.to(dtype), w.to(dtype), b.to(dtype), a.to(dtype), bb.to(dtype), offsets,
                                       ids, gates).float() - exact).abs().max()
    assert (y.float() - exact).abs().max() <= 2 * torch_err + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward_equal_explicit_casts(dtype):
    _check_autocast_equals_explicit_casts("cpu", dtype)


@pytest.mark.skipif(not (torch.cuda.is_available() and milora_ext.has_cuda_kernels()),
                    reason="no CUDA device visible (or a CPU-only build): scripts/gpu_check.sh runs this on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_forward_backward_equal_explicit_casts(dtype):
    _check_autocast_equals_explicit_casts("cuda", dtype)


def test_autocast_keeps_gates_float32_and_gate_gradients():
    x, w, b, a, bb, offsets, ids, gates = _case(1)
    gates.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gated_lora_linear(x, w, b, a, bb, offsets, ids, gates)
    y.float().sum().backward()
    assert gates.grad is not None and gates.grad.dtype == torch.float32
    assert gates.grad.abs().sum() > 0


def test_autocast_leaves_float64_and_disabled_autocast_alone():
    x, w, b, a, bb, offsets, ids, gates = _case(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64 = gated_lora_linear(x.double(), w.double(), b.double(), a.double(), bb.double(), offsets, ids, gates.double())
    assert y64.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        y32 = gated_lora_linear(x, w, b, a, bb, offsets, ids, gates)
    assert y32.dtype == torch.float32


def test_autocast_registration_is_compiled_in():
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("milora_ext::gated_lora_linear", key), key
    assert milora_ext.gated_lora_linear is not None


@pytest.mark.parametrize("routing", ["prompt", "token"])
def test_model_trains_under_cpu_bf16_autocast(routing):
    from milora import MiLoRAConfig
    from milora_test_utils import milora_model
    cfg = MiLoRAConfig(r=4, alpha=8, top_k=3, routing=routing, experts_per_module=2 if routing == "token" else 1)
    model, _ = milora_model(config=cfg)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    pm = (labels == -100).long()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=labels, prompt_mask=pm)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(gr is not None and gr.dtype == torch.float32 and torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads)
    # close to the float32 loss (bf16 rounding only)
    model.zero_grad()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels, prompt_mask=pm).loss
    assert abs(out.loss.item() - ref.item()) < 0.05 * abs(ref.item())
