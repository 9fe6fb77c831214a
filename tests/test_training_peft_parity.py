"""MiLoRAModel's PEFT-like surface: disable_adapter(), active_adapters, get_base_model / base_model,
push_to_hub's error, and the export / merge methods."""
import pytest
import torch

from milora import MiLoRAConfig, get_milora_model
from milora_test_utils import randomize_adapter, tiny_model


def _ids(seed=0):
    return torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def model():
    m = get_milora_model(tiny_model(seed=4), MiLoRAConfig(r=4, alpha=8, top_k=3), adapter_name="a")
    m.add_adapter("b", MiLoRAConfig(r=2, alpha=4, top_k=7, gate_mode="hard"))
    randomize_adapter(m, "a", 1)
    randomize_adapter(m, "b", 2)
    return m.eval()


def test_disable_adapter_runs_the_base_model(model):
    ids = _ids()
    with torch.no_grad():
        base = tiny_model(seed=4)(input_ids=ids).logits
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
            off_named = model(input_ids=ids, adapter_names=["a", "b"]).logits
            gen = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        back = model(input_ids=ids).logits
    assert not torch.equal(with_adapter, base)
    torch.testing.assert_close(off, base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(off_named, base, atol=1e-6, rtol=1e-6)
    assert torch.equal(gen, tiny_model(seed=4).generate(input_ids=ids, max_new_tokens=3, do_sample=False))
    assert torch.equal(back, with_adapter)  # restored on exit


def test_active_adapters_base_model_and_push_to_hub(model):
    assert model.active_adapters == ["a"]
    model.set_trainable_adapters(["a", "b"])
    assert model.active_adapters == ["a", "b"]
    assert model.get_base_model() is model.base_model and type(model.base_model).__name__ == "LlamaForCausalLM"
    with pytest.raises(NotImplementedError, match="save_pretrained"):
        model.push_to_hub("someone/adapter")


def test_export_and_merge_methods(model, tmp_path):
    peft = pytest.importorskip("peft")
    ids = _ids(1)
    with torch.no_grad():
        want = model(input_ids=ids, adapter_names=["b", "b"]).logits
    with pytest.raises(ValueError, match="routed"):
        model.save_peft_adapter(tmp_path / "a", "a")
    model.save_peft_adapter(tmp_path / "b", "b")
    pm = peft.PeftModel.from_pretrained(tiny_model(seed=4), str(tmp_path / "b")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload("b")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=2e-5, rtol=1e-5)
