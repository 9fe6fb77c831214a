"""Plain PyTorch reference of gated_lora_linear: obviously correct, differentiable, slow.

Tests compare the kernels against it, and benchmarks time it as "MiLoRA through plain
PyTorch". It loops over sequences and experts in Python and computes every expert, also
those with gate 0 (so its autograd gives the true gradient of every gate).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def gated_lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    seq_offsets: Tensor,
    adapter_ids: Tensor,
    gates: Tensor,
    *,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Reference for `milora_ext.gated_lora_linear` (same arguments, same result).

    compute_dtype: None computes in x's dtype, as PyTorch would (each matmul rounds to that
    dtype); torch.float32 / torch.float64 upcast every operand, compute, and round the result
    to x's dtype once. Tests use float64 as ground truth and x's dtype to measure how much
    error the same computation has when PyTorch does it in that dtype.

    Semantics:
        for each sequence s, p = adapter_ids[s], each token t of s:
            y[t] = weight @ x[t] + bias
                   + sum_e gates[s, e] * lora_b[p, e] @ (lora_a[p, e] @ x[t])   (no LoRA term if p == -1)
    """
    out_dtype = x.dtype
    cd = compute_dtype or x.dtype
    K = x.shape[-1]
    x2 = x.reshape(-1, K).to(cd)
    y = F.linear(x2, weight.to(cd), None if bias is None else bias.to(cd))
    offsets = seq_offsets.tolist()
    ids = adapter_ids.tolist()
    rows = []
    for s, p in enumerate(ids):
        lo, hi = offsets[s], offsets[s + 1]
        ys = y[lo:hi]
        if p >= 0 and hi > lo:
            xs = x2[lo:hi]
            for e in range(lora_a.shape[1]):
                a = lora_a[p, e].to(cd)  # [R, K]
                b = lora_b[p, e].to(cd)  # [N, R]
                ys = ys + gates[s, e].to(cd) * ((xs @ a.t()) @ b.t())
        rows.append(ys)
    y = torch.cat(rows, 0) if rows else y
    return y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])
