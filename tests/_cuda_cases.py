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

import contextlib
import os
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


def skewed_lens(T: int, S: int, seed: int = 0) -> list:
    """S sequence lengths summing to T, very unequal (some empty), deterministic."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(S, generator=gen, dtype=torch.float64) ** 4
    w = torch.where(torch.rand(S, generator=gen, dtype=torch.float64) < 0.2, 0.0, w)
    if float(w.sum()) == 0.0:
        w[0] = 1.0
    lens = (w / w.sum() * T).floor().long()
    lens[int(w.argmax())] += T - int(lens.sum())
    return [int(v) for v in lens]


# Edge cases for the kernels, sized for the CPU emulator (which runs every CUDA thread as a
# std::thread) and reused on the GPU. Each entry: (id, make_case kwargs without dtype/device).
EDGE_CASES = [
    # decode-like: one token per sequence, each sequence its own adapter
    ("decode_1tok", dict(K=64, N=48, E=1, R=16, seq_lens=[1])),
    ("decode_odd_K257_N129", dict(K=257, N=129, E=3, R=5, seq_lens=[1] * 7)),
    ("decode_R1", dict(K=40, N=24, E=2, R=1, seq_lens=[1] * 3)),
    ("decode_E8_R33", dict(K=72, N=20, E=8, R=33, seq_lens=[1] * 4, zero_gate_frac=0.5)),
    ("decode_multi_token_seqs", dict(K=256, N=64, E=2, R=16, seq_lens=[3, 0, 5, 9])),
    ("decode_T64", dict(K=96, N=40, E=2, R=8, seq_lens=[16] * 4)),
    ("decode_shared_adapter_diff_gates", dict(K=48, N=33, E=2, R=16, seq_lens=[2, 1, 3], P=1, adapter_ids=[0, 0, 0])),
    ("decode_small_K", dict(K=7, N=5, E=2, R=3, seq_lens=[2, 1])),
    ("decode_N1", dict(K=33, N=1, E=1, R=4, seq_lens=[1, 1])),
    # prefill-like
    ("prefill_two_seqs", dict(K=128, N=130, E=2, R=16, seq_lens=[70, 30])),
    ("prefill_odd_empty_seqs", dict(K=257, N=129, E=3, R=40, seq_lens=[33, 0, 1, 50])),
    ("prefill_many_short_seqs", dict(K=64, N=72, E=2, R=8, seq_lens=[1, 2, 3, 5, 8, 13, 21, 30], P=3)),
    ("prefill_skewed", dict(K=96, N=65, E=4, R=16, seq_lens=skewed_lens(150, 6, seed=1))),
    ("prefill_R128_E2", dict(K=64, N=40, E=2, R=128, seq_lens=[40, 30])),
    ("prefill_E16_R7", dict(K=40, N=30, E=16, R=7, seq_lens=[50, 20], zero_gate_frac=0.6)),
    ("prefill_R256_E1", dict(K=32, N=24, E=1, R=256, seq_lens=[66])),
    ("prefill_small_K_N", dict(K=5, N=3, E=2, R=2, seq_lens=[40, 30])),
    # no LoRA work anywhere
    ("all_adapters_off", dict(K=64, N=40, E=2, R=8, seq_lens=[30, 50], adapter_ids=[-1, -1])),
    ("all_gates_zero", dict(K=64, N=40, E=2, R=8, seq_lens=[30, 50], zero_gate_frac=1.0)),
    ("decode_all_off", dict(K=64, N=40, E=2, R=8, seq_lens=[1, 1, 1], adapter_ids=[-1, -1, -1])),
    ("no_sequences_cover_T0", dict(K=16, N=8, E=1, R=4, seq_lens=[])),
    ("empty_sequences_only", dict(K=16, N=8, E=1, R=4, seq_lens=[0, 0])),
    ("mixed_off_and_on", dict(K=80, N=48, E=3, R=12, seq_lens=[20, 1, 0, 47], adapter_ids=[-1, 1, 0, 2], P=3)),
    ("no_bias", dict(K=64, N=40, E=2, R=8, seq_lens=[3, 70], bias=False)),
    ("int32_indices", dict(K=64, N=40, E=2, R=8, seq_lens=[3, 70], index_dtype=torch.int32)),
]


@contextlib.contextmanager
def env_vars(**env: str):
    """Set the CUDA path switches (MILORA_DECODE_MAX_TOKENS, MILORA_PDL, ...) for a block; the
    launcher reads them at every call. The previous values come back afterwards."""
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

