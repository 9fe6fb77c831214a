"""Helpers of the adversarial-file tests: a good MiLoRA directory, a hand-written PEFT directory,
and small editors. Kept out of conftest so that only the tests that use them import them."""
import json
import shutil

import torch
from safetensors.torch import load_file, save_file

# tiny_model: hidden 64, intermediate 128, 4 heads of 16, 2 KV heads -> k/v out 32
PEFT_MODULES = [("self_attn", "q_proj", 64, 64), ("self_attn", "v_proj", 64, 32), ("mlp", "down_proj", 128, 64)]


def peft_key(i, parent, module, ab):
    return f"base_model.model.model.layers.{i}.{parent}.{module}.lora_{ab}.weight"


def write_peft_dir(d, ranks=None, **cfg_over):
    """A PEFT LoRA directory for tiny_model (2 layers; q, v, down), written without peft.
    ranks: {(layer, module): r} overrides of r = 4."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    t = {}
    for i in range(2):
        for parent, m, K, N in PEFT_MODULES:
            r = (ranks or {}).get((i, m), 4)
            t[peft_key(i, parent, m, "A")] = torch.randn(r, K, generator=g) * 0.2
            t[peft_key(i, parent, m, "B")] = torch.randn(N, r, generator=g) * 0.2
    save_file(t, d / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
           "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
           "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "task_type": "CAUSAL_LM"}
    cfg.update(cfg_over)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_json(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def edit_tensors(path, fn):
    t = load_file(path)
    fn(t)
    save_file(t, path)
