"""MiLoRAModel: a LLaMA-family causal LM (transformers 5.x) with MiLoRA adapters.

`get_milora_model(model, config)` replaces the target linears of every decoder layer
(`model.model.layers[i].self_attn.{q,k,v,o}_proj`, `.mlp.{gate,up,down}_proj`, see targets.py)
by `MiLoRALinear` (sharing the frozen base weights) and adds one `PromptRouter` per decoder layer.

Top-down, one call (types in routing.py; picture in docs/module_layer.md):
  forward / generate(adapter_names=...)
    -> a Request (each row's adapter slot, the prompt mask), entered with `self.routing(req)`
       (a CallContext in a ContextVar: this call, this thread);
    -> per forward of the decoder stack, its pre-hook builds the BatchPlan (seq_offsets,
       adapter_ids, gates): a prompt gets new PromptGates, attached to its KV cache; a
       continuation reads the gates stored with the cache it continues;
    -> on a prompt forward, each decoder layer's pre-hook runs the layer's router on the
       hidden states entering the layer and writes the gates of that layer's linears;
    -> each MiLoRALinear reads its gates from the plan and makes one op call; it writes nothing
       back (routers return their load-balancing losses to the call, the model sums them).
Decode steps run no router and no per-linear index work.

Adapter kinds: "prompt" (MiLoRA, gates from the layer routers); "token" (per-token MoE-LoRA,
the MOELoRA baseline: a router at every adapted linear on every token, the op called with one
sequence per token); "static" (no router, every adapted module on with gate alpha / r:
imported PEFT adapters). Rows of different kinds can share a batch.

Adapters are installed by one path (`_load_spec` -> `_install`), all or nothing; checkpoint.py
and peft_import.py only read, validate and write files.

Not supported: chunked prefill through `forward` (a continuation reads the gates of the cache's
first chunk), models whose layers are not under `model.model.layers`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .config import MODULE_INDEX, MODULE_NAMES, MODULE_PARENTS, MiLoRAConfig
from .layer import MiLoRALinear
from .continuous_batching import NOT_FROM_BASE_MODEL, ContinuousBatchingMixin
from .router import PromptRouter, switch_load_balance_losses
from .routing import (BatchPlan, CallContext, PromptGates, Request, RoutedCheckpoint, RoutingKey, SlotTables,
                      TokenSettings, attach_gates, current_call, enter as enter_call, gates_of)
from .targets import AdapterInfo, check_target_modules, find_decoder_layers, get_target_linear, module_path
from .checkpoint import AdapterSpec, read_adapter_dir, validate_spec, write_adapter_dir
from .peft_import import read_peft_dir

BASE_NAMES = (None, "base")


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if get is not None:
        return int(get())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        return int(cache[0][0].shape[-2])
    return 0


def check_adapter_name(name) -> None:
    """A new adapter's name: a non-empty string that does not name the base model."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"MiLoRA: adapter names must be non-empty strings, got {name!r}")
    if name in ("base", "__base__"):
        raise ValueError(f"MiLoRA: {name!r} is reserved for the base model")


class _Undo:
    """What an adapter install may change, remembered so that a failure restores it exactly:
    each adapted linear's and router's Parameters / buffers / attributes (installing replaces
    Parameters, never edits existing ones in place, so keeping references is enough), the
    requires_grad flags, the model's adapter records, and which linears were wrapped."""

    def __init__(self, model: "MiLoRAModel") -> None:
        self.model = model
        self.modules = [(mod, _module_state(mod)) for mod in list(model._linears.values()) + list(model.routers)]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.wrapped = set(model._linears)
        self.fields = {"active_adapter": model.active_adapter}
        self.adapters = dict(model.adapters)

    def restore(self) -> None:
        m = self.model
        version = m._version + 1  # requests / caches built during the failed install are stale
        for key in [k for k in m._linears if k not in self.wrapped]:  # linears this install wrapped
            setattr(getattr(m.layers[key[0]], MODULE_PARENTS[key[1]]), key[1], m._originals.pop(key))
            del m._linears[key]
        for mod, state in self.modules:
            mod.__dict__.clear()
            mod.__dict__.update(state)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        m.adapters.clear()
        m.adapters.update(self.adapters)
        for k, v in self.fields.items():
            setattr(m, k, v)
        m._version, m._tables = version, None


def _module_state(mod: nn.Module) -> dict:
    """A shallow copy of a module's attributes, with its containers copied one level."""
    return {k: (type(v)(v) if isinstance(v, (dict, list)) else v) for k, v in mod.__dict__.items()}


# ---- the model ----------------------------------------------------------------------------


class MiLoRAModel(ContinuousBatchingMixin, nn.Module):
    """A causal LM with MiLoRA adapters; see the module docstring. Build with `get_milora_model`
    or `MiLoRAModel.from_pretrained`. Attributes not found here are looked up on `base_model`
    (except the continuous-batching ones: the base model's would serve without adapters)."""

    def __init__(self, model: nn.Module, config: MiLoRAConfig, adapter_name: Optional[str] = "default", *,
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        if not isinstance(config, MiLoRAConfig):
            raise TypeError(f"get_milora_model: config must be a MiLoRAConfig, got {type(config).__name__}")
        config.validate()  # fields may have been assigned after construction
        layers = find_decoder_layers(model)
        if any(isinstance(m, MiLoRALinear) for m in model.modules()):
            raise ValueError("get_milora_model: this model already has MiLoRA layers (wrap the original base model once)")
        check_target_modules(layers, config.target_modules, type(model).__name__)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is None:
            hidden = get_target_linear(layers, 0, config.target_modules[0]).in_features
        self._base_requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.base_model = model
        self.default_config = config
        self.hidden_size = int(hidden)
        self.num_layers = len(layers)
        dev = next(model.parameters()).device
        self.routers = nn.ModuleList([PromptRouter(self.hidden_size, len(MODULE_NAMES), 1, 0, device=dev) for _ in layers])
        self._routing_key = RoutingKey()
        self.adapters: Dict[str, AdapterInfo] = {}
        self.active_adapter: Optional[str] = None
        self.trainable = True
        self.trainable_adapters: Optional[List[str]] = None  # None: the active adapter (milora.trainable)
        self.autocast_adapter_dtype = bool(autocast_adapter_dtype)
        self._adapters_disabled = False
        self._linears: Dict[Tuple[int, str], MiLoRALinear] = {}
        self._version = 0
        self._tables: Optional[SlotTables] = None
        self._layers_ref = [layers]  # a list so that nn.Module does not register it twice
        self._originals: Dict[Tuple[int, str], nn.Linear] = {}  # the wrapped nn.Linear modules
        self._hooks: List = []
        self._direct_requests: Dict = {}
        try:
            for i in range(self.num_layers):
                for m in config.target_modules:
                    self._wrap(i, m)
        # Routing hooks. They act only inside a call of this model (the CallContext of the running
        # thread / task says so), except that a direct call of the wrapped HF model's forward opens
        # a one-forward call with the active adapter (so `model.base_model(...)` and HF utilities
        # that call it behave like the MiLoRAModel).
            stack = model.model
            self._hooks = [stack.register_forward_pre_hook(self._on_stack_start, with_kwargs=True),
                           stack.register_forward_hook(self._on_stack_end, always_call=True)]
            for i, layer in enumerate(layers):
                self._hooks.append(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
            if adapter_name is not None:
                self.add_adapter(adapter_name, config)
        except BaseException:
            self._unwrap()  # the base model leaves exactly as it came
            raise

    def _unwrap(self) -> None:
        """Give the base model back as it was before wrapping: its nn.Linear modules, no hooks,
        its requires_grad flags. The MiLoRAModel is unusable afterwards."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for key, original in self._originals.items():
            setattr(getattr(self.layers[key[0]], MODULE_PARENTS[key[1]]), key[1], original)
        self._originals = {}
        self._linears = {}
        for p in self.base_model.parameters():
            if id(p) in self._base_requires_grad:
                p.requires_grad_(self._base_requires_grad[id(p)])

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._changed()  # cached index tables live on the old device
        return out

    # ---- attribute fallback ---------------------------------------------------------------

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model" or name in NOT_FROM_BASE_MODEL:
                raise
            return getattr(self.base_model, name)

    @property
    def layers(self) -> nn.ModuleList:
        return self._layers_ref[0]

    def milora_linears(self) -> Dict[Tuple[int, str], MiLoRALinear]:
        """(layer index, module name) -> MiLoRALinear, for every adapted linear."""
        return dict(self._linears)

    # ---- wrapping -------------------------------------------------------------------------

    def _wrap(self, layer_idx: int, module: str) -> MiLoRALinear:
        key = (layer_idx, module)
        if key in self._linears:
            return self._linears[key]
        parent = getattr(self.layers[layer_idx], MODULE_PARENTS[module])
        base = getattr(parent, module)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"MiLoRA: {module_path(layer_idx, module)} is not an nn.Linear ({type(base).__name__})")
        lin = MiLoRALinear.from_linear(base, adapter_name=None)
        for info in self.adapters.values():  # placeholder slots of the adapters already loaded
            lin.add_adapter(info.name, r=0, kind=info.kind, top_k=info.config.top_k, gate_mode=info.config.gate_mode)
        if self.active_adapter is not None:
            lin.set_adapter(self.active_adapter)
            lin.lora_dropout = self.adapters[self.active_adapter].config.dropout
        lin.set_routing(self._routing_key, layer_idx, MODULE_INDEX[module])
        setattr(parent, module, lin)
        self._originals[key] = base
        self._linears[key] = lin
        return lin

    # ---- adapters -------------------------------------------------------------------------

    def _check_new_name(self, name: str) -> None:
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"MiLoRA: adapter {name!r} already exists; delete it first or pick another name")

    def _install(self, info: AdapterInfo, init: str, generator: Optional[torch.Generator] = None,
                 tensors: Optional[Dict[str, Tensor]] = None) -> None:
        """Add slot `len(self.adapters)` for `info` to every linear and router, with the weights
        of `tensors` (file names, see checkpoint.py) when given. All or nothing: if any step
        fails, the model and the base model are restored exactly (the same Parameter objects)."""
        undo = _Undo(self)
        try:
            self._install_slots(info, init, generator)
            if tensors is not None:
                self._set_adapter_weights(info, tensors)
        except BaseException:
            undo.restore()
            raise

    def _install_slots(self, info: AdapterInfo, init: str, generator: Optional[torch.Generator]) -> None:
        cfg = info.config
        E = cfg.experts_per_module
        for key in sorted(info.modules):
            self._wrap(*key)
        for key, lin in self._linears.items():
            rank, scaling = info.modules.get(key, (0, 0.0))
            lin.add_adapter(info.name, r=rank, scaling=scaling, num_experts=E if rank else 1, kind=info.kind,
                            top_k=cfg.top_k, gate_mode=cfg.gate_mode, init=init, generator=generator)
        for router in self.routers:
            router.add_slot(pooler=cfg.pooler, activation=cfg.activation, top_k=cfg.top_k,
                            gate_mode=cfg.gate_mode, num_experts=E, generator=generator)
        self.adapters[info.name] = info
        self._changed()
        if self.active_adapter is None:
            self.set_adapter(info.name)
        else:
            self._apply_trainable()

    def _set_adapter_weights(self, info: AdapterInfo, t: Dict[str, Tensor]) -> None:
        """Copy one adapter's tensors (file names, validated) into its slot."""
        name = info.name
        for (i, m) in info.modules:
            names = ["lora_A", "lora_B"] + (["router"] if info.kind == "token" else [])
            self._linears[(i, m)].set_adapter_tensors(name, {n: t[f"layers.{i}.{m}.{n}"] for n in names})
        if info.kind == "prompt":
            p = self._slot_of(name)
            E = info.config.experts_per_module
            with torch.no_grad():
                for i, router in enumerate(self.routers):
                    for m in MODULE_NAMES:
                        k = f"layers.{i}.router.{m}.weight"
                        if k in t:
                            router.weight[p, MODULE_INDEX[m], :E].copy_(t[k])
                    if f"layers.{i}.router.pool_query" in t:
                        router.pool_query[p].copy_(t[f"layers.{i}.router.pool_query"])
                    if f"layers.{i}.router.rational_num" in t:
                        router.rational_num[p].copy_(t[f"layers.{i}.router.rational_num"])
                        router.rational_den[p].copy_(t[f"layers.{i}.router.rational_den"])
        from .trainable import sync
        sync(self)  # a trainable adapter's Parameters take the installed values

    def adapter_spec(self, adapter_name: str, tensors: Optional[Dict[str, Tensor]] = None) -> AdapterSpec:
        """One adapter as an AdapterSpec (CPU copies of its tensors under the file names of
        checkpoint.py), e.g. to save it. tensors: the adapter's tensors when the caller already
        has them (a trained adapter's float32 Parameters, or tensors gathered from shards)."""
        if adapter_name not in self.adapters:
            raise ValueError(f"MiLoRA: unknown adapter {adapter_name!r}; loaded adapters: {list(self.adapters)}")
        info = self.adapters[adapter_name]
        cfg = getattr(self.base_model, "config", None)
        base = {"model_type": getattr(cfg, "model_type", None), "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_layers}
        if tensors is not None:
            return AdapterSpec(info.config, info.kind, dict(info.modules), tensors, base)
        from .trainable import sync
        sync(self)  # stacks up to date with the trainable Parameters
        out: Dict[str, Tensor] = {}
        for (i, m) in sorted(info.modules):
            for k, v in self._linears[(i, m)].get_adapter_tensors(adapter_name).items():
                out[f"layers.{i}.{m}.{k}"] = v.cpu().contiguous()
        if info.kind == "prompt":
            p = self._slot_of(adapter_name)
            E = info.config.experts_per_module
            layers_mods: Dict[int, list] = {}
            for (i, m) in info.modules:
                layers_mods.setdefault(i, []).append(m)
            for i, mods in layers_mods.items():
                r = self.routers[i]
                for m in mods:
                    out[f"layers.{i}.router.{m}.weight"] = r.weight.detach()[p, MODULE_INDEX[m], :E].float().cpu().clone().contiguous()
                if info.config.pooler == "self_attn":
                    out[f"layers.{i}.router.pool_query"] = r.pool_query.detach()[p].float().cpu().clone()
                if info.config.activation == "rational":
                    out[f"layers.{i}.router.rational_num"] = r.rational_num.detach()[p].float().cpu().clone()
                    out[f"layers.{i}.router.rational_den"] = r.rational_den.detach()[p].float().cpu().clone()
        return AdapterSpec(info.config, info.kind, dict(info.modules), out, base)

    def add_adapter(self, adapter_name: str, config: Optional[MiLoRAConfig] = None, *, seed: Optional[int] = None) -> None:
        """Add a new, freshly initialised adapter (LoRA B = 0, so it starts as the base model).

        config defaults to the config given to get_milora_model; its routing decides the kind
        ("prompt" or "token"). Modules not wrapped yet are wrapped. seed: optional seed of the
        initialisation."""
        config = self.default_config if config is None else config
        if not isinstance(config, MiLoRAConfig):
            raise TypeError(f"add_adapter: config must be a MiLoRAConfig, got {type(config).__name__}")
        config.validate()  # fields may have been assigned after construction
        self._check_new_name(adapter_name)
        check_target_modules(self.layers, config.target_modules, type(self.base_model).__name__)
        modules = {(i, m): (config.r, config.scaling) for i in range(self.num_layers) for m in config.target_modules}
        gen = None
        if seed is not None:
            gen = torch.Generator(device=next(self.base_model.parameters()).device).manual_seed(seed)
        self._install(AdapterInfo(adapter_name, config, config.routing, modules), "lora", gen)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (its slot in every linear and router). Wrapped linears stay wrapped."""
        slot = self._slot_of(adapter_name)
        for lin in self._linears.values():
            lin.delete_adapter(adapter_name)
        for router in self.routers:
            router.remove_slot(slot)
        del self.adapters[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            nxt = next(iter(self.adapters), None)
            self._changed()
            self.set_adapter(nxt)
        else:
            self._changed()

    def set_adapter(self, adapter_name: Optional[str]) -> None:
        """Make `adapter_name` active: rows without adapter_names use it, it is the one trained
        (its Parameters get requires_grad when the model is trainable) and saved by default.
        None: no active adapter (the base model)."""
        if adapter_name is not None:
            self._slot_of(adapter_name)
        self.active_adapter = adapter_name
        dropout = self.adapters[adapter_name].config.dropout if adapter_name is not None else 0.0
        for lin in self._linears.values():
            lin.set_adapter(adapter_name)
            lin.lora_dropout = dropout
        self._apply_trainable()

    def set_trainable(self, trainable: bool = True) -> None:
        """Make the active adapter trainable (or freeze everything with False)."""
        self.trainable = bool(trainable)
        self._apply_trainable()

    def set_trainable_adapters(self, adapter_names: Optional[Sequence[str]]) -> None:
        """Train several adapters at once: each gets its own Parameters (and so its own optimizer
        state); a batch names each row's adapter (adapter_names) and every adapter learns from its
        own rows only. The loss of such a batch is the sum over adapters of each adapter's mean
        token loss over its rows (see `forward`). None: back to training the active adapter."""
        if adapter_names is not None:
            if isinstance(adapter_names, str):
                raise ValueError("set_trainable_adapters: give a list of adapter names")
            for n in adapter_names:
                self._slot_of(n)
            adapter_names = list(dict.fromkeys(adapter_names))
        self.trainable_adapters = adapter_names
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        from . import trainable
        trainable.apply(self)

    def _slot_of(self, name: str) -> int:
        for i, n in enumerate(self.adapters):
            if n == name:
                return i
        raise ValueError(f"MiLoRA: unknown adapter {name!r}; loaded adapters: {list(self.adapters)} (or 'base' / None for the base model)")

    @property
    def adapter_names(self) -> List[str]:
        return list(self.adapters)

    def _changed(self) -> None:
        """The adapter set changed: slot tables are rebuilt, older requests / cached gates are refused."""
        self._version += 1
        self._tables = None

    def _slot_tables(self) -> SlotTables:
        """Per-slot tables of the current adapter set (rebuilt after adapter changes)."""
        tables = self._tables
        if tables is None:
            P = len(self.adapters)
            dev = self.routers[0].weight.device
            E = self.routers[0].num_experts
            scale = torch.zeros(self.num_layers, P, len(MODULE_NAMES), dtype=torch.float32, device=dev)
            for (i, m), lin in self._linears.items():
                scale[i, :, MODULE_INDEX[m]] = lin.scaling.to(dev)
            static_w = torch.zeros(P, E, dtype=torch.float32, device=dev)
            for p, info in enumerate(self.adapters.values()):
                n = info.config.experts_per_module
                static_w[p, :n] = 1.0 / n
            kinds = tuple(info.kind for info in self.adapters.values())
            experts = tuple(tuple(self._linears[(i, m)].num_experts if (i, m) in self._linears else None
                                  for m in MODULE_NAMES) for i in range(self.num_layers))
            tables = SlotTables(
                version=self._version, scale=scale, static_weights=static_w,
                is_prompt=torch.tensor([k == "prompt" for k in kinds], dtype=torch.bool, device=dev),
                is_token=torch.tensor([k == "token" for k in kinds], dtype=torch.bool, device=dev),
                kinds=kinds, experts=experts)
            self._tables = tables
        return tables

    # ---- requests -------------------------------------------------------------------------

    def _make_request(self, adapter_names, batch_size: int, device, mask: Optional[Tensor], collect_aux: bool,
                      route_once: bool = False) -> Request:
        """The Request of one call: each row's slot from adapter_names (default: the active adapter).
        Inside `disable_adapter()` every row is the base model."""
        if self._adapters_disabled:
            adapter_names = [None] * batch_size
        if adapter_names is None:
            names = [self.active_adapter] * batch_size
        else:
            if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
                raise ValueError(f"MiLoRA: adapter_names must be a list with one adapter name (or None / 'base') per batch row, got {type(adapter_names).__name__}")
            if len(adapter_names) != batch_size:
                raise ValueError(f"MiLoRA: adapter_names has {len(adapter_names)} entries but the batch has {batch_size} rows")
            names = list(adapter_names)
        order = {n: i for i, n in enumerate(self.adapters)}
        slots = []
        for n in names:
            if n in BASE_NAMES or n == "__base__":
                slots.append(-1)
            elif isinstance(n, str) and n in order:
                slots.append(order[n])
            else:
                raise ValueError(f"MiLoRA: unknown adapter {n!r} in adapter_names; loaded adapters: {list(self.adapters)} (None or 'base' = base model)")
        infos = list(self.adapters.values())
        present = sorted({s for s in slots if s >= 0})
        tok_slots = [s for s in present if infos[s].kind == "token"]
        token = None
        if tok_slots:
            tok = [infos[s].config for s in tok_slots]
            ks = {c.top_k for c in tok}
            modes = {c.gate_mode for c in tok}
            token = TokenSettings(top_k=ks.pop() if len(ks) == 1 else None,
                                  hard=(modes.pop() == "hard") if len(modes) == 1 else None,
                                  k_max=max(min(c.top_k, c.experts_per_module) for c in tok),
                                  single_slot=tok_slots[0] if len(tok_slots) == 1 else None)
        return Request(slots, device, self._slot_tables(), prompt_mask=mask, collect_aux=collect_aux, token=token,
                       route_once=route_once)

    @contextmanager
    def routing(self, request: Request, plan: Optional[BatchPlan] = None):
        """Scope of one call: `request` is the current call of this thread / task inside the block.
        Yields the CallContext (its `aux` holds the routers' load-balancing losses afterwards).
        plan: a BatchPlan built by the caller (a packed ragged batch: its own seq_offsets and
        gates) used for every forward of the block instead of one built per forward; it must
        hold all gates (`routes` False)."""
        if request.version != self._version:
            raise RuntimeError("MiLoRA: this request was built for another set of adapters; build it again")
        if plan is not None and plan.routes:
            raise ValueError("MiLoRA: a caller-built BatchPlan must carry its gates (routes=False)")
        ctx = CallContext(self._routing_key, request, plan)
        with enter_call(ctx):
            yield ctx

    def _direct_request(self, B: int, device) -> Request:
        """The request of a direct call of the wrapped HF model (no MiLoRAModel call around it):
        the active adapter on every row. Cached per (B, device) and adapter set."""
        key = (B, device, self._version, self.active_adapter, self._adapters_disabled)
        req = self._direct_requests.get(key)
        if req is None:
            if len(self._direct_requests) > 16:
                self._direct_requests = {}
            req = self._direct_requests[key] = self._make_request(None, B, device, None, collect_aux=False)
        return req

    # ---- per forward: the batch plan --------------------------------------------------------

    def _own_call(self) -> Optional[CallContext]:
        ctx = current_call()
        return ctx if ctx is not None and ctx.owner is self._routing_key else None

    def _on_stack_start(self, module, args, kwargs):
        """Start of a decoder-stack forward inside a call: build its BatchPlan."""
        x = kwargs.get("input_ids")
        if x is None and args:
            x = args[0]
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            return None
        B, L = int(x.shape[0]), int(x.shape[1])
        ctx = self._own_call()
        if ctx is None:  # a direct call of the wrapped model: a call scope for this forward only
            ctx = CallContext(self._routing_key, self._direct_request(B, x.device))
            ctx.scope = enter_call(ctx)
            ctx.scope.__enter__()
        if module.training and torch.is_grad_enabled():
            self._wrap_checkpoint_functions()  # no-op unless checkpointing was enabled on the base model
        if ctx.pinned:  # the caller built this call's plan (packed ragged batches)
            return None
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        ctx.plan = self._plan(ctx, B, L, cache, kwargs.get("attention_mask"))
        return None

    def _plan(self, ctx: CallContext, B: int, L: int, cache, attention_mask) -> BatchPlan:
        req = ctx.request
        rows = req.rows(B)
        offs = req.offsets(B, L)
        token = req.token_plan(B, L)
        if _cache_length(cache) > 0:  # a continuation: the gates of the cache's own prompt
            gates = self._cached_gates(cache, rows)
            offs, ids = gates.step_indices(offs, rows.slots, L)
            return BatchPlan(offs, ids, req.all_base, gates, False, rows, None, token)
        if req.route_once and ctx.call_gates is not None:  # generate(use_cache=False): routed at step 1
            if ctx.call_gates.slots != rows.key:
                raise RuntimeError(f"MiLoRA: the batch changed from {ctx.call_gates.batch_size} to {B} rows during one "
                                   "generate call without a KV cache")
            return BatchPlan(offs, rows.slots, req.all_base, ctx.call_gates, False, rows, None, token)
        mask = rows.mask
        if mask is None and isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 \
                and attention_mask.shape[0] == B:
            mask = attention_mask
        if mask is not None:
            if mask.shape[0] != B or mask.shape[1] < L:
                raise ValueError(f"MiLoRA: prompt mask of shape {tuple(mask.shape)} does not cover the batch {(B, L)}")
            mask = mask[:, mask.shape[1] - L:].to(torch.bool)
        gates = PromptGates(self._routing_key, req.version, rows.key, self.num_layers, len(MODULE_NAMES), L)
        if cache is not None:
            attach_gates(cache, gates)
        if req.route_once:
            ctx.call_gates = gates
        return BatchPlan(offs, rows.slots, req.all_base, gates, not req.all_base, rows, mask, token)

    def _cached_gates(self, cache, rows) -> PromptGates:
        """The gates stored with a non-empty KV cache, checked against this forward's rows."""
        gates = gates_of(cache)
        if gates is None:
            raise ValueError(
                "MiLoRA: this forward continues a KV cache that holds no MiLoRA routing (it was not filled by a "
                "MiLoRAModel forward / generate of this model), so the prompt's gates are unknown. Run the whole "
                "prompt through the model without a cache, or call generate(..., cache=prefix_cache) with the full "
                "input_ids: it routes from prefix + suffix")
        if gates.owner is not self._routing_key:
            raise ValueError("MiLoRA: this KV cache was routed by another MiLoRAModel")
        if gates.version != self._version:
            raise ValueError("MiLoRA: adapters were added or removed since this KV cache was routed; its gates "
                             "refer to the old adapter slots. Run the prompt again")
        if gates.slots != rows.key:
            names = list(self.adapters)
            show = lambda slots: [names[s] if s >= 0 else "base" for s in slots]  # noqa: E731
            raise ValueError(f"MiLoRA: this KV cache was routed for rows with adapters {show(gates.slots)}, but this "
                             f"forward asks for {show(rows.key)}; a cache continues only with its own adapters")
        return gates

    def _on_stack_end(self, module, args, output):
        ctx = self._own_call()
        if ctx is None or ctx.pinned:
            return None
        plan, ctx.plan = ctx.plan, None
        if ctx.scope is not None:  # the one-forward scope of a direct call ends here
            ctx.scope.__exit__(None, None, None)
            ctx.scope = None
        if plan is not None and plan.routes:
            cache = getattr(output, "cache", None)
            if cache is None and isinstance(output, dict):
                cache = output.get("past_key_values")
            if cache is not None and gates_of(cache) is not plan.gates:  # a cache the stack created itself
                attach_gates(cache, plan.gates)
        return None

    def _make_layer_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            ctx = self._own_call()
            if ctx is not None and ctx.plan is not None and ctx.plan.routes:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._route_layer(layer_idx, hidden, ctx.plan, ctx)
            return None
        return hook

    def _route_layer(self, i: int, hidden: Tensor, plan: BatchPlan, ctx: CallContext) -> None:
        """A prompt forward: run layer i's router and store the gates of its adapted linears in the
        plan's PromptGates (the only writer of gates)."""
        req = ctx.request
        tables = req.tables
        rows = plan.rows
        B = rows.slots.shape[0]
        scale = tables.scale[i].index_select(0, rows.slots_clamped) * rows.valid.unsqueeze(-1)  # [B, 7]
        kinds = req.kinds
        static = tables.static_weights.index_select(0, rows.slots_clamped).unsqueeze(1)  # [B, 1, E]
        if "prompt" in kinds:
            out = self.routers[i](hidden, mask=plan.pool_mask, slots=rows.slots_clamped, module_mask=scale > 0,
                                  aux_rows=rows.is_prompt, slots_present=req.prompt_slots)
            w = out.gates
            own = req.train_by_kind.get("prompt")
            if own is not None:  # several adapters trained at once: each one's Switch loss over its own rows
                groups = rows.slots.unsqueeze(0) == own[1].unsqueeze(1)  # [G, B]
                n = ((scale > 0).unsqueeze(0) & groups.unsqueeze(-1)).any(1).sum(-1).to(torch.float32)  # [G]
                ctx.add_adapter_aux("prompt", switch_load_balance_losses(out.probs, groups, n))
            elif not req.train_slots:
                ctx.add_aux(out.aux_loss)
            if len(kinds) > 1:
                w = torch.where(rows.is_prompt.view(B, 1, 1), w, static)
        else:
            w = static
        gates = w * scale.unsqueeze(-1)  # [B, 7, E]
        row = plan.gates.per_layer[i]
        for m, E in enumerate(tables.experts[i]):
            if E is not None:
                row[m] = gates[:, m, :E].contiguous()
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # One host read per layer per prompt (inference only: in training a zero gate can
            # still carry a gradient), so decode steps skip the op where no row uses a module.
            plan.gates.unused[i] = [not u for u in gates.ne(0).any(-1).any(0).tolist()]

    # ---- forward / generate ---------------------------------------------------------------

    @staticmethod
    def _batch_shape(input_ids, kwargs) -> Tuple[int, int, torch.device]:
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("MiLoRA: give input_ids or inputs_embeds")
        return int(ref.shape[0]), int(ref.shape[1]), ref.device

    def _wrap_checkpoint_functions(self) -> None:
        """HF gradient / activation checkpointing (`model.gradient_checkpointing_enable()`, reentrant
        or not; enabled on the wrapped model): make every decoder layer's checkpoint function a
        RoutedCheckpoint, so routing stays outside the checkpoint. Runs at the start of every
        training forward (a no-op once wrapped)."""
        for i, layer in enumerate(self.layers):
            fn = getattr(layer, "_gradient_checkpointing_func", None)
            if fn is not None and not isinstance(fn, RoutedCheckpoint):
                layer._gradient_checkpointing_func = RoutedCheckpoint(self._routing_key, i, fn)

    def _lb_coef(self, req: Request) -> float:
        infos = list(self.adapters.values())
        coefs = [infos[s].config.load_balance_coef for s in set(req.slots) if s >= 0]
        return max(coefs) if coefs else 0.0

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, *,
                labels: Optional[Tensor] = None, prompt_mask: Optional[Tensor] = None,
                adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        """Training / scoring forward: the base model's forward with MiLoRA routing.

        adapter_names: one adapter name per row (None or "base" = base model); default: the
        active adapter for every row. prompt_mask [B, L]: 1 on the prompt tokens the routers
        pool over (padding and response tokens 0). Default: with labels, the tokens whose label
        is -100 (the prompt of an SFT example; a row without any pools over all its tokens);
        without labels, attention_mask, else every token. An explicit prompt_mask wins.
        With labels, loss = LM loss + load_balance_coef * aux_loss (the largest coef among the
        batch's adapters). The output (MiLoRACausalLMOutput) also carries `aux_loss`: the mean
        over routers (layer routers, or per-linear routers for token routing) of their Switch
        losses (0 if none).

        Several adapters trained at once (`set_trainable_adapters`) with two or more of them among
        the rows: loss = sum over those adapters a of [mean token loss over a's rows +
        load_balance_coef_a * aux_a], aux_a = a's Switch loss over its own rows (prompt routing:
        mean over the layer routers) or its own tokens (token routing: mean over the per-linear
        routers). Each adapter's gradient, routers included, is then the gradient of training it
        alone on its rows (rows of other, frozen adapters are run but not in the loss).

        num_items_in_batch (what transformers' Trainer passes under gradient accumulation: the
        target tokens, labels[:, 1:] != -100, of the whole accumulated batch): the LM loss is the
        sum of token losses divided by it (transformers' rule), and the load-balancing term is
        weighted by this batch's share of those tokens, so over the micro-batches of one step it
        adds up to the token-weighted mean of their aux losses (weight 1 for a single batch).
        Several adapters: with MiLoRATrainer's AdapterItemCounts each adapter a uses its own
        count N_a (a's summed token losses / N_a, aux_a weighted by a's share n_a / N_a): the
        micro-batches' LM gradients add up to training each adapter alone on its rows of the
        whole accumulated batch. With a single number N (plain Trainer) the adapters share it:
        a's summed token losses / N, aux_a weighted by n_a / N (each adapter weighted by its
        share of the batch's tokens).

        Without a cache (or with an empty one) this forward routes from its own tokens and, with
        use_cache, stores the gates with the returned cache. A forward that continues a non-empty
        cache uses the gates stored with that cache (the same adapter_names are required); a cache
        without MiLoRA gates is refused.
        """
        B, L, dev = self._batch_shape(input_ids, kwargs)
        if prompt_mask is not None:
            if not isinstance(prompt_mask, Tensor) or tuple(prompt_mask.shape) != (B, L):
                raise ValueError(f"MiLoRA: prompt_mask must have shape {(B, L)} (like input_ids), got "
                                 f"{tuple(prompt_mask.shape) if isinstance(prompt_mask, Tensor) else type(prompt_mask).__name__}")
        from .training import AdapterItemCounts, MiLoRACausalLMOutput, prompt_mask_from_labels
        from .trainable import sync
        sync(self)  # trainable adapters' slots up to date before a possibly compiled forward
        if prompt_mask is None and isinstance(labels, Tensor) and tuple(labels.shape) == (B, L):
            prompt_mask = prompt_mask_from_labels(labels, attention_mask)
        req = self._make_request(adapter_names, B, dev, prompt_mask, collect_aux=True)
        trained = self._trained_slots_in(req)
        if trained is not None and labels is not None:
            req.set_train_slots(trained)
            return self._forward_several(req, input_ids, attention_mask, labels, kwargs)
        num_items = kwargs.get("num_items_in_batch")
        if isinstance(num_items, AdapterItemCounts):  # the HF model divides by the batch's total
            kwargs["num_items_in_batch"] = num_items = num_items.total
        with self.routing(req) as ctx:
            ctx.synced = True  # sync(self) ran above
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        aux = self._mean_aux(ctx.aux, dev)
        has_labels = labels is not None
        if has_labels:
            coef = self._lb_coef(req)
            if num_items is not None:  # this micro-batch's share of the accumulated batch's targets
                coef = coef * (labels[:, 1:] != -100).sum().to(torch.float32) / num_items
        if isinstance(out, tuple):  # return_dict=False: (loss, logits, ...) + (aux_loss,)
            if has_labels:
                out = (out[0] + (coef * aux).to(out[0].dtype),) + tuple(out[1:])
            return tuple(out) + (aux,)
        if has_labels and getattr(out, "loss", None) is not None:
            out.loss = out.loss + (coef * aux).to(out.loss.dtype)
        return MiLoRACausalLMOutput(**dict(out.items()), aux_loss=aux)

    @staticmethod
    def _mean_aux(aux_list, dev) -> Tensor:
        if not aux_list:
            return torch.zeros((), dtype=torch.float32, device=dev)
        return torch.stack([a.float().mean() for a in aux_list]).mean()

    def _trained_slots_in(self, req: Request) -> Optional[Tuple[int, ...]]:
        """Slots of the trainable adapters present among the request's rows when several adapters
        are trained at once (None otherwise). A batch holding only one of them (or none) is still
        normalised per adapter: rows of frozen adapters never count."""
        from .trainable import trainable_names
        names = trainable_names(self)
        if len(names) < 2:
            return None
        present = set(req.slots)
        return tuple(s for s in sorted(self._slot_of(n) for n in names) if s in present)

    def _forward_several(self, req: Request, input_ids, attention_mask, labels: Tensor, kwargs):
        """Several trainable adapters in one batch: the per-adapter loss of `forward`'s docstring."""
        from .training import AdapterItemCounts, MiLoRACausalLMOutput, per_adapter_lm_loss, target_counts
        num_items = kwargs.pop("num_items_in_batch", None)
        return_dict = kwargs.pop("return_dict", True)
        dev = labels.device
        with self.routing(req) as ctx:
            ctx.synced = True  # sync(self) ran above
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        slots = torch.tensor(req.slots, device=dev)
        groups = [torch.nonzero(slots == s).flatten() for s in req.train_slots]
        here = target_counts(labels, groups)  # [G] each adapter's targets in this batch
        names = list(self.adapters)
        if num_items is None:  # each adapter's mean over its own targets; full aux
            denom, share = here, torch.ones_like(here)
        else:
            if isinstance(num_items, AdapterItemCounts):  # each adapter's targets in the accumulated batch
                denom = torch.stack([num_items.count(names[s], dev) for s in req.train_slots])
            else:  # one count for the whole batch (plain Trainer): the adapters share it
                denom = torch.as_tensor(num_items, dtype=torch.float32).to(dev).reshape(()).expand(len(groups))
            share = torch.where(denom > 0, here / denom.clamp_min(1e-30), torch.zeros_like(here))
        loss = per_adapter_lm_loss(out.logits, labels, groups, denom)
        infos = list(self.adapters.values())
        own_aux = {}  # slot -> its Switch loss over its own rows / tokens, mean over its routers
        for kind, (own, _) in req.train_by_kind.items():
            losses = ctx.adapter_aux.get(kind)
            if losses:
                mean = torch.stack([a.float() for a in losses]).mean(0)
                own_aux.update({s: mean[k] for k, s in enumerate(own)})
        for k, s in enumerate(req.train_slots):
            if s in own_aux:
                loss = loss + infos[s].config.load_balance_coef * share[k] * own_aux[s]
        aux = self._mean_aux(list(own_aux.values()), dev)
        fields = dict(out.items())
        fields["loss"] = loss.to(out.logits.dtype) if out.logits.dtype == torch.float64 else loss
        result = MiLoRACausalLMOutput(**fields, aux_loss=aux)
        return result if return_dict else result.to_tuple()

    def generate(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None,
                 prompt_mask: Optional[Tensor] = None, **kwargs):
        """HF generate with MiLoRA: each row uses adapter_names[row] (None / "base" = base model;
        default the active adapter). The routers run once per call, on the prompt (pooled over
        prompt_mask, default the attention_mask: left padding is excluded); every decode step
        reuses the gates, which live with the call's KV cache. Rows expanded by HF (beams,
        num_return_sequences) inherit their prompt's adapter and gates.

        A prefix KV cache (`cache=` / `past_key_values=` holding the first tokens of input_ids) is
        not reused as it is: MiLoRA routes from the whole prompt, and the prefix's keys and values
        depend on the gates (they were computed with the prefix's own). generate empties the cache
        and prefills the whole prompt into it, so the result equals generate without the cache."""
        ref = kwargs.get("input_ids", args[0] if args else None)
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("MiLoRA.generate: give input_ids or inputs_embeds")
        B, L, dev = int(ref.shape[0]), int(ref.shape[1]), ref.device
        mask = prompt_mask
        if mask is not None:
            if not isinstance(mask, Tensor) or tuple(mask.shape) != (B, L):
                raise ValueError(f"MiLoRA: prompt_mask must have shape {(B, L)} (like input_ids), got "
                                 f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        else:
            am = kwargs.get("attention_mask")
            if isinstance(am, Tensor) and am.dim() == 2 and tuple(am.shape) == (B, L):
                mask = am
        req = self._make_request(adapter_names, B, dev, mask, collect_aux=False, route_once=True)
        from .trainable import sync
        sync(self)  # trainable adapters' slots up to date before a possibly compiled decode
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if _cache_length(cache) > 0:
            self._empty_cache(cache)
        with self.routing(req) as ctx:
            ctx.synced = True  # sync(self) ran above
            return self.base_model.generate(*args, **kwargs)

    @staticmethod
    def _empty_cache(cache) -> None:
        """generate() from a prefix cache: its keys / values were computed with the gates of the
        prefix alone, so they are emptied and the whole prompt is prefilled (routed from prefix +
        suffix) into the same cache object."""
        reset = getattr(cache, "reset", None)
        if callable(reset):
            reset()
        if _cache_length(cache) != 0:
            raise ValueError(f"MiLoRA.generate: cannot restart the given KV cache ({type(cache).__name__}) to route from "
                             "the whole prompt; pass no cache or a DynamicCache / StaticCache")

    # ---- save / load: files are read and written by checkpoint.py / peft_import.py ----------

    def save_pretrained(self, save_directory: Union[str, os.PathLike], adapter_name: Optional[str] = None, *,
                        state_dict: Optional[Dict[str, Tensor]] = None, is_main_process: bool = True, **kwargs) -> None:
        """Write one adapter (default: the active one) as milora_config.json + adapter_model.safetensors.

        A trainable adapter is written from its Parameters (float32 master weights stay float32).
        Sharded training (as PEFT): under FSDP2 every rank calls save_pretrained (its DTensor
        Parameters are gathered) and only `is_main_process` writes; under FSDP1 pass the gathered
        full `state_dict` (FSDP.state_dict_type FULL_STATE_DICT; the keys are model.state_dict()'s).
        Other keyword arguments of PEFT's save_pretrained (safe_serialization, ...) are accepted and
        ignored: milora always writes safetensors."""
        from . import trainable
        name = adapter_name if adapter_name is not None else self.active_adapter
        if name is None:
            raise ValueError("save_pretrained: no active adapter; pass adapter_name")
        if not isinstance(name, str):
            raise TypeError(f"save_pretrained: adapter_name must be a string, got {type(name).__name__}")
        if name not in self.adapters:
            raise ValueError(f"save_pretrained: unknown adapter {name!r}; loaded adapters: {list(self.adapters)}")
        tensors = None
        if name in trainable.trainable_names(self):
            tensors = trainable.trained_tensors(self, name, state_dict)
            trainable._check_fits(self, name, tensors)
        if is_main_process:
            write_adapter_dir(save_directory, self.adapter_spec(name, tensors=tensors))

    def save_trained(self, save_directory: Union[str, os.PathLike], *, state_dict: Optional[Dict[str, Tensor]] = None,
                     is_main_process: bool = True) -> List[str]:
        """Training checkpoint (MiLoRATrainer): every trainable adapter, the active one in
        save_directory and each other one in save_directory/<name>. Returns their names."""
        from .trainable import save_trained
        return save_trained(self, save_directory, state_dict, is_main_process)

    def load_trained(self, directory: Union[str, os.PathLike]) -> List[str]:
        """Resume (MiLoRATrainer): copy a save_trained checkpoint back into the same Parameters,
        exactly, so that a restored optimizer continues bit-identically."""
        from .trainable import load_trained
        return load_trained(self, directory)

    def load_adapter(self, directory: Union[str, os.PathLike], adapter_name: str) -> None:
        """Load an adapter saved by save_pretrained under the name `adapter_name`. Everything is
        validated before the model changes, and installing is all or nothing: errors leave the
        model untouched."""
        self._check_new_name(adapter_name)
        self._load_spec(read_adapter_dir(directory), adapter_name, directory)

    def load_peft_adapter(self, directory: Union[str, os.PathLike], adapter_name: str) -> None:
        """Load a PEFT LoRA adapter directory as a router-less ("static") adapter: every adapted
        module on with gate alpha / r (alpha / sqrt(r) with use_rslora; rank_pattern and
        alpha_pattern honoured). Validated first, installed all or nothing."""
        self._check_new_name(adapter_name)
        self._load_spec(read_peft_dir(directory), adapter_name, directory)

    def _load_spec(self, spec: AdapterSpec, adapter_name: str, source) -> None:
        """The one load path: check the name, validate the spec against this model, install it."""
        self._check_new_name(adapter_name)
        validate_spec(self.layers, getattr(self.base_model, "config", None), spec, os.fspath(source))
        self._install(AdapterInfo(adapter_name, spec.config, spec.kind, dict(spec.modules)), "zeros",
                      tensors=spec.tensors)

    @classmethod
    def _from_spec(cls, base_model: nn.Module, spec: AdapterSpec, adapter_name: str, source) -> "MiLoRAModel":
        """Wrap base_model and load spec, validated first; on any failure the base model is
        given back exactly as it was."""
        check_adapter_name(adapter_name)
        validate_spec(find_decoder_layers(base_model), getattr(base_model, "config", None), spec, os.fspath(source))
        model = cls(base_model, spec.config, adapter_name=None)
        try:
            model._load_spec(spec, adapter_name, source)
        except BaseException:
            model._unwrap()
            raise
        return model

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False) -> "MiLoRAModel":
        """Wrap base_model and load the adapter saved in `directory`. The name and the files are
        validated against base_model before it is modified; a failure leaves it untouched.
        is_trainable=False freezes the adapter."""
        check_adapter_name(adapter_name)
        model = cls._from_spec(base_model, read_adapter_dir(directory), adapter_name, directory)
        model.set_trainable(is_trainable)
        if not is_trainable:
            model.eval()
        return model

    @classmethod
    def from_peft(cls, base_model: nn.Module, directory: Union[str, os.PathLike], adapter_name: str = "default") -> "MiLoRAModel":
        """Wrap base_model and load a PEFT LoRA adapter directory into it (validated first; a
        failure leaves base_model untouched)."""
        check_adapter_name(adapter_name)
        model = cls._from_spec(base_model, read_peft_dir(directory), adapter_name, directory)
        model.eval()
        return model

    # ---- PEFT parity ----------------------------------------------------------------------

    @contextmanager
    def disable_adapter(self):
        """Context manager: inside it every forward / generate runs the base model (adapter_names
        are ignored), as PEFT's disable_adapter()."""
        previous = self._adapters_disabled
        self._adapters_disabled = True
        try:
            yield
        finally:
            self._adapters_disabled = previous

    @property
    def active_adapters(self) -> List[str]:
        """As PEFT: the adapters used when no adapter_names are given (the active adapter), or
        the adapters being trained when several are (set_trainable_adapters)."""
        if self.trainable_adapters:
            return list(self.trainable_adapters)
        return [self.active_adapter] if self.active_adapter is not None else []

    def get_base_model(self) -> nn.Module:
        """The wrapped HF causal LM (also `self.base_model`; PEFT's `base_model` is its tuner
        wrapper, whose `.model` is this module)."""
        return self.base_model

    def push_to_hub(self, *args, **kwargs):
        raise NotImplementedError(
            "MiLoRAModel.push_to_hub is not supported (the wrapped model's would upload the base model, not the "
            "adapter). Write the adapter with model.save_pretrained(dir) (or model.save_peft_adapter(dir) for a "
            "PEFT-loadable static adapter) and upload that folder, e.g. huggingface_hub.upload_folder(folder_path=dir, "
            "repo_id=...).")

    def save_peft_adapter(self, save_directory: Union[str, os.PathLike], adapter_name: Optional[str] = None) -> None:
        """Write a static (or constantly-routed) adapter in PEFT's own LoRA format; see milora.peft_export."""
        from .peft_export import save_peft_adapter
        from .trainable import sync
        sync(self)
        save_peft_adapter(self, save_directory, adapter_name)

    def merge_and_unload(self, adapter_name: Optional[str] = None, *, safe_merge: bool = False) -> nn.Module:
        """Merge a static (or constantly-routed) adapter into the base weights and return the HF
        model without MiLoRA (routed adapters are refused); see milora.peft_export."""
        from .peft_export import merge_and_unload
        from .trainable import sync
        sync(self)
        return merge_and_unload(self, adapter_name, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Remove MiLoRA (layers, routers, hooks) and return the HF model with its original weights."""
        from .peft_export import unload
        return unload(self)

    # ---- reporting ------------------------------------------------------------------------

    def num_adapter_parameters(self, adapter_name: Optional[str] = None) -> int:
        """Number of parameters adapter `adapter_name` (default: the active one) trains: its LoRA
        A / B at its own rank and expert count, its per-token routers (token routing) or its layer
        routers (prompt routing: [7, E, d] weights, pooling query, rational coefficients).
        Equals the size of the Parameters it has while trainable."""
        from . import trainable
        name = adapter_name if adapter_name is not None else self.active_adapter
        if name is None:
            return 0
        return trainable.count(self, name)

    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        """(trainable parameters, all parameters), as PEFT: exactly the Parameters with
        requires_grad (the trainable adapters' own) and every other Parameter of the model."""
        ps = list(self.parameters())
        return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)

    def print_trainable_parameters(self) -> None:
        """Print the trainable adapters' parameter count against the whole model's, as PEFT."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100.0 * trainable / max(total, 1):.4f}")


def get_milora_model(model: nn.Module, config: MiLoRAConfig, adapter_name: Optional[str] = "default", *,
                     autocast_adapter_dtype: bool = True) -> MiLoRAModel:
    """Wrap a LLaMA-family causal LM with MiLoRA (in place: its target linears are replaced by
    MiLoRALinear sharing the frozen base weights). adapter_name=None wraps without creating an
    adapter (e.g. to load adapters afterwards). Raises ValueError naming missing modules for
    models of another structure."""
    return MiLoRAModel(model, config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
