"""Decode steps reuse what the layer handed the op at the previous step of the same prompt
(MiLoRALinear._routed_args): the same logits as the path that reads everything again, and
nothing stale after a stack is replaced, trained or the mode changes."""
import copy

import pytest
import torch

from milora import MiLoRAConfig
from milora.routing import attach_gates, gates_of
from milora.layer import MiLoRALinear
from milora_test_utils import OpSpy, milora_model, randomize_adapter

NAMES = ["b", "default", "base"]


@pytest.fixture()
def model():
    m, _ = milora_model(seed=0)
    m.add_adapter("b", MiLoRAConfig(r=8, alpha=16, top_k=2))
    randomize_adapter(m, "b", 5)
    m.eval()
    return m


def _ids(seed=0):
    return torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(seed))


def _forget_kept_args(model):
    """Pre-hooks that drop every linear's kept arguments: each forward reads everything again."""
    def drop(mod, args):
        mod._routed_args = None
    return [lin.register_forward_pre_hook(drop) for lin in model.milora_linears().values()]


def _decode(model, steps=4, seed=0):
    """Prefill + `steps` greedy decode steps through forward(cache=...); the logits of each."""
    ids = _ids(seed)
    out = model(input_ids=ids, use_cache=True, adapter_names=NAMES)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=nxt, cache=out.cache, use_cache=True, adapter_names=NAMES)
        logits.append(out.logits[:, -1])
    return torch.stack(logits), out


def test_kept_arguments_give_the_logits_of_the_full_path(model, monkeypatch):
    calls = {"routed": 0}
    real = MiLoRALinear._forward_routed

    def counting(self, *a, **kw):
        calls["routed"] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(MiLoRALinear, "_forward_routed", counting)
    spy = OpSpy(monkeypatch)  # the kept path still calls the (patchable) module-level op
    with torch.no_grad():
        kept, _ = _decode(model)
        n_kept, n_ops = calls["routed"], len(spy.calls)
        hooks = _forget_kept_args(model)
        try:
            calls["routed"] = 0
            spy.reset()
            full, _ = _decode(model)
        finally:
            for h in hooks:
                h.remove()
    assert torch.equal(kept, full)
    assert len(spy.calls) == n_ops > 0
    n = len(model.milora_linears())
    # prefill and the first decode step (new offsets) read everything; steps 2-4 reuse it
    assert n_kept == 2 * n and calls["routed"] == 5 * n


def _copy(cache):
    """A copy of a KV cache that holds the same prompt gates (the same PromptGates object)."""
    c = copy.deepcopy(cache)
    attach_gates(c, gates_of(cache))
    return c


def test_a_replaced_or_rewritten_stack_is_read_at_the_next_step(model):
    with torch.no_grad():
        _, out = _decode(model, steps=2)  # the kept arguments are in use from here on
        nxt = out.logits[:, -1:].argmax(-1)
        step = lambda: model(input_ids=nxt, cache=_copy(out.cache), use_cache=True, adapter_names=NAMES).logits  # noqa: E731
        for lin in model.milora_linears().values():
            lin.lora_b = lin.lora_b * 3  # a new tensor object (like load_state_dict(assign=True))
        lin = model.milora_linears()[(0, "q_proj")]
        lin.lora_a.mul_(-1)  # in place: the same object, new values
        got = step()
        hooks = _forget_kept_args(model)
        try:
            want = step()
        finally:
            for h in hooks:
                h.remove()
        # and the changed adapters matter at all
        for lin in model.milora_linears().values():
            lin.lora_b = lin.lora_b / 3
        before = step()
    assert torch.equal(got, want)
    assert not torch.allclose(got, before)


def test_autograd_and_training_dropout_never_use_kept_arguments():
    m, _ = milora_model(seed=0, dropout=0.5)
    ids = _ids(1)[:, :4]
    with torch.no_grad():
        m(input_ids=ids, use_cache=True, adapter_names=["default"] * 3)
    lins = list(m.milora_linears().values())
    assert all(lin._routed_args is not None for lin in lins)
    m.train()
    torch.manual_seed(0)
    with torch.no_grad():  # dropout applies in training mode, with or without autograd
        a = m(input_ids=ids, adapter_names=["default"] * 3).logits
        b = m(input_ids=ids, adapter_names=["default"] * 3).logits
    assert not torch.equal(a, b)
    for lin in lins:
        lin._routed_args = None
    m.eval()
    out = m(input_ids=ids, adapter_names=["default"] * 3)  # autograd on: nothing kept
    assert all(lin._routed_args is None for lin in lins)
    out.logits.sum().backward()
    grads = [p.grad for lin in lins for p in lin.trainable_parameters_of("default").values()]
    assert grads and all(g is not None for g in grads)
