"""Random gated_lora_linear problems for tests and benchmarks.

Inputs are fresh random values (never zeros), scaled so that y's base and LoRA parts have
comparable magnitudes: the LoRA term must be big enough that a kernel dropping or misrouting
it fails a comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

MIXES = ("distinct", "uniform", "skewed", "identical")


def adapter_mix(num_seqs: int, num_slots: int, mix: str, generator: torch.Generator) -> List[int]:
    """Adapter slot of each sequence, by popularity mix (punica's adversarial mixes):

    distinct:  sequence s uses slot s % P (every sequence its own adapter when S <= P)
    uniform:   slots drawn uniformly at random
    skewed:    Zipf-like: slot 0 takes about half of the sequences, slot 1 a quarter, ...
    identical: every sequence uses slot 0
    """
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
    if num_slots <= 0:
        return [-1] * num_seqs
    if mix == "distinct":
        return [s % num_slots for s in range(num_seqs)]
    if mix == "identical":
        return [0] * num_seqs
    if mix == "uniform":
        return torch.randint(0, num_slots, (num_seqs,), generator=generator).tolist()
    weights = torch.tensor([0.5 ** i for i in range(num_slots)])
    return torch.multinomial(weights, num_seqs, replacement=True, generator=generator).tolist()


@dataclass
class Problem:
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    seq_offsets: torch.Tensor
    adapter_ids: torch.Tensor
    gates: torch.Tensor

    def args(self):
        return (self.x, self.weight, self.bias, self.lora_a, self.lora_b,
                self.seq_offsets, self.adapter_ids, self.gates)

    def active_adapter_bytes(self) -> int:
        """Bytes of the A and B matrices a call must read: each (adapter, expert) with a
        non-zero gate in at least one non-empty sequence."""
        lens = (self.seq_offsets[1:] - self.seq_offsets[:-1]).cpu()
        ids = self.adapter_ids.cpu()
        nz = (self.gates.cpu() != 0) & (lens > 0)[:, None] & (ids >= 0)[:, None]
        pairs = {(int(ids[s]), e) for s, e in nz.nonzero().tolist()}
        per_expert = (self.lora_a[0, 0].numel() + self.lora_b[0, 0].numel()) * self.lora_a.element_size()
        return len(pairs) * per_expert


def make_problem(
    seq_lens: Sequence[int],
    adapter_ids: Sequence[int],
    *,
    K: int,
    N: int,
    P: int,
    E: int = 1,
    R: int = 16,
    active_experts: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    bias: bool = True,
    index_dtype: torch.dtype = torch.int64,
    seed: int = 0,
) -> Problem:
    """A random problem. active_experts = k keeps k random non-zero gates per sequence (the
    rest exactly 0); None keeps all E non-zero."""
    if len(seq_lens) != len(adapter_ids):
        raise ValueError("seq_lens and adapter_ids must have the same length")
    g = torch.Generator().manual_seed(seed)
    T = int(sum(seq_lens))
    S = len(seq_lens)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    # Base ~ N(0, 1) per output; LoRA delta of the same order with gates ~ U(0.5, 1.5).
    x = rnd(T, K)
    weight = rnd(N, K, scale=1 / math.sqrt(K))
    b = rnd(N) if bias else None
    lora_a = rnd(P, E, R, K, scale=1 / math.sqrt(K))
    lora_b = rnd(P, E, N, R, scale=1 / math.sqrt(R * E))
    gates = torch.rand(S, E, generator=g) + 0.5
    if active_experts is not None and S > 0:
        keep = torch.rand(S, E, generator=g).argsort(dim=1)[:, :active_experts]
        mask = torch.zeros(S, E, dtype=torch.bool).scatter_(1, keep, True)
        gates = gates * mask
    offsets = torch.tensor([0] + list(torch.tensor(list(seq_lens), dtype=torch.int64).cumsum(0).tolist()), dtype=index_dtype)
    return Problem(
        x=x,
        weight=weight,
        bias=b,
        lora_a=lora_a,
        lora_b=lora_b,
        seq_offsets=offsets.to(device),
        adapter_ids=torch.tensor(list(adapter_ids), dtype=index_dtype, device=device),
        gates=gates.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32),
    )
