"""Behaviour 6: PEFT LoRA adapters import exactly (single adapter and PEFT's adapter_names mixed batch)."""
import copy
import json
import os

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is a test-only dependency")

from milora import MiLoRAModel, get_milora_model, MiLoRAConfig  # noqa: E402
from milora_test_utils import OpSpy, assert_state_equal, forward_gates, snapshot_state, tiny_model  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_CONFIGS = {
    "p1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "p2": dict(r=8, lora_alpha=4, target_modules=ALL, use_rslora=True),
    "p3": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj", "o_proj"],
               rank_pattern={"q_proj": 2, "model.layers.1.mlp.up_proj": 6}, alpha_pattern={"k_proj": 3},
               layers_to_transform=[1]),
}


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    base = tiny_model(seed=11)
    pristine = copy.deepcopy(base)
    pm = None
    for name, kw in PEFT_CONFIGS.items():
        cfg = peft.LoraConfig(init_lora_weights=False, **kw)
        if pm is None:
            pm = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    pm.eval()
    dirs = {}
    for name in PEFT_CONFIGS:
        d = root / name
        pm.save_pretrained(d, selected_adapters=[name])
        sub = d / name
        dirs[name] = sub if (sub / "adapter_config.json").exists() else d
    return pm, pristine, dirs


def _ids(seed=0, B=4, L=7):
    return torch.randint(1, 128, (B, L), generator=torch.Generator().manual_seed(seed))


def test_files_are_standard_peft(peft_setup):
    _, _, dirs = peft_setup
    for name, d in dirs.items():
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(d))
        from safetensors.torch import load_file
        keys = load_file(d / "adapter_model.safetensors").keys()
        assert all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in keys)
        assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_single_adapter_matches_peft(peft_setup, name):
    pm, pristine, dirs = peft_setup
    model = MiLoRAModel.from_peft(copy.deepcopy(pristine), dirs[name], adapter_name=name)
    info = model.adapters[name]
    assert info.kind == "static"
    ids = _ids(1)
    pm.set_adapter(name)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        got = model(input_ids=ids).logits
        base = pristine(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # B is non-zero: the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # every adapted module on with gate alpha / r (rank_pattern / alpha_pattern / rslora honoured)
    gates = forward_gates(model, input_ids=ids[:1])
    kw = PEFT_CONFIGS[name]
    for (i, m), lin in model.milora_linears().items():
        g = gates[i][lin.module_idx]
        if (i, m) in info.modules:
            key = f"model.layers.{i}.{'self_attn' if m in ALL[:4] else 'mlp'}.{m}"
            r = next((v for k, v in kw.get("rank_pattern", {}).items() if key.endswith(k)), kw["r"])
            a = next((v for k, v in kw.get("alpha_pattern", {}).items() if key.endswith(k)), kw["lora_alpha"])
            s = a / (r ** 0.5 if kw.get("use_rslora") else r)
            assert g.item() == pytest.approx(s)
        else:
            assert g.item() == 0.0


def test_mixed_batch_matches_peft_adapter_names(peft_setup, monkeypatch):
    pm, pristine, dirs = peft_setup
    model = get_milora_model(copy.deepcopy(pristine), MiLoRAConfig(target_modules=ALL), adapter_name=None)
    for name, d in dirs.items():
        model.load_peft_adapter(d, name)
    model.eval()
    names = ["p1", "p2", "base", "p3", "p2", "p1"]
    ids = _ids(2, B=len(names))
    with torch.no_grad():
        want = pm(input_ids=ids, adapter_names=[n if n != "base" else "__base__" for n in names]).logits
        spy = OpSpy(monkeypatch)
        got = model(input_ids=ids, adapter_names=names).logits
    assert len(spy.calls) == len(model.milora_linears())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # generation agrees with PEFT row by row
    out = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, do_sample=False)
    for i, n in enumerate(names):
        if n == "base":
            with pm.disable_adapter():
                alone = pm.generate(input_ids=ids[i:i + 1], max_new_tokens=4, do_sample=False)
        else:
            pm.set_adapter(n)
            alone = pm.generate(input_ids=ids[i:i + 1], max_new_tokens=4, do_sample=False)
        assert torch.equal(alone[0], out[i])


def test_imported_adapter_round_trips_through_milora_format(peft_setup, tmp_path):
    pm, pristine, dirs = peft_setup
    model = MiLoRAModel.from_peft(copy.deepcopy(pristine), dirs["p3"], adapter_name="p3")
    ids = _ids(3)
    want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    again = MiLoRAModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    assert torch.equal(again(input_ids=ids).logits, want)


def test_unsupported_peft_options_are_rejected(peft_setup, tmp_path):
    _, pristine, dirs = peft_setup
    model = get_milora_model(copy.deepcopy(pristine), MiLoRAConfig(), adapter_name="keep")
    snap = snapshot_state(model)
    import shutil
    for field, value, msg in [("use_dora", True, "use_dora"), ("peft_type", "IA3", "peft_type"),
                              ("modules_to_save", ["lm_head"], "modules_to_save"), ("r", 5, "rank 4 but the config says r=5")]:
        d = tmp_path / field
        shutil.copytree(dirs["p1"], d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg[field] = value
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=msg):
            model.load_peft_adapter(d, "bad")
        assert model.adapter_names == ["keep"]
        assert_state_equal(model, snap)


def test_loading_wraps_modules_the_model_did_not_adapt_yet(peft_setup):
    pm, pristine, dirs = peft_setup
    model = get_milora_model(copy.deepcopy(pristine), MiLoRAConfig(r=2, alpha=2, target_modules=["k_proj"]), adapter_name="own")
    assert sorted({m for _, m in model.milora_linears()}) == ["k_proj"]
    model.load_peft_adapter(dirs["p1"], "p1")  # q_proj, v_proj, down_proj get wrapped now
    assert sorted({m for _, m in model.milora_linears()}) == ["down_proj", "k_proj", "q_proj", "v_proj"]
    model.eval()
    ids = _ids(5, B=3)
    pm.set_adapter("p1")
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        got = model(input_ids=ids, adapter_names=["p1", "own", "p1"]).logits
        own = model(input_ids=ids[1:2], adapter_names=["own"]).logits
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:2], own, rtol=1e-5, atol=1e-5)
