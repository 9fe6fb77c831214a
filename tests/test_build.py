"""What the installed build contains."""
import os

import pytest
import torch

import milora_ext


def test_ops_are_registered():
    for name in ("gated_lora_linear", "gated_lora_linear_backward", "check_indices"):
        assert hasattr(torch.ops.milora_ext, name), name
    assert torch._C._dispatch_has_kernel_for_dispatch_key("milora_ext::gated_lora_linear", "CPU")


@pytest.mark.skipif(os.environ.get("MILORA_CUDA") != "1", reason="only when the build was asked for CUDA kernels (MILORA_CUDA=1, as in CI)")
def test_cuda_kernels_compiled_in_when_requested():
    # CI builds with MILORA_CUDA=1: the CUDA kernels must be in the library even on a machine
    # without a GPU, so a CUDA compile problem cannot pass unnoticed.
    assert milora_ext.has_cuda_kernels()
