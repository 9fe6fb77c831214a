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


@pytest.mark.skipif(not (os.sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="torch runs on OpenMP only in its Linux builds")
def test_cpu_kernel_is_built_with_openmp():
    # at::parallel_for is a header template: without -fopenmp it runs every work item on the
    # calling thread and the CPU kernel never uses a second core (setup.py, _openmp_flags).
    so = milora_ext._C.__file__
    with open(so, "rb") as f:
        assert b"GOMP_parallel" in f.read(), f"{so} does not call into OpenMP: built without -fopenmp"
