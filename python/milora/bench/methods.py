"""The methods of the layer bench: ways to compute one linear layer for a multi-tenant batch.

Every method solves the same `Problem` (milora_ext.workloads): x [T, K], base W [N, K], P adapter
slots of E LoRA experts of rank R, per-sequence adapter ids and gates; each returns y [T, N].

    base         F.linear alone: what serving the base model costs (the lower bound)
    peft_loop    how PEFT serves a mixed batch: base, then a Python loop over the adapters in
                 the batch (gather the rows, LoRA, scatter-add)
    gather_bmm   gather each sequence's A and B (experts stacked along the rank), two batched
                 matmuls over padded sequences (punica's / S-LoRA's "gather-BMM" baseline)
    moelora      MOELoRA-style per-token routing: a router of each adapter at this layer scores
                 the experts for every token, top-k per token, then the fused op with one
                 sequence per token (routing cost + per-token granularity, best kernel)
    milora_ref   MiLoRA through the plain PyTorch reference (milora_ext.gated_lora_linear_ref)
    milora       MiLoRA through the fused op (milora_ext.gated_lora_linear)
    milora_base  the fused op with every adapter id -1: its own base product alone (on CPUs with
                 AMX tiles, bfloat16 calls of up to 128 tokens run milora's own product,
                 csrc/cpu/base_amx.h, not F.linear's), so the LoRA term's own cost shows apart

`build_methods(problem)` returns, for each method, the timed callable and the output it must
match (computed in float32 by the reference), so that a fast but wrong method cannot win.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

import milora_ext
from milora_ext.workloads import Problem

METHODS = ("base", "peft_loop", "gather_bmm", "moelora", "milora_ref", "milora", "milora_base")
LABELS = {
    "base": "base F.linear",
    "peft_loop": "PEFT-style loop",
    "gather_bmm": "gather + bmm",
    "moelora": "MOELoRA per-token",
    "milora_ref": "MiLoRA (reference op)",
    "milora": "MiLoRA (fused op)",
    "milora_base": "fused op, no adapters",
}

# (rtol, atol) of the check against the float32 reference; y ~ N(0, 2) by construction, and a
# dropped or misrouted LoRA term changes y by O(1), far above these.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-3, 1e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


@dataclass
class LayerMethod:
    name: str
    fn: Callable[[], torch.Tensor]       # the timed call
    expected: Callable[[], torch.Tensor]  # float32 (float64) output it must match
    floor_ratio: Optional[float]          # byte floor / base bytes of what this method must read


# ---- the methods ------------------------------------------------------------------------


def peft_style_loop(p: Problem) -> torch.Tensor:
    """How PEFT serves a mixed batch: base output, then per adapter in the batch, gather its
    rows, run its LoRA (here: its experts with a non-zero gate), scatter-add the result."""
    y = F.linear(p.x, p.weight, p.bias)
    lens = p.seq_offsets.diff()
    token_adapter = torch.repeat_interleave(p.adapter_ids, lens, output_size=p.x.shape[0])
    token_gates = torch.repeat_interleave(p.gates, lens, dim=0, output_size=p.x.shape[0])
    for adapter in torch.unique(p.adapter_ids).tolist():
        if adapter < 0:
            continue
        rows = (token_adapter == adapter).nonzero().squeeze(1)
        xs = p.x.index_select(0, rows)
        gs = token_gates.index_select(0, rows)
        delta = None
        for e in range(p.gates.shape[1]):
            if not bool(gs[:, e].any()):
                continue
            term = ((xs @ p.lora_a[adapter, e].t()) @ p.lora_b[adapter, e].t()) * gs[:, e : e + 1].to(xs.dtype)
            delta = term if delta is None else delta + term
        if delta is not None:
            y.index_add_(0, rows, delta)
    return y


def make_gather_bmm(p: Problem) -> Callable[[], torch.Tensor]:
    """Gather-BMM: per sequence, gather A [E*R, K] and B [N, E*R] of its adapter and run two
    batched matmuls over the sequences padded to the longest (gates scale the rank-R
    intermediate of each expert). B is stored once in the [P, N, E*R] layout this needs."""
    Pn, E, R, K = p.lora_a.shape
    N = p.lora_b.shape[2]
    a_cat = p.lora_a.reshape(Pn, E * R, K)
    b_cat = p.lora_b.permute(0, 2, 1, 3).reshape(Pn, N, E * R).contiguous()
    lens = p.seq_offsets.diff()
    S = lens.numel()
    L = int(lens.max()) if S else 0
    ids = p.adapter_ids.clamp_min(0)
    # rows with adapter -1 get gate 0: their LoRA term vanishes
    g = (p.gates * (p.adapter_ids >= 0).unsqueeze(1)).to(p.x.dtype).repeat_interleave(R, dim=1)  # [S, E*R]
    decode = bool((lens == 1).all())
    if not decode:  # sequences tile [0, T) in order, so the valid slots of [S, L] are the tokens in order
        valid = torch.arange(L, device=p.x.device).unsqueeze(0) < lens.unsqueeze(1)  # [S, L]

    def fn() -> torch.Tensor:
        y = F.linear(p.x, p.weight, p.bias)
        a = a_cat.index_select(0, ids)                                          # [S, E*R, K]
        b = b_cat.index_select(0, ids)                                          # [S, N, E*R]
        if decode:
            h = torch.bmm(p.x.unsqueeze(1), a.transpose(1, 2)) * g.unsqueeze(1)  # [S, 1, E*R]
            return y + torch.bmm(h, b.transpose(1, 2)).squeeze(1)
        xp = p.x.new_zeros(S, L, K)
        xp[valid] = p.x
        h = torch.bmm(xp, a.transpose(1, 2)) * g.unsqueeze(1)                   # [S, L, E*R]
        d = torch.bmm(h, b.transpose(1, 2))                                     # [S, L, N]
        return y + d[valid]

    return fn


class TokenRouter:
    """MOELoRA's router at one linear: per adapter, logits = x W_r[p]^T over its E experts,
    softmax, keep the top-k per token renormalised, times the LoRA scaling."""

    def __init__(self, p: Problem, top_k: int, scaling: float = 2.0, seed: int = 0) -> None:
        Pn, E, _, K = p.lora_a.shape
        g = torch.Generator().manual_seed(seed + 17)
        self.weight = (torch.randn(Pn, E, K, generator=g) / K ** 0.5).to(p.x.device)  # float32
        self.top_k = min(int(top_k), E)
        self.scaling = scaling
        lens = p.seq_offsets.diff()
        self.token_adapter = torch.repeat_interleave(p.adapter_ids, lens, output_size=p.x.shape[0])
        T = p.x.shape[0]
        self.token_offsets = torch.arange(T + 1, dtype=p.seq_offsets.dtype, device=p.x.device)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.index_select(0, self.token_adapter.clamp_min(0))          # [T, E, K]
        logits = torch.bmm(w, x.float().unsqueeze(2)).squeeze(2)                 # [T, E]
        top, idx = logits.topk(self.top_k, dim=1)
        probs = torch.softmax(top, dim=1) * self.scaling
        return torch.zeros_like(logits).scatter_(1, idx, probs)

    def token_problem(self, p: Problem) -> Problem:
        return Problem(p.x, p.weight, p.bias, p.lora_a, p.lora_b, self.token_offsets, self.token_adapter,
                       self.gates(p.x))

    def bytes(self) -> int:
        used = torch.unique(self.token_adapter[self.token_adapter >= 0]).numel()
        return used * self.weight[0].numel() * self.weight.element_size()


# ---- checks and floors ------------------------------------------------------------------


def byte_floor(p: Problem, extra_bytes: int = 0) -> float:
    """(bytes of W + bytes of the active adapters' A and B [+ extra]) / bytes of W: the time
    ratio to base that a purely memory-bound implementation could reach."""
    w_bytes = p.weight.numel() * p.weight.element_size()
    return (w_bytes + p.active_adapter_bytes() + extra_bytes) / w_bytes


def _compute_dtype(p: Problem) -> torch.dtype:
    return torch.float64 if p.x.dtype == torch.float64 else torch.float32


def reference_output(p: Problem) -> torch.Tensor:
    """The reference computed in float32 (float64 for float64 problems), rounded once to x's dtype."""
    return milora_ext.gated_lora_linear_ref(*p.args(), compute_dtype=_compute_dtype(p))


def check_output(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """assert_close with the dtype's tolerance; the error names the method."""
    rtol, atol = TOLERANCES.get(got.dtype, (5e-2, 5e-2))
    try:
        cd = torch.float64 if want.dtype == torch.float64 else torch.float32
        torch.testing.assert_close(got.to(cd), want.to(cd), rtol=rtol, atol=atol)
    except AssertionError as e:
        raise AssertionError(f"layer method {name!r} does not match the reference output; it is not timed.\n{e}") from None


# ---- the table of methods ---------------------------------------------------------------


def build_methods(p: Problem, names=METHODS, *, moe_top_k: Optional[int] = None, scaling: float = 2.0,
                  seed: int = 0) -> Dict[str, LayerMethod]:
    """Timed callables for `names` on problem p, each with the output it must match.

    moe_top_k: experts per token of the MOELoRA router (default: p's active experts per
    sequence, so both routings run the same number of experts per token)."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown layer method(s) {unknown}; choose from {list(METHODS)}")
    cd = _compute_dtype(p)
    ref = lambda: reference_output(p)  # noqa: E731
    floor = byte_floor(p)
    out: Dict[str, LayerMethod] = {}
    for name in names:
        if name == "base":
            out[name] = LayerMethod(name, lambda: F.linear(p.x, p.weight, p.bias),
                                    lambda: F.linear(p.x.to(cd), p.weight.to(cd), None if p.bias is None else p.bias.to(cd)),
                                    1.0)
        elif name == "peft_loop":
            out[name] = LayerMethod(name, lambda: peft_style_loop(p), ref, floor)
        elif name == "gather_bmm":
            out[name] = LayerMethod(name, make_gather_bmm(p), ref, floor)
        elif name == "milora_ref":
            out[name] = LayerMethod(name, lambda: milora_ext.gated_lora_linear_ref(*p.args()), ref, floor)
        elif name == "milora":
            out[name] = LayerMethod(name, lambda: milora_ext.gated_lora_linear(*p.args()), ref, floor)
        elif name == "milora_base":
            out[name] = LayerMethod(name, lambda a=p.args_without_adapters(): milora_ext.gated_lora_linear(*a),
                                    lambda: F.linear(p.x.to(cd), p.weight.to(cd), None if p.bias is None else p.bias.to(cd)),
                                    1.0)
        elif name == "moelora":
            if moe_top_k is None:
                nz = (p.gates != 0).sum(1)
                moe_top_k = max(int(nz.max()) if nz.numel() else 1, 1)
            router = TokenRouter(p, moe_top_k, scaling, seed)

            def moe(router=router):
                tp = router.token_problem(p)
                return milora_ext.gated_lora_linear(*tp.args())

            tp0 = router.token_problem(p)
            out[name] = LayerMethod(name, moe, lambda tp0=tp0: reference_output(tp0),
                                    byte_floor(tp0, router.bytes()))
    return out


def check_methods(methods: Dict[str, LayerMethod]) -> None:
    """Run every method once and compare it with its expected output (raises AssertionError)."""
    for name, m in methods.items():
        check_output(name, m.fn(), m.expected())
