"""Import a standard PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

The adapter becomes a router-less ("static") MiLoRA adapter: every module it adapts is on with
gate = its PEFT scaling, alpha / r (alpha / sqrt(r) with use_rslora), with r and alpha per module
from rank_pattern / alpha_pattern. The rank of each module is read from its lora_A shape and
must agree with r / rank_pattern.

rank_pattern / alpha_pattern keys are regular expressions from the file, matched as PEFT does:
the first key k (in file order) with re.match(rf"(.*\\.)?({k})$", name) gives the value, where name
is "model.layers.<i>.<parent>.<module>". They are only matched against the finite set of module
names the weights hold, and with bounded cost: a key must compile with Python's `re` (as in
PEFT; an invalid one is a ValueError naming it, never a bare re.error), and is then matched with
the `regex` package (re-compatible syntax and semantics for these patterns, a transformers
dependency) under a total time budget of PATTERN_BUDGET_S seconds for the whole file, so a
catastrophic-backtracking key such as "(.|.)*\\w\\W" is refused within that budget instead of
running for hours. Real PEFT keys (module names, simple alternations) match in microseconds.
Keys longer than MAX_PATTERN_CHARS or more than MAX_PATTERNS keys are refused up front.

Values are checked strictly: r and rank_pattern values are integers >= 1 (not 4.9, "abc" or
null), lora_alpha and alpha_pattern values finite numbers > 0 (a zero or negative alpha is
refused, like MiLoRAConfig.alpha), lora_dropout a number in [0, 1), use_rslora and the other
flags true / false (the string "no" is not false).

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
import time
import warnings
from typing import Any, Callable, Dict, List, Sequence, Tuple

from torch import Tensor

from .checkpoint import LAYER_INDEX, AdapterSpec, read_json, read_safetensors
from .config import (FLOAT32_MAX, MAX_RANK, MODULE_NAMES, MODULE_PARENTS, MiLoRAConfig, is_finite, is_int,
                     is_number, short_repr)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PATTERN_BUDGET_S = 2.0
MAX_PATTERN_CHARS = 1024
MAX_PATTERNS = 10000

_KEY = re.compile(
    r"^base_model\.model\.model\.layers\." + LAYER_INDEX + r"\.(self_attn|mlp)\.(" + "|".join(MODULE_NAMES)
    + r")\.lora_([AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$"
)


def _compile_patterns(patterns: Any, field: str, src: str, check_value: Callable[[Any], bool], want: str) -> List[Tuple[str, Any, Any]]:
    """[(key, compiled matcher, value)] of a rank_pattern / alpha_pattern object, in file order."""
    import regex
    if patterns is None:
        return []
    if not isinstance(patterns, dict):
        raise ValueError(f"MiLoRA: {src}: {field} must be an object mapping module-name patterns to values, got {short_repr(patterns)}")
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"MiLoRA: {src}: {field} has {len(patterns)} keys, more than the {MAX_PATTERNS} allowed")
    out = []
    for key, value in patterns.items():
        if not check_value(value):
            raise ValueError(f"MiLoRA: {src}: {field}[{short_repr(key)}] must be {want}, got {short_repr(value)}")
        if len(key) > MAX_PATTERN_CHARS:
            raise ValueError(f"MiLoRA: {src}: {field} key {short_repr(key)} is longer than {MAX_PATTERN_CHARS} characters")
        full = rf"(.*\.)?({key})$"  # PEFT's get_pattern_key
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FutureWarning "possible nested set"
                re.compile(full)  # valid exactly when PEFT accepts it
                matcher = regex.compile(full, flags=regex.VERSION0)
        except (re.error, regex.error, RecursionError, OverflowError, ValueError) as e:
            raise ValueError(f"MiLoRA: {src}: {field} key {short_repr(key)} is not a valid regular expression ({e})") from None
        out.append((key, matcher, value))
    return out


def _pattern_values(patterns: Sequence[Tuple[str, Any, Any]], names: Sequence[str], default, field: str, src: str,
                    deadline: float) -> Dict[str, Any]:
    """name -> value of the first matching pattern (or default), within the time budget."""
    out = {}
    for name in names:
        out[name] = default
        for key, matcher, value in patterns:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                hit = matcher.match(name, timeout=left)
            except TimeoutError:
                raise ValueError(f"MiLoRA: {src}: matching the {field} keys against the module names takes more than "
                                 f"{PATTERN_BUDGET_S} s (key {short_repr(key)}: catastrophic backtracking?); simplify the "
                                 f"patterns") from None
            if hit:
                out[name] = value
                break
    return out


def _flag(cfg: Dict, name: str, src: str, default: bool = False) -> bool:
    v = cfg.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ValueError(f"MiLoRA: {src}: {name} must be true or false, got {short_repr(v)}")
    return v


def _is_rank(v) -> bool:
    return is_int(v) and 1 <= v <= MAX_RANK


def _is_alpha(v) -> bool:
    return is_finite(v) and 0 < v < FLOAT32_MAX


def read_peft_dir(directory) -> AdapterSpec:
    """Read a PEFT LoRA directory into an AdapterSpec of kind "static" (not yet checked against a model)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"MiLoRA: the PEFT adapter directory must be a path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"MiLoRA: PEFT adapter directory {directory} does not exist")
    cfg_path = os.path.join(directory, PEFT_CONFIG_NAME)
    cfg = read_json(cfg_path)
    src = cfg_path
    peft_type = cfg.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise ValueError(f"MiLoRA: {src}: peft_type {short_repr(peft_type)} is not supported (only LORA)")
    unsupported = []
    if _flag(cfg, "use_dora", src):
        unsupported.append("use_dora=true")
    if cfg.get("bias", "none") not in ("none", None):
        unsupported.append(f"bias={short_repr(cfg.get('bias'))}")
    if _flag(cfg, "lora_bias", src):
        unsupported.append("lora_bias=true")
    if cfg.get("modules_to_save"):
        unsupported.append(f"modules_to_save={short_repr(cfg.get('modules_to_save'))}")
    if _flag(cfg, "fan_in_fan_out", src):
        unsupported.append("fan_in_fan_out=true")
    for k in ("target_parameters", "trainable_token_indices", "layer_replication", "alora_invocation_tokens"):
        if cfg.get(k):
            unsupported.append(f"{k}={short_repr(cfg.get(k))}")
    if unsupported:
        raise ValueError(f"MiLoRA: {src}: unsupported PEFT LoRA options: {', '.join(unsupported)}")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not _is_rank(r):
        raise ValueError(f"MiLoRA: {src}: r must be an integer in [1, {MAX_RANK}], got {short_repr(r)}")
    if not _is_alpha(alpha):
        raise ValueError(f"MiLoRA: {src}: lora_alpha must be a finite number > 0, got {short_repr(alpha)} (zero or "
                         f"negative alphas are not supported)")
    alpha = float(alpha)
    rslora = _flag(cfg, "use_rslora", src)
    dropout = cfg.get("lora_dropout", 0.0)
    dropout = 0.0 if dropout is None else dropout
    if not is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"MiLoRA: {src}: lora_dropout must be a number in [0, 1), got {short_repr(dropout)}")
    rank_pattern = _compile_patterns(cfg.get("rank_pattern"), "rank_pattern", src, _is_rank,
                                     f"an integer in [1, {MAX_RANK}]")
    alpha_pattern = _compile_patterns(cfg.get("alpha_pattern"), "alpha_pattern", src, _is_alpha, "a finite number > 0")

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
                         f"{list(MODULE_NAMES)}, layer indices without leading zeros): {[short_repr(k) for k in sorted(unknown)[:6]]}")
    if not pairs:
        raise ValueError(f"MiLoRA: {weights_path}: no LoRA tensors found")

    names = {(i, m): f"model.layers.{i}.{MODULE_PARENTS[m]}.{m}" for (i, m) in pairs}
    deadline = time.monotonic() + PATTERN_BUDGET_S
    ranks = _pattern_values(rank_pattern, sorted(names.values()), r, "rank_pattern", src, deadline)
    alphas = _pattern_values(alpha_pattern, sorted(names.values()), alpha, "alpha_pattern", src, deadline)
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
        key = names[(i, m)]
        if rank < 1:
            raise ValueError(f"MiLoRA: {weights_path}: {key} has rank 0 (lora_A {tuple(A.shape)}); LoRA ranks must be >= 1")
        want_r = ranks[key]
        if rank != want_r:
            raise ValueError(f"MiLoRA: {weights_path}: {key} has rank {rank} but the config says r={want_r}")
        scaling = float(alphas[key]) / (math.sqrt(rank) if rslora else rank)
        modules[(i, m)] = (rank, scaling)
        tensors[f"layers.{i}.{m}.lora_A"] = A.unsqueeze(0)
        tensors[f"layers.{i}.{m}.lora_B"] = B.unsqueeze(0)
    targets = sorted({m for (_, m) in modules}, key=MODULE_NAMES.index)
    try:
        config = MiLoRAConfig(r=max(rk for rk, _ in modules.values()), alpha=alpha, dropout=float(dropout),
                              target_modules=tuple(targets), routing="prompt", experts_per_module=1,
                              use_rslora=rslora, top_k=len(targets))
    except ValueError as e:
        raise ValueError(f"MiLoRA: {src}: {e}") from None
    return AdapterSpec(config, "static", modules, tensors, {})
