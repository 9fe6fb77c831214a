"""Behaviour 3: per-token MoE-LoRA (MOELoRA baseline) and prompt routing over several experts per module."""
import pytest
import torch

from milora import MiLoRAConfig
from milora_test_utils import generate_with_gates, OpSpy, count_router_calls, milora_model


def _ids(b, l, seed):
    return torch.randint(1, 128, (b, l), generator=torch.Generator().manual_seed(seed))


def test_token_routing_runs_a_router_per_token_through_the_op(monkeypatch):
    cfg = MiLoRAConfig(r=2, alpha=4, routing="token", experts_per_module=8, top_k=4)
    model, ref = milora_model(seed=3, config=cfg)
    assert all(lin.router_weight is not None and lin.router_weight.shape == (1, 8, lin.in_features)
               for lin in model.milora_linears().values())
    spy = OpSpy(monkeypatch)
    counter, handles = count_router_calls(model)
    ids = _ids(2, 5, 0)
    out = model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    for h in handles:
        h.remove()
    assert counter["n"] == 0  # no layer router with token routing
    n_lin = len(model.milora_linears())
    assert len(spy.calls) == 3 * n_lin
    prefill, decode = spy.calls[:n_lin], spy.calls[n_lin:]
    for c in prefill:
        assert c["seq_offsets"].tolist() == list(range(11)) and c["adapter_ids"].tolist() == [0] * 10
        g = c["gates"]
        assert g.shape == (10, 8) and ((g != 0).sum(1) == 4).all()
        torch.testing.assert_close(g.sum(1), torch.full((10,), 2.0))  # soft top-4, times alpha / r
    for c in decode:
        assert c["seq_offsets"].tolist() == [0, 1, 2] and ((c["gates"] != 0).sum(1) == 4).all()
    # different tokens pick different experts
    assert len({tuple((c["gates"] != 0).nonzero()[:, 1].tolist()) for c in prefill}) > 1
    # batched rows still equal rows alone
    for i in range(2):
        assert torch.equal(model.generate(input_ids=ids[i:i + 1], max_new_tokens=3, min_new_tokens=3, do_sample=False)[0], out[i])


def test_token_routing_model_matches_standalone_layers():
    """Inside the model, the per-token path equals each MiLoRALinear's own standalone MoE forward."""
    cfg = MiLoRAConfig(r=2, alpha=4, routing="token", experts_per_module=4, top_k=2, gate_mode="hard")
    model, _ = milora_model(seed=4, config=cfg)
    ids = _ids(2, 6, 1)
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    places = {key: (lin._routing_owner, lin.layer_idx, lin.module_idx) for key, lin in model.milora_linears().items()}
    for lin in model.milora_linears().values():
        lin.set_routing(None, -1, -1)  # standalone layers
    try:
        plain = model.base_model(input_ids=ids).logits
    finally:
        for key, lin in model.milora_linears().items():
            lin.set_routing(*places[key])
    torch.testing.assert_close(out.logits, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate_mode", ["soft", "hard"])
def test_prompt_routing_with_several_experts_per_module(monkeypatch, gate_mode):
    E = 3
    cfg = MiLoRAConfig(r=2, alpha=4, experts_per_module=E, top_k=2, gate_mode=gate_mode)
    model, _ = milora_model(seed=5, config=cfg)
    assert model.routers[0].weight.shape == (1, 7, E, 64)
    spy = OpSpy(monkeypatch)
    ids = _ids(3, 5, 2)
    _, gates = generate_with_gates(model, input_ids=ids, max_new_tokens=2, do_sample=False)
    for layer in gates:
        g = torch.stack([x for x in layer if x is not None], 1)  # [B, 7, E]
        on = g != 0
        assert (on.any(-1) == on.all(-1)).all()  # a selected module runs all its experts
        assert (on.any(-1).sum(-1) == 2).all()   # top-2 modules
        mod = g.sum(-1)
        if gate_mode == "soft":
            torch.testing.assert_close(mod.sum(-1), torch.full((3,), 2.0))
        else:
            assert set(mod[on.any(-1)].round(decimals=5).tolist()) == {2.0}
        assert (g[on] > 0).all() and len(set(g[on].tolist())) > 2  # experts mixed non-uniformly
    assert all(c["gates"].shape[1] == E for c in spy.calls)
    # training reaches every expert of the selected modules and the router
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    counts = [int((lin.trainable_parameters_of("default")["lora_b"].grad.abs().sum((-1, -2)) > 0).sum())
              for lin in model.milora_linears().values()]
    assert set(counts) <= {0, E} and E in counts  # all experts of a selected module, none of the others
    assert model.routers[0].trainable_parameters_of("default")["weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("gather_limit", [0, 1 << 22])
def test_several_token_routed_tenants(monkeypatch, gather_limit):
    """Token-routed adapters with different expert counts, k and gate modes share a batch."""
    import milora.layer
    from milora_test_utils import generate_with_gates, randomize_adapter
    monkeypatch.setattr(milora.layer, "TOKEN_ROUTER_GATHER_LIMIT", gather_limit)
    model, _ = milora_model(seed=6, config=MiLoRAConfig(r=2, alpha=4, routing="token", experts_per_module=4, top_k=2),
                            adapter_name="t4")
    model.add_adapter("t2", MiLoRAConfig(r=3, alpha=3, routing="token", experts_per_module=2, top_k=1, gate_mode="hard"))
    model.add_adapter("p", MiLoRAConfig(r=2, alpha=2, top_k=2))
    randomize_adapter(model, "t2", 8)
    randomize_adapter(model, "p", 9)
    names = ["t2", "t4", "p", "base", "t4"]
    ids = _ids(5, 4, 3)
    spy = OpSpy(monkeypatch)
    out = model(input_ids=ids, adapter_names=names)
    g = spy.calls[0]["gates"].view(5, 4, -1)
    assert ((g[0] != 0).sum(-1) == 1).all() and set(g[0].unique().tolist()) == {0.0, 1.0}  # t2: hard top-1
    assert ((g[1] != 0).sum(-1) == 2).all()                                                  # t4: soft top-2
    assert out.aux_loss > 0
    for i, n in enumerate(names):
        alone = model(input_ids=ids[i:i + 1], adapter_names=[n]).logits
        torch.testing.assert_close(out.logits[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    gen = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=3, do_sample=False)
    for i, n in enumerate(names):
        assert torch.equal(model.generate(input_ids=ids[i:i + 1], adapter_names=[n], max_new_tokens=3, do_sample=False)[0], gen[i])
