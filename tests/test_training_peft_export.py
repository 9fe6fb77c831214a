"""PEFT parity: export to PEFT's format (PeftModel.from_pretrained gives the same logits), merge_and_unload,
unload; routed adapters are refused with a clear error."""
import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is a test-only dependency")

from milora import MiLoRAConfig, MiLoRAModel, get_milora_model  # noqa: E402
from milora.peft_export import merge_and_unload, save_peft_adapter, unload  # noqa: E402
from milora_test_utils import randomize_adapter, tiny_model  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids(seed=0, B=3, L=7):
    return torch.randint(1, 128, (B, L), generator=torch.Generator().manual_seed(seed))


PEFT_SOURCES = {
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"model.layers.1.mlp.up_proj": 3}),
    "one_layer_rslora": dict(r=2, lora_alpha=5, target_modules=["k_proj", "o_proj"], layers_to_transform=[1],
                             use_rslora=True),
}


@pytest.fixture(scope="module", params=list(PEFT_SOURCES))
def peft_dir(tmp_path_factory, request):
    """A PEFT LoRA (random A and B) saved by PEFT itself."""
    d = tmp_path_factory.mktemp("peft_src")
    base = tiny_model(seed=3)
    cfg = peft.LoraConfig(init_lora_weights=False, **PEFT_SOURCES[request.param])
    pm = peft.get_peft_model(base, cfg).eval()
    pm.save_pretrained(d)
    with torch.no_grad():
        logits = pm(input_ids=_ids()).logits
    return d, logits


def _peft_logits(directory, seed=3):
    pm = peft.PeftModel.from_pretrained(tiny_model(seed=seed), str(directory)).eval()
    with torch.no_grad():
        return pm(input_ids=_ids()).logits


def test_imported_peft_adapter_round_trips_through_peft(peft_dir, tmp_path):
    src, want = peft_dir
    model = MiLoRAModel.from_peft(tiny_model(seed=3), src, adapter_name="imp")
    save_peft_adapter(model, tmp_path / "out", "imp")
    doc = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert doc["peft_type"] == "LORA" and not doc["use_rslora"]
    if len({r for r, _ in model.adapters["imp"].modules.values()}) > 1:
        assert doc["rank_pattern"] and doc["alpha_pattern"]
    got = _peft_logits(tmp_path / "out")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, want, atol=1e-5, rtol=1e-5)
    # and milora reads its own export back to the same adapter
    again = MiLoRAModel.from_peft(tiny_model(seed=3), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=_ids()).logits, want, atol=1e-5, rtol=1e-5)


def test_constantly_routed_adapter_exports_as_plain_lora(tmp_path):
    """experts_per_module=1, hard gates, top_k = every module: plain LoRA whatever the router says."""
    base = tiny_model(seed=5)
    cfg = MiLoRAConfig(r=4, alpha=8, top_k=7, gate_mode="hard", target_modules=ALL)
    model = get_milora_model(base, cfg, adapter_name="a").eval()
    randomize_adapter(model, "a", seed=9)
    with torch.no_grad():
        want = model(input_ids=_ids()).logits
        base_logits = tiny_model(seed=5)(input_ids=_ids()).logits
    assert (want - base_logits).abs().max() > 1e-2  # the adapter matters
    save_peft_adapter(model, tmp_path, "a")
    torch.testing.assert_close(_peft_logits(tmp_path, seed=5), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_k=7, gate_mode="soft"),
                                dict(routing="token", experts_per_module=2, top_k=1)])
def test_routed_adapters_are_refused_clearly(kw, tmp_path):
    model = get_milora_model(tiny_model(seed=1), MiLoRAConfig(r=4, alpha=8, **kw), adapter_name="r")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="routed.*cannot\\s+represent|cannot represent"):
        save_peft_adapter(model, tmp_path, "r")
    with pytest.raises(ValueError, match="save_pretrained"):
        merge_and_unload(model, "r")
    assert not any(tmp_path.iterdir())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed


def test_merge_and_unload_static_equals_adapter(peft_dir):
    src, want = peft_dir
    model = MiLoRAModel.from_peft(tiny_model(seed=3), src, adapter_name="imp")
    model.add_adapter("other", MiLoRAConfig(r=2, alpha=4))
    model.set_adapter("imp")
    merged = merge_and_unload(model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert all(type(m).__name__ != "MiLoRALinear" for m in merged.modules())
    assert not any(h for m in merged.modules() for h in (m._forward_pre_hooks, m._forward_hooks))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=_ids()).logits, want, atol=2e-5, rtol=1e-5)


def test_merge_and_unload_bf16_base_rounds_once(peft_dir):
    src, want = peft_dir
    model = MiLoRAModel.from_peft(tiny_model(seed=3, dtype=torch.bfloat16), src, adapter_name="imp")
    i, m = max(model.adapters["imp"].modules)
    lin = model.milora_linears()[(i, m)]
    W = lin.weight.detach().float().clone()
    t = lin.get_adapter_tensors("imp")
    s = lin.slots[lin.adapter_slots["imp"]].scaling
    expect = (W + s * (t["lora_B"][0].float() @ t["lora_A"][0].float())).to(torch.bfloat16)
    merged = merge_and_unload(model, "imp")
    parent = getattr(merged.model.layers[i], "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn")
    assert torch.equal(getattr(parent, m).weight, expect)


def test_unload_gives_back_the_base_model():
    base = tiny_model(seed=2)
    ref = copy.deepcopy(base)
    model = get_milora_model(base, MiLoRAConfig(r=4, alpha=8))
    randomize_adapter(model, "default", 1)
    plain = unload(model)
    assert plain is base and all(type(m).__name__ != "MiLoRALinear" for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=_ids()).logits, ref(input_ids=_ids()).logits, atol=0, rtol=0)
