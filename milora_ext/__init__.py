"""milora_ext: the kernel package of milora (a thin, typed op API over torch.ops.milora_ext).

    import milora_ext
    y = milora_ext.gated_lora_linear(x, weight, bias, lora_a, lora_b, seq_offsets, adapter_ids, gates)

See `milora_ext.ops.gated_lora_linear` for the contract, and `milora_ext.reference` for the
plain PyTorch implementation the tests and benchmarks compare against.
"""
import torch  # noqa: F401  (first: _C links against libtorch / libc10, which it loads)

from . import _C  # noqa: F401  (loads the compiled library, which registers torch.ops.milora_ext)
from .cpu import cpu_capability, max_cpu_capability, set_cpu_capability, supported_cpu_capabilities  # noqa: F401
from .ops import (  # noqa: F401
    check_indices,
    gated_lora_linear,
    has_cuda_kernels,
    set_index_checks,
)
from .reference import gated_lora_linear_ref  # noqa: F401

__all__ = [
    "gated_lora_linear",
    "gated_lora_linear_ref",
    "check_indices",
    "set_index_checks",
    "has_cuda_kernels",
    "cpu_capability",
    "max_cpu_capability",
    "set_cpu_capability",
    "supported_cpu_capabilities",
]
