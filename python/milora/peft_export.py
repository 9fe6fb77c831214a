"""Ways out of milora, as PEFT users expect them: export to PEFT's own format, merge into the base
weights, unload.

Only adapters whose output does not depend on the input through a router can leave milora:
  * "static" adapters (imported PEFT LoRA, or any adapter installed without a router): module m
    adds gate_m * B_m A_m x with a constant gate (alpha / r, split evenly over E experts);
  * routed adapters whose routing is a constant: one expert per module, gate_mode "hard" and
    top_k covering every adapted module (prompt routing) or top_k >= 1 (token routing): every
    module is on with gate 1 * alpha / r, i.e. plain LoRA whatever the router computes.
Other prompt- or token-routed adapters switch modules / experts per prompt or per token, which a
PEFT LoRA adapter (and a single merged weight) cannot represent: they are refused with an error
that says so and what to use instead.

E experts with constant gates g_e become one LoRA of rank E * r: B' = [g_1 B_1 ... g_E B_E],
A' = [A_1; ...; A_E] (exact up to rounding).

The functions take a MiLoRAModel and use its public adapter surface (`adapters`, the file-format
tensors of `MiLoRAModel.adapter_spec`); file I/O uses JSON + safetensors only.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .config import MODULE_NAMES, MODULE_PARENTS

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def _module_key(i: int, m: str) -> str:
    return f"model.layers.{i}.{MODULE_PARENTS[m]}.{m}"


def _adapter_name(model, adapter_name: Optional[str], what: str) -> str:
    name = adapter_name if adapter_name is not None else model.active_adapter
    if name is None:
        raise ValueError(f"{what}: no active adapter; pass adapter_name (loaded adapters: {list(model.adapters)})")
    if name not in model.adapters:
        raise ValueError(f"{what}: unknown adapter {name!r}; loaded adapters: {list(model.adapters)}")
    return name


def constant_expert_gates(model, adapter_name: str, what: str) -> Tensor:
    """The constant per-expert gate multipliers [E] (without alpha / r) of a static or
    constantly-routed adapter; a ValueError saying why otherwise."""
    info = model.adapters[adapter_name]
    cfg = info.config
    E = cfg.experts_per_module
    if info.kind == "static":
        return torch.full((E,), 1.0 / E, dtype=torch.float64)
    n_mods = len({m for (_, m) in info.modules})
    constant = E == 1 and cfg.gate_mode == "hard" and (info.kind == "token" or cfg.top_k >= n_mods)
    if constant:
        return torch.ones(1, dtype=torch.float64)
    raise ValueError(
        f"{what}: adapter {adapter_name!r} is {info.kind}-routed (routing={cfg.routing!r}, top_k={cfg.top_k}, "
        f"gate_mode={cfg.gate_mode!r}, experts_per_module={E}): its router switches modules/experts per "
        f"{'prompt' if info.kind == 'prompt' else 'token'}, which a PEFT LoRA adapter or a merged weight cannot "
        f"represent. Keep it in milora (save_pretrained / MiLoRAModel.from_pretrained). Only static adapters "
        f"(imported PEFT LoRA) and adapters whose routing is constant (experts_per_module=1, gate_mode='hard', "
        f"top_k covering every adapted module) can be exported or merged.")


def plain_lora_factors(model, adapter_name: str, what: str = "MiLoRA") -> Dict[Tuple[int, str], Tuple[Tensor, Tensor, float]]:
    """(layer, module) -> (A [r', K], B [N, r'], scaling) such that the adapter adds
    scaling * B @ A @ x at that module, exactly (r' = E * r). Float32 or the adapter's dtype."""
    w = constant_expert_gates(model, adapter_name, what)
    info = model.adapters[adapter_name]
    tensors = model.adapter_spec(adapter_name).tensors
    out = {}
    for (i, m), (r, scaling) in sorted(info.modules.items()):
        a = tensors[f"layers.{i}.{m}.lora_A"]  # [E, r, K]
        b = tensors[f"layers.{i}.{m}.lora_B"]  # [E, N, r]
        E = a.shape[0]
        A = a.reshape(E * r, a.shape[-1])
        if E == 1:  # the common case keeps the exact tensors
            B = b[0]
        else:
            B = torch.cat([(b[e].double() * w[e]).to(b.dtype) for e in range(E)], dim=1)
        out[(i, m)] = (A.contiguous(), B.contiguous(), float(scaling) * (float(w[0]) if E == 1 else 1.0))
    return out


def save_peft_adapter(model, directory, adapter_name: Optional[str] = None) -> None:
    """Write a static (or constantly-routed) adapter in PEFT's own LoRA format
    (adapter_config.json + adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base,
    directory)` loads with the same logits. Per-module ranks / scalings go to rank_pattern /
    alpha_pattern (keys are full module paths); modules present in only some layers are named by a
    target_modules regex. Routed adapters raise ValueError (see the module docstring)."""
    from safetensors.torch import save_file
    name = _adapter_name(model, adapter_name, "save_peft_adapter")
    factors = plain_lora_factors(model, name, "save_peft_adapter")
    info = model.adapters[name]
    ranks = {k: int(A.shape[0]) for k, (A, _, _) in factors.items()}
    alphas = {k: s * ranks[k] for k, (_, _, s) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    rank_pattern = {_module_key(*k): v for k, v in sorted(ranks.items()) if v != r}
    alpha_pattern = {_module_key(*k): v for k, v in sorted(alphas.items()) if v != alpha}
    mods = sorted({m for (_, m) in factors}, key=MODULE_NAMES.index)
    layer_sets = {m: {i for (i, mm) in factors if mm == m} for m in mods}
    if all(s == set(range(model.num_layers)) for s in layer_sets.values()):
        target_modules = mods
    else:  # PEFT matches a string target_modules with re.fullmatch against each module path
        target_modules = "|".join(_module_key(i, m).replace(".", r"\.") for (i, m) in sorted(factors))
    base_cfg = getattr(model.base_model, "config", None)
    doc = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(base_cfg, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        "lora_dropout": float(info.config.dropout),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
        "inference_mode": True,
    }
    tensors = {}
    for (i, m), (A, B, _) in factors.items():
        prefix = f"base_model.model.{_module_key(i, m)}"
        tensors[f"{prefix}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.cpu().contiguous()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, PEFT_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    save_file(tensors, os.path.join(directory, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})


def unload(model) -> nn.Module:
    """Remove every MiLoRA layer, router and hook and return the base HF model with its original
    nn.Linear modules (no adapter merged). The MiLoRAModel must not be used afterwards.

    The original modules share their weight Parameters with the MiLoRA layers, so a merge done
    in place on those (merge_and_unload) is what the returned model holds."""
    model._unwrap()
    model.adapters.clear()
    model.active_adapter = None
    model._unloaded = True
    return model.base_model


def merge_and_unload(model, adapter_name: Optional[str] = None, *, safe_merge: bool = False) -> nn.Module:
    """Merge one static (or constantly-routed) adapter into the base weights and return the
    base HF model (plain nn.Linear modules, no hooks): W += scaling * B @ A, computed in
    float32 (float64 for a float64 base) and rounded once to the weight's dtype. Other loaded
    adapters are dropped, as in PEFT. Routed adapters raise ValueError before anything changes.
    safe_merge: check that the merged weights are finite before writing them."""
    name = _adapter_name(model, adapter_name, "merge_and_unload")
    factors = plain_lora_factors(model, name, "merge_and_unload")
    merged = {}
    with torch.no_grad():
        for (i, m), (A, B, s) in factors.items():
            lin = model._linears[(i, m)]
            W = lin.weight
            cd = torch.float64 if W.dtype == torch.float64 else torch.float32
            new = W.to(cd) + s * (B.to(W.device, cd) @ A.to(W.device, cd))
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"merge_and_unload: merging {name!r} gives non-finite weights at {_module_key(i, m)}")
            merged[(i, m)] = new.to(W.dtype)
        for key, new in merged.items():
            model._linears[key].weight.copy_(new)
    return unload(model)
