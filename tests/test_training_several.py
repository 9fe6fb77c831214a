"""Several adapters trained at once: one mixed batch, each adapter learns from its own rows only,
with gradients equal to training it alone on its rows (per-adapter loss normalisation)."""
import pytest
import torch

from milora import MiLoRAConfig, get_milora_model
from milora_test_utils import randomize_adapter, tiny_model


CONFIGS = {"prompt": MiLoRAConfig(r=4, alpha=8, top_k=3, load_balance_coef=0.1),
           "static_like": MiLoRAConfig(r=2, alpha=4, top_k=7, gate_mode="hard"),
           "token": MiLoRAConfig(r=4, alpha=8, routing="token", experts_per_module=3, top_k=2, load_balance_coef=0.1),
           "token_hard": MiLoRAConfig(r=2, alpha=4, routing="token", experts_per_module=2, top_k=1, gate_mode="hard",
                                      load_balance_coef=0.3, target_modules=["q_proj", "v_proj", "up_proj"])}


def _model(kinds=("prompt", "prompt"), frozen="prompt"):
    model = get_milora_model(tiny_model(seed=0), CONFIGS[kinds[0]], adapter_name="a")
    model.add_adapter("b", CONFIGS[kinds[1]])
    model.add_adapter("frozen", MiLoRAConfig(r=2, alpha=4, routing=frozen, experts_per_module=2))
    for i, n in enumerate(("a", "b", "frozen")):
        randomize_adapter(model, n, 20 + i)
    model.set_trainable_adapters(["a", "b"])
    model.train()
    return model


def _rows(seed=0, B=6, L=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, L), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100  # rows with different numbers of target tokens
    return ids, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("kinds,frozen", [
    (("prompt", "prompt"), "prompt"), (("prompt", "static_like"), "prompt"),
    # token-routed: each adapter's Switch loss over its own tokens (not pooled with the other
    # trained adapter's, nor with a frozen token-routed adapter's tokens)
    (("token", "token_hard"), "token"), (("token", "prompt"), "token"), (("prompt", "token_hard"), "prompt")])
def test_each_adapter_gets_the_gradient_of_training_it_alone(kinds, frozen):
    model = _model(kinds, frozen)
    ids, labels = _rows()
    names = ["a", "b", "a", "frozen", "b", "a"]
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    assert params == {n for n in params if n.endswith(("__a", "__b"))} and any(n.endswith("__b") for n in params)
    out = model(input_ids=ids, labels=labels, adapter_names=names)
    out.loss.backward()
    mixed = _grads(model)
    for adapter in ("a", "b"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        model.zero_grad()
        model.set_trainable_adapters(None)
        model.set_adapter(adapter)   # train it alone: the ordinary single-adapter forward
        alone = model(input_ids=ids[rows], labels=labels[rows])
        alone.loss.backward()
        got = _grads(model)
        assert got and all(n.endswith(f"__{adapter}") for n in got)
        assert set(got) == {n for n in mixed if n.endswith(f"__{adapter}")}
        assert any("router" in n and float(g.abs().max()) > 0 for n, g in got.items())  # the routers learn too
        for n, g in got.items():
            torch.testing.assert_close(mixed[n], g, rtol=1e-4, atol=1e-6)
        model.set_trainable_adapters(["a", "b"])
    # the loss is the sum of each adapter's own loss
    assert torch.isfinite(out.loss) and out.aux_loss.dim() == 0


def test_several_adapters_each_with_its_own_optimizer_state():
    model = _model()
    ids, labels = _rows(1)
    names = ["a", "b", "a", "frozen", "b", "a"]
    frozen = model.milora_linears()[(0, "q_proj")].get_adapter_tensors("frozen")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(3):
        out = model(input_ids=ids, labels=labels, adapter_names=names)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]
    assert len(opt.state) == sum(1 for p in model.parameters() if p.requires_grad)  # a's and b's own states
    after = model.milora_linears()[(0, "q_proj")].get_adapter_tensors("frozen")
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert model.active_adapters == ["a", "b"]


def test_a_batch_holding_one_trained_adapter_is_still_normalised_per_adapter():
    """Rows of a frozen adapter never count, also when only one trained adapter (or none) is in the batch."""
    model = _model(("prompt", "token"))
    ids, labels = _rows(2)
    names = ["a", "frozen", "a", "frozen", "frozen", "a"]
    model(input_ids=ids, labels=labels, adapter_names=names).loss.backward()
    mixed = _grads(model)
    assert all(n.endswith("__a") for n, g in mixed.items() if float(g.abs().max()) > 0)  # b's, if any, are 0
    model.zero_grad()
    model.set_trainable_adapters(None)
    model.set_adapter("a")
    rows = [0, 2, 5]
    model(input_ids=ids[rows], labels=labels[rows]).loss.backward()
    alone = _grads(model)
    assert alone and set(alone) == {n for n in mixed if n.endswith("__a")}
    for n, g in alone.items():
        torch.testing.assert_close(mixed[n], g, rtol=1e-4, atol=1e-6)
    model.zero_grad()
    model.set_trainable_adapters(["a", "b"])
    out = model(input_ids=ids[[1, 3]], labels=labels[[1, 3]], adapter_names=["frozen", "frozen"])
    out.loss.backward()  # nothing trained in the batch: a zero loss, zero gradients
    assert float(out.loss.detach()) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.grad is not None)
