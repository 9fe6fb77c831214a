// Host-side interface of the CUDA kernels of milora_ext::gated_lora_linear.
//
// Only plain types cross this boundary, so the ATen-level dispatcher
// (gated_lora_linear_cuda.cpp, host compiler) and the kernels (*.cu, nvcc, no ATen
// headers: fast to compile) stay apart. Every launcher enqueues on `stream` and returns
// cudaErrorInvalidValue when called outside its contract, the error of cudaLaunchKernelEx
// where it uses that, else cudaSuccess; the caller then runs C10_CUDA_KERNEL_LAUNCH_CHECK()
// for the errors of <<<...>>> launches.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace milora::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest E and R the CUDA kernels accept (the dispatcher names them in its errors).
constexpr int64_t kMaxExperts = 16;
constexpr int64_t kMaxRank = 256;
// Largest T the fused decode kernel takes (8 n8 token tiles of the mma).
constexpr int64_t kDecodeMaxTokens = 64;

// The index tensors as the kernels see them: raw pointers (int32 or int64) read on the
// device and sanitised there (common.cuh: route_token), never on the host.
struct IndexArgs {
  const void* offsets;  // [S + 1]
  const void* ids;      // [S]
  bool offsets64;       // int64 (else int32)
  bool ids64;
  int64_t S;            // sequences
  int64_t P;            // adapter slots
};

// Everything the LoRA kernels read and the workspace they share. The workspace holds
//   routes[T][2]  int32 (sequence s, adapter p) of each token, p = -1: no LoRA;
//                 written by the shrink kernel for every token, read by the expand kernels;
//   U[T][E][R]    float32 lora_a[p, e] @ x[t], defined only for active (t, e), i.e. p >= 0
//                 and gates[s, e] != 0 (the expand kernels read nothing else).
struct LoraArgs {
  DType dtype;
  const void* x;       // [T, K], row stride ldx; 16-byte aligned rows (see ldx)
  const void* lora_a;  // [P, E, R, K] contiguous
  const void* lora_b;  // [P, E, N, R] contiguous
  const float* gates;  // [S, E] contiguous float32
  int32_t* routes;     // [T, 2] workspace
  float* U;            // [T, E, R] workspace (16-byte aligned)
  int64_t T, K, N, E, R;
  int64_t ldx;         // row stride of x in elements: K, or K rounded up to 16 bytes' worth
                       // (the packing pads x so that every row is 16-byte aligned)
  IndexArgs idx;
};

// SIMT shrink, one CTA per (token, expert, 16 rank rows): writes routes and U.
// prefetch_b: also pull each active (adapter, expert) slab of lora_b into L2 (decode: the
// fused kernel reads it right after). Signals programmatic dependent launch at its start.
cudaError_t launch_shrink_simt(const LoraArgs& a, bool prefetch_b, cudaStream_t stream);

// Fused decode (float16 / bfloat16, 1 <= T <= kDecodeMaxTokens): y = x W^T + bias + LoRA,
// each CTA owning a block of output rows over all of K, y written once. Needs routes / U
// from launch_shrink_simt, issued just before on the same stream; with pdl the kernel is
// launched as a programmatic dependent of it (compute capability >= 9.0 only).
// row_tiles: output rows per CTA in tiles of 16 for T > 16 (1 or 2; 0 = the default, 2).
cudaError_t launch_decode_fused(const LoraArgs& a, const void* weight, const void* bias, void* y, int row_tiles,
                                bool pdl, cudaStream_t stream);

// Tensor-core shrink for prefill (float16 / bfloat16): writes routes and U.
cudaError_t launch_shrink_tc(const LoraArgs& a, cudaStream_t stream);

// Tensor-core expand for prefill (float16 / bfloat16).
//   preinit = true:  y[t, n] = bias[n] + delta[t, n] for every t < T, n < N (y is then the C
//                    operand of the base GEMM, beta = 1);
//   preinit = false: y[t, n] += delta[t, n] for the tokens with an active expert only.
cudaError_t launch_expand_tc(const LoraArgs& a, const void* bias, void* y, bool preinit, cudaStream_t stream);

// SIMT expand (float32): y[t, n] += delta[t, n] for the tokens with an active expert.
cudaError_t launch_expand_simt(const LoraArgs& a, void* y, cudaStream_t stream);

}  // namespace milora::cuda
