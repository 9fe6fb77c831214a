"""Shared comparison helpers for the op tests (CPU and CUDA).

Tolerance, flash-attention style: a kernel's error is judged against the error of the same
computation done by PyTorch in the same dtype, both measured against a float64 ground truth:

    err_kernel <= 2 * err_torch + floor

The kernel accumulates in float32 (float64 for float64) and rounds at most twice (the base
product to x's dtype, then base + LoRA delta), while PyTorch in that dtype rounds after the
base product, after x @ A^T, after the expand and after every add; so a correct kernel lands
within about PyTorch's own error, and a factor 2 leaves room for different summation orders.
The floor, a few units in the last place of the output's magnitude, covers problems where
PyTorch's error happens to be exactly zero (tiny sums, base-only batches).
"""
from __future__ import annotations

import torch

from milora_ext import gated_lora_linear_ref

# Units in the last place of each dtype (its machine epsilon).
EPS = {
    torch.float64: torch.finfo(torch.float64).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_within_torch_error(actual: torch.Tensor, truth: torch.Tensor, torch_same_dtype: torch.Tensor, what: str = "y"):
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(truth.double().abs().max().item(), 1.0) if truth.numel() else 1.0
    floor = 4 * EPS[actual.dtype] * scale
    err = max_err(actual, truth)
    err_torch = max_err(torch_same_dtype, truth)
    assert err <= 2 * err_torch + floor, (
        f"{what}: max error {err:.3g} vs float64 truth exceeds 2 x PyTorch-in-{actual.dtype} error "
        f"{err_torch:.3g} + floor {floor:.3g}"
    )


def check_against_reference(y: torch.Tensor, args) -> None:
    """y from a kernel vs the reference computed in float64 and in x's dtype."""
    truth = gated_lora_linear_ref(*args, compute_dtype=torch.float64)
    same = gated_lora_linear_ref(*args)
    assert y.dtype == args[0].dtype
    assert_within_torch_error(y, truth, same)
