// The CUDA kernel source csrc/cuda/shrink_simt.cu compiled as C++ for the CPU emulator.
#include "cuda/shrink_simt.cu"
