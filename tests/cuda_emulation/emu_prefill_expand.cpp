// The CUDA kernel source csrc/cuda/prefill_expand.cu compiled as C++ for the CPU emulator.
#include "cuda/prefill_expand.cu"
