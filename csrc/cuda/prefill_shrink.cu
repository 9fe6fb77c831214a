// Tensor-core shrink for prefill (float16 / bfloat16):
//   U[t, e, r] = lora_a[p, e, r, :] . x[t, :]   (float32) for every active (t, e).
//
// One CTA per block of 32 consecutive tokens (grid: ceil(T / 32)); its 8 warps split K and
// each runs warp_gemm.cuh with the x rows of the 32 tokens as the m16 operand (2 tiles) and
// 8 * NB lora_a rows as the n8 operand, the columns being the (expert, rank) pairs of the
// active experts laid end to end; a fixed-order tree in shared memory sums the 8 partial
// tiles (bitwise reproducible). x is read from HBM once per token block (E_active * R <= 64);
// wider problems make further passes over it that hit L1/L2.
//
// Segments: a block may straddle sequences. It runs one pass per distinct adapter among
// its tokens (one pass in the common prefill case of long sequences), each pass covering
// only the experts that have a non-zero gate for at least one of the pass's tokens, and
// writes U only for the tokens of the pass whose gate for that expert is non-zero. Tokens
// with no adapter, and experts with gate 0 everywhere in the block, cost nothing. The block
// also writes every token's route (common.cuh: route_token) for the expand kernel.
#include "cuda/common.cuh"
#include "cuda/warp_gemm.cuh"

namespace milora::cuda {
namespace {

constexpr int kShrinkTcWarps = 8;
constexpr int kShrinkTcThreads = kShrinkTcWarps * 32;
constexpr int kShrinkTcTokens = 32;  // 2 m16 tiles

// Index of the n-th (0-based) set bit of mask (n < popcount(mask)).
__device__ __forceinline__ int nth_set_bit(uint32_t mask, int n) {
  for (int i = 0; i < n; ++i) mask &= mask - 1;  // drop the n lowest set bits
  return __ffs(mask) - 1;
}

template <typename scalar_t, int NB>
__global__ void __launch_bounds__(kShrinkTcThreads) milora_shrink_tc_kernel(const LoraArgs a, bool vec_a) {
  constexpr int MT = 2;
  constexpr int kCols = 8 * NB;  // (expert, rank) columns per pass over K
  constexpr int LD = kCols + 1;
  __shared__ float buf[reduce_floats<MT, NB, kShrinkTcWarps>()];
  __shared__ Route routes[kShrinkTcTokens];
  __shared__ uint32_t active[kMaxExperts];  // bit i: token t0 + i has gate != 0 for expert e

  const int64_t T = a.T, K = a.K, E = a.E, R = a.R;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, q = lane & 3;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kShrinkTcTokens;

  if (warp == 0) {  // lane i routes token t0 + i
    const int64_t t = t0 + lane;
    Route rt{-1, -1};
    if (t < T) {
      rt = route_token(a.idx, t, T);
      store_route(a.routes, t, rt);
    }
    routes[lane] = rt;
    for (int64_t e = 0; e < E; ++e) {
      const bool on = rt.p >= 0 && a.gates[rt.s * E + e] != 0.f;
      const uint32_t bits = __ballot_sync(kFullMask, on);
      if (lane == 0) active[e] = bits;
    }
  }
  __syncthreads();

  uint32_t pending = 0;  // tokens with at least one active expert (hence an adapter)
  for (int64_t e = 0; e < E; ++e) pending |= active[e];

  const scalar_t* X = static_cast<const scalar_t*>(a.x);
  const scalar_t* a_rows[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t t = t0 + 16 * i + g + 8 * h;
      a_rows[i][h] = X + (t < T ? t : T - 1) * a.ldx;  // tokens past T: a valid row, result dropped
    }
  const KChunks kc = k_chunks(K, 0);  // x rows are 16-byte aligned: chunks from k = 0
  const int64_t c_begin = kc.count * warp / kShrinkTcWarps, c_end = kc.count * (warp + 1) / kShrinkTcWarps;

  while (pending != 0) {  // CTA-uniform: every thread derives the same passes from smem
    const int32_t p = routes[__ffs(pending) - 1].p;
    uint32_t pass = 0;
    for (int i = 0; i < kShrinkTcTokens; ++i)
      if (((pending >> i) & 1u) && routes[i].p == p) pass |= 1u << i;
    pending &= ~pass;
    // The pass's columns: (expert, rank) for every expert active for one of its tokens,
    // kCols at a time, so x is streamed once per kCols columns, not once per expert.
    uint32_t experts = 0;
    for (int64_t e = 0; e < E; ++e)
      if (active[e] & pass) experts |= 1u << e;
    const int cols = __popc(experts) * static_cast<int>(R);
    const scalar_t* A = static_cast<const scalar_t*>(a.lora_a) + static_cast<int64_t>(p) * E * R * K;
    for (int cb = 0; cb < cols; cb += kCols) {
      const scalar_t* b_rows[NB];
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        int col = cb + 8 * j + g;
        col = col < cols ? col : cols - 1;  // columns past the last: a valid row, result dropped
        const int e = nth_set_bit(experts, col / static_cast<int>(R));
        b_rows[j] = A + (e * R + col % static_cast<int>(R)) * K;
      }
      float acc[MT][NB][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NB; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;
      WarpGemm<scalar_t, MT, NB, false>::run(a_rows, b_rows, c_begin, c_end, kc, K, true, vec_a, 0, q, acc);
      cta_reduce<MT, NB, kShrinkTcWarps>(acc, buf, warp, lane);  // ends with __syncthreads()
      for (int idx = tid; idx < kShrinkTcTokens * kCols; idx += kShrinkTcThreads) {
        const int row = idx / kCols, c = idx % kCols, col = cb + c;
        if (col >= cols) continue;
        const int e = nth_set_bit(experts, col / static_cast<int>(R));
        const int64_t r = col % static_cast<int>(R);
        if ((active[e] & pass) >> row & 1u) a.U[((t0 + row) * E + e) * R + r] = buf[row * LD + c];
      }
      __syncthreads();  // buf is reused by the next reduction
    }
  }
}

template <typename scalar_t, int NB>
cudaError_t launch_one(const LoraArgs& a, cudaStream_t stream) {
  // x (the stream here, T x K): rows 16-byte aligned and padded (lora_args.h), so 16-byte
  // loads for every K. lora_a (small, L2-resident, reused by every token block) is read with
  // scalar loads when its rows are not 16-byte aligned: the n8 operand's 8 rows would need
  // 8 different shifts, and the aligned words around a row's ends may lie outside the tensor.
  if (!host_aligned(a.x, 16) || a.ldx % 8 != 0 || a.ldx < a.K) return cudaErrorInvalidValue;
  const bool vec_a = a.K % 8 == 0 && host_aligned(a.lora_a, 16);
  const unsigned blocks = static_cast<unsigned>(ceil_div<int64_t>(a.T, kShrinkTcTokens));
  auto* kernel = milora_shrink_tc_kernel<scalar_t, NB>;
  MILORA_LAUNCH_KERNEL(kernel, dim3(blocks), dim3(kShrinkTcThreads), stream, a, vec_a);
  return cudaSuccess;  // launch errors: C10_CUDA_KERNEL_LAUNCH_CHECK in the caller
}

template <typename scalar_t>
cudaError_t launch_typed(const LoraArgs& a, cudaStream_t stream) {
  // Columns (expert, rank) per pass over K: 16, 32 or 64, sized by E * R (the number of
  // active experts is known on the device only); wider problems take several passes.
  const int64_t cols = a.E * a.R;
  if (cols <= 16) return launch_one<scalar_t, 2>(a, stream);
  if (cols <= 32) return launch_one<scalar_t, 4>(a, stream);
  return launch_one<scalar_t, 8>(a, stream);
}

}  // namespace

cudaError_t launch_shrink_tc(const LoraArgs& a, cudaStream_t stream) {
  if (a.T < 1) return cudaSuccess;
  if (a.dtype == DType::kFloat32 || a.E > kMaxExperts) return cudaErrorInvalidValue;
  if (a.dtype == DType::kFloat16) return launch_typed<__half>(a, stream);
  return launch_typed<__nv_bfloat16>(a, stream);
}

}  // namespace milora::cuda
