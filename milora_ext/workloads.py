"""Random gated_lora_linear problems for the tests, the CUDA emulator, the benchmarks and the
GPU check: one builder (make_problem; make_case is the same as a dict), adversarial adapter
mixes, skewed lengths, and the tenant-isolation batches. The accuracy rule they are judged by
is milora_ext.accuracy.

Inputs are fresh random values (never zeros), scaled so that y's base and LoRA parts have
comparable magnitudes: the LoRA term must be big enough that a kernel dropping or misrouting
it fails a comparison.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

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


ARG_NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "seq_offsets", "adapter_ids", "gates")


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

    def args_without_adapters(self):
        """args() with every adapter id -1: the op's base product alone, the same tensors otherwise."""
        return self.args()[:6] + (torch.full_like(self.adapter_ids, -1), self.gates)

    def as_dict(self) -> Dict[str, Optional[torch.Tensor]]:
        """The arguments by name (ARG_NAMES), e.g. to replace one with a strided view."""
        return dict(zip(ARG_NAMES, self.args()))

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
    adapter_ids: Optional[Sequence[int]] = None,
    *,
    K: int,
    N: int,
    P: Optional[int] = None,
    E: int = 1,
    R: int = 16,
    active_experts: Optional[int] = None,
    zero_gate_frac: Optional[float] = None,
    gates: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    bias: bool = True,
    index_dtype: torch.dtype = torch.int64,
    seed: int = 0,
) -> Problem:
    """The one builder of gated_lora_linear problems (tests, emulator, benchmarks, GPU check).

    Sequence s has seq_lens[s] tokens and adapter adapter_ids[s] (default s % P; P defaults to
    the number of sequences). Gates are U(0.5, 1.5); then either active_experts = k keeps k
    random non-zero gates per sequence, or zero_gate_frac zeroes that fraction of them at
    random, or `gates` gives them outright ([S, E]). Values are drawn in float64 and rounded
    once to `dtype`. Magnitudes: base ~ N(0, 1) per output, the LoRA term (all experts
    together) of the same order, so a kernel that drops or misroutes it fails a comparison.
    """
    if active_experts is not None and zero_gate_frac is not None:
        raise ValueError("give active_experts or zero_gate_frac, not both")
    S = len(seq_lens)
    P = P if P is not None else max(S, 1)
    if adapter_ids is None:
        adapter_ids = [s % P for s in range(S)]
    if len(seq_lens) != len(adapter_ids):
        raise ValueError("seq_lens and adapter_ids must have the same length")
    g = torch.Generator().manual_seed(seed)
    T = int(sum(seq_lens))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    x = rnd(T, K)
    weight = rnd(N, K, scale=1 / math.sqrt(K))
    b = rnd(N) if bias else None
    lora_a = rnd(P, E, R, K, scale=1 / math.sqrt(K))
    lora_b = rnd(P, E, N, R, scale=1 / math.sqrt(R * E))
    if gates is None:
        gates = torch.rand(S, E, generator=g, dtype=torch.float64) + 0.5
        if active_experts is not None and S > 0:
            keep = torch.rand(S, E, generator=g).argsort(dim=1)[:, :active_experts]
            gates = gates * torch.zeros(S, E, dtype=torch.bool).scatter_(1, keep, True)
        elif zero_gate_frac is not None:
            gates = torch.where(torch.rand(S, E, generator=g, dtype=torch.float64) < zero_gate_frac, 0.0, gates)
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


def make_case(*, seq_lens: Sequence[int], adapter_ids: Optional[Sequence[int]] = None, zero_gate_frac: float = 0.25,
              dtype: torch.dtype = torch.bfloat16, **kw) -> Dict[str, Optional[torch.Tensor]]:
    """make_problem as a dict of arguments (ARG_NAMES), with the CUDA kernel tests' defaults:
    bfloat16, a quarter of the gates zero."""
    if "active_experts" in kw or kw.get("gates") is not None:
        zero_gate_frac = None
    return make_problem(seq_lens, adapter_ids, zero_gate_frac=zero_gate_frac, dtype=dtype, **kw).as_dict()


def case_args(case) -> tuple:
    """The positional arguments of gated_lora_linear from a Problem, a dict (ARG_NAMES) or a tuple."""
    if isinstance(case, Problem):
        return case.args()
    if isinstance(case, dict):
        return tuple(case[k] for k in ARG_NAMES)
    return tuple(case)


def skewed_lens(T: int, S: int, seed: int = 0) -> List[int]:
    """S sequence lengths summing to T, very unequal (some empty), deterministic."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(S, generator=g, dtype=torch.float64) ** 4
    w = torch.where(torch.rand(S, generator=g, dtype=torch.float64) < 0.2, 0.0, w)
    if float(w.sum()) == 0.0:
        w[0] = 1.0
    lens = (w / w.sum() * T).floor().long()
    lens[int(w.argmax())] += T - int(lens.sum())
    return [int(v) for v in lens]


@contextlib.contextmanager
def env_vars(**env: str):
    """Set environment variables for a block, e.g. the CUDA path switches (MILORA_PDL,
    MILORA_DECODE_MAX_TOKENS, ...; the launcher reads them at every call); the previous
    values come back afterwards."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Adapter slot of sequence s in the tenant-isolation problems (cycled): 0 and 2 are healthy
# tenants (0 with a poisoned expert whose gate is 0 in all its sequences), 1 is a tenant whose
# whole adapter (and input rows) are non-finite, -1 is base only, 3 has a poisoned expert that
# is off (gate 0) in some of its sequences and on in others. Slot 4 is used by no sequence
# and is poisoned too.
_ISOLATION_IDS = (0, 1, -1, 2, 3)


def tenant_isolation_problem(
    seq_lens: Sequence[int],
    *,
    poison: float,
    K: int = 40,
    N: int = 36,
    E: int = 3,
    R: int = 16,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int = 0,
):
    """A batch where some tenants' weights are non-finite, for the tenant-isolation property
    of gated_lora_linear: a token's output depends only on x[t], the base weights and the
    experts of its own adapter whose gate is non-zero.

    Returns (poisoned, clean, protected): two Problems that differ only in values the
    protected tokens must not depend on, and the list of those tokens. A kernel has the
    property when y(poisoned)[protected] == y(clean)[protected] bit for bit (and it is
    deterministic). Poisoned with `poison` (NaN, +Inf or -Inf):
      - slot 1 entirely (lora_a, lora_b) and the x rows of its tokens: another tenant;
      - expert 1 of slot 0, whose gate is 0 in every sequence of slot 0;
      - expert 0 of slot 3, whose gate is 0 in every other sequence of slot 3 (the sequences
        where it is on are not protected: they read it);
      - slot 4, used by no sequence.
    """
    S = len(seq_lens)
    ids = [_ISOLATION_IDS[s % len(_ISOLATION_IDS)] for s in range(S)]
    clean = make_problem(seq_lens, ids, K=K, N=N, P=5, E=E, R=R, dtype=dtype, device=device, seed=seed)
    gates = clean.gates.clone()
    offsets = clean.seq_offsets.tolist()
    if E < 2:
        raise ValueError(f"tenant_isolation_problem needs E >= 2 experts, got {E}")
    protected, slot3_count = [], 0
    for s, p in enumerate(ids):
        shielded = True
        if p == 0:
            gates[s, 1] = 0.0
        elif p == 1:
            shielded = False
        elif p == 3:
            if slot3_count % 2 == 0:
                gates[s, 0] = 0.0
            else:
                shielded = False
            slot3_count += 1
        if shielded:
            protected.extend(range(offsets[s], offsets[s + 1]))
    clean.gates = gates
    bad = Problem(*[None if t is None else t.clone() for t in clean.args()])
    for s, p in enumerate(ids):
        if p == 1:
            bad.x[offsets[s]:offsets[s + 1]] = poison
    bad.lora_a[1] = poison
    bad.lora_b[1] = poison
    bad.lora_a[0, 1] = poison
    bad.lora_b[0, 1] = poison
    bad.lora_a[3, 0] = poison
    bad.lora_b[3, 0] = poison
    bad.lora_a[4] = poison
    bad.lora_b[4] = poison
    return bad, clean, protected
