"""Where MiLoRA's target linears live in a decoder layer, and what a loaded adapter adapts.

The 7 target linears of a LLaMA-family decoder layer are `self_attn.{q,k,v,o}_proj` and
`mlp.{gate,up,down}_proj`; the decoder layers are `model.model.layers`. `AdapterInfo` is what the
model records about one loaded adapter. No model class is imported here: checkpoint.py uses
these to validate files against a model's layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch.nn as nn

from .config import MODULE_PARENTS, MiLoRAConfig
from .layer import MiLoRALinear


@dataclass
class AdapterInfo:
    """One loaded adapter: its config, kind and per-module (rank, scaling)."""

    name: str
    config: MiLoRAConfig
    kind: str                                         # "prompt" | "token" | "static"
    modules: Dict[Tuple[int, str], Tuple[int, float]]  # (layer, module) -> (rank, scaling)


# ---- structure checks ---------------------------------------------------------------------


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """model.model.layers of a LLaMA-family causal LM, or a ValueError naming what is missing."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"MiLoRA supports LLaMA-family causal LMs (Llama, Mistral, Qwen2, Qwen3, ...) whose decoder layers are "
            f"`model.model.layers`; {type(model).__name__} has no `model.layers` ModuleList"
        )
    return layers


def module_path(layer_idx: int, module: str) -> str:
    return f"model.layers.{layer_idx}.{MODULE_PARENTS[module]}.{module}"


def get_target_linear(layers: Sequence[nn.Module], layer_idx: int, module: str) -> Optional[nn.Module]:
    """The nn.Linear / MiLoRALinear at layers[layer_idx].<parent>.<module>, or None."""
    if not 0 <= layer_idx < len(layers):
        return None
    parent = getattr(layers[layer_idx], MODULE_PARENTS[module], None)
    lin = getattr(parent, module, None) if parent is not None else None
    return lin if isinstance(lin, (nn.Linear, MiLoRALinear)) else None


def check_target_modules(layers: Sequence[nn.Module], target_modules: Sequence[str], model_name: str = "model") -> None:
    """Raise a ValueError naming every target linear that is missing from the decoder layers."""
    missing = []
    for i in range(len(layers)):
        for m in target_modules:
            if get_target_linear(layers, i, m) is None:
                missing.append(module_path(i, m))
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(
            f"MiLoRA: target modules not found in {model_name}: {shown}. MiLoRA needs decoder layers with "
            f"self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj nn.Linear modules (restricted to target_modules)"
        )
