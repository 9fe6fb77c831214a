"""Typed Python API of the milora_ext ops, with their fake (meta) registrations."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_OPS = torch.ops.milora_ext

# Whether gated_lora_linear validates index values of CUDA tensors on the host (one device
# synchronisation per call). CPU tensors are always validated by the C++ kernel itself.
_CHECK_INDICES_ON_DEVICE = True


def set_index_checks(enabled: bool) -> bool:
    """Turn the host-side validation of seq_offsets / adapter_ids values for CUDA inputs on or off.

    It is on by default and costs one device-to-host copy (a synchronisation) per call. Turn it
    off to capture a decode step in a CUDA graph; the CUDA kernels still never read or write out
    of bounds whatever the index tensors hold (a bad slot or offset gives a wrong answer, not a
    crash). Returns the previous setting.
    """
    global _CHECK_INDICES_ON_DEVICE
    previous = _CHECK_INDICES_ON_DEVICE
    _CHECK_INDICES_ON_DEVICE = bool(enabled)
    return previous


def has_cuda_kernels() -> bool:
    """True when this build of milora_ext has the CUDA kernels compiled in."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("milora_ext::gated_lora_linear", "CUDA")


def check_indices(seq_offsets: Tensor, adapter_ids: Tensor, num_tokens: int, num_slots: int) -> None:
    """Raise a ValueError / IndexError unless 0 = seq_offsets[0] <= ... <= seq_offsets[-1] =
    num_tokens and -1 <= adapter_ids[s] < num_slots. Copies the tensors to the host."""
    _OPS.check_indices(seq_offsets, adapter_ids, num_tokens, num_slots)


def gated_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    seq_offsets: Tensor,
    adapter_ids: Tensor,
    gates: Tensor,
    *,
    check_indices: Optional[bool] = None,
) -> Tensor:
    """A linear layer's base output plus, for every sequence of the batch, the gated LoRA
    experts of that sequence's own adapter.

    Args:
        x:            [T, K] or [..., K]; leading dims are flattened to T tokens, and y keeps them.
        weight:       [N, K] base weight (nn.Linear layout).
        bias:         [N] or None.
        lora_a:       [P, E, R, K]: P adapter slots x E experts x rank R.
        lora_b:       [P, E, N, R].
        seq_offsets:  int32 or int64 [S + 1], 0 = offsets[0] <= ... <= offsets[S] = T; tokens
                      offsets[s] .. offsets[s+1]-1 form sequence s (empty sequences allowed).
        adapter_ids:  int32 or int64 [S]: adapter slot of each sequence, -1 = base only.
        gates:        float32 [S, E]: coefficient of each expert for each sequence (it already
                      holds the LoRA scaling alpha / r); 0 = expert off, its work is skipped.
                      float64 is accepted with float64 inputs (for gradcheck).
        check_indices: CUDA only: validate seq_offsets / adapter_ids values on the host (one
                      synchronisation). None = the global setting (`set_index_checks`, on by
                      default). CPU inputs are always validated.

    x, weight, bias, lora_a, lora_b share one dtype: float32, float16, bfloat16 (float64 on CPU).
    Products accumulate in float32 (float64 for float64). Per-token routing is the same op with
    one sequence per token.

    Semantics:
        for each sequence s, p = adapter_ids[s], each token t of s:
            y[t] = weight @ x[t] + bias
                   + sum_e gates[s, e] * lora_b[p, e] @ (lora_a[p, e] @ x[t])   (no LoRA term if p == -1)

    Tenant isolation (a guaranteed property, on every device and path): y[t] depends only on
    x[t], weight, bias and the experts e of token t's own adapter p whose gate gates[s, e] is
    non-zero. Another sequence's adapter, an unused slot, or an expert whose gate is 0 for
    s is never multiplied into y[t], so NaN / Inf there cannot reach it (no 0 * Inf = NaN),
    and y[t] is bit-identical whatever those values are. In the backward, dx[t] likewise
    never depends on another adapter (dweight and dbias sum over all tokens, as in any
    shared linear layer). Tested in tests/test_op_isolation.py (CPU) and, for every CUDA
    path, tests/test_cuda_emulated.py / tests/test_cuda_gated_lora_linear.py.

    Returns:
        y: [..., N] in x's dtype.

    Raises ValueError (shapes, values), TypeError (dtypes), IndexError (adapter ids out of
    range), naming the argument and what was expected.
    """
    do_check = _CHECK_INDICES_ON_DEVICE if check_indices is None else check_indices
    if do_check and x.device.type != "cpu" and not torch.compiler.is_compiling():
        num_tokens = x.numel() // x.shape[-1] if x.dim() >= 1 and x.shape[-1] > 0 else 0
        _OPS.check_indices(seq_offsets, adapter_ids, num_tokens, lora_a.shape[0] if lora_a.dim() == 4 else 0)
    return _OPS.gated_lora_linear(x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates)


# ---- torch.compile / meta support -------------------------------------------------------


@torch.library.register_fake("milora_ext::gated_lora_linear")
def _gated_lora_linear_fake(x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates):
    torch._check(x.dim() >= 1, lambda: "gated_lora_linear: x must have shape [T, K] or [..., K]")
    torch._check(weight.dim() == 2, lambda: f"gated_lora_linear: weight must have shape [N, K], got {tuple(weight.shape)}")
    torch._check(
        weight.shape[1] == x.shape[-1],
        lambda: f"gated_lora_linear: weight must have shape [N, K] with K = x.size(-1) = {x.shape[-1]}",
    )
    # The C++ kernels check devices too; this catches mixed devices while tracing (and on meta).
    named = dict(weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, seq_offsets=seq_offsets,
                 adapter_ids=adapter_ids, gates=gates)
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"gated_lora_linear: {name} must be on x's device {x.device}, got {t.device}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("milora_ext::gated_lora_linear_backward")
def _gated_lora_linear_backward_fake(grad_y, x, weight, lora_a, lora_b, seq_offsets, adapter_ids, gates, output_mask):
    def like(t, wanted):
        return torch.empty_like(t) if wanted else t.new_empty((0,))

    return (
        like(x, output_mask[0]),
        like(weight, output_mask[1]),
        x.new_empty((weight.shape[0],)) if output_mask[2] else x.new_empty((0,)),
        like(lora_a, output_mask[3]),
        like(lora_b, output_mask[4]),
        like(gates, output_mask[5]),
    )


@torch.library.register_fake("milora_ext::check_indices")
def _check_indices_fake(seq_offsets, adapter_ids, num_tokens, num_slots):
    return None

# Autograd is registered in C++ (csrc/gated_lora_linear_autograd.cpp): a Python autograd
# kernel cost as much per call as the LoRA term of a decode step. The gradients come from
# torch.ops.milora_ext.gated_lora_linear_backward, whose fake is above.
