"""Case builders and the accuracy rule shared by the CUDA kernel tests
(test_cuda_gated_lora_linear.py on a GPU, test_cuda_emulated.py on the CPU emulator).

Accuracy rule (the flash-attention test rule): with y64 the float64 reference,
    max|y_kernel - y64| <= 2 * max|y_torch - y64| + floor
where y_torch is the same computation done by PyTorch in the inputs' dtype (every matmul
rounded to that dtype, as an eager PyTorch layer would). A kernel that accumulates in float32
and rounds once (or twice, for the prefill base + delta) should not be more than twice as
wrong as plain PyTorch; the floor, one unit in the last place at the largest output
(eps * max|y64|), covers cases where PyTorch happens to be almost exact (a single correctly
rounded output can already be half an ulp off, and the prefill path rounds base and delta).
The LoRA term is built to be as large as the base term, so a wrong adapter, gate or expert
moves y by O(1), far outside the tolerance.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from milora_ext import gated_lora_linear_ref

ARG_NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "seq_offsets", "adapter_ids", "gates")


def make_case(
    *,
    K: int,
    N: int,
    E: int,
    R: int,
    seq_lens: Sequence[int],
    P: Optional[int] = None,
    adapter_ids: Optional[Sequence[int]] = None,
    gates: Optional[torch.Tensor] = None,
    zero_gate_frac: float = 0.25,
    bias: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    index_dtype: torch.dtype = torch.int64,
    seed: int = 0,
) -> dict:
    """A gated_lora_linear problem. Sequence s has seq_lens[s] tokens and adapter
    adapter_ids[s] (default: s % P, P default S); gates default to U(0.5, 1.5) with a fraction
    of them zero. Magnitudes: base ~ N(0, 1), each expert's LoRA term ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    S = len(seq_lens)
    T = int(sum(seq_lens))
    P = P if P is not None else max(S, 1)
    if adapter_ids is None:
        adapter_ids = [s % P for s in range(S)]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x = randn(T, K)
    weight = randn(N, K, scale=K**-0.5)
    b = randn(N) if bias else None
    lora_a = randn(P, E, R, K, scale=K**-0.5)
    lora_b = randn(P, E, N, R, scale=R**-0.5)
    if gates is None:
        gates = torch.rand(S, E, generator=gen, dtype=torch.float64) + 0.5
        gates = torch.where(torch.rand(S, E, generator=gen, dtype=torch.float64) < zero_gate_frac, 0.0, gates)
    gates = gates.to(torch.float32)
    offsets = torch.tensor([0] + list(torch.tensor(list(seq_lens), dtype=torch.int64).cumsum(0).tolist()), dtype=index_dtype)
    ids = torch.tensor(list(adapter_ids), dtype=index_dtype)
    case = dict(x=x, weight=weight, bias=b, lora_a=lora_a, lora_b=lora_b, seq_offsets=offsets, adapter_ids=ids, gates=gates)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def args(case: dict) -> tuple:
    return tuple(case[k] for k in ARG_NAMES)


def reference64(case: dict) -> torch.Tensor:
    """The exact result in float64 (inputs upcast, nothing rounded to the inputs' dtype)."""
    up = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in case.items()}
    return gated_lora_linear_ref(*args(up))


def check_close(y: torch.Tensor, case: dict, what: str = "") -> None:
    """Assert the accuracy rule above for the kernel output y."""
    x = case["x"]
    expected_shape = (*x.shape[:-1], case["weight"].shape[0])
    assert tuple(y.shape) == expected_shape, f"{what}: shape {tuple(y.shape)} != {expected_shape}"
    assert y.dtype == x.dtype, f"{what}: dtype {y.dtype} != {x.dtype}"
    if y.numel() == 0:
        return
    y64 = reference64(case)
    y_pt = gated_lora_linear_ref(*args(case)).double()
    err = (y.double() - y64).abs().max().item()
    err_pt = (y_pt - y64).abs().max().item()
    floor = torch.finfo(x.dtype).eps * max(y64.abs().max().item(), 1e-6)
    assert err == err, f"{what}: NaN in the output"
    assert err <= 2 * err_pt + floor, (
        f"{what}: max error {err:.3g} vs float64 > 2 * PyTorch-{x.dtype} error {err_pt:.3g} + floor {floor:.3g}"
    )
