// The CUDA kernel source csrc/cuda/expand_simt.cu compiled as C++ for the CPU emulator.
#include "cuda/expand_simt.cu"
