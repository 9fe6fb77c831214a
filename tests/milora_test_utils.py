"""Shared helpers of the module-layer tests: tiny random HF models and adapter randomisation."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import milora  # noqa: E402
from milora import MiLoRAConfig, get_milora_model  # noqa: E402

VOCAB = 128


def tiny_config(family="llama", **kw):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    common.update(kw)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    raise ValueError(family)


def tiny_model(family="llama", seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
    }[family]
    model = cls(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def randomize_adapter(model, name, seed=0, scale=0.5):
    """Give adapter `name` random non-zero LoRA A and B (and routers) so that it matters."""
    g = torch.Generator().manual_seed(seed)
    p = model._slot_of(name)
    info = model.adapters[name]
    with torch.no_grad():
        for (i, m), (r, _) in info.modules.items():
            lin = model._linears[(i, m)]
            E = info.config.experts_per_module
            a = torch.randn(E, r, lin.in_features, generator=g) * scale / lin.in_features ** 0.5
            b = torch.randn(E, lin.out_features, r, generator=g) * scale / r ** 0.5
            lin.lora_a[p, :E, :r] = a.to(lin.lora_a.dtype)
            lin.lora_b[p, :E, :, :r] = b.to(lin.lora_b.dtype)
            if info.kind == "token":
                lin.router_weight[p, :E] = torch.randn(E, lin.in_features, generator=g)
        if info.kind == "prompt":
            for r_ in model.routers:
                r_.weight[p] = torch.randn(r_.weight[p].shape, generator=g)
                r_.pool_query[p] = torch.randn(r_.pool_query[p].shape, generator=g) * 0.1


def milora_model(family="llama", seed=0, config=None, adapter_name="default", randomize=True, dtype=torch.float32, **kw):
    base = tiny_model(family, seed, dtype=dtype)
    ref = copy.deepcopy(base)
    cfg = config if config is not None else MiLoRAConfig(r=4, alpha=8, top_k=3, **kw)
    model = get_milora_model(base, cfg, adapter_name=adapter_name)
    if randomize and adapter_name is not None:
        randomize_adapter(model, adapter_name, seed + 1)
    model.eval()
    return model, ref


class OpSpy:
    """Counts calls of the op by the module layer and records their arguments."""

    def __init__(self, monkeypatch):
        import milora.layer as layer_mod
        self.calls = []
        real = layer_mod.gated_lora_linear

        def spy(x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates, **kw):
            self.calls.append(dict(x_shape=tuple(x.shape), weight=weight, seq_offsets=seq_offsets.clone(),
                                   adapter_ids=adapter_ids.clone(), gates=gates.detach().clone(), gates_obj=gates))
            return real(x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates, **kw)

        monkeypatch.setattr(layer_mod, "gated_lora_linear", spy)

    def reset(self):
        self.calls.clear()


def count_router_calls(model):
    counter = {"n": 0}

    def hook(mod, args, kwargs, out):
        counter["n"] += 1

    handles = [r.register_forward_hook(hook, with_kwargs=True) for r in model.routers]
    return counter, handles


def generate_with_gates(model, **kw):
    """model.generate(**kw) and the gates stored with its KV cache: ([B, ...] tokens,
    gates[layer][module] = [B, E] tensor or None)."""
    out = model.generate(return_dict_in_generate=True, **kw)
    gates = milora.gates_of(out.cache)
    assert gates is not None, "generate's KV cache carries no MiLoRA gates"
    return out.sequences, [list(layer) for layer in gates.per_layer]


def forward_gates(model, **kw):
    """The gates a prompt forward computes (stored with its KV cache)."""
    out = model(use_cache=True, **kw)
    gates = milora.gates_of(out.cache)
    assert gates is not None
    return [list(layer) for layer in gates.per_layer]


def snapshot_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, snap):
    now = model.state_dict()
    assert set(now) == set(snap)
    for k, v in snap.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k
