"""Adapter save / load: a directory with `milora_config.json` and `adapter_model.safetensors`
(JSON + safetensors only, never pickle).

milora_config.json:
    {"format": "milora", "format_version": 1,
     "adapter_kind": "prompt" | "token" | "static",
     "config": {...MiLoRAConfig fields...},
     "base_model": {"model_type": ..., "hidden_size": d, "num_hidden_layers": L},
     "modules": {"layers.<i>.<module>": {"rank": r, "scaling": alpha / r}, ...},
     "weights_digest": "<hex>"}   (optional on read: files of older versions lack it)

adapter_model.safetensors (E = config.experts_per_module, r = the module's rank), metadata
{"format": "pt", "milora_format": "1", "milora_weights_digest": <the config's weights_digest>}:
    layers.<i>.<module>.lora_A            [E, r, in_features]     (model dtype)
    layers.<i>.<module>.lora_B            [E, out_features, r]
    layers.<i>.<module>.router            [E, in_features]        float32, token routing only
    layers.<i>.router.<module>.weight     [E, d]   float32, prompt routing: the layer router's
                                                   rows for this module (nn.Linear layout)
    layers.<i>.router.pool_query          [d]      prompt routing with pooler "self_attn"
    layers.<i>.router.rational_num        [7]      prompt routing with activation "rational"
    layers.<i>.router.rational_den        [5]

Loading reads and validates everything (JSON fields, the set of tensor names, every shape
against the model, target modules present in the model, no name clash) before the model is
touched: a missing, truncated or mismatched file raises and leaves the model unchanged.
Parsing is strict (see `read_adapter_dir`): integers must be ints ("r": 4.9 and true are
refused), layer indices canonical ("layers.00" is refused, so it cannot merge with
"layers.0"), tensors float16/bfloat16/float32/float64 and finite. Errors are ValueError
(FileNotFoundError for a missing file), naming the file and the field.

Saving is atomic (`files.write_files_atomically`): both files are written to temporary names in
the directory, then renamed, weights first. weights_digest, the SHA-256 of the tensors serialised
as safetensors without metadata, is written into both files: a config left beside
weights of another save (a crash between the two renames) is refused on load instead of loading
silently wrong. A weights file re-written by other tools without the entry is not checked. A
symlink planted at either name is replaced, never followed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .config import (FLOAT32_MAX, MAX_RANK, MODULE_INDEX, MODULE_NAMES, MiLoRAConfig, is_finite, is_int,
                     short_repr)
from .files import parse_json, read_json_file, read_regular_file, write_files_atomically
from .layer import ADAPTER_KINDS
from .targets import get_target_linear, module_path

CONFIG_NAME = "milora_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "milora"
FORMAT_VERSION = 1

# canonical decimal layer index (no leading zeros, at most 9 digits): "layers.00" is not "layers.0"
LAYER_INDEX = r"(0|[1-9][0-9]{0,8})"
_MODULE_KEY = re.compile(r"^layers\." + LAYER_INDEX + r"\.(" + "|".join(MODULE_NAMES) + r")$")
TENSOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BASE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers")
DIGEST_KEY = "milora_weights_digest"


@dataclass
class AdapterSpec:
    """A validated-on-read adapter description, ready to be checked against a model and installed."""

    config: MiLoRAConfig
    kind: str
    modules: Dict[Tuple[int, str], Tuple[int, float]]  # (layer, module) -> (rank, scaling)
    tensors: Dict[str, Tensor]                          # names as in the module docstring
    base: Dict = field(default_factory=dict)            # hidden_size / num_hidden_layers, if known


def _hidden_size(layers, model_config) -> int:
    d = getattr(model_config, "hidden_size", None)
    if d is not None:
        return int(d)
    for m in MODULE_NAMES:
        lin = get_target_linear(layers, 0, m)
        if lin is not None and m != "down_proj":
            return int(lin.in_features)
    raise ValueError("MiLoRA: cannot determine the model's hidden size")


def expected_shapes(layers, model_config, spec: AdapterSpec) -> Dict[str, tuple]:
    """Tensor name -> shape that `spec` must provide for this model (modules must exist)."""
    E = spec.config.experts_per_module
    d = _hidden_size(layers, model_config)
    shapes: Dict[str, tuple] = {}
    router_layers: Dict[int, list] = {}
    for (i, m), (r, _) in sorted(spec.modules.items()):
        lin = get_target_linear(layers, i, m)
        K, N = lin.in_features, lin.out_features
        shapes[f"layers.{i}.{m}.lora_A"] = (E, r, K)
        shapes[f"layers.{i}.{m}.lora_B"] = (E, N, r)
        if spec.kind == "token":
            shapes[f"layers.{i}.{m}.router"] = (E, K)
        router_layers.setdefault(i, []).append(m)
    if spec.kind == "prompt":
        for i, mods in router_layers.items():
            for m in mods:
                shapes[f"layers.{i}.router.{m}.weight"] = (E, d)
            if spec.config.pooler == "self_attn":
                shapes[f"layers.{i}.router.pool_query"] = (d,)
            if spec.config.activation == "rational":
                shapes[f"layers.{i}.router.rational_num"] = (7,)
                shapes[f"layers.{i}.router.rational_den"] = (5,)
    return shapes


def validate_spec(layers, model_config, spec: AdapterSpec, source: str) -> None:
    """Raise ValueError unless `spec` fits the model exactly (see the module docstring)."""
    source = f"MiLoRA: adapter {source}"
    if spec.kind not in ADAPTER_KINDS:
        raise ValueError(f"{source}: unknown adapter kind {spec.kind!r}; expected one of {list(ADAPTER_KINDS)}")
    if spec.kind in ("prompt", "token") and spec.kind != spec.config.routing:
        raise ValueError(f"{source}: adapter kind {spec.kind!r} does not match config.routing {spec.config.routing!r}")
    n_layers = spec.base.get("num_hidden_layers")
    if n_layers is not None and int(n_layers) != len(layers):
        raise ValueError(f"{source}: adapter was saved for a model with {n_layers} decoder layers, this model has {len(layers)}")
    d = spec.base.get("hidden_size")
    if d is not None and int(d) != _hidden_size(layers, model_config):
        raise ValueError(f"{source}: adapter was saved for hidden_size {d}, this model has {_hidden_size(layers, model_config)}")
    if not spec.modules:
        raise ValueError(f"{source}: the adapter adapts no module")
    targets = set(spec.config.target_modules)
    used = {m for (_, m) in spec.modules}
    if used - targets:
        raise ValueError(f"{source}: mismatched target modules: weights for {sorted(used - targets, key=MODULE_INDEX.get)} "
                         f"but config.target_modules is {list(spec.config.target_modules)}")
    if targets - used:
        raise ValueError(f"{source}: mismatched target modules: config.target_modules lists "
                         f"{sorted(targets - used, key=MODULE_INDEX.get)} but the adapter has no weights for them")
    missing = []
    for (i, m), (r, s) in sorted(spec.modules.items()):
        if not 0 <= i < len(layers):
            raise ValueError(f"{source}: module layers.{i}.{m}: layer index out of range (the model has {len(layers)} layers)")
        if get_target_linear(layers, i, m) is None:
            missing.append(module_path(i, m))
        if not is_int(r) or not 1 <= r <= MAX_RANK:
            raise ValueError(f"{source}: module layers.{i}.{m}: rank must be an integer in [1, {MAX_RANK}], got {short_repr(r)}")
        if not is_finite(s) or not 0 < s < FLOAT32_MAX:
            raise ValueError(f"{source}: module layers.{i}.{m}: scaling must be a finite number > 0 (that fits float32), "
                             f"got {short_repr(s)}")
    if missing:
        raise ValueError(f"{source}: target modules not found in the model: {missing[:8]}")
    want = expected_shapes(layers, model_config, spec)
    have = spec.tensors
    unknown = sorted(set(have) - set(want))
    if unknown:
        raise ValueError(f"{source}: unknown tensor name(s) {[short_repr(k) for k in unknown[:8]]}{' ...' if len(unknown) > 8 else ''}")
    lacking = sorted(set(want) - set(have))
    if lacking:
        raise ValueError(f"{source}: missing tensor(s) {lacking[:8]}{' ...' if len(lacking) > 8 else ''}")
    for k, shape in want.items():
        t = have[k]
        if not isinstance(t, Tensor) or t.dtype not in TENSOR_DTYPES:
            raise ValueError(f"{source}: tensor {k} must be a float16/bfloat16/float32/float64 tensor, "
                             f"got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(shape)} for this model")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{source}: tensor {k} holds NaN or Inf values")


def write_adapter_dir(directory, spec: AdapterSpec) -> None:
    """Write an adapter (its config, modules, tensors under the names of the module docstring,
    and spec.base: model_type / hidden_size / num_hidden_layers) to `directory` (created if
    needed), atomically: see the module docstring."""
    from safetensors.torch import save as save_bytes
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"save_pretrained: save_directory must be a path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    tensors = spec.tensors
    meta = {"format": "pt", "milora_format": str(FORMAT_VERSION)}
    digest = hashlib.sha256(save_bytes(tensors)).hexdigest()  # no metadata: its order is not deterministic
    weights = save_bytes(tensors, metadata={**meta, DIGEST_KEY: digest})
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter_kind": spec.kind,
        "config": spec.config.to_dict(),
        "base_model": {k: spec.base.get(k) for k in BASE_FIELDS},
        "modules": {f"layers.{i}.{m}": {"rank": r, "scaling": s} for (i, m), (r, s) in sorted(spec.modules.items())},
        "weights_digest": digest,
    }
    text = json.dumps(doc, indent=2) + "\n"
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_pretrained: {directory} exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            raise ValueError(f"save_pretrained: {path} is a directory")
    # weights first: the config, which names the weights' digest, commits the checkpoint
    write_files_atomically(directory, [(WEIGHTS_NAME, weights), (CONFIG_NAME, text.encode("utf-8"))])




def read_json(path: str) -> dict:
    """A JSON object from a regular file, parsed strictly (see files.py)."""
    return read_json_file(path)


def read_safetensors(path: str, digest: Optional[str] = None) -> Dict[str, Tensor]:
    """All tensors of a safetensors file (no pickle). digest: the weights_digest of the config;
    the file must carry the same one in its metadata, or none."""
    from safetensors.torch import load as load_bytes
    data = read_regular_file(path, "weights file")
    try:
        tensors = load_bytes(data)
    except Exception as e:  # SafetensorError, ...: truncated or corrupt file
        raise ValueError(f"MiLoRA: {path} is not a readable safetensors file (truncated or corrupt?): {str(e)[:200]}") from None
    if digest is not None:
        header = parse_json(data[8: 8 + int.from_bytes(data[:8], "little")], path)  # validated by load_bytes
        have = (header.get("__metadata__") or {}).get(DIGEST_KEY)
        if have is not None and have != digest:
            raise ValueError(f"MiLoRA: {path} comes from another save than {CONFIG_NAME} beside it (weights_digest "
                             f"{short_repr(have)} != {digest!r}): an interrupted save? Save the adapter again")
    return tensors


def _read_modules(mods, cfg_path: str) -> Dict[Tuple[int, str], Tuple[int, float]]:
    if not isinstance(mods, dict) or not mods:
        raise ValueError(f"MiLoRA: {cfg_path}: 'modules' must be a non-empty object")
    modules: Dict[Tuple[int, str], Tuple[int, float]] = {}
    for k, v in mods.items():
        mt = _MODULE_KEY.match(k)
        if mt is None:
            raise ValueError(f"MiLoRA: {cfg_path}: bad module key {short_repr(k)}; expected 'layers.<i>.<module>' with i a "
                             f"decimal layer index without leading zeros and module in {list(MODULE_NAMES)}")
        if not isinstance(v, dict) or set(v) != {"rank", "scaling"}:
            raise ValueError(f"MiLoRA: {cfg_path}: module {k!r} must be an object with 'rank' and 'scaling'")
        r, s = v["rank"], v["scaling"]
        if not is_int(r) or not 1 <= r <= MAX_RANK:
            raise ValueError(f"MiLoRA: {cfg_path}: modules.{k}.rank must be an integer in [1, {MAX_RANK}], got {short_repr(r)}")
        if not is_finite(s) or not 0 < s < FLOAT32_MAX:
            raise ValueError(f"MiLoRA: {cfg_path}: modules.{k}.scaling must be a finite number > 0, got {short_repr(s)}")
        modules[(int(mt.group(1)), mt.group(2))] = (r, float(s))
    return modules


def _read_base(base, cfg_path: str) -> Dict:
    if base is None:
        return {}
    if not isinstance(base, dict):
        raise ValueError(f"MiLoRA: {cfg_path}: 'base_model' must be an object")
    unknown = sorted(short_repr(k) for k in set(base) - set(BASE_FIELDS))
    if unknown:
        raise ValueError(f"MiLoRA: {cfg_path}: base_model: unknown field(s) {unknown[:8]}; known: {list(BASE_FIELDS)}")
    if base.get("model_type") is not None and not isinstance(base["model_type"], str):
        raise ValueError(f"MiLoRA: {cfg_path}: base_model.model_type must be a string, got {short_repr(base['model_type'])}")
    for k in ("hidden_size", "num_hidden_layers"):
        v = base.get(k)
        if v is not None and (not is_int(v) or v < 1):
            raise ValueError(f"MiLoRA: {cfg_path}: base_model.{k} must be a positive integer, got {short_repr(v)}")
    return {k: v for k, v in base.items() if v is not None}


def read_adapter_dir(directory) -> AdapterSpec:
    """Read and check a saved MiLoRA adapter directory (nothing is validated against a model yet).

    Every field is checked for type and range before the weights are read; the weights must
    carry the config's weights_digest when both have one."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"MiLoRA: the adapter directory must be a path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"MiLoRA: adapter directory {directory} does not exist")
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.lexists(cfg_path) and os.path.isfile(os.path.join(directory, "adapter_config.json")):
        raise FileNotFoundError(f"MiLoRA: {cfg_path} is missing; {directory} looks like a PEFT adapter: use load_peft_adapter")
    doc = read_json(cfg_path)
    if doc.get("format") != FORMAT:
        raise ValueError(f"MiLoRA: {cfg_path}: 'format' must be {FORMAT!r}, got {short_repr(doc.get('format'))}")
    version = doc.get("format_version")
    if not is_int(version) or version != FORMAT_VERSION:
        raise ValueError(f"MiLoRA: {cfg_path}: unsupported format_version {short_repr(version)} (this milora reads {FORMAT_VERSION})")
    known = {"format", "format_version", "adapter_kind", "config", "base_model", "modules", "weights_digest"}
    unknown = sorted(short_repr(k) for k in set(doc) - known)
    if unknown:
        raise ValueError(f"MiLoRA: {cfg_path}: unknown field(s) {unknown[:8]}")
    try:
        config = MiLoRAConfig.from_dict(doc.get("config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"MiLoRA: {cfg_path}: bad config: {e}") from None
    kind = doc.get("adapter_kind")
    if not isinstance(kind, str) or kind not in ADAPTER_KINDS:
        raise ValueError(f"MiLoRA: {cfg_path}: adapter_kind must be one of {list(ADAPTER_KINDS)}, got {short_repr(kind)}")
    modules = _read_modules(doc.get("modules"), cfg_path)
    base = _read_base(doc.get("base_model"), cfg_path)
    digest = doc.get("weights_digest")
    if digest is not None and (not isinstance(digest, str) or re.fullmatch(r"[0-9a-f]{64}", digest) is None):
        raise ValueError(f"MiLoRA: {cfg_path}: weights_digest must be 64 lowercase hex digits, got {short_repr(digest)}")
    tensors = read_safetensors(os.path.join(directory, WEIGHTS_NAME), digest)
    return AdapterSpec(config, kind, modules, tensors, base)
