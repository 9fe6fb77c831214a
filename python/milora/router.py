"""Routers of MiLoRA: the prompt-aware layer router and its pieces.

- `rational_function` / `RationalActivation`: Ra(x) = P(x) / (1 + |Q(x)|), deg P = 6 (7
  coefficients), Q(x) = b1 x + ... + b5 x^5 (5 coefficients), initialised to approximate GELU
  (max error about 0.011 on [-8, 8]; coefficients fitted offline by least squares).
- `pool_hidden`: pools a prompt's hidden states over its prompt tokens only ("self_attn",
  "mean", "last", "max"); padding is excluded and any padding side works.
- `select_top_k`: top-k selection with soft (renormalised probability) or hard (1.0,
  straight-through) gates, with a per-row k and per-row gate mode.
- `switch_load_balance_loss`: Switch-style N * sum_i f_i P_i (`switch_load_balance_losses`: of
  several row groups at once, one per adapter trained in the batch).
- `PromptRouter`: one per decoder layer. It holds the router parameters of every adapter
  slot stacked along a leading slot dimension, so a batch whose rows use different adapters
  is routed by batched gathers, with no Python loop over rows.

All router math runs in float32 whatever the model's dtype.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import ACTIVATIONS, GATE_MODES, POOLERS
from .slots import SlotStacks

# Ra(x) = (sum_i a_i x^i, i = 0..6) / (1 + |sum_j b_j x^j, j = 1..5|) fitted to GELU on [-8, 8].
GELU_RATIONAL_NUM = (
    -0.01074459426877947,
    0.4999999998468621,
    0.4411863704407488,
    0.14927844571409665,
    0.024406267306950342,
    0.0019340911615324985,
    5.953839543105364e-05,
)
GELU_RATIONAL_DEN = (
    2.4006331682459385e-08,
    0.29855684284862943,
    -1.0108747442694216e-07,
    0.0038681359513649876,
    8.848576441188632e-09,
)

_POOLER_CODE = {name: i for i, name in enumerate(POOLERS)}
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}


def rational_function(x: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """Ra(x) = P(x) / (1 + |Q(x)|) elementwise.

    num: [..., 7] (a0..a6), den: [..., 5] (b1..b5); their leading dims broadcast against x's
    leading dims (x [..., d]), e.g. x [B, d] with num [B, 7] applies each row's own function.
    """
    p = num[..., 6].unsqueeze(-1)
    for i in range(5, -1, -1):
        p = p * x + num[..., i].unsqueeze(-1)
    q = den[..., 4].unsqueeze(-1)
    for j in range(3, -1, -1):
        q = q * x + den[..., j].unsqueeze(-1)
    q = q * x
    return p / (1.0 + q.abs())


class RationalActivation(nn.Module):
    """Learnable rational activation Ra(x) = P(x) / (1 + |Q(x)|) (degrees 6 / 5, 12 scalars),
    initialised to approximate GELU. Computes in float32 and returns x's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.numerator = nn.Parameter(torch.tensor(GELU_RATIONAL_NUM, dtype=torch.float32))
        self.denominator = nn.Parameter(torch.tensor(GELU_RATIONAL_DEN, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return rational_function(x.float(), self.numerator.float(), self.denominator.float()).to(x.dtype)


def pool_hidden(hidden: Tensor, mask: Optional[Tensor], pooler: str, query: Optional[Tensor] = None) -> Tensor:
    """Pool hidden states [B, L, d] over the positions where mask [B, L] is true.

    pooler: "mean", "max", "last" (the last masked position, whatever the padding side) or
    "self_attn" (softmax over positions of hidden @ query, query [B, d] or [d]). A row
    without any masked position pools to zeros (it gets no NaN). Returns [B, d].
    """
    B, L, d = hidden.shape
    if mask is None:
        m = None
    else:
        if mask.shape != (B, L):
            raise ValueError(f"pool_hidden: mask must have shape {(B, L)}, got {tuple(mask.shape)}")
        m = mask.to(torch.bool)
    if pooler == "mean":
        if m is None:
            return hidden.mean(1)
        mf = m.to(hidden.dtype)
        return (hidden * mf.unsqueeze(-1)).sum(1) / mf.sum(1, keepdim=True).clamp_min(1.0)
    if pooler == "max":
        if m is None:
            return hidden.amax(1)
        out = hidden.masked_fill(~m.unsqueeze(-1), float("-inf")).amax(1)
        return torch.where(m.any(1, keepdim=True), out, torch.zeros_like(out))
    if pooler == "last":
        if m is None:
            return hidden[:, -1]
        pos = torch.arange(L, device=hidden.device).unsqueeze(0)
        idx = torch.where(m, pos, torch.full_like(pos, -1)).amax(1)  # [B], -1 if none
        out = hidden.gather(1, idx.clamp_min(0).view(B, 1, 1).expand(B, 1, d)).squeeze(1)
        return torch.where((idx >= 0).unsqueeze(-1), out, torch.zeros_like(out))
    if pooler == "self_attn":
        if query is None:
            raise ValueError("pool_hidden: the self_attn pooler needs a query vector")
        q = query if query.dim() == 2 else query.unsqueeze(0).expand(B, d)
        scores = torch.einsum("bld,bd->bl", hidden, q)
        if m is not None:
            has = m.any(1, keepdim=True)
            scores = scores.masked_fill(~(m | ~has), float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        out = torch.einsum("bl,bld->bd", attn, hidden)
        if m is not None:
            out = torch.where(has, out, torch.zeros_like(out))
        return out
    raise ValueError(f"pool_hidden: unknown pooler {pooler!r}; choose one of {list(POOLERS)}")


def select_top_k(
    probs: Tensor,
    top_k,
    hard,
    valid: Optional[Tensor] = None,
    k_max: Optional[int] = None,
) -> Tensor:
    """Gates of the top-k choices of each row of probs [N, C].

    top_k: int or long tensor [N] (a per-row k); hard: bool or bool tensor [N]. Soft gates are
    the selected probabilities renormalised to sum to 1; hard gates are exactly 1.0 in the
    forward with the soft gate's gradient (straight-through). valid [N, C] bool: choices that may
    be selected (others get gate 0 even when k exceeds the number of valid choices).
    k_max: the largest k of any row (a Python int, avoids a device sync); default top_k or C.
    """
    N, C = probs.shape
    if k_max is None:
        k_max = int(top_k) if isinstance(top_k, int) else C
    k_max = max(1, min(int(k_max), C))
    topv, idx = probs.topk(k_max, dim=-1)
    if isinstance(top_k, int) and isinstance(hard, bool) and valid is None:
        # fast path (per-token routing at every linear): uniform k, no masking
        if hard and not (torch.is_grad_enabled() and probs.requires_grad):
            return torch.zeros_like(probs).scatter_(1, idx, 1.0)
        soft = torch.zeros_like(probs).scatter_(1, idx, topv / topv.sum(-1, keepdim=True))
        if not hard:
            return soft
        sel = (soft != 0).to(probs.dtype)
        return sel + (soft - soft.detach())
    if isinstance(top_k, int):
        keep = torch.ones(N, k_max, dtype=probs.dtype, device=probs.device)
    else:
        keep = (torch.arange(k_max, device=probs.device).unsqueeze(0) < top_k.unsqueeze(1)).to(probs.dtype)
    sel = torch.zeros_like(probs).scatter(1, idx, keep)
    if valid is not None:
        sel = sel * valid.to(probs.dtype)
    kept = probs * sel
    soft = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    if isinstance(hard, bool):
        if not hard:
            return soft
        return sel + (soft - soft.detach())
    hard_gates = sel + (soft - soft.detach())
    return torch.where(hard.unsqueeze(-1), hard_gates, soft)


def switch_load_balance_loss(probs: Tensor, rows: Optional[Tensor] = None, num_choices=None) -> Tensor:
    """Switch-Transformer load balancing N * sum_i f_i P_i over the rows of probs [N, C].

    f_i: fraction of rows whose top-1 is i (no gradient); P_i: mean probability of i.
    rows [N] bool: rows that count (others ignored); num_choices: N in the formula (int or
    0-dim tensor; default C). With no counted row the loss is 0.
    """
    n_rows, C = probs.shape
    top1 = F.one_hot(probs.argmax(-1), C).to(probs.dtype)
    if rows is None:
        w = torch.ones(n_rows, dtype=probs.dtype, device=probs.device)
    else:
        w = rows.to(probs.dtype)
    denom = w.sum().clamp_min(1.0)
    f = (top1 * w.unsqueeze(-1)).sum(0) / denom
    P = (probs * w.unsqueeze(-1)).sum(0) / denom
    n = C if num_choices is None else num_choices
    return (f * P).sum() * n


def switch_load_balance_losses(probs: Tensor, groups: Tensor, num_choices=None) -> Tensor:
    """`switch_load_balance_loss` of several row groups at once: groups [G, N] bool (the rows
    each group counts; they may overlap), num_choices: N of the formula, int / 0-dim tensor /
    [G] tensor (default C). Returns [G]: each group's loss as if its rows were the whole batch."""
    C = probs.shape[1]
    top1 = F.one_hot(probs.argmax(-1), C).to(probs.dtype)
    w = groups.to(probs.dtype)
    denom = w.sum(-1, keepdim=True).clamp_min(1.0)
    f = (w @ top1) / denom
    P = (w @ probs) / denom
    n = C if num_choices is None else num_choices
    return (f * P).sum(-1) * n


class RouterOutput(NamedTuple):
    gates: Tensor      # [B, M, E] float32 routing weights (without the LoRA scaling); 0 = off
    probs: Tensor      # [B, M] float32 module probabilities (softmax over the layer's modules)
    selected: Tensor   # [B, M] bool: modules in the row's top-k
    aux_loss: Tensor   # 0-dim float32 Switch load-balancing loss over the counted rows


def keep_float32(fn):
    """Wrap an nn.Module._apply conversion so that float32 tensors stay float32 and only follow
    the device: `model.to(torch.bfloat16)` / `.half()` must not round router parameters or the
    LoRA scaling, which the docs promise are float32 whatever the model's dtype."""
    def apply(t):
        out = fn(t)
        if t.dtype == torch.float32 and out.is_floating_point() and out.dtype != torch.float32:
            out = t.to(device=out.device)  # from the original: nothing was rounded
        return out
    return apply


class PromptRouter(SlotStacks, nn.Module):
    """The MiLoRA layer router, computed once per prompt.

    h = Pool(H) over the prompt tokens (padding excluded); g = Ra(h) (or GELU);
    logits = W g with W [M * E, d] (one column block per adapted module, E experts per module);
    p = softmax over the row's available (module, expert) pairs; module probability
    p_m = sum_e p_{m,e}; the top-k modules by p_m are kept.
    Gate of (m, e) = module_gate_m * p_{m,e} / p_m where module_gate_m is the renormalised
    top-k probability ("soft") or 1.0 ("hard", straight-through). With E = 1 this is exactly
    the paper's router; with E > 1 a selected module runs all its experts mixed by the
    router's within-module distribution (our choice; the paper has E = 1).

    Weights are stacked over adapter slots (the leading dim P) in buffers: weight [P, M, E, d],
    pool_query [P, d] (self-attention pooling vector, zero-initialised = mean pooling at start),
    rational_num [P, 7], rational_den [P, 5]; the slots being trained also have their own
    Parameters (`trainable.<stack>__<slot name>`, see milora.slots; a standalone router's slots
    are all trainable, named "0", "1", ...). Each slot has its own pooler, activation, top-k,
    gate mode and expert count (slot settings), so a batch mixing adapters is routed in one
    pass; `forward(..., slots=...)` gives each row its slot.

    Standalone: `PromptRouter(hidden_size, num_modules)` has one slot configured by the
    keyword arguments; `router(hidden, mask)` routes a batch.
    """

    def __init__(
        self,
        hidden_size: int,
        num_modules: int,
        num_experts: int = 1,
        num_slots: int = 1,
        *,
        pooler: str = "self_attn",
        activation: str = "rational",
        top_k: int = 3,
        gate_mode: str = "soft",
        device=None,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or num_modules < 1 or num_experts < 1 or num_slots < 0:
            raise ValueError("PromptRouter: hidden_size, num_modules, num_experts must be >= 1 and num_slots >= 0")
        self.hidden_size = int(hidden_size)
        self.num_modules = int(num_modules)
        self.num_experts = int(num_experts)
        kw = dict(device=device, dtype=torch.float32)
        self._init_slot_stacks()
        self.register_buffer("weight", torch.empty(0, self.num_modules, self.num_experts, self.hidden_size, **kw))
        self.register_buffer("pool_query", torch.empty(0, self.hidden_size, **kw))
        self.register_buffer("rational_num", torch.empty(0, 7, **kw))
        self.register_buffer("rational_den", torch.empty(0, 5, **kw))
        self.register_buffer("slot_pooler", torch.empty(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("slot_activation", torch.empty(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("slot_top_k", torch.empty(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("slot_hard", torch.empty(0, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("slot_expert_mask", torch.empty(0, self.num_experts, dtype=torch.bool, device=device), persistent=False)
        self.slot_settings: List[dict] = []
        for _ in range(num_slots):
            self.add_slot(pooler=pooler, activation=activation, top_k=top_k, gate_mode=gate_mode, num_experts=num_experts)
        if num_slots:
            self.set_trainable_slots({str(i): i for i in range(num_slots)})

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(keep_float32(fn), *args, **kwargs)  # router parameters stay float32
        self._after_apply()
        return out

    def _stack_names(self):
        return ("weight", "pool_query", "rational_num", "rational_den")

    def _slot_region(self, stack: str, slot: int):
        st = self.slot_settings[slot]
        if stack == "weight":
            return (self.num_modules, st["num_experts"], self.hidden_size)
        if stack == "pool_query":
            return (self.hidden_size,) if st["pooler"] == "self_attn" else (0,)
        on = st["activation"] == "rational"
        return ((7,) if stack == "rational_num" else (5,)) if on else (0,)

    @property
    def num_slots(self) -> int:
        return len(self.slot_settings)

    # ---- slot management ------------------------------------------------------------------

    def _replace(self, name: str, value: Tensor) -> None:
        old = getattr(self, name)
        if isinstance(old, nn.Parameter):
            setattr(self, name, nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            setattr(self, name, value)

    def _grow_experts(self, num_experts: int) -> None:
        extra = num_experts - self.num_experts
        if extra <= 0:
            return
        with torch.no_grad():
            self._replace("weight", F.pad(self.weight.detach(), (0, 0, 0, extra)))
            self._replace("slot_expert_mask", F.pad(self.slot_expert_mask, (0, extra), value=False))
        self.num_experts = num_experts

    def add_slot(
        self,
        *,
        pooler: str = "self_attn",
        activation: str = "rational",
        top_k: int = 3,
        gate_mode: str = "soft",
        num_experts: int = 1,
        generator: Optional[torch.Generator] = None,
    ) -> int:
        """Append an adapter slot with fresh router parameters; returns its index.

        The routing weight is initialised like nn.Linear (uniform +-1/sqrt(d)); the pooling
        query at zero; the rational activation at the GELU fit."""
        if pooler not in POOLERS:
            raise ValueError(f"PromptRouter: unknown pooler {pooler!r}; choose one of {list(POOLERS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"PromptRouter: unknown activation {activation!r}; choose one of {list(ACTIVATIONS)}")
        if gate_mode not in GATE_MODES:
            raise ValueError(f"PromptRouter: unknown gate_mode {gate_mode!r}; choose one of {list(GATE_MODES)}")
        if top_k < 1 or num_experts < 1:
            raise ValueError("PromptRouter: top_k and num_experts must be >= 1")
        self.sync_slots()
        self._grow_experts(num_experts)
        dev = self.weight.device
        d, M, E = self.hidden_size, self.num_modules, self.num_experts
        bound = 1.0 / math.sqrt(d)
        w = torch.empty(1, M, E, d, dtype=torch.float32, device=dev).uniform_(-bound, bound, generator=generator)
        w[:, :, num_experts:] = 0
        with torch.no_grad():
            self._replace("weight", torch.cat([self.weight.detach(), w]))
            self._replace("pool_query", torch.cat([self.pool_query.detach(), torch.zeros(1, d, device=dev)]))
            self._replace("rational_num", torch.cat([self.rational_num.detach(), torch.tensor([GELU_RATIONAL_NUM], device=dev)]))
            self._replace("rational_den", torch.cat([self.rational_den.detach(), torch.tensor([GELU_RATIONAL_DEN], device=dev)]))
        em = torch.zeros(1, E, dtype=torch.bool, device=dev)
        em[:, :num_experts] = True
        self.slot_pooler = torch.cat([self.slot_pooler, torch.tensor([_POOLER_CODE[pooler]], device=dev)])
        self.slot_activation = torch.cat([self.slot_activation, torch.tensor([_ACT_CODE[activation]], device=dev)])
        self.slot_top_k = torch.cat([self.slot_top_k, torch.tensor([int(top_k)], device=dev)])
        self.slot_hard = torch.cat([self.slot_hard, torch.tensor([gate_mode == "hard"], device=dev)])
        self.slot_expert_mask = torch.cat([self.slot_expert_mask, em])
        self.slot_settings.append(dict(pooler=pooler, activation=activation, top_k=int(top_k), gate_mode=gate_mode, num_experts=int(num_experts)))
        self._rebind_slots()
        return self.num_slots - 1

    def remove_slot(self, slot: int) -> None:
        """Drop a slot; later slots move down by one. The expert dim shrinks to the new maximum."""
        P = self.num_slots
        if not 0 <= slot < P:
            raise IndexError(f"PromptRouter.remove_slot: slot {slot} out of range [0, {P})")
        self.sync_slots()
        keep = torch.tensor([p for p in range(P) if p != slot], dtype=torch.long, device=self.weight.device)
        del self.slot_settings[slot]
        E_new = max([s["num_experts"] for s in self.slot_settings], default=1)
        with torch.no_grad():
            self._replace("weight", self.weight.detach().index_select(0, keep)[:, :, :E_new].contiguous())
            for name in ("pool_query", "rational_num", "rational_den"):
                self._replace(name, getattr(self, name).detach().index_select(0, keep))
        self.slot_pooler = self.slot_pooler.index_select(0, keep)
        self.slot_activation = self.slot_activation.index_select(0, keep)
        self.slot_top_k = self.slot_top_k.index_select(0, keep)
        self.slot_hard = self.slot_hard.index_select(0, keep)
        self.slot_expert_mask = self.slot_expert_mask.index_select(0, keep)[:, :E_new].contiguous()
        self.num_experts = E_new
        self._rebind_slots(removed=slot)

    # ---- routing --------------------------------------------------------------------------

    def forward(
        self,
        hidden: Tensor,
        mask: Optional[Tensor] = None,
        slots: Optional[Tensor] = None,
        module_mask: Optional[Tensor] = None,
        aux_rows: Optional[Tensor] = None,
        slots_present: Optional[Sequence[int]] = None,
    ) -> RouterOutput:
        """Route a batch of prompts.

        Args:
            hidden: [B, L, d] hidden states entering the decoder layer (any float dtype).
            mask: [B, L] prompt mask (1 = prompt token to pool over; padding and, in training,
                response tokens 0). None = every position.
            slots: [B] long adapter slot of each row (default: slot 0 for every row).
            module_mask: [B, M] bool, the modules each row's adapter adapts in this layer
                (default all). Others get probability 0 and gate 0.
            aux_rows: [B] bool, rows that count in the load-balancing loss (default all).
            slots_present: the slots that can occur in `slots` (Python ints; default all
                slots); only their poolers / activations are computed.
        Returns a RouterOutput (gates [B, M, E], probs [B, M], selected [B, M], aux_loss).
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"PromptRouter: hidden must have shape [B, L, {self.hidden_size}], got {tuple(hidden.shape)}")
        if self.num_slots == 0:
            raise RuntimeError("PromptRouter has no adapter slot")
        B = hidden.shape[0]
        M, E = self.num_modules, self.num_experts
        dev = hidden.device
        if slots is None:
            slots = torch.zeros(B, dtype=torch.long, device=dev)
        if module_mask is None:
            module_mask = torch.ones(B, M, dtype=torch.bool, device=dev)
        settings = self.slot_settings if slots_present is None else [self.slot_settings[p] for p in slots_present]
        h = hidden.float()

        # pooling (one pass per pooler kind present)
        pooled = None
        pooler_codes = sorted({_POOLER_CODE[s["pooler"]] for s in settings})
        for code in pooler_codes:
            name = POOLERS[code]
            q = self._stacked("pool_query").index_select(0, slots).float() if name == "self_attn" else None
            out = pool_hidden(h, mask, name, q)
            pooled = out if pooled is None else torch.where((self.slot_pooler.index_select(0, slots) == code).unsqueeze(-1), out, pooled)

        # activation
        act_codes = sorted({_ACT_CODE[s["activation"]] for s in settings})
        g = None
        for code in act_codes:
            if ACTIVATIONS[code] == "rational":
                out = rational_function(pooled, self._stacked("rational_num").index_select(0, slots).float(),
                                        self._stacked("rational_den").index_select(0, slots).float())
            else:
                out = F.gelu(pooled)
            g = out if g is None else torch.where((self.slot_activation.index_select(0, slots) == code).unsqueeze(-1), out, g)

        # logits over (module, expert) pairs, masked to what the row's adapter has
        w = self._stacked("weight").index_select(0, slots).float().reshape(B, M * E, self.hidden_size)
        logits = torch.bmm(w, g.unsqueeze(-1)).view(B, M, E)
        valid = module_mask.unsqueeze(-1) & self.slot_expert_mask.index_select(0, slots).unsqueeze(1)
        any_valid = valid.flatten(1).any(-1).view(B, 1, 1)
        logits = logits.masked_fill(~valid & any_valid, float("-inf"))
        p_joint = torch.softmax(logits.view(B, M * E), dim=-1).view(B, M, E)
        p_mod = p_joint.sum(-1)  # [B, M]

        k_max = min(max(s["top_k"] for s in settings), M)
        modules_ok = module_mask & any_valid.view(B, 1)
        if len({s["top_k"] for s in settings}) == 1:
            top_k = settings[0]["top_k"]
        else:
            top_k = self.slot_top_k.index_select(0, slots)
        modes = {s["gate_mode"] for s in settings}
        hard = (modes == {"hard"}) if len(modes) == 1 else self.slot_hard.index_select(0, slots)
        mod_gate = select_top_k(p_mod, top_k, hard, valid=modules_ok, k_max=k_max)
        within = p_joint / p_mod.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).tiny)
        gates = mod_gate.unsqueeze(-1) * within

        n_choices = module_mask.any(0).sum() if aux_rows is None else (module_mask & aux_rows.unsqueeze(-1)).any(0).sum()
        aux = switch_load_balance_loss(p_mod, aux_rows, n_choices.to(torch.float32))
        return RouterOutput(gates, p_mod, mod_gate.detach() != 0, aux)
