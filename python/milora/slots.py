"""Stacked adapter slots for serving, separate Parameters for the adapters being trained.

A MiLoRALinear or PromptRouter keeps every adapter's weights in ONE stacked tensor per kind
(leading dim = adapter slot): serving reads it as it is, one op call per linear. Those stacks are
buffers, not Parameters, so `model.parameters()` never hands another adapter's slot to an
optimizer (AdamW's decoupled weight decay and momentum would move it).

An adapter being trained gets its own Parameters, one per stack, holding exactly its own region
of the slot (its rank and experts, no zero padding): `trainable.<stack>__<adapter>`. They are in
float32 on a 16-bit model by default (master weights; see `MiLoRAModel`'s adapter_dtype).

Who holds the truth: while an adapter is trainable its Parameters do; its slot in the stack is a
copy, kept in step by version counters (`Tensor._version` grows on every in-place write) and by counting optimizer steps (a fused
optimizer writes without bumping versions):
  * every forward first syncs (below: a slot-sized copy after an optimizer step), then
  * a forward with autograd builds the stack it hands to the op out of place, with the trainable
    regions taken from the Parameters (cast to the stack's dtype): gradients reach the
    Parameters and nothing else;
  * a forward without autograd (eval, generate) and every reader of the stacks first copies any
    Parameter written since the last copy (an optimizer step) into its slot, then uses the stack
    as serving does;
  * a write into a trainable slot of the stack (loading weights) is copied into the Parameter
    in place (the optimizer keeps the same Parameter object) at the next sync.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch import Tensor

from .routing import current_call

# Optimizer steps seen so far (any torch optimizer). A fused optimizer (AdamW(fused=True), the
# Trainer's default) writes Parameters without bumping their version counters, so a step is
# also a reason to copy the Parameters into their slots.
_STEPS = [0]


def _count_step(optimizer, args, kwargs) -> None:
    _STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)

Region = Tuple[int, ...]  # the adapter's own sizes of the slot's dims (a prefix box of the padded slot)


def param_key(stack: str, adapter: str) -> str:
    """ParameterDict key of adapter `adapter`'s Parameter for stack `stack` (no dots allowed)."""
    return f"{stack}__{adapter.replace('.', '%2E')}"


class _Entry:
    __slots__ = ("adapter", "slot", "key", "region", "param_seen", "stack_seen", "step_seen")

    def __init__(self, adapter: str, slot: int, key: str, region: Region) -> None:
        self.adapter, self.slot, self.key, self.region = adapter, slot, key, region
        self.param_seen: Tuple[int, int] = (-1, -1)   # (data_ptr, _version) of the Parameter at the last sync
        self.stack_seen: Tuple[int, int] = (-1, -1)   # (data_ptr, _version) of the stack at the last sync
        self.step_seen = _STEPS[0]                     # optimizer steps at the last sync


def _state(t: Tensor) -> Tuple[int, int]:
    return (t.data_ptr(), t._version)


def _local(t: Tensor) -> Tensor:
    """The full value of a Parameter that FSDP2 may have turned into a DTensor (collective)."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _sync_before_state_dict(module, prefix, keep_vars) -> None:
    module.sync_slots()


def _synced_by_call(module) -> bool:
    # False while a shard was left for the forward to sync (FSDP: the Parameter is whole only there)
    ctx = current_call()
    return (ctx is not None and ctx.synced and ctx.owner is getattr(module, "_routing_owner", None)
            and not getattr(module, "_sync_deferred", True))


class SlotStacks:
    """Mixin for nn.Modules with stacked per-slot tensors (registered as buffers)."""

    def _init_slot_stacks(self) -> None:
        self.trainable = nn.ParameterDict()
        self._entries: Dict[str, List[_Entry]] = {}  # stack name -> entries (slot order)
        self._index_cache: Dict = {}
        # a state dict shows stacks and Parameters in step (a slot written by a load, a Parameter by a step)
        self.register_state_dict_pre_hook(_sync_before_state_dict)

    # ---- what the subclass provides ---------------------------------------------------------

    def _slot_region(self, stack: str, slot: int) -> Region:
        """The adapter's own sizes of `stack`'s slot `slot` (dims after the slot dim)."""
        raise NotImplementedError

    def _stack_names(self) -> Iterable[str]:
        raise NotImplementedError

    # ---- trainable set ----------------------------------------------------------------------

    def set_trainable_slots(self, slots: Dict[str, int], dtype: Optional[torch.dtype] = None) -> None:
        """Make exactly the adapters in `slots` (name -> slot index) trainable: each gets (or keeps,
        as the same Parameter objects) its own Parameters; the others lose theirs (their values go
        back into the stacks first). dtype: of new Parameters (default: the stack's dtype)."""
        self.sync_slots()
        old = {e.key: e for entries in self._entries.values() for e in entries}
        new_entries: Dict[str, List[_Entry]] = {}
        keep = set()
        for stack in self._stack_names():
            buf = getattr(self, stack)
            if buf is None:
                continue
            for name, slot in sorted(slots.items(), key=lambda kv: kv[1]):
                region = tuple(self._slot_region(stack, slot))
                if 0 in region:
                    continue  # this adapter has nothing in this stack (e.g. r = 0 at this linear)
                key = param_key(stack, name)
                idx = (slot,) + tuple(slice(0, n) for n in region)
                value = buf.detach()[idx]
                p = self.trainable[key] if key in self.trainable else None
                if p is None or tuple(p.shape) != region:
                    want = dtype if dtype is not None else (p.dtype if p is not None else buf.dtype)
                    self.trainable[key] = nn.Parameter(value.to(want).clone().contiguous())
                e = _Entry(name, slot, key, region)
                e.param_seen, e.stack_seen = _state(self.trainable[key]), _state(buf)
                new_entries.setdefault(stack, []).append(e)
                keep.add(key)
        for key in list(self.trainable.keys()):
            if key not in keep:
                del self.trainable[key]
        self._entries = new_entries
        self._index_cache = {}
        del old

    def trainable_slot_map(self) -> Dict[str, int]:
        """Adapter name -> slot of the adapters trainable here."""
        return {e.adapter: e.slot for entries in self._entries.values() for e in entries}

    def _rebind_slots(self, removed: Optional[int] = None) -> None:
        """After the stacks were rebuilt (a slot added, or slot `removed` dropped): the same
        adapters stay trainable, with the same Parameter objects, at their new slot indices."""
        mapping = {}
        for name, slot in self.trainable_slot_map().items():
            if removed is not None and slot == removed:
                continue
            mapping[name] = slot - 1 if removed is not None and slot > removed else slot
        for entries in self._entries.values():  # the old stacks are gone: nothing to sync from them
            for e in entries:
                e.param_seen = _state(self.trainable[e.key])
        self._entries = {}
        self.set_trainable_slots(mapping)

    def trainable_slot_names(self) -> List[str]:
        return sorted({e.adapter for entries in self._entries.values() for e in entries})

    def has_trainable_slots(self) -> bool:
        return bool(self._entries)

    # ---- keeping stacks and Parameters in step ------------------------------------------------

    @torch.no_grad()
    def sync_slots(self) -> None:
        """Copy Parameters written since the last sync into their slots, and slots written since
        the last sync (loads) into their Parameters. A no-op without trainable adapters."""
        deferred = False
        for stack, entries in self._entries.items():
            buf = getattr(self, stack)
            for e in entries:
                p = self.trainable[e.key]
                if hasattr(p, "full_tensor") or tuple(p.shape) != e.region:
                    # a shard outside its forward (FSDP2 DTensor, FSDP1 flat view): synced inside the
                    # forward, where the Parameter is whole; saved through state_dict= / full_tensor
                    deferred = True
                    continue
                idx = (e.slot,) + tuple(slice(0, n) for n in e.region)
                stack_moved = _state(buf) != e.stack_seen
                param_moved = _state(p) != e.param_seen or _STEPS[0] != e.step_seen
                if param_moved or not stack_moved:
                    if param_moved:
                        buf[idx].copy_(p.detach().to(buf.dtype))
                elif p.shape == buf[idx].shape:  # the slot was written (a load): it wins
                    p.copy_(buf[idx].to(p.dtype))
                e.param_seen, e.stack_seen, e.step_seen = _state(p), _state(buf), _STEPS[0]
        self._sync_deferred = deferred

    def _stacked(self, stack: str) -> Tensor:
        """The stack a forward hands to the op (see the module docstring)."""
        buf = getattr(self, stack)
        entries = self._entries.get(stack)
        if not entries:
            return buf
        # A compiled region cannot sync, and a call of the owning model synced once at its start
        # (a per-linear sync costs tens of microseconds per decode step and linear).
        if not torch.compiler.is_compiling() and not _synced_by_call(self):
            self.sync_slots()
        if not torch.is_grad_enabled():  # no autograd: the (synced) stack itself
            return buf
        params = [self.trainable[e.key] for e in entries]
        if not any(p.requires_grad for p in params):
            return buf
        # out of place: the op sees the Parameters' current values, gradients reach them only
        if len(entries) == 1 and buf.shape[0] == 1 and tuple(params[0].shape) == tuple(buf.shape[1:]):
            return params[0].to(buf.dtype).unsqueeze(0)
        key = (stack, buf.device, tuple(e.slot for e in entries))
        idx = self._index_cache.get(key)
        if idx is None:
            idx = self._index_cache[key] = torch.tensor([e.slot for e in entries], dtype=torch.long, device=buf.device)
        full = tuple(buf.shape[1:])
        vals = []
        for e, p in zip(entries, params):
            v = p.to(buf.dtype)
            if tuple(v.shape) != full:
                pad: List[int] = []
                for have, want in zip(reversed(v.shape), reversed(full)):
                    pad += [0, want - have]
                v = F.pad(v, pad)
            vals.append(v)
        return buf.index_copy(0, idx, torch.stack(vals))

    def trainable_parameters_of(self, adapter: str) -> Dict[str, nn.Parameter]:
        """Stack name -> the Parameter of `adapter` (empty if it is not trainable here)."""
        return {stack: self.trainable[e.key] for stack, entries in self._entries.items()
                for e in entries if e.adapter == adapter}

    def _after_apply(self) -> None:
        """After .to() / .float() ...: stacks and Parameters were converted separately."""
        self._index_cache = {}
        for stack, entries in self._entries.items():
            buf = getattr(self, stack)
            for e in entries:
                e.param_seen = (-1, -1)  # treat the Parameter as written: it is pushed at the next sync
                e.stack_seen = _state(buf)
