"""Behaviour 7: bad input gives clear errors."""
import pytest
import torch
import torch.nn as nn

from milora import MiLoRAConfig, get_milora_model
from milora_test_utils import assert_state_equal, milora_model, snapshot_state, tiny_model, transformers


@pytest.fixture(scope="module")
def model():
    m, _ = milora_model(seed=0)
    return m


def _ids(B=2, L=5):
    return torch.randint(1, 128, (B, L), generator=torch.Generator().manual_seed(0))


def test_unknown_adapter_name(model):
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'.*loaded adapters: \['default'\]"):
        model(input_ids=_ids(), adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.generate(input_ids=_ids(), adapter_names=["nope", "base"], max_new_tokens=2)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter"):
        model.delete_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter"):
        model.save_pretrained("/tmp/never_written", adapter_name="nope")


def test_adapter_names_of_the_wrong_length(model):
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 rows"):
        model(input_ids=_ids(), adapter_names=["default", "base", "default"])
    with pytest.raises(ValueError, match="adapter_names has 1 entries but the batch has 2 rows"):
        model.generate(input_ids=_ids(), adapter_names=["default"], max_new_tokens=2)
    with pytest.raises(ValueError, match="one adapter name"):
        model(input_ids=_ids(), adapter_names="default")


def test_adapter_names_that_are_not_strings(model):
    snap = snapshot_state(model)
    for names in (["default", ["default"]], ["default", {"a": 1}], ["default", 3]):
        with pytest.raises(ValueError, match="unknown adapter .* in adapter_names"):
            model(input_ids=_ids(), adapter_names=names)
        with pytest.raises(ValueError, match="unknown adapter .* in adapter_names"):
            model.generate(input_ids=_ids(), adapter_names=names, max_new_tokens=2)
    assert_state_equal(model, snap)


def test_config_fields_assigned_later_are_checked_before_anything_changes(model):
    cfg = MiLoRAConfig(r=4)
    cfg.top_k = 2 ** 63
    snap = snapshot_state(model)
    with pytest.raises(ValueError, match="MiLoRAConfig.top_k must be an integer"):
        model.add_adapter("huge", cfg)
    assert model.adapter_names == ["default"]
    assert_state_equal(model, snap)
    base = tiny_model(seed=1)
    with pytest.raises(ValueError, match="top_k"):
        get_milora_model(base, cfg)
    assert isinstance(base.model.layers[0].self_attn.q_proj, nn.Linear)


def test_prompt_mask_of_the_wrong_shape(model):
    with pytest.raises(ValueError, match=r"prompt_mask must have shape \(2, 5\)"):
        model(input_ids=_ids(), prompt_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"prompt_mask must have shape \(2, 5\)"):
        model.generate(input_ids=_ids(), prompt_mask=torch.ones(5, 2), max_new_tokens=2)


def test_target_modules_not_found():
    base = tiny_model(seed=1)
    base.model.layers[0].mlp.gate_proj = nn.Identity()
    with pytest.raises(ValueError, match=r"target modules not found in LlamaForCausalLM: model\.layers\.0\.mlp\.gate_proj"):
        get_milora_model(base, MiLoRAConfig())
    assert isinstance(base.model.layers[0].self_attn.q_proj, nn.Linear)  # nothing was wrapped
    # restricting target_modules to what exists works
    m = get_milora_model(base, MiLoRAConfig(target_modules=["q_proj", "v_proj"]))
    assert sorted({k[1] for k in m.milora_linears()}) == ["q_proj", "v_proj"]


def test_model_of_another_structure():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    gpt2 = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no `model.layers`"):
        get_milora_model(gpt2, MiLoRAConfig())


def test_misc_bad_calls(model):
    with pytest.raises(ValueError, match="already has MiLoRA layers"):
        get_milora_model(model.base_model, MiLoRAConfig())
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default")
    with pytest.raises(ValueError, match="reserved"):
        model.add_adapter("base")
    with pytest.raises(TypeError, match="MiLoRAConfig"):
        get_milora_model(tiny_model(), {"r": 4})
