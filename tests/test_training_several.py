"""Several adapters trained at once: one mixed batch, each adapter learns from its own rows only,
with gradients equal to training it alone on its rows (per-adapter loss normalisation)."""
import pytest
import torch

from milora import MiLoRAConfig, get_milora_model
from milora_test_utils import randomize_adapter, tiny_model


def _model(kinds=("prompt", "prompt")):
    cfgs = {"prompt": MiLoRAConfig(r=4, alpha=8, top_k=3, load_balance_coef=0.1),
            "static_like": MiLoRAConfig(r=2, alpha=4, top_k=7, gate_mode="hard")}
    model = get_milora_model(tiny_model(seed=0), cfgs[kinds[0]], adapter_name="a")
    model.add_adapter("b", cfgs[kinds[1]])
    model.add_adapter("frozen", MiLoRAConfig(r=2, alpha=4))
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


@pytest.mark.parametrize("kinds", [("prompt", "prompt"), ("prompt", "static_like")])
def test_each_adapter_gets_the_gradient_of_training_it_alone(kinds):
    model = _model(kinds)
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
