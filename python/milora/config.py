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
import reprlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Tuple, Union

from .files import parse_json, read_json_file, write_files_atomically

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

# Sanity bounds, far beyond any practical adapter: they refuse corrupted or hostile values up front
# (before any tensor is allocated or any model is touched) and keep sizes and index tensors within
# int64 / float32. top_k may exceed the number of choices a router scores (it is clipped), but not
# len(MODULE_NAMES) * experts_per_module, the largest number of choices any router has.
MAX_RANK = 65536
MAX_EXPERTS_PER_MODULE = 1024
FLOAT32_MAX = 3.4028234663852886e38

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlevel = 3


def short_repr(value: Any) -> str:
    """repr() bounded in length and depth, for error messages about untrusted values."""
    return _repr.repr(value)


def is_int(value: Any) -> bool:
    """True for a Python int that is not a bool (JSON true/false must not pass as 1/0)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for an int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A finite number (ints too large for a float are not)."""
    try:
        return is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


def check_int(owner: str, name: str, value: Any, lo: int, hi: int) -> int:
    """Return `value` if it is an int (not a bool) in [lo, hi], else raise a ValueError naming it."""
    if not is_int(value) or not lo <= value <= hi:
        raise ValueError(f"{owner}.{name} must be an integer in [{lo}, {hi}], got {short_repr(value)}")
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    """Return `value` if it is a bool (JSON true / false), else raise a ValueError naming it."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be true or false, got {short_repr(value)}")
    return value


def normalize_target_modules(target_modules: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    """Validate target module names and return them in canonical order (`MODULE_NAMES`).

    Accepts an iterable of names, a single name, or "all-linear" (all seven). Raises ValueError
    for names MiLoRA cannot adapt, duplicates, or an empty selection.
    """
    if isinstance(target_modules, str):
        names = list(MODULE_NAMES) if target_modules == "all-linear" else [target_modules]
    elif isinstance(target_modules, (list, tuple)):
        names = list(target_modules)
    else:
        raise ValueError(f"MiLoRAConfig.target_modules must be a list of module names or 'all-linear', "
                         f"got {short_repr(target_modules)}")
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"MiLoRAConfig.target_modules must hold module names (strings), got {short_repr(names)}")
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

    Every field is checked strictly on construction (also when read from JSON): integers must be
    ints (not bools, not 4.9), flags must be bools (the string "no" is not False), numbers must
    be finite; bounds below. A bad value raises a ValueError naming the field.

    Args:
        r: LoRA rank of every expert, 1..MAX_RANK.
        alpha: LoRA alpha, > 0; each expert's output is scaled by alpha / r (times its gate).
            A zero or negative alpha is refused: a router-gated module with scaling <= 0 is
            never selected (the routers only consider modules with a positive scale), so such an
            adapter would silently behave like the base model.
        dropout: LoRA dropout on the adapter input (training only); the base path sees the
            undropped input (see `MiLoRALinear`).
        target_modules: which of `MODULE_NAMES` are adapted in every decoder layer.
        top_k: prompt routing: modules kept per layer and per prompt (clipped to the number of
            adapted modules; k >= that number keeps every module). Token routing: experts
            kept per token at each adapted linear (clipped to experts_per_module). At most
            len(MODULE_NAMES) * experts_per_module.
        pooler: how a layer router pools the prompt's hidden states: "self_attn" (learned
            query vector, initialised to zero = mean pooling at start), "mean", "last", "max".
        activation: "rational" (learnable P6/Q5 rational function initialised near GELU) or "gelu".
        gate_mode: "soft": a selected module's output is scaled by its renormalised top-k
            probability; "hard": by 1.0 (straight-through gradient to the router).
        experts_per_module: LoRA experts per adapted linear (E), 1..MAX_EXPERTS_PER_MODULE. With routing="prompt" and E > 1
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
        self.validate()

    def validate(self) -> None:
        """Check every field again (fields may be assigned after construction); ValueError naming it."""
        own = "MiLoRAConfig"
        self.target_modules = normalize_target_modules(self.target_modules)
        if not is_int(self.r) or not 1 <= self.r <= MAX_RANK:
            raise ValueError(f"{own}.r must be an integer >= 1 (at most {MAX_RANK}), got {short_repr(self.r)}")
        check_int(own, "experts_per_module", self.experts_per_module, 1, MAX_EXPERTS_PER_MODULE)
        check_int(own, "top_k", self.top_k, 1, len(MODULE_NAMES) * self.experts_per_module)
        if not is_finite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"{own}.alpha must be a finite number > 0, got {short_repr(self.alpha)} (a router-gated "
                             f"module with scaling <= 0 is never selected: the adapter would act as the base model)")
        if not self.scaling < FLOAT32_MAX:
            raise ValueError(f"{own}.alpha {short_repr(self.alpha)} is too large: the scaling alpha / r must fit float32")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{own}.dropout must be a number in [0, 1), got {short_repr(self.dropout)}")
        if not is_finite(self.load_balance_coef) or self.load_balance_coef < 0:
            raise ValueError(f"{own}.load_balance_coef must be a finite number >= 0, got {short_repr(self.load_balance_coef)}")
        for name, value, allowed in (
            ("pooler", self.pooler, POOLERS),
            ("activation", self.activation, ACTIVATIONS),
            ("gate_mode", self.gate_mode, GATE_MODES),
            ("routing", self.routing, ROUTINGS),
        ):
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{own}.{name} must be one of {list(allowed)}, got {short_repr(value)}")
        check_bool(own, "use_rslora", self.use_rslora)

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
        unknown = sorted(short_repr(k) for k in set(d) - known)
        if unknown:
            raise ValueError(f"MiLoRAConfig: unknown field(s) {unknown[:8]}; known fields are {sorted(known)}")
        return cls(**d)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_string(cls, text: str) -> "MiLoRAConfig":
        """Parse strictly (files.parse_json: no duplicate keys, bounded nesting)."""
        return cls.from_dict(parse_json(text, "MiLoRAConfig JSON"))

    def to_json_file(self, path: Union[str, os.PathLike]) -> None:
        """Write atomically (a temporary then rename; a symlink at `path` is replaced, not followed)."""
        path = os.fspath(path)
        write_files_atomically(os.path.dirname(path) or ".", [(os.path.basename(path), (self.to_json_string() + "\n").encode("utf-8"))])

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike]) -> "MiLoRAConfig":
        return cls.from_dict(read_json_file(os.fspath(path)))
