"""Behaviour 5: save / load round trip (JSON + safetensors), clear errors, model unchanged on error."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from milora import MiLoRAConfig, MiLoRAModel
from milora_test_utils import assert_state_equal, milora_model, randomize_adapter, snapshot_state, tiny_model

CONFIGS = {
    "prompt": MiLoRAConfig(r=4, alpha=8, top_k=2, pooler="self_attn", gate_mode="hard"),
    "prompt_e2_gelu_mean": MiLoRAConfig(r=3, alpha=3, experts_per_module=2, activation="gelu", pooler="mean",
                                        target_modules=["q_proj", "o_proj", "up_proj"]),
    "token": MiLoRAConfig(r=2, alpha=4, routing="token", experts_per_module=4, top_k=2),
}


def _ids(seed=0):
    return torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_round_trip_gives_identical_outputs(tmp_path, kind):
    model, ref = milora_model(seed=0, config=CONFIGS[kind])
    pristine = copy.deepcopy(ref)
    ids = _ids()
    want = model(input_ids=ids).logits
    want_gen = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_model.safetensors", "milora_config.json"]
    doc = json.loads((tmp_path / "milora_config.json").read_text())
    assert doc["format"] == "milora" and doc["config"] == CONFIGS[kind].to_dict()
    assert doc["adapter_kind"] == CONFIGS[kind].routing
    loaded = MiLoRAModel.from_pretrained(ref, tmp_path, adapter_name="x")
    assert torch.equal(loaded(input_ids=ids).logits, want)
    assert torch.equal(loaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False), want_gen)
    assert not any(p.requires_grad for p in loaded.parameters())
    # load_adapter into another model next to a second adapter
    other, _ = milora_model(seed=0, config=MiLoRAConfig(r=8, alpha=8), adapter_name="first")
    other.load_adapter(tmp_path, "mine")
    assert torch.equal(other(input_ids=ids, adapter_names=["mine"] * 3).logits, want)
    # saving from the second model gives the same tensors
    other.save_pretrained(tmp_path / "again", adapter_name="mine")
    a, b = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    del pristine


def test_trained_router_parameters_survive(tmp_path):
    model, ref = milora_model(seed=1)
    with torch.no_grad():
        model.routers[0].rational_num[0] += 0.1
        model.routers[1].rational_den[0] -= 0.05
    ids = _ids(1)
    want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    t = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(t["layers.0.router.rational_num"], model.routers[0].rational_num[0].detach())
    assert t["layers.0.q_proj.lora_A"].shape == (1, 4, 64) and t["layers.0.router.q_proj.weight"].shape == (1, 64)
    loaded = MiLoRAModel.from_pretrained(ref, tmp_path)
    assert torch.equal(loaded(input_ids=ids).logits, want)


@pytest.fixture
def saved(tmp_path):
    model, _ = milora_model(seed=2)
    model.save_pretrained(tmp_path / "good")
    target, _ = milora_model(seed=3, adapter_name="keep")
    return tmp_path, target


def _copy_good(tmp_path, name):
    import shutil
    shutil.copytree(tmp_path / "good", tmp_path / name)
    return tmp_path / name


def _edit_json(d, fn):
    doc = json.loads((d / "milora_config.json").read_text())
    fn(doc)
    (d / "milora_config.json").write_text(json.dumps(doc))


def _edit_tensors(d, fn):
    t = load_file(d / "adapter_model.safetensors")
    fn(t)
    save_file(t, d / "adapter_model.safetensors")


def _bad_dirs(tmp_path):
    bad = {}
    d = _copy_good(tmp_path, "no_config"); os.remove(d / "milora_config.json"); bad["no_config"] = (d, FileNotFoundError, "milora_config.json is missing")
    d = _copy_good(tmp_path, "no_weights"); os.remove(d / "adapter_model.safetensors"); bad["no_weights"] = (d, FileNotFoundError, "adapter_model.safetensors is missing")
    d = _copy_good(tmp_path, "truncated")
    raw = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    bad["truncated"] = (d, ValueError, "truncated or corrupt")
    d = _copy_good(tmp_path, "bad_json"); (d / "milora_config.json").write_text('{"format": "milora", '); bad["bad_json"] = (d, ValueError, "not valid JSON")
    d = _copy_good(tmp_path, "shape"); _edit_tensors(d, lambda t: t.__setitem__("layers.1.k_proj.lora_B", torch.zeros(1, 64, 4)))
    bad["shape"] = (d, ValueError, r"layers.1.k_proj.lora_B has shape \(1, 64, 4\), expected \(1, 32, 4\)")
    d = _copy_good(tmp_path, "unknown_key"); _edit_tensors(d, lambda t: t.__setitem__("layers.0.lm_head.lora_A", torch.zeros(1)))
    bad["unknown_key"] = (d, ValueError, "unknown tensor name")
    d = _copy_good(tmp_path, "missing_key"); _edit_tensors(d, lambda t: t.pop("layers.1.router.pool_query"))
    bad["missing_key"] = (d, ValueError, "missing tensor")
    d = _copy_good(tmp_path, "targets"); _edit_json(d, lambda doc: doc["config"].__setitem__("target_modules", ["q_proj", "v_proj"]))
    bad["targets"] = (d, ValueError, "mismatched target modules")
    d = _copy_good(tmp_path, "bad_module"); _edit_json(d, lambda doc: doc["modules"].__setitem__("layers.0.foo_proj", {"rank": 4, "scaling": 2}))
    bad["bad_module"] = (d, ValueError, "bad module key")
    d = _copy_good(tmp_path, "layers"); _edit_json(d, lambda doc: doc["base_model"].__setitem__("num_hidden_layers", 3))
    bad["layers"] = (d, ValueError, "3 decoder layers")
    d = _copy_good(tmp_path, "bad_config"); _edit_json(d, lambda doc: doc["config"].__setitem__("pooler", "attention"))
    bad["bad_config"] = (d, ValueError, "pooler")
    bad["no_dir"] = (tmp_path / "nowhere", FileNotFoundError, "does not exist")
    return bad


def test_bad_files_raise_and_leave_the_model_unchanged(saved):
    tmp_path, target = saved
    ids = _ids(4)
    before_logits = target(input_ids=ids).logits
    snap = snapshot_state(target)
    for name, (d, exc, msg) in _bad_dirs(tmp_path).items():
        with pytest.raises(exc, match=msg):
            target.load_adapter(d, "new")
        assert target.adapter_names == ["keep"], name
        assert_state_equal(target, snap)
        assert torch.equal(target(input_ids=ids).logits, before_logits), name
    # also from_pretrained on a fresh base model leaves it untouched
    base = tiny_model(seed=5)
    base_snap = snapshot_state(base)
    with pytest.raises(ValueError, match="unknown tensor name"):
        MiLoRAModel.from_pretrained(base, tmp_path / "unknown_key")
    assert_state_equal(base, base_snap)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    # a good directory still loads afterwards; a clashing name does not
    target.load_adapter(tmp_path / "good", "new")
    with pytest.raises(ValueError, match="already exists"):
        target.load_adapter(tmp_path / "good", "keep")


def test_model_with_missing_module_is_rejected(saved):
    tmp_path, _ = saved
    base = tiny_model(seed=6)
    import torch.nn as nn
    base.model.layers[1].mlp.down_proj = nn.Identity()
    with pytest.raises(ValueError, match=r"target modules not found.*model\.layers\.1\.mlp\.down_proj"):
        MiLoRAModel.from_pretrained(base, tmp_path / "good")


# ---- installing is all or nothing (issue 8 point 6, issue 10 points 2 and 9) ----------------------


def _fail_on_call(monkeypatch, cls, name, n):
    """Make cls.name raise on its n-th call (1-based)."""
    real = getattr(cls, name)
    calls = {"n": 0}

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("injected failure")
        return real(self, *a, **kw)

    monkeypatch.setattr(cls, name, flaky)


def _base_layout(base):
    """Everything about a base model except its tensors (compared with snapshot_state)."""
    return dict(grad={n: p.requires_grad for n, p in base.named_parameters()},
                modules=[(n, type(m).__name__) for n, m in base.named_modules()],
                params=[id(p) for p in base.parameters()],
                hooks=sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in base.modules()))


@pytest.mark.parametrize("site", [("MiLoRALinear", "add_adapter", 9), ("PromptRouter", "add_slot", 2),
                                  ("MiLoRALinear", "set_adapter_tensors", 3)])
def test_a_failed_load_leaves_model_and_base_bit_identical(tmp_path, monkeypatch, site):
    import milora
    src, _ = milora_model(seed=4, config=CONFIGS["prompt"])  # the same base weights as `model`
    src.save_pretrained(tmp_path / "full")
    # a model that adapts q_proj only: loading the 7-module adapter wraps 6 more linears per layer
    model, _ = milora_model(seed=4, config=MiLoRAConfig(r=2, alpha=4, target_modules=["q_proj"]))
    model.train()
    ids = _ids(5)
    before_out = model(input_ids=ids).logits.detach()
    snap, base_snap, layout = snapshot_state(model), snapshot_state(model.base_model), _base_layout(model.base_model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    ids_of_params = [id(p) for p in model.parameters()]
    cls = getattr(milora, site[0])
    with monkeypatch.context() as mp:
        _fail_on_call(mp, cls, site[1], site[2])
        with pytest.raises(RuntimeError, match="injected failure"):
            model.load_adapter(tmp_path / "full", "full")
    assert_state_equal(model, snap)
    assert _base_layout(model.base_model) == layout
    assert_state_equal(model.base_model, base_snap)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert [id(p) for p in model.parameters()] == ids_of_params
    assert model.adapter_names == ["default"] and len(model.milora_linears()) == 2
    assert torch.equal(model(input_ids=ids).logits.detach(), before_out)
    # later loads work
    model.load_adapter(tmp_path / "full", "full")
    model.eval()
    want = src.eval()(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids, adapter_names=["full"] * 3).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entry", ["from_pretrained", "from_peft"])
@pytest.mark.parametrize("bad", ["name_base", "name_empty", "install"])
def test_from_files_leave_the_base_model_untouched_on_failure(tmp_path, monkeypatch, entry, bad):
    import milora
    src, _ = milora_model(seed=5, config=CONFIGS["prompt"])
    if entry == "from_pretrained":
        src.save_pretrained(tmp_path)
    else:
        peft = pytest.importorskip("peft")
        pm = peft.get_peft_model(tiny_model(seed=5), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_()
        pm.save_pretrained(tmp_path)
    base = tiny_model(seed=6)
    snap, layout = snapshot_state(base), _base_layout(base)
    load = getattr(MiLoRAModel, entry)
    name = {"name_base": "base", "name_empty": "", "install": "ok"}[bad]
    with monkeypatch.context() as mp:
        if bad == "install":
            _fail_on_call(mp, milora.MiLoRALinear, "set_adapter_tensors", 2)
        with pytest.raises((ValueError, RuntimeError)):
            load(base, tmp_path, adapter_name=name)
    assert _base_layout(base) == layout
    assert_state_equal(base, snap)
    assert load(base, tmp_path, adapter_name="ok").adapter_names == ["ok"]  # and it still loads
