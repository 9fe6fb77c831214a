// The CUDA kernel source csrc/cuda/prefill_shrink.cu compiled as C++ for the CPU emulator.
#include "cuda/prefill_shrink.cu"
