"""Import a standard PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

The adapter becomes a router-less ("static") MiLoRA adapter: every module it adapts is on with
gate = its PEFT scaling, alpha / r (alpha / sqrt(r) with use_rslora), with r and alpha per module
from rank_pattern / alpha_pattern (matched like PEFT: a pattern key k matches module key
"model.layers.<i>.<parent>.<module>" when re.match(rf"(.*\\.)?({k})$", key)). The rank of each
module is read from its lora_A shape and must agree with r / rank_pattern.

Supported: LoRA on the seven LLaMA-family linears of decoder layers (any subset, any layers).
Rejected with a clear error: other peft types, DoRA, LoRA biases / bias != "none",
modules_to_save, embeddings or other modules, fan_in_fan_out, pickle-only checkpoints
(adapter_model.bin), and anything else that changes the math.
The peft package itself is not needed.
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, Tuple

from torch import Tensor

from .checkpoint import AdapterSpec, install_spec, read_json, read_safetensors, validate_spec
from .config import MODULE_NAMES, MODULE_PARENTS, MiLoRAConfig

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"

_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(" + "|".join(MODULE_NAMES)
    + r")\.lora_([AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$"
)


def _pattern_value(patterns: Dict, key: str, default):
    for pk, v in patterns.items():
        if re.match(rf"(.*\.)?({pk})$", key):
            return v
    return default


def read_peft_dir(directory) -> AdapterSpec:
    """Read a PEFT LoRA directory into an AdapterSpec of kind "static" (not yet checked against a model)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"MiLoRA: PEFT adapter directory {directory} does not exist")
    cfg_path = os.path.join(directory, PEFT_CONFIG_NAME)
    cfg = read_json(cfg_path)
    src = cfg_path
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"MiLoRA: {src}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    unsupported = []
    if cfg.get("use_dora"):
        unsupported.append("use_dora=true")
    if cfg.get("bias", "none") not in ("none", None):
        unsupported.append(f"bias={cfg.get('bias')!r}")
    if cfg.get("lora_bias"):
        unsupported.append("lora_bias=true")
    if cfg.get("modules_to_save"):
        unsupported.append(f"modules_to_save={cfg.get('modules_to_save')!r}")
    if cfg.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out=true")
    for k in ("target_parameters", "trainable_token_indices", "layer_replication", "alora_invocation_tokens"):
        if cfg.get(k):
            unsupported.append(f"{k}={cfg.get(k)!r}")
    if unsupported:
        raise ValueError(f"MiLoRA: {src}: unsupported PEFT LoRA options: {', '.join(unsupported)}")
    try:
        r = int(cfg["r"])
        alpha = float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"MiLoRA: {src}: needs numeric 'r' and 'lora_alpha' ({e})") from e
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise ValueError(f"MiLoRA: {src}: rank_pattern / alpha_pattern must be objects")

    weights_path = os.path.join(directory, PEFT_WEIGHTS_NAME)
    if not os.path.isfile(weights_path) and os.path.isfile(os.path.join(directory, "adapter_model.bin")):
        raise ValueError(f"MiLoRA: {directory} holds only adapter_model.bin (pickle); convert it to adapter_model.safetensors")
    raw = read_safetensors(weights_path)

    pairs: Dict[Tuple[int, str], Dict[str, Tensor]] = {}
    unknown = []
    for key, t in raw.items():
        mt = _KEY.match(key)
        if mt is None or MODULE_PARENTS[mt.group(3)] != mt.group(2):
            unknown.append(key)
            continue
        i, m, ab = int(mt.group(1)), mt.group(3), mt.group(4)
        slot = pairs.setdefault((i, m), {})
        if ab in slot:
            raise ValueError(f"MiLoRA: {weights_path}: two lora_{ab} tensors for layers.{i}.{m}")
        slot[ab] = t
    if unknown:
        raise ValueError(f"MiLoRA: {weights_path}: tensors MiLoRA cannot import (only LoRA A/B of the decoder layers' "
                         f"{list(MODULE_NAMES)}): {sorted(unknown)[:6]}")
    if not pairs:
        raise ValueError(f"MiLoRA: {weights_path}: no LoRA tensors found")

    modules: Dict[Tuple[int, str], Tuple[int, float]] = {}
    tensors: Dict[str, Tensor] = {}
    for (i, m), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"MiLoRA: {weights_path}: layers.{i}.{m} has lora_{''.join(sorted(ab))} but not both A and B")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"MiLoRA: {weights_path}: layers.{i}.{m}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} "
                             f"are not [r, in] / [out, r]")
        rank = int(A.shape[0])
        key = f"model.layers.{i}.{MODULE_PARENTS[m]}.{m}"
        want_r = int(_pattern_value(rank_pattern, key, r))
        if rank != want_r:
            raise ValueError(f"MiLoRA: {weights_path}: {key} has rank {rank} but the config says r={want_r}")
        a = float(_pattern_value(alpha_pattern, key, alpha))
        scaling = a / (math.sqrt(rank) if rslora else rank)
        modules[(i, m)] = (rank, scaling)
        tensors[f"layers.{i}.{m}.lora_A"] = A.unsqueeze(0)
        tensors[f"layers.{i}.{m}.lora_B"] = B.unsqueeze(0)
    targets = sorted({m for (_, m) in modules}, key=MODULE_NAMES.index)
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    config = MiLoRAConfig(r=max(rk for rk, _ in modules.values()), alpha=alpha, dropout=dropout,
                          target_modules=tuple(targets), routing="prompt", experts_per_module=1,
                          use_rslora=rslora, top_k=len(targets))
    return AdapterSpec(config, "static", modules, tensors, {})


def load_peft_adapter(model, directory, adapter_name: str) -> None:
    """Validate a PEFT LoRA directory against a MiLoRAModel, then add it as `adapter_name`."""
    model._check_new_name(adapter_name)
    spec = read_peft_dir(directory)
    validate_spec(model.layers, getattr(model.base_model, "config", None), spec, os.fspath(directory))
    install_spec(model, adapter_name, spec)
