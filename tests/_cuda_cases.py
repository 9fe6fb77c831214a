"""Edge cases of the CUDA kernel tests (test_cuda_gated_lora_linear.py on a GPU,
test_cuda_emulated.py on the CPU emulator), built with the project's one case builder
(milora_ext.workloads.make_case) and judged by its one accuracy rule (milora_ext.accuracy).

Also exposes, for the test files' `cc.` prefix, the builder helpers and `check_close`."""
from __future__ import annotations

import torch

from milora_ext.accuracy import check_against_reference, reference64  # noqa: F401
from milora_ext.workloads import ARG_NAMES, case_args as args, env_vars, make_case, skewed_lens  # noqa: F401


def check_close(y: torch.Tensor, case, what: str = "", y64=None) -> torch.Tensor:
    """milora_ext.accuracy's rule for the kernel output y of `case`; returns the float64 reference."""
    return check_against_reference(y, case, what or "y", y64=y64)


# Edge cases for the kernels, sized for the CPU emulator (which runs every CUDA thread as a
# fiber) and reused on the GPU. Each entry: (id, make_case kwargs without dtype/device).
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
