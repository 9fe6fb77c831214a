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


# The op's one overload, called directly rather than through its packet (which picks the overload
# on every call).
_GATED_LORA_LINEAR = _OPS.gated_lora_linear.default


def _type_problem(x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates) -> Optional[str]:
    # The dispatcher turns None into an undefined tensor (the C++ checks then report a shape
    # [0], naming the wrong problem) and rejects other non-tensors naming the schema's type; say
    # which argument was not a Tensor instead.
    named = dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, seq_offsets=seq_offsets,
                 adapter_ids=adapter_ids, gates=gates)
    for name, value in named.items():
        if not isinstance(value, Tensor):
            return f"gated_lora_linear: {name} must be a Tensor, got {type(value).__name__}"
    if bias is not None and not isinstance(bias, Tensor):
        return f"gated_lora_linear: bias must be a Tensor or None, got {type(bias).__name__}"
    return None


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
    args = (x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates)
    if getattr(x, "is_cpu", True):
        # CPU (or x not a tensor): the C++ kernel checks every argument and index itself, so the
        # call goes straight to the op, and the argument types are looked at only when it
        # refused them. With cold caches the Python checks ahead of the call cost 29-41 us per
        # call (in-process A/B, 401 paired rounds: about 1% of a 64-token 4096 x 4096 bf16 layer).
        try:
            return _GATED_LORA_LINEAR(*args)
        except (TypeError, ValueError, RuntimeError):
            problem = _type_problem(*args)
            if problem is None:
                raise
        raise TypeError(problem)
    problem = _type_problem(*args)
    if problem is not None:
        raise TypeError(problem)
    do_check = _CHECK_INDICES_ON_DEVICE if check_indices is None else check_indices
    if do_check and not torch.compiler.is_compiling():
        num_tokens = x.numel() // x.shape[-1] if x.dim() >= 1 and x.shape[-1] > 0 else 0
        _OPS.check_indices(seq_offsets, adapter_ids, num_tokens, lora_a.shape[0] if lora_a.dim() == 4 else 0)
    return _GATED_LORA_LINEAR(*args)


# ---- torch.compile / meta support -------------------------------------------------------
#
# The fake kernels reject exactly what the real kernels reject (csrc/checks.cpp for every
# device, plus the CUDA limits of csrc/cuda/gated_lora_linear_cuda.cpp), in the same order,
# with the same exception types and messages, so that under torch.compile a bad call fails
# while tracing, not when the compiled graph first runs. Sizes may be symbolic: comparisons go
# through torch._check_* (guards / runtime asserts), messages are built only on failure.

# Limits of the CUDA kernels (csrc/cuda/launch.h: kMaxExperts, kMaxRank; the grid limits of
# gated_lora_linear_cuda.cpp). tests/test_op_fake.py checks them against launch.h.
CUDA_MAX_EXPERTS = 16
CUDA_MAX_RANK = 256
_INT_MAX = 2**31 - 1
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX = (torch.int32, torch.int64)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


# c10::ScalarType names, as the C++ messages print them.
_CXX_DTYPE = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float64: "Double",
              torch.int32: "Int", torch.int64: "Long", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
              torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def _dt(dtype: torch.dtype) -> str:
    return _CXX_DTYPE.get(dtype, str(dtype))


def _check_args(op, x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates):
    """Python twin of milora::check_gated_lora_args (csrc/checks.cpp). Returns (T, K, N, P, E, R, S)."""
    # ---- ranks and sizes
    torch._check_value(x.dim() >= 1, lambda: f"{op}: x must have shape [T, K] or [..., K], got a 0-dim tensor")
    K = x.shape[-1]
    torch._check_value(K >= 1, lambda: f"{op}: x must have at least one input feature (K >= 1), got shape {_shape(x)}")
    T = x.numel() // K
    torch._check_value(
        weight.dim() == 2 and weight.shape[1] == K,
        lambda: f"{op}: weight must have shape [N, K] = [N, {K}] (K = x.size(-1)), got {_shape(weight)}")
    N = weight.shape[0]
    torch._check_value(N >= 1, lambda: f"{op}: weight must have at least one output feature (N >= 1), got {_shape(weight)}")
    if bias is not None:
        torch._check_value(bias.dim() == 1 and bias.shape[0] == N,
                           lambda: f"{op}: bias must have shape [N] = [{N}] or be None, got {_shape(bias)}")
    torch._check_value(lora_a.dim() == 4 and lora_a.shape[3] == K,
                       lambda: f"{op}: lora_a must have shape [P, E, R, K] = [P, E, R, {K}], got {_shape(lora_a)}")
    P, E, R = lora_a.shape[0], lora_a.shape[1], lora_a.shape[2]
    torch._check_value(E >= 1 and R >= 1,
                       lambda: f"{op}: lora_a must have E >= 1 experts and rank R >= 1, got {_shape(lora_a)}")
    torch._check_value(
        lora_b.dim() == 4 and lora_b.shape[0] == P and lora_b.shape[1] == E and lora_b.shape[2] == N
        and lora_b.shape[3] == R,
        lambda: f"{op}: lora_b must have shape [P, E, N, R] = [{P}, {E}, {N}, {R}] (P, E, R from lora_a, N from "
                f"weight), got {_shape(lora_b)}")
    torch._check_value(seq_offsets.dim() == 1 and seq_offsets.shape[0] >= 1,
                       lambda: f"{op}: seq_offsets must have shape [S + 1] (S >= 0 sequences), got {_shape(seq_offsets)}")
    S = seq_offsets.shape[0] - 1
    torch._check_value(
        adapter_ids.dim() == 1 and adapter_ids.shape[0] == S,
        lambda: f"{op}: adapter_ids must have shape [S] = [{S}] (S = seq_offsets.size(0) - 1), got {_shape(adapter_ids)}")
    torch._check_value(
        gates.dim() == 2 and gates.shape[0] == S and gates.shape[1] == E,
        lambda: f"{op}: gates must have shape [S, E] = [{S}, {E}] (S sequences, E experts of lora_a), got {_shape(gates)}")
    # ---- dtypes
    dt = x.dtype
    torch._check_type(dt in _FLOATS, lambda: f"{op}: x must be float32, float16, bfloat16 or float64, got {_dt(dt)}")
    named = dict(weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    for name, t in named.items():
        if t is not None:
            torch._check_type(t.dtype == dt, lambda: f"{op}: {name} must have x's dtype {_dt(dt)}, got {_dt(t.dtype)}")
    for name, t in (("seq_offsets", seq_offsets), ("adapter_ids", adapter_ids)):
        torch._check_type(t.dtype in _INDEX, lambda: f"{op}: {name} must be int32 or int64, got {_dt(t.dtype)}")
    torch._check_type(
        gates.dtype == torch.float32 or (dt == torch.float64 and gates.dtype == torch.float64),
        lambda: f"{op}: gates must be float32 (or float64 when x is float64), got {_dt(gates.dtype)}")
    # ---- devices
    named.update(seq_offsets=seq_offsets, adapter_ids=adapter_ids, gates=gates)
    for name, t in named.items():
        if t is not None:
            torch._check_value(t.device == x.device,
                               lambda: f"{op}: {name} must be on x's device {x.device}, got {t.device}")
    return T, K, N, P, E, R, S


def _check_cuda_limits(op, x, lora_a, sizes):
    """Python twin of the extra checks of the CUDA forward (csrc/cuda/gated_lora_linear_cuda.cpp)."""
    T, K, N, P, E, R, S = sizes
    dt = x.dtype
    torch._check_type(
        dt in (torch.float32, torch.float16, torch.bfloat16),
        lambda: f"{op}: the CUDA kernels take float32, float16 or bfloat16 inputs, got {_dt(dt)} (float64 runs on CPU only)")
    torch._check_value(
        E <= CUDA_MAX_EXPERTS,
        lambda: f"{op}: the CUDA kernels support at most {CUDA_MAX_EXPERTS} experts per adapter, got E = {E} "
                f"(lora_a of shape {_shape(lora_a)})")
    torch._check_value(
        R <= CUDA_MAX_RANK,
        lambda: f"{op}: the CUDA kernels support LoRA rank R <= {CUDA_MAX_RANK}, got R = {R} "
                f"(lora_a of shape {_shape(lora_a)})")
    torch._check_value(
        T < _INT_MAX and S < _INT_MAX and P < _INT_MAX and N < (1 << 22),
        lambda: f"{op}: the CUDA kernels support T, S, P < 2^31 and N < 2^22 (grid limits), got T = {T}, S = {S}, "
                f"P = {P}, N = {N}")


@torch.library.register_fake("milora_ext::gated_lora_linear")
def _gated_lora_linear_fake(x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates):
    op = "gated_lora_linear"
    sizes = _check_args(op, x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates)
    if x.device.type == "cuda":
        _check_cuda_limits(op, x, lora_a, sizes)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("milora_ext::gated_lora_linear_backward")
def _gated_lora_linear_backward_fake(grad_y, x, weight, lora_a, lora_b, seq_offsets, adapter_ids, gates, output_mask):
    op = "gated_lora_linear_backward"
    N = _check_args(op, x, weight, None, lora_a, lora_b, seq_offsets, adapter_ids, gates)[2]
    y_shape = (*x.shape[:-1], N)
    torch._check_value(
        grad_y.dim() == len(y_shape) and all(a == b for a, b in zip(grad_y.shape, y_shape)),
        lambda: f"{op}: grad_y must have the output's shape [{', '.join(str(d) for d in y_shape)}], got {_shape(grad_y)}")
    torch._check_type(grad_y.dtype == x.dtype, lambda: f"{op}: grad_y must have x's dtype {_dt(x.dtype)}, got {_dt(grad_y.dtype)}")
    torch._check_value(grad_y.device == x.device, lambda: f"{op}: grad_y must be on x's device {x.device}")

    # The kernel returns every gradient contiguous (csrc/gated_lora_linear_backward.cpp),
    # whatever the strides of x, weight, lora_a, lora_b and gates.
    def like(t, wanted):
        return t.new_empty(t.shape) if wanted else t.new_empty((0,))

    return (
        like(x, output_mask[0]),
        like(weight, output_mask[1]),
        x.new_empty((N,)) if output_mask[2] else x.new_empty((0,)),
        like(lora_a, output_mask[3]),
        like(lora_b, output_mask[4]),
        like(gates, output_mask[5]),
    )


@torch.library.register_fake("milora_ext::check_indices")
def _check_indices_fake(seq_offsets, adapter_ids, num_tokens, num_slots):
    # The shape and dtype checks of check_indices (csrc/gated_lora_linear_backward.cpp); its
    # value checks need the data.
    op = "check_indices"
    torch._check_value(seq_offsets.dim() == 1 and seq_offsets.shape[0] >= 1,
                       lambda: f"{op}: seq_offsets must have shape [S + 1], got {_shape(seq_offsets)}")
    torch._check_value(
        adapter_ids.dim() == 1 and adapter_ids.shape[0] == seq_offsets.shape[0] - 1,
        lambda: f"{op}: adapter_ids must have shape [S] = [{seq_offsets.shape[0] - 1}], got {_shape(adapter_ids)}")
    for name, t in (("seq_offsets", seq_offsets), ("adapter_ids", adapter_ids)):
        torch._check_type(t.dtype in _INDEX, lambda: f"{op}: {name} must be int32 or int64, got {_dt(t.dtype)}")
    return None

# Autograd is registered in C++ (csrc/gated_lora_linear_autograd.cpp): a Python autograd
# kernel cost as much per call as the LoRA term of a decode step. The gradients come from
# torch.ops.milora_ext.gated_lora_linear_backward, whose fake is above; its own autograd
# (double backward) is in csrc/gated_lora_linear_backward.cpp.
