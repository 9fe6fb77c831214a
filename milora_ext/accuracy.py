"""The one accuracy rule for gated_lora_linear and its gradients (CPU, CUDA, emulator, GPU check).

Flash-attention style: a kernel's error is judged against the error of the same computation
done by PyTorch in the same dtype, both measured against a float64 ground truth:

    max|y_kernel - y64| <= 2 * max|y_torch - y64| + floor,   floor = 4 eps(dtype) * max(max|y64|, 1)

The kernels accumulate in float32 (float64 for float64) and round at most twice (the base
product to x's dtype, then base + LoRA delta; the CUDA prefill path splits U into hi + lo
halves), while PyTorch in that dtype rounds after the base product, after x @ A^T, after the
expand and after every add; so a correct kernel lands within about PyTorch's own error, and
a factor 2 leaves room for different summation orders. The floor, a few units in the last
place of the output's magnitude, covers problems where PyTorch's error happens to be about
zero (tiny sums, base-only batches). In float64 PyTorch's computation *is* the float64
truth, so its error cannot be observed; there the floor scales with the magnitude of the
terms summed (the result of the same op on |inputs|), the textbook bound for sums taken in
a different order, instead of with |y|, which cancellation can make much smaller. The LoRA term of the problems (milora_ext.workloads) is
as large as the base term, so a wrong adapter, gate or expert moves y by O(1), far outside.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import gated_lora_linear_ref
from .workloads import case_args


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def tolerance(truth: torch.Tensor, torch_same_dtype: torch.Tensor, dtype: torch.dtype,
              term_magnitude: Optional[torch.Tensor] = None) -> float:
    """term_magnitude: for float64, the op on |inputs| (see the module docstring)."""
    scale = max(truth.double().abs().max().item(), 1.0) if truth.numel() else 1.0
    if dtype == torch.float64 and term_magnitude is not None and term_magnitude.numel():
        scale = max(scale, term_magnitude.double().abs().max().item())
    return 2 * max_err(torch_same_dtype, truth) + 4 * torch.finfo(dtype).eps * scale


def assert_within_torch_error(actual: torch.Tensor, truth: torch.Tensor, torch_same_dtype: torch.Tensor,
                              what: str = "y", term_magnitude: Optional[torch.Tensor] = None) -> None:
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err, tol = max_err(actual, truth), tolerance(truth, torch_same_dtype, actual.dtype, term_magnitude)
    assert err <= tol, (
        f"{what}: max error {err:.3g} vs float64 truth exceeds 2 x PyTorch-in-{actual.dtype} error "
        f"+ floor = {tol:.3g}")


def reference64(case) -> torch.Tensor:
    """The exact result in float64 (inputs upcast, nothing rounded to the inputs' dtype)."""
    up = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in case_args(case)]
    return gated_lora_linear_ref(*up)


def check_against_reference(y: torch.Tensor, case, what: str = "y", y64: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Assert the rule for a kernel output y of the problem `case` (a Problem, a dict of the
    arguments or their tuple). y64: the float64 reference if already computed. Returns y64,
    so a caller that needs it again does not recompute it."""
    args = case_args(case)
    x, weight = args[0], args[1]
    expected_shape = (*x.shape[:-1], weight.shape[0])
    assert tuple(y.shape) == expected_shape, f"{what}: shape {tuple(y.shape)} != {expected_shape}"
    assert y.dtype == x.dtype, f"{what}: dtype {y.dtype} != {x.dtype}"
    if y64 is None:
        y64 = reference64(args)
    if y.numel():
        magnitude = None
        if y.dtype == torch.float64:
            magnitude = gated_lora_linear_ref(*[a.abs() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                                for a in args]).reshape(y.shape)
        assert_within_torch_error(y, y64.reshape(y.shape), gated_lora_linear_ref(*args).double(), what, magnitude)
    return y64
