// SIMT expand for float32: y[t, n] += sum_e gates[s,e] * lora_b[p, e, n, :] . U[t, e, :].
//
// Grid: (T tokens, ceil(N / 256) column blocks); one thread per output element. A token with
// no adapter, or whose experts all have gate 0, costs no work and its row of y is not
// touched. The float32 path favours exactness over speed (no tensor cores: TF32 would not
// match float32 PyTorch); the bfloat16 / float16 paths use decode_kernel.cu and
// prefill_expand.cu.
#include "cuda/common.cuh"

namespace milora::cuda {
namespace {

constexpr int kExpandThreads = 256;

__global__ void __launch_bounds__(kExpandThreads) milora_expand_simt_kernel(const LoraArgs a, float* y) {
  const int64_t t = blockIdx.x;
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  const Route rt = load_route(a.routes, t);
  if (rt.p < 0 || n >= a.N) return;
  const int64_t E = a.E, R = a.R;
  const float* B = static_cast<const float*>(a.lora_b);
  float v = 0.f;
  bool any = false;
  for (int64_t e = 0; e < E; ++e) {
    const float gate = a.gates[rt.s * E + e];
    if (gate == 0.f) continue;  // expert off: no work
    any = true;
    const float* b = B + ((static_cast<int64_t>(rt.p) * E + e) * a.N + n) * R;
    const float* u = a.U + (t * E + e) * R;
    float d = 0.f;
#pragma unroll 4
    for (int64_t r = 0; r < R; ++r) d = fmaf(__ldg(b + r), u[r], d);
    v = fmaf(gate, d, v);
  }
  if (any) y[t * a.N + n] += v;
}

}  // namespace

cudaError_t launch_expand_simt(const LoraArgs& a, void* y, cudaStream_t stream) {
  if (a.T < 1) return cudaSuccess;
  if (a.dtype != DType::kFloat32) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(a.T), static_cast<unsigned>(ceil_div<int64_t>(a.N, kExpandThreads)));
  float* yf = static_cast<float*>(y);
  MILORA_LAUNCH_KERNEL(milora_expand_simt_kernel, grid, dim3(kExpandThreads), stream, a, yf);
  return cudaSuccess;  // launch errors: C10_CUDA_KERNEL_LAUNCH_CHECK in the caller
}

}  // namespace milora::cuda
