// The CUDA kernel source csrc/cuda/decode_kernel.cu compiled as C++ for the CPU emulator.
#include "cuda/decode_kernel.cu"
