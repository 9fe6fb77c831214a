import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from milora import MiLoRALinear
from milora_test_utils import OpSpy


def _randomize(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_a.copy_(torch.randn(layer.lora_a.shape, generator=g) * 0.3)
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.3)
        # keep the zero padding of smaller ranks / expert counts exact
        for p, s in enumerate(layer.slots):
            layer.lora_a[p, s.num_experts:] = 0
            layer.lora_a[p, :, s.rank:] = 0
            layer.lora_b[p, s.num_experts:] = 0
            layer.lora_b[p, :, :, s.rank:] = 0


def _lora(x, layer, name):
    p = layer.adapter_slots[name]
    s = layer.slots[p]
    A = layer.lora_a[p, 0, : s.rank]
    B = layer.lora_b[p, 0, :, : s.rank]
    return s.scaling * (x @ A.t() @ B.t())


def test_from_linear_is_a_drop_in_replacement():
    torch.manual_seed(0)
    lin = nn.Linear(16, 24)
    layer = MiLoRALinear.from_linear(lin, r=4, alpha=8)
    assert layer.weight is lin.weight and layer.bias is lin.bias  # shared, not copied
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_a.shape == (1, 1, 4, 16) and layer.lora_b.shape == (1, 1, 24, 4)
    assert torch.equal(layer.lora_b, torch.zeros_like(layer.lora_b)) and layer.lora_a.abs().sum() > 0
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), lin(x))  # B = 0: exactly the base layer
    assert layer(x).shape == (2, 3, 24)
    fresh = MiLoRALinear(16, 24, bias=False, r=2, alpha=2)
    assert fresh.bias is None and fresh(x).shape == (2, 3, 24)


def test_standalone_is_plain_lora_of_the_active_adapter():
    torch.manual_seed(0)
    lin = nn.Linear(16, 24)
    layer = MiLoRALinear.from_linear(lin, r=4, alpha=8, adapter_name="a")
    layer.add_adapter("b", r=8, alpha=4)
    assert layer.rank == 8  # zero-padded to the largest rank
    _randomize(layer)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), lin(x) + _lora(x, layer, "a"), rtol=1e-5, atol=1e-5)
    layer.set_adapter("b")
    torch.testing.assert_close(layer(x), lin(x) + _lora(x, layer, "b"), rtol=1e-5, atol=1e-5)
    layer.set_adapter(None)
    torch.testing.assert_close(layer(x), lin(x))
    layer.set_adapter("a")
    layer.delete_adapter("b")
    assert layer.rank == 4 and list(layer.adapter_slots) == ["a"]
    torch.testing.assert_close(layer(x), lin(x) + _lora(x, layer, "a"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_adapter("zzz")


def test_one_op_call_per_forward(monkeypatch):
    spy = OpSpy(monkeypatch)
    layer = MiLoRALinear(16, 8, r=2, alpha=2)
    layer(torch.randn(3, 4, 16))
    assert len(spy.calls) == 1
    c = spy.calls[0]
    assert c["seq_offsets"].tolist() == [0, 12] and c["adapter_ids"].tolist() == [0]
    assert c["gates"].tolist() == [[1.0]]


def test_gradients_and_dropout():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = MiLoRALinear.from_linear(lin, r=4, alpha=8, dropout=0.5)
    x = torch.randn(6, 16)
    layer.train()
    # B = 0: the LoRA term vanishes, and the base path must see the undropped input
    torch.testing.assert_close(layer(x), lin(x))
    _randomize(layer)
    y = layer(x)
    y.sum().backward()
    own = layer.trainable_parameters_of("default")  # the trained adapter's own Parameters
    assert own["lora_a"].grad.abs().sum() > 0 and own["lora_b"].grad.abs().sum() > 0
    assert layer.weight.grad is None
    layer.eval()
    torch.testing.assert_close(layer(x), lin(x) + _lora(x, layer, "default"), rtol=1e-5, atol=1e-5)


def test_token_routing_layer_matches_manual_moe():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    E, k, r = 4, 2, 3
    layer = MiLoRALinear.from_linear(lin, r=r, alpha=6, num_experts=E, routing="token", top_k=k)
    _randomize(layer)
    x = torch.randn(7, 16)
    y = layer(x)
    logits = x @ layer.router_weight[0].t()
    probs = logits.softmax(-1)
    top = probs.topk(k, -1)
    want = lin(x)
    for t in range(7):
        w = top.values[t] / top.values[t].sum()
        for j, e in enumerate(top.indices[t].tolist()):
            want[t] += 2.0 * w[j] * (layer.lora_b[0, e] @ (layer.lora_a[0, e] @ x[t]))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.trainable_parameters_of("default")["router_weight"].grad.abs().sum() > 0


def test_bfloat16_layer():
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    layer = MiLoRALinear.from_linear(lin, r=4, alpha=8)
    assert layer.lora_a.dtype == torch.bfloat16
    _randomize(layer)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    want = (x.float() @ lin.weight.float().t() + lin.bias.float() + _lora(x.float(), _f32(layer), "default"))
    torch.testing.assert_close(layer(x).float(), want, rtol=2e-2, atol=2e-2)


def _f32(layer):
    class V:
        pass
    v = V()
    v.lora_a, v.lora_b, v.slots, v.adapter_slots = layer.lora_a.float(), layer.lora_b.float(), layer.slots, layer.adapter_slots
    return v
