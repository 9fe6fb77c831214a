"""Behaviour 2: several adapters in one batch, one op call per adapted linear per step."""
import pytest
import torch

from milora import MiLoRAConfig
from milora_test_utils import OpSpy, milora_model, randomize_adapter


@pytest.fixture(scope="module")
def tenants():
    model, ref = milora_model(seed=1, adapter_name="a")
    model.add_adapter("b", MiLoRAConfig(r=8, alpha=8, top_k=2, pooler="max", activation="gelu"))
    model.add_adapter("c", MiLoRAConfig(r=2, alpha=4, top_k=7, target_modules=["q_proj", "v_proj", "down_proj"], gate_mode="hard"))
    model.add_adapter("t", MiLoRAConfig(r=2, alpha=4, routing="token", experts_per_module=4, top_k=2, target_modules=["q_proj", "up_proj"]))
    for i, n in enumerate(["b", "c", "t"]):
        randomize_adapter(model, n, 20 + i)
    model.eval()
    return model, ref


def _ids(b, l, seed):
    return torch.randint(1, 128, (b, l), generator=torch.Generator().manual_seed(seed))


def test_each_row_equals_running_alone(tenants, monkeypatch):
    model, ref = tenants
    names = ["a", "b", "base", "c", "a", None]
    ids = _ids(len(names), 6, 0)
    spy = OpSpy(monkeypatch)
    out = model(input_ids=ids, adapter_names=names).logits
    assert len(spy.calls) == len(model.milora_linears())  # one op call per adapted linear
    assert all(c["adapter_ids"].tolist() == [0, 1, -1, 2, 0, -1] for c in spy.calls)
    for i, n in enumerate(names):
        alone = model(input_ids=ids[i:i + 1], adapter_names=[n]).logits
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        base = ref(input_ids=ids).logits
    torch.testing.assert_close(out[2], base[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[5], base[5], rtol=1e-5, atol=1e-5)
    for i in (0, 1, 3):
        assert (out[i] - base[i]).abs().max() > 1e-3  # the adapters do something


def test_mixed_kinds_with_token_routed_rows(tenants, monkeypatch):
    """Prompt-routed, token-routed (MOELoRA) and base rows in one batch."""
    model, _ = tenants
    names = ["t", "a", "base", "t"]
    ids = _ids(4, 5, 1)
    spy = OpSpy(monkeypatch)
    out = model(input_ids=ids, adapter_names=names).logits
    assert len(spy.calls) == len(model.milora_linears())
    assert all(c["seq_offsets"].numel() == 4 * 5 + 1 for c in spy.calls)  # one sequence per token
    for i, n in enumerate(names):
        alone = model(input_ids=ids[i:i + 1], adapter_names=[n]).logits
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_generate_multi_tenant(tenants, monkeypatch):
    model, _ = tenants
    names = ["c", "a", "b", "base"]
    ids = _ids(4, 5, 2)
    spy = OpSpy(monkeypatch)
    out = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    # linears that no tenant's routing uses skip the op (the base layer alone)
    n_used = len({id(c["weight"]) for c in spy.calls})
    assert 0 < n_used <= len(model.milora_linears())
    assert len(spy.calls) == 4 * n_used  # prefill + 3 decode steps, one call per used linear each
    decode = spy.calls[n_used:]
    assert all(c["x_shape"][:2] == (4, 1) and c["seq_offsets"].tolist() == [0, 1, 2, 3, 4] for c in decode)
    for i, n in enumerate(names):
        alone = model.generate(input_ids=ids[i:i + 1], adapter_names=[n], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(alone[0], out[i])


def test_active_adapter_is_the_default(tenants):
    model, _ = tenants
    ids = _ids(2, 4, 3)
    model.set_adapter("b")
    try:
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids, adapter_names=["b", "b"]).logits)
        # a direct call of the wrapped HF model uses the active adapter too
        torch.testing.assert_close(model.base_model(input_ids=ids).logits, model(input_ids=ids).logits)
    finally:
        model.set_adapter("a")


def test_delete_adapter_keeps_the_others(tenants):
    model, _ = tenants
    ids = _ids(3, 4, 4)
    before = model(input_ids=ids, adapter_names=["a", "c", "t"]).logits
    model.add_adapter("tmp", MiLoRAConfig(r=16, alpha=4, experts_per_module=2))
    randomize_adapter(model, "tmp", 99)
    mid = model(input_ids=ids, adapter_names=["a", "c", "t"]).logits
    model.delete_adapter("tmp")
    after = model(input_ids=ids, adapter_names=["a", "c", "t"]).logits
    torch.testing.assert_close(mid, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert model.adapter_names == ["a", "b", "c", "t"]
    assert all(lin.rank == 8 for lin in model.milora_linears().values())  # padding shrank back
