"""Which adapters of a MiLoRAModel train, in what dtype, and how their Parameters are read,
counted, saved and loaded (the model calls these; see milora.slots for the storage).

* The trainable adapters are `model.trainable_adapters` (default: the active adapter) when the
  model is trainable. Each gets its own Parameters in every linear (LoRA A / B, and the per-token
  router of a token-routed adapter) and every layer router (prompt-routed adapters): exactly its
  own sizes, nothing of any other adapter. So `[p for p in model.parameters() if p.requires_grad]`
  is exactly what trains, and `num_adapter_parameters` counts exactly that.
* dtype: with `autocast_adapter_dtype=True` (default, as PEFT) the Parameters of adapters trained
  on a 16-bit (bf16 / fp16) base are float32 master weights; the serving stacks keep the model's
  dtype and each training forward casts the trainable slots into them (one cast of the adapter's
  own weights per linear per forward; `milora-bench train` measures what it costs). With False
  they are in the model's dtype. Routers are always float32.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .config import MODULE_INDEX, MODULE_NAMES
from .slots import SlotStacks, param_key

HALF = (torch.bfloat16, torch.float16)


def base_dtype(model) -> torch.dtype:
    for lin in model._linears.values():
        return lin.weight.dtype
    return torch.float32


def adapter_param_dtype(model) -> Optional[torch.dtype]:
    """dtype of new trainable LoRA Parameters: float32 on a 16-bit base with
    autocast_adapter_dtype, else None (the stack's dtype)."""
    if getattr(model, "autocast_adapter_dtype", True) and base_dtype(model) in HALF:
        return torch.float32
    return None


def trainable_names(model) -> List[str]:
    """The adapters that train now (empty when the model is frozen)."""
    if not model.trainable:
        return []
    names = model.trainable_adapters
    if names is None:
        names = [model.active_adapter] if model.active_adapter is not None else []
    return [n for n in names if n in model.adapters]


def apply(model) -> None:
    """Give exactly the trainable adapters their own Parameters in every linear and router (the
    same Parameter objects when they already had them)."""
    names = trainable_names(model)
    slot = {n: model._slot_of(n) for n in names}
    kinds = {n: model.adapters[n].kind for n in names}
    dtype = adapter_param_dtype(model)
    for lin in model._linears.values():
        lin.set_trainable_slots(slot, dtype)
    prompt = {n: s for n, s in slot.items() if kinds[n] == "prompt"}
    for router in model.routers:
        router.set_trainable_slots(prompt)


def slot_modules(model) -> Iterable[SlotStacks]:
    return list(model._linears.values()) + list(model.routers)


def sync(model) -> None:
    """Bring every stack up to date with the trainable Parameters (before reading stacks, and
    once per model call, outside any compiled region)."""
    for m in slot_modules(model):
        if m.has_trainable_slots():
            m.sync_slots()


def count(model, name: str) -> int:
    """Number of parameters adapter `name` trains: the sizes of the Parameters it gets when
    trainable (its own regions of every stack)."""
    slot = model._slot_of(name)
    info = model.adapters[name]
    n = 0
    for lin in model._linears.values():
        for stack in lin._stack_names():
            if getattr(lin, stack) is not None:
                n += _numel(lin._slot_region(stack, slot))
    if info.kind == "prompt":
        for router in model.routers:
            for stack in router._stack_names():
                n += _numel(router._slot_region(stack, slot))
    return n


def _numel(region) -> int:
    out = 1
    for d in region:
        out *= int(d)
    return out


# ---- the trained adapters' tensors, from the Parameters or from a (gathered) state dict -------


def _param_names(model) -> Dict[int, str]:
    """id(Parameter) -> its name relative to the MiLoRAModel, without FSDP / checkpoint wrapper
    segments (the names a gathered full state dict uses)."""
    out = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out[id(p)] = n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
    return out


def _reader(model, state_dict: Optional[Dict[str, Tensor]]) -> Callable[[SlotStacks, str, str], Tensor]:
    """(module, stack, adapter) -> the adapter's trained region: from `state_dict` when given
    (keys as model.state_dict() names them), else from the Parameter (an FSDP2 DTensor is
    gathered: a collective, every rank must call)."""
    names = _param_names(model) if state_dict is not None else None

    def read(module: SlotStacks, stack: str, adapter: str) -> Tensor:
        p = module.trainable[param_key(stack, adapter)]
        if state_dict is not None:
            key = names.get(id(p))
            if key is None or key not in state_dict:
                raise KeyError(f"save_pretrained: the state_dict given has no entry for {key or stack} of adapter {adapter!r}")
            t = state_dict[key]
        else:
            t = p
        full = getattr(t, "full_tensor", None)
        if callable(full):
            t = full()
        return t.detach()

    return read


def trained_tensors(model, name: str, state_dict: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
    """Adapter `name` (trainable) under the file names of milora.checkpoint, read from its
    Parameters or from `state_dict`; stacks are not read (they may be stale or sharded)."""
    info = model.adapters[name]
    if state_dict is None:
        sync(model)  # slots written since the last sync (a load) reach the Parameters first
    read = _reader(model, state_dict)
    out: Dict[str, Tensor] = {}
    for (i, m) in sorted(info.modules):
        lin = model._linears[(i, m)]
        out[f"layers.{i}.{m}.lora_A"] = read(lin, "lora_a", name)  # the Parameters' dtype (float32 masters)
        out[f"layers.{i}.{m}.lora_B"] = read(lin, "lora_b", name)
        if info.kind == "token":
            out[f"layers.{i}.{m}.router"] = read(lin, "router_weight", name).float()
    if info.kind == "prompt":
        layers_mods: Dict[int, list] = {}
        for (i, m) in info.modules:
            layers_mods.setdefault(i, []).append(m)
        for i, mods in sorted(layers_mods.items()):
            r = model.routers[i]
            w = read(r, "weight", name).float()
            for m in mods:
                out[f"layers.{i}.router.{m}.weight"] = w[MODULE_INDEX[m]].contiguous()
            if info.config.pooler == "self_attn":
                out[f"layers.{i}.router.pool_query"] = read(r, "pool_query", name).float()
            if info.config.activation == "rational":
                out[f"layers.{i}.router.rational_num"] = read(r, "rational_num", name).float()
                out[f"layers.{i}.router.rational_den"] = read(r, "rational_den", name).float()
    return {k: v.cpu().contiguous() for k, v in out.items()}


def _check_fits(model, name: str, tensors: Dict[str, Tensor]) -> None:
    """The trained tensors have the adapter's own shapes (a still-sharded Parameter would not)."""
    slot = model._slot_of(name)
    for (i, m) in model.adapters[name].modules:
        lin = model._linears[(i, m)]
        for stack, fname in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            t = tensors[f"layers.{i}.{m}.{fname}"]
            want = tuple(lin._slot_region(stack, slot))
            if tuple(t.shape) != want:
                raise ValueError(f"MiLoRA: layers.{i}.{m}.{fname} has shape {tuple(t.shape)}, adapter {name!r} has {want}: "
                                 "a sharded Parameter (FSDP1)? Pass the gathered full state_dict (state_dict=...)")


def save_trained(model, directory, state_dict=None, is_main_process: bool = True) -> List[str]:
    """Write every trainable adapter (Trainer checkpoints): the first of `trainable_names`
    (the active adapter when it trains) into `directory`, each other one into
    `directory/<name>`. Tensors come from the Parameters (or `state_dict`); every rank must
    call under FSDP2 (DTensors are gathered), only `is_main_process` writes."""
    from .checkpoint import write_adapter_dir
    names = trainable_names(model)
    if not names:
        raise ValueError("MiLoRA: no adapter is trainable; nothing to save as a training checkpoint")
    order = sorted(names, key=lambda n: n != model.active_adapter)
    for k, name in enumerate(order):
        tensors = trained_tensors(model, name, state_dict)
        _check_fits(model, name, tensors)
        if is_main_process:
            write_adapter_dir(directory if k == 0 else os.path.join(directory, name), model.adapter_spec(name, tensors=tensors))
    return order


@torch.no_grad()
def load_trained(model, directory) -> List[str]:
    """Copy a training checkpoint written by save_trained back into the same Parameters (in
    place, exact: float32 masters stay float32), then into the serving stacks. The files must
    describe the adapters as they are (same kind, modules, ranks)."""
    from .checkpoint import read_adapter_dir, validate_spec
    names = trainable_names(model)
    order = sorted(names, key=lambda n: n != model.active_adapter)
    for k, name in enumerate(order):
        src = directory if k == 0 else os.path.join(directory, name)
        spec = read_adapter_dir(src)
        validate_spec(model.layers, getattr(model.base_model, "config", None), spec, os.fspath(src))
        info = model.adapters[name]
        if spec.kind != info.kind or dict(spec.modules) != dict(info.modules):
            raise ValueError(f"MiLoRA: {src} holds a {spec.kind} adapter with other modules / ranks than adapter {name!r}")
        t = spec.tensors
        for (i, m) in info.modules:
            own = model._linears[(i, m)].trainable_parameters_of(name)
            own["lora_a"].copy_(t[f"layers.{i}.{m}.lora_A"])
            own["lora_b"].copy_(t[f"layers.{i}.{m}.lora_B"])
            if info.kind == "token":
                own["router_weight"].copy_(t[f"layers.{i}.{m}.router"])
        if info.kind == "prompt":
            E = info.config.experts_per_module
            for i, router in enumerate(model.routers):
                own = router.trainable_parameters_of(name)
                for m in MODULE_NAMES:
                    key = f"layers.{i}.router.{m}.weight"
                    if key in t:
                        own["weight"][MODULE_INDEX[m], :E].copy_(t[key])
                for stack in ("pool_query", "rational_num", "rational_den"):
                    key = f"layers.{i}.router.{stack}"
                    if key in t:
                        own[stack].copy_(t[key])
    sync(model)
    return order
