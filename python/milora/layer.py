"""MiLoRALinear: a drop-in nn.Linear with stacked LoRA expert slots, served by one call of
`milora_ext.gated_lora_linear` per forward.

Storage (P adapter slots, E experts per slot, rank R, in_features K, out_features N):
    weight [N, K], bias [N] or None : the wrapped nn.Linear's own Parameters, frozen and shared
                                      with the base model (never copied).
    lora_a [P, E, R, K]             : stacked buffer, kaiming-uniform(a=sqrt(5)) per expert like PEFT.
    lora_b [P, E, N, R]             : stacked buffer, zero-initialised (the adapter starts as a no-op).
    router_weight [P, E, K] float32 : stacked buffer, only once a token-routed adapter is loaded
                                      (the per-token MoE-LoRA router of each slot).
    trainable.<stack>__<adapter>    : the Parameters of the adapters being trained, each exactly
                                      that adapter's region of its slot (see milora.slots).
    scaling [P] float32 buffer      : LoRA scaling of each slot at this linear (alpha / r; 0 when
                                      the slot's adapter does not adapt this module).
Adapters of different ranks / expert counts are zero-padded to the largest R and E (exact: a
padded rank row of A is zero, a padded expert has gate 0). Adding or deleting an adapter
rebuilds the stacks; the trainable adapters keep their Parameter objects (optimizers stay valid).

Training: only the trainable adapters' own Parameters exist as Parameters, so an optimizer
built from `parameters()` can never move another adapter's slot (AdamW weight decay included).
A standalone layer makes its first adapter trainable (like a PEFT LoRA layer); inside a
MiLoRAModel the model decides which adapters are trainable.

Forward modes:
  * inside a call of the MiLoRAModel that placed it (`set_routing`): the call's current
    `BatchPlan` (milora.routing) gives seq_offsets, adapter_ids and this linear's gates, all
    prepared by the model once per forward / once per prompt; the layer only reads them;
  * otherwise (standalone, or called outside the model's forward): plain LoRA of the active
    adapter on every token, gate = scaling (split evenly over E experts, gate scaling / E each),
    or, for a token-routed adapter, its per-token router.

LoRA dropout (p > 0, training mode only): the op applies its LoRA term to whatever x it gets,
so the layer computes op(dropout(x)) + W (x - dropout(x)), i.e. W x + b + LoRA(dropout(x)),
exactly; this costs one extra base matmul per linear in training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import milora_ext  # noqa: F401  (loads the op library)

from .router import keep_float32, select_top_k, switch_load_balance_loss, switch_load_balance_losses
from .routing import _CALL
from .slots import SlotStacks

ADAPTER_KINDS = ("prompt", "token", "static")

# The op itself (the OpOverload), not milora_ext's Python wrapper: the layer always hands it
# tensors of the right kinds, the C++ kernel validates CPU index values itself, and the layer
# never asked the wrapper for the host-side CUDA index check (check_indices=False), so the
# wrapper only added a Python frame and the overload resolution per call. Autograd and autocast
# are registered in C++, so training goes through the same object. A module-level name so that
# benchmarks / tests can swap it (milora.bench.generate.reference_op, tests' OpSpy).
gated_lora_linear = torch.ops.milora_ext.gated_lora_linear.default

# Per-token routing with several adapters in the batch: gather each token's router rows when
# T * E * K is at most this (decode steps), else score all slots and keep the token's own.
TOKEN_ROUTER_GATHER_LIMIT = 1 << 22


@dataclass
class SlotInfo:
    """What a MiLoRALinear knows about one adapter slot."""

    name: str
    rank: int            # this adapter's rank at this linear (0: the adapter does not adapt it)
    num_experts: int
    scaling: float       # alpha / r at this linear (0 when rank == 0)
    kind: str            # "prompt" (layer router), "token" (per-token router here), "static"
    top_k: int = 1       # token routing: experts per token
    gate_mode: str = "soft"


class MiLoRALinear(SlotStacks, nn.Module):
    """Drop-in replacement of nn.Linear holding one or more LoRA adapter slots.

    `MiLoRALinear(in_features, out_features, bias=True, *, r=8, alpha=16, ...)` builds a fresh
    base linear; `MiLoRALinear.from_linear(linear, ...)` wraps an existing one (its weight and
    bias Parameters are reused, frozen). forward(input) has nn.Linear's signature and output
    shape. See the module docstring for storage, routing modes and dropout.

    Keyword args of both constructors describe the first adapter (adapter_name=None: none):
        r, alpha, use_rslora: rank and scaling alpha / r (alpha / sqrt(r)).
        num_experts: LoRA experts E of this adapter.
        dropout: LoRA dropout on the adapter input (whole layer; training only).
        routing: "prompt" (gates come from a layer router via the model; standalone = plain
            LoRA), "token" (per-token top-k router at this linear, MOELoRA) or "static"
            (plain LoRA, no router, e.g. an imported PEFT adapter).
        top_k, gate_mode: token routing: experts kept per token, "soft" or "hard" gates.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        r: int = 8,
        alpha: float = 16,
        num_experts: int = 1,
        dropout: float = 0.0,
        routing: str = "prompt",
        top_k: int = 1,
        gate_mode: str = "soft",
        use_rslora: bool = False,
        adapter_name: Optional[str] = "default",
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, dropout)
        if adapter_name is not None:
            self.add_adapter(adapter_name, r=r, alpha=alpha, num_experts=num_experts, kind=routing,
                             top_k=top_k, gate_mode=gate_mode, use_rslora=use_rslora)
            self.set_trainable(True)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        alpha: float = 16,
        num_experts: int = 1,
        dropout: float = 0.0,
        routing: str = "prompt",
        top_k: int = 1,
        gate_mode: str = "soft",
        use_rslora: bool = False,
        adapter_name: Optional[str] = "default",
    ) -> "MiLoRALinear":
        """Wrap `linear` (its weight/bias Parameters are kept and frozen, not copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"MiLoRALinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight, linear.bias, dropout)
        if adapter_name is not None:
            self.add_adapter(adapter_name, r=r, alpha=alpha, num_experts=num_experts, kind=routing,
                             top_k=top_k, gate_mode=gate_mode, use_rslora=use_rslora)
            self.set_trainable(True)
        return self

    def _setup(self, weight: nn.Parameter, bias: Optional[nn.Parameter], dropout: float) -> None:
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"MiLoRALinear: dropout must be in [0, 1), got {dropout}")
        self.out_features, self.in_features = weight.shape
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias
        dev, dt = weight.device, weight.dtype
        K, N = self.in_features, self.out_features
        self._init_slot_stacks()
        self.register_buffer("lora_a", torch.zeros(0, 1, 1, K, device=dev, dtype=dt))
        self.register_buffer("lora_b", torch.zeros(0, 1, N, 1, device=dev, dtype=dt))
        self.register_buffer("router_weight", None)
        self.register_buffer("scaling", torch.zeros(0, dtype=torch.float32, device=dev), persistent=False)
        self.register_buffer("expert_mask", torch.zeros(0, 1, dtype=torch.bool, device=dev), persistent=False)
        self.register_buffer("slot_top_k", torch.zeros(0, dtype=torch.long, device=dev), persistent=False)
        self.register_buffer("slot_hard", torch.zeros(0, dtype=torch.bool, device=dev), persistent=False)
        self.lora_dropout = float(dropout)
        self.slots: List[SlotInfo] = []
        self.active_adapter: Optional[str] = None
        # this linear's place in a MiLoRAModel (set once through set_routing)
        self._routing_owner = None
        self.layer_idx = -1
        self.module_idx = -1
        self._cache: Dict = {}
        # what a routed inference forward hands the op, kept while the prompt's gates and the
        # stacks stay the same objects (see _forward_routed)
        self._routed_args: Optional[tuple] = None

    def _apply(self, fn, *args, **kwargs):
        # the per-token router and the scaling stay float32 (dtype conversions of the model only
        # move them); weights and LoRA tensors follow fn
        keep = keep_float32(fn)
        rw = self.router_weight
        keep32 = [rw, self.scaling] + [p for k, p in getattr(self, "trainable", {}).items() if k.startswith("router_weight__")]
        f32 = {id(t) for x in keep32 if x is not None for t in (x, getattr(x, "grad", None)) if t is not None}
        out = super()._apply(lambda t: keep(t) if id(t) in f32 else fn(t), *args, **kwargs)
        self._cache = {}
        self._routed_args = None
        self._after_apply()
        return out

    def set_routing(self, owner: object, layer_idx: int, module_idx: int) -> None:
        """Place this linear in a MiLoRAModel: during that model's calls it reads the gates of
        (layer_idx, module_idx) from the call's BatchPlan. owner None: standalone again."""
        self._routing_owner = owner
        self.layer_idx = int(layer_idx)
        self.module_idx = int(module_idx)

    # ---- slot stacks (milora.slots) ----------------------------------------------------------

    def _stack_names(self):
        return ("lora_a", "lora_b", "router_weight")

    def _slot_region(self, stack: str, slot: int):
        s = self.slots[slot]
        if s.rank == 0:
            return (0,)
        if stack == "lora_a":
            return (s.num_experts, s.rank, self.in_features)
        if stack == "lora_b":
            return (s.num_experts, self.out_features, s.rank)
        return (s.num_experts, self.in_features) if s.kind == "token" else (0,)

    # ---- introspection --------------------------------------------------------------------

    @property
    def adapter_slots(self) -> Dict[str, int]:
        """Adapter name -> slot index."""
        return {s.name: i for i, s in enumerate(self.slots)}

    @property
    def rank(self) -> int:
        """R, the padded rank of the stacked tensors."""
        return self.lora_a.shape[2]

    @property
    def num_experts(self) -> int:
        """E, the padded expert count of the stacked tensors."""
        return self.lora_a.shape[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"adapters={[s.name for s in self.slots]}, R={self.rank}, E={self.num_experts}, active={self.active_adapter!r}")

    def _slot(self, name: str) -> int:
        for i, s in enumerate(self.slots):
            if s.name == name:
                return i
        raise ValueError(f"MiLoRALinear: unknown adapter {name!r}; loaded adapters: {[s.name for s in self.slots]}")

    # ---- adapter slots --------------------------------------------------------------------

    def _set_stack(self, name: str, value: Optional[Tensor]) -> None:
        setattr(self, name, None if value is None else value.contiguous())

    def add_adapter(
        self,
        name: str,
        *,
        r: int,
        alpha: Optional[float] = None,
        scaling: Optional[float] = None,
        num_experts: int = 1,
        kind: str = "prompt",
        top_k: int = 1,
        gate_mode: str = "soft",
        use_rslora: bool = False,
        init: str = "lora",
        generator: Optional[torch.Generator] = None,
    ) -> int:
        """Append a slot for adapter `name`; returns its index.

        r = 0 adds a placeholder slot (the adapter does not adapt this linear: scaling 0).
        scaling defaults to alpha / r (alpha / sqrt(r) with use_rslora). init: "lora" (A
        kaiming-uniform, B zero), "zeros" (both zero; weights loaded afterwards).
        The first adapter added becomes the active one.
        """
        if any(s.name == name for s in self.slots):
            raise ValueError(f"MiLoRALinear: adapter {name!r} already exists")
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"MiLoRALinear: unknown adapter kind/routing {kind!r}; choose one of {list(ADAPTER_KINDS)}")
        if r < 0 or num_experts < 1 or top_k < 1:
            raise ValueError("MiLoRALinear: r must be >= 0, num_experts and top_k >= 1")
        if gate_mode not in ("soft", "hard"):
            raise ValueError(f"MiLoRALinear: gate_mode must be 'soft' or 'hard', got {gate_mode!r}")
        if scaling is None:
            if r == 0:
                scaling = 0.0
            else:
                if alpha is None:
                    raise ValueError("MiLoRALinear.add_adapter: give alpha or scaling")
                scaling = float(alpha) / (math.sqrt(r) if use_rslora else r)
        if r == 0:
            scaling = 0.0
        P, E, R = len(self.slots), self.num_experts, self.rank
        if P == 0:
            E, R = 1, 1
        E2, R2 = max(E, num_experts), max(R, r, 1)
        K, N = self.in_features, self.out_features
        dev, dt = self.lora_a.device, self.lora_a.dtype
        self.sync_slots()
        with torch.no_grad():
            a_old = self.lora_a.detach()[:, :E, :R]
            b_old = self.lora_b.detach()[:, :E, :, :R]
            a = F.pad(a_old, (0, 0, 0, R2 - a_old.shape[2], 0, E2 - a_old.shape[1]))
            b = F.pad(b_old, (0, R2 - b_old.shape[3], 0, 0, 0, E2 - b_old.shape[1]))
            new_a = torch.zeros(1, E2, R2, K, device=dev, dtype=dt)
            new_b = torch.zeros(1, E2, N, R2, device=dev, dtype=dt)
            if r > 0 and init == "lora":
                for e in range(num_experts):
                    w = torch.empty(r, K, device=dev, dtype=torch.float32)
                    if generator is None:
                        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                    else:
                        bound = 1.0 / math.sqrt(K)  # kaiming_uniform(a=sqrt(5)) bound on fan_in K
                        w.uniform_(-bound, bound, generator=generator)
                    new_a[0, e, :r] = w.to(dt)
            elif init not in ("lora", "zeros"):
                raise ValueError(f"MiLoRALinear.add_adapter: init must be 'lora' or 'zeros', got {init!r}")
            self._set_stack("lora_a", torch.cat([a, new_a]))
            self._set_stack("lora_b", torch.cat([b, new_b]))
            needs_router = (kind == "token" and r > 0) or self.router_weight is not None
            if needs_router:
                old = (self.router_weight.detach()[:, :E] if self.router_weight is not None
                       else torch.zeros(P, E, K, device=dev, dtype=torch.float32))
                old = F.pad(old, (0, 0, 0, E2 - old.shape[1]))
                new = torch.zeros(1, E2, K, device=dev, dtype=torch.float32)
                if kind == "token" and r > 0:
                    bound = 1.0 / math.sqrt(K)
                    new[0, :num_experts].uniform_(-bound, bound, generator=generator)
                self._set_stack("router_weight", torch.cat([old, new]))
        em = torch.zeros(P + 1, E2, dtype=torch.bool, device=dev)
        em[:P, : self.expert_mask.shape[1]] = self.expert_mask
        em[P, :num_experts] = True
        self.expert_mask = em
        self.scaling = torch.cat([self.scaling, torch.tensor([scaling], dtype=torch.float32, device=dev)])
        self.slot_top_k = torch.cat([self.slot_top_k, torch.tensor([int(top_k)], device=dev)])
        self.slot_hard = torch.cat([self.slot_hard, torch.tensor([gate_mode == "hard"], device=dev)])
        self.slots.append(SlotInfo(name, int(r), int(num_experts), float(scaling), kind, int(top_k), gate_mode))
        if self.active_adapter is None:
            self.active_adapter = name
        self._cache = {}
        self._routed_args = None
        self._rebind_slots()
        return len(self.slots) - 1

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`'s slot (later slots move down); R and E shrink to the new maxima."""
        p = self._slot(name)
        self.sync_slots()
        keep_list = [i for i in range(len(self.slots)) if i != p]
        del self.slots[p]
        dev = self.weight.device
        keep = torch.tensor(keep_list, dtype=torch.long, device=dev)
        E2 = max([s.num_experts for s in self.slots], default=1)
        R2 = max([s.rank for s in self.slots] + [1])
        with torch.no_grad():
            self._set_stack("lora_a", self.lora_a.detach().index_select(0, keep)[:, :E2, :R2])
            self._set_stack("lora_b", self.lora_b.detach().index_select(0, keep)[:, :E2, :, :R2])
            if self.router_weight is not None:
                if any(s.kind == "token" and s.rank > 0 for s in self.slots):
                    self._set_stack("router_weight", self.router_weight.detach().index_select(0, keep)[:, :E2])
                else:
                    self._set_stack("router_weight", None)
        self.expert_mask = self.expert_mask.index_select(0, keep)[:, :E2].contiguous()
        self.scaling = self.scaling.index_select(0, keep)
        self.slot_top_k = self.slot_top_k.index_select(0, keep)
        self.slot_hard = self.slot_hard.index_select(0, keep)
        if self.active_adapter == name:
            self.active_adapter = self.slots[0].name if self.slots else None
        self._cache = {}
        self._routed_args = None
        self._rebind_slots(removed=p)

    def set_adapter(self, name: Optional[str]) -> None:
        """Make `name` the active adapter (used when no routing state is active); None = base only."""
        if name is not None:
            self._slot(name)
        self.active_adapter = name
        self._cache = {}
        self._routed_args = None

    def set_trainable(self, trainable: bool, dtype: Optional[torch.dtype] = None) -> None:
        """Standalone use: make the active adapter trainable (its own Parameters, in `dtype`,
        default the stack's) or, with False, none (the base weight always stays frozen).
        A MiLoRAModel chooses the trainable adapters of its layers with set_trainable_slots."""
        on = trainable and self.active_adapter is not None
        self.set_trainable_slots({self.active_adapter: self._slot(self.active_adapter)} if on else {}, dtype)

    def get_adapter_tensors(self, name: str) -> Dict[str, Tensor]:
        """Detached copies of one adapter's weights at their own size: lora_A [E, r, K],
        lora_B [E, N, r], and router [E, K] for a token-routed adapter. Empty if r == 0."""
        p = self._slot(name)
        s = self.slots[p]
        if s.rank == 0:
            return {}
        self.sync_slots()
        out = {
            "lora_A": self.lora_a.detach()[p, : s.num_experts, : s.rank].clone().contiguous(),
            "lora_B": self.lora_b.detach()[p, : s.num_experts, :, : s.rank].clone().contiguous(),
        }
        if s.kind == "token":
            out["router"] = self.router_weight.detach()[p, : s.num_experts].clone().contiguous()
        return out

    def expected_adapter_shapes(self, rank: int, num_experts: int, kind: str) -> Dict[str, tuple]:
        shapes = {
            "lora_A": (num_experts, rank, self.in_features),
            "lora_B": (num_experts, self.out_features, rank),
        }
        if kind == "token":
            shapes["router"] = (num_experts, self.in_features)
        return shapes

    def set_adapter_tensors(self, name: str, tensors: Dict[str, Tensor]) -> None:
        """Copy weights (as returned by get_adapter_tensors) into adapter `name`'s slot."""
        p = self._slot(name)
        s = self.slots[p]
        want = self.expected_adapter_shapes(s.rank, s.num_experts, s.kind) if s.rank > 0 else {}
        if set(tensors) != set(want):
            raise ValueError(f"MiLoRALinear.set_adapter_tensors: expected tensors {sorted(want)}, got {sorted(tensors)}")
        for k, shape in want.items():
            if tuple(tensors[k].shape) != shape:
                raise ValueError(f"MiLoRALinear.set_adapter_tensors: {k} must have shape {shape}, got {tuple(tensors[k].shape)}")
        with torch.no_grad():
            if s.rank == 0:
                return
            self.lora_a[p].zero_()
            self.lora_b[p].zero_()
            self.lora_a[p, : s.num_experts, : s.rank].copy_(tensors["lora_A"])
            self.lora_b[p, : s.num_experts, :, : s.rank].copy_(tensors["lora_B"])
            if s.kind == "token":
                self.router_weight[p].zero_()
                self.router_weight[p, : s.num_experts].copy_(tensors["router"])
        self.sync_slots()  # a trainable adapter's Parameters take the loaded values

    # ---- forward --------------------------------------------------------------------------

    def _op(self, x: Tensor, seq_offsets: Tensor, adapter_ids: Tensor, gates: Tensor) -> Tensor:
        if self.lora_dropout > 0.0 and self.training:
            xd = F.dropout(x, self.lora_dropout, training=True)
            y = gated_lora_linear(xd, self.weight, self.bias, self._stacked("lora_a"), self._stacked("lora_b"),
                                  seq_offsets, adapter_ids, gates)
            return y + F.linear(x - xd, self.weight)
        return gated_lora_linear(x, self.weight, self.bias, self._stacked("lora_a"), self._stacked("lora_b"),
                                 seq_offsets, adapter_ids, gates)

    def token_gates(self, x2: Tensor, token_slots: Tensor, top_k=None, hard=None, k_max=None, single_slot=None):
        """Per-token MoE-LoRA gates [T, E] (scaling included) and router probabilities [T, E].

        x2 [T, K]; token_slots [T] long (>= 0) slot of each token. top_k / hard: Python
        values valid for every token, or None to read each slot's own setting. single_slot: a
        Python int when every token that matters uses that slot (one router matmul)."""
        T, K = x2.shape
        P, E = self.lora_a.shape[0], self.num_experts
        xf = x2.float()
        router_weight = self._stacked("router_weight")
        if single_slot is not None:
            logits = F.linear(xf, router_weight[single_slot].float())
        elif T * E * K <= TOKEN_ROUTER_GATHER_LIMIT:  # gather each token's router rows (decode steps)
            w = router_weight.index_select(0, token_slots).float()  # [T, E, K]
            logits = torch.bmm(w, xf.unsqueeze(-1)).squeeze(-1)
        else:  # large prefill: score every slot, keep the token's own
            logits = F.linear(xf, router_weight.reshape(P * E, K).float()).view(T, P, E)
            logits = logits.gather(1, token_slots.view(T, 1, 1).expand(T, 1, E)).squeeze(1)
        full = self._cache.get("token_full")
        if full is None:
            full = self._cache["token_full"] = all(s.num_experts == E for s in self.slots if s.kind == "token" and s.rank > 0)
        valid = None
        if not full:
            valid = self.expert_mask.index_select(0, token_slots)
            logits = logits.masked_fill(~valid, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if top_k is None:
            top_k = self.slot_top_k.index_select(0, token_slots)
        if hard is None:
            hard = self.slot_hard.index_select(0, token_slots)
        if k_max is None:
            k_max = max(s.top_k for s in self.slots)
        gates = select_top_k(probs, top_k, hard, valid=valid, k_max=k_max)
        return gates * self.scaling.index_select(0, token_slots).unsqueeze(-1), probs

    def forward(self, input: Tensor) -> Tensor:
        ctx = _CALL.get()  # milora.routing.current_call(), without its frame
        if ctx is not None and ctx.owner is self._routing_owner:  # a call of the model that placed this linear
            plan = ctx.plan
            if plan is None:
                raise RuntimeError(f"MiLoRALinear (layer {self.layer_idx}): called during a MiLoRAModel call but outside "
                                   "its decoder stack's forward; there is no batch plan to read")
            # Decode steps: the arguments kept by the last routed forward, while they are still
            # the ones this forward would read (same prompt gates, index tensors and stacks, no
            # autograd, no dropout, not traced; the stacks brought up to date first). Checked by
            # identity: a new prompt, batch, adapter set, .to() or loaded stack misses.
            args = None if torch.compiler.is_compiling() else self._routed_args  # never traced, never guarded on
            if (args is not None and args[0] is plan.gates and args[1] is plan.seq_offsets
                    and args[2] is plan.adapter_ids and not torch.is_grad_enabled()
                    and not (self.training and self.lora_dropout > 0.0)):
                params, bufs = self._parameters, self._buffers
                if (params.get("weight") is args[4] and params.get("bias") is args[5]
                        and bufs.get("lora_a") is args[6] and bufs.get("lora_b") is args[7]):
                    if self._entries and not (ctx.synced and not self._sync_deferred):
                        self.sync_slots()  # in place: the stacks stay the same objects
                    gates = args[3]
                    if gates is None:  # no row has an active expert here (PromptGates.unused)
                        return F.linear(input, args[4], args[5])
                    return gated_lora_linear(input, args[4], args[5], args[6], args[7], args[1], args[2], gates)
            return self._forward_routed(input, plan, ctx)
        return self._forward_standalone(input)

    def _forward_routed(self, x: Tensor, plan, ctx) -> Tensor:
        if not self.slots or plan.all_base:
            return F.linear(x, self.weight, self.bias)
        row_gates = plan.gates.per_layer[self.layer_idx][self.module_idx]
        if row_gates is None:
            row_gates = plan.for_linear(self.layer_idx, self.module_idx)  # raises the explanation
        tp = plan.token
        if tp is None:
            skip = plan.gates.skips(self.layer_idx, self.module_idx) and not row_gates.requires_grad
            if not (torch.is_grad_enabled() or torch.compiler.is_compiling() or (self.training and self.lora_dropout > 0.0)):
                # kept for the next forward of this prompt (forward's fast path); without
                # autograd the op reads the stacks themselves (see _stacked)
                self._routed_args = (plan.gates, plan.seq_offsets, plan.adapter_ids, None if skip else row_gates,
                                     self.weight, self.bias, self.lora_a, self.lora_b)
            if skip:
                return F.linear(x, self.weight, self.bias)
            return self._op(x, plan.seq_offsets, plan.adapter_ids, row_gates)
        # per-token routing: one sequence per token
        if self.router_weight is None:
            gates = row_gates.repeat_interleave(tp.seq_len, 0)
        else:
            st = tp.settings
            gates, probs = self.token_gates(x.reshape(-1, self.in_features), tp.slots_clamped, st.top_k, st.hard,
                                            st.k_max, st.single_slot)
            if tp.rows_mixed:
                gates = torch.where(tp.is_routed.unsqueeze(-1), gates, row_gates.repeat_interleave(tp.seq_len, 0))
            req = ctx.request
            if req.collect_aux:  # the per-token router's loss goes to the call, summed by the model
                own = req.train_by_kind.get("token")
                if own is not None:  # several adapters trained at once: each one's loss over its own tokens
                    groups = tp.adapter_ids.unsqueeze(0) == own[1].unsqueeze(1)  # [G, T]
                    ctx.add_adapter_aux("token", switch_load_balance_losses(probs, groups))
                elif not req.train_slots:
                    ctx.add_aux(switch_load_balance_loss(probs, tp.is_routed, None))
        return self._op(x, tp.offsets, tp.adapter_ids, gates)

    def _forward_standalone(self, x: Tensor) -> Tensor:
        name = self.active_adapter
        if name is None or not self.slots:
            return F.linear(x, self.weight, self.bias)
        p = self._slot(name)
        s = self.slots[p]
        if s.rank == 0:
            return F.linear(x, self.weight, self.bias)
        T = x.numel() // self.in_features if self.in_features else 0
        dev = x.device
        if s.kind == "token":
            key = ("tok", T, dev)
            if key not in self._cache:
                self._cache = {k: v for k, v in self._cache.items() if k[0] != "tok"}
                self._cache[key] = (torch.full((T,), p, dtype=torch.long, device=dev),
                                    torch.arange(T + 1, dtype=torch.long, device=dev))
            slots, offsets = self._cache[key]
            gates, _ = self.token_gates(x.reshape(-1, self.in_features), slots, s.top_k, s.gate_mode == "hard", s.top_k, p)
            return self._op(x, offsets, slots, gates)
        key = ("seq", T, dev)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "seq"}
            gates = (self.scaling[p] * self.expert_mask[p].float() / s.num_experts).view(1, -1).to(dev).contiguous()
            self._cache[key] = (torch.tensor([0, T], dtype=torch.long, device=dev),
                                torch.tensor([p], dtype=torch.long, device=dev), gates)
        offsets, ids, gates = self._cache[key]
        return self._op(x, offsets, ids, gates)
