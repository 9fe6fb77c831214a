"""MiLoRAConfig: the hyper-parameters of one MiLoRA adapter, with a JSON round-trip.

The seven linear modules of a LLaMA-family decoder layer that MiLoRA can adapt are listed in
`MODULE_NAMES` (canonical order, also the order of a layer router's outputs) and
`MODULE_PARENTS` (the sub-module of the decoder layer that holds each of them).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Tuple, Union

MODULE_NAMES: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_PARENTS: Dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
MODULE_INDEX: Dict[str, int] = {name: i for i, name in enumerate(MODULE_NAMES)}

POOLERS: Tuple[str, ...] = ("self_attn", "mean", "last", "max")
ACTIVATIONS: Tuple[str, ...] = ("rational", "gelu")
GATE_MODES: Tuple[str, ...] = ("soft", "hard")
ROUTINGS: Tuple[str, ...] = ("prompt", "token")


def normalize_target_modules(target_modules: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    """Validate target module names and return them in canonical order (`MODULE_NAMES`).

    Accepts an iterable of names, a single name, or "all-linear" (all seven). Raises ValueError
    for names MiLoRA cannot adapt, duplicates, or an empty selection.
    """
    if isinstance(target_modules, str):
        names = list(MODULE_NAMES) if target_modules == "all-linear" else [target_modules]
    else:
        names = list(target_modules)
    if not names:
        raise ValueError("MiLoRAConfig.target_modules is empty; choose some of " + ", ".join(MODULE_NAMES))
    bad = [n for n in names if n not in MODULE_INDEX]
    if bad:
        raise ValueError(
            f"MiLoRAConfig.target_modules: unsupported module name(s) {bad}; MiLoRA adapts the "
            f"LLaMA-family linears {list(MODULE_NAMES)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"MiLoRAConfig.target_modules has duplicates: {names}")
    return tuple(n for n in MODULE_NAMES if n in names)


@dataclass
class MiLoRAConfig:
    """Hyper-parameters of one MiLoRA adapter.

    Args:
        r: LoRA rank of every expert.
        alpha: LoRA alpha; each expert's output is scaled by alpha / r (times its gate).
        dropout: LoRA dropout on the adapter input (training only); the base path sees the
            undropped input (see `MiLoRALinear`).
        target_modules: which of `MODULE_NAMES` are adapted in every decoder layer.
        top_k: prompt routing: modules kept per layer and per prompt (clipped to the number of
            adapted modules; k >= that number keeps every module). Token routing: experts
            kept per token at each adapted linear (clipped to experts_per_module).
        pooler: how a layer router pools the prompt's hidden states: "self_attn" (learned
            query vector, initialised to zero = mean pooling at start), "mean", "last", "max".
        activation: "rational" (learnable P6/Q5 rational function initialised near GELU) or "gelu".
        gate_mode: "soft": a selected module's output is scaled by its renormalised top-k
            probability; "hard": by 1.0 (straight-through gradient to the router).
        experts_per_module: LoRA experts per adapted linear (E). With routing="prompt" and E > 1
            the layer router scores modules x experts (see `PromptRouter`).
        routing: "prompt": MiLoRA, one router per decoder layer, run once per prompt;
            "token": per-token MoE-LoRA (MOELoRA baseline), a router at every adapted linear,
            top-k experts per token.
        load_balance_coef: weight of the Switch-style load-balancing loss added to the LM loss.
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
    """

    r: int = 32
    alpha: float = 64
    dropout: float = 0.0
    target_modules: Tuple[str, ...] = field(default=MODULE_NAMES)
    top_k: int = 3
    pooler: str = "self_attn"
    activation: str = "rational"
    gate_mode: str = "soft"
    experts_per_module: int = 1
    routing: str = "prompt"
    load_balance_coef: float = 1e-2
    use_rslora: bool = False

    def __post_init__(self) -> None:
        self.target_modules = normalize_target_modules(self.target_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"MiLoRAConfig.r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.experts_per_module, bool) or not isinstance(self.experts_per_module, int) or self.experts_per_module < 1:
            raise ValueError(f"MiLoRAConfig.experts_per_module must be an integer >= 1, got {self.experts_per_module!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"MiLoRAConfig.top_k must be an integer >= 1, got {self.top_k!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"MiLoRAConfig.alpha must be a finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MiLoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.load_balance_coef, (int, float)) or not math.isfinite(self.load_balance_coef) or self.load_balance_coef < 0:
            raise ValueError(f"MiLoRAConfig.load_balance_coef must be a finite number >= 0, got {self.load_balance_coef!r}")
        for name, value, allowed in (
            ("pooler", self.pooler, POOLERS),
            ("activation", self.activation, ACTIVATIONS),
            ("gate_mode", self.gate_mode, GATE_MODES),
            ("routing", self.routing, ROUTINGS),
        ):
            if value not in allowed:
                raise ValueError(f"MiLoRAConfig.{name} must be one of {list(allowed)}, got {value!r}")
        self.use_rslora = bool(self.use_rslora)

    @property
    def scaling(self) -> float:
        """The LoRA scaling folded into the gates: alpha / r (alpha / sqrt(r) with use_rslora)."""
        return float(self.alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)

    # ---- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MiLoRAConfig":
        """Build from a dict; unknown keys raise ValueError (they usually mean a wrong file)."""
        if not isinstance(d, dict):
            raise ValueError(f"MiLoRAConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MiLoRAConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_string(cls, text: str) -> "MiLoRAConfig":
        return cls.from_dict(json.loads(text))

    def to_json_file(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string() + "\n")

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike]) -> "MiLoRAConfig":
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_json_string(f.read())
