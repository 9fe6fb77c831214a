"""Adapter isolation: training one adapter never changes another (AdamW weight decay included),
exactly the trained adapter's own Parameters require grad and are counted, serving keeps one
stacked tensor per linear; float32 master weights on a 16-bit base."""
import copy

import pytest
import torch

from milora import MiLoRAConfig, get_milora_model
from milora_test_utils import randomize_adapter, tiny_model


def _batch(seed=0, B=4, L=10, prompt_len=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, L), generator=g)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return ids, labels


def _three_kinds(dtype=torch.float32, **kw):
    """Adapters of every kind: "a" prompt-routed (trained), "t" token-routed, "s" static-like."""
    model = get_milora_model(tiny_model(seed=0, dtype=dtype), MiLoRAConfig(r=4, alpha=8, top_k=3), adapter_name="a", **kw)
    model.add_adapter("t", MiLoRAConfig(r=2, alpha=4, routing="token", experts_per_module=2, top_k=1))
    model.add_adapter("p", MiLoRAConfig(r=6, alpha=6, top_k=2, target_modules=["q_proj", "v_proj"]))
    for i, n in enumerate(("a", "t", "p")):
        randomize_adapter(model, n, 10 + i)
    model.set_adapter("a")
    return model


def _stacks(model):
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in
            ("lora_a", "lora_b", "router_weight", "weight", "pool_query", "rational_num", "rational_den")}


def _slot_views(model, name):
    """Every stack's slot of adapter `name` (copies)."""
    slot = model._slot_of(name)
    return {n: t[slot].clone() for n, t in _stacks(model).items() if t.dim() > 0 and t.shape[0] > slot}


@pytest.mark.parametrize("opt_name", ["adamw", "adamw_fused", "sgd_momentum"])
def test_training_a_never_moves_other_adapters(opt_name):
    model = _three_kinds()
    ids, labels = _batch()
    before = {n: _slot_views(model, n) for n in ("t", "p")}
    with torch.no_grad():
        logits_before = {n: model(input_ids=ids, adapter_names=[n] * 4).logits for n in ("t", "p")}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5, fused=opt_name == "adamw_fused")
           if opt_name.startswith("adamw") else torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.5))
    model.train()
    for step in range(2):
        # a mixed batch: rows of the other adapters too; only "a" trains
        out = model(input_ids=ids, labels=labels, adapter_names=["a", "t", "p", "a"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    for n in ("t", "p"):
        after = _slot_views(model, n)
        for k, v in before[n].items():
            assert torch.equal(after[k], v), (n, k)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, adapter_names=[n] * 4).logits, logits_before[n])
    # "a" did change, and its stack slot follows its Parameters (eval forward = training values)
    own = model.milora_linears()[(0, "q_proj")].trainable_parameters_of("a")
    assert torch.equal(model.milora_linears()[(0, "q_proj")].lora_a[0, :1, :4], own["lora_a"].detach())


def test_trainable_parameters_are_exactly_the_active_adapter(capsys):
    model = _three_kinds()
    for name in ("a", "t", "p"):
        model.set_adapter(name)
        req = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert req and all(n.endswith(f"__{name}") for n, _ in req), [n for n, _ in req][:5]
        total = sum(p.numel() for _, p in req)
        assert total == model.num_adapter_parameters(name) == model.get_nb_trainable_parameters()[0]
        model.print_trainable_parameters()
        assert f"trainable params: {total:,d}" in capsys.readouterr().out
    # "t": per-token routers are its own; "p": only q/v, rank 6; "a": layer routers
    model.set_adapter("p")
    lin = model.milora_linears()[(1, "v_proj")].trainable_parameters_of("p")
    assert tuple(lin["lora_a"].shape) == (1, 6, 64) and not model.milora_linears()[(1, "k_proj")].trainable_parameters_of("p")
    model.set_trainable(False)
    assert not any(p.requires_grad for p in model.parameters())


def test_switching_the_trained_adapter_keeps_values_and_parameter_objects():
    model = _three_kinds()
    ids, labels = _batch(1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    # adding / deleting another adapter keeps the optimizer's Parameters the model's
    model.add_adapter("new", MiLoRAConfig(r=8, alpha=8))
    model.delete_adapter("t")
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, trained)
    model.set_adapter("p")   # "a" stops training: its values stay in its slot
    assert not any(n.endswith("__a") for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, adapter_names=["a"] * 4).logits, trained)


def test_serving_reads_one_stacked_tensor_per_linear(monkeypatch):
    import milora.layer as layer_mod
    model = _three_kinds()
    seen, real = [], layer_mod.gated_lora_linear

    def spy(x, weight, bias, lora_a, lora_b, *args, **kw):
        seen.append((lora_a, lora_b))
        return real(x, weight, bias, lora_a, lora_b, *args, **kw)

    monkeypatch.setattr(layer_mod, "gated_lora_linear", spy)
    ids, _ = _batch(2)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["a", "t", "p", None])
    stacks = {id(t) for lin in model.milora_linears().values() for t in (lin.lora_a, lin.lora_b)}
    assert len(seen) == len(model.milora_linears())  # one op call per linear
    assert all(id(a) in stacks and id(b) in stacks and a.shape[0] == 3 for a, b in seen)  # the stacks themselves


@pytest.mark.parametrize("keep_dtype", [False, True])
def test_bf16_base_float32_master_weights(keep_dtype):
    kw = {"autocast_adapter_dtype": False} if keep_dtype else {}
    model = _three_kinds(torch.bfloat16, **kw)
    lin = model.milora_linears()[(0, "q_proj")]
    own = lin.trainable_parameters_of("a")
    want = torch.bfloat16 if keep_dtype else torch.float32
    assert own["lora_a"].dtype == want and lin.lora_a.dtype == torch.bfloat16
    assert model.routers[0].trainable_parameters_of("a")["weight"].dtype == torch.float32
    ids, labels = _batch(3)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = [lin_.trainable_parameters_of("a")["lora_b"].grad for lin_ in model.milora_linears().values()]
    assert all(g.dtype == want for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    # forward in training mode equals the serving forward (stack = master weights rounded once)
    model.eval()
    with torch.no_grad():
        served = model(input_ids=ids).logits
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, served, atol=0, rtol=0)
    opt.step()
    if not keep_dtype:  # a small update survives in float32 although bf16 would round it away
        assert own["lora_a"].dtype == torch.float32


def test_save_and_load_of_a_trained_adapter_is_exact(tmp_path):
    from milora import MiLoRAModel
    model = _three_kinds(torch.bfloat16)
    ids, labels = _batch(4)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = MiLoRAModel.from_pretrained(tiny_model(seed=0, dtype=torch.bfloat16), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
