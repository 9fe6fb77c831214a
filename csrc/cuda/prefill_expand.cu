// Tensor-core expand for prefill (float16 / bfloat16):
//   delta[t, n] = sum_e gates[s,e] * lora_b[p, e, n, :] . U[t, e, :]
//   preinit: y[t, n] = bias[n] + delta[t, n]   (all t < T, n < N; y is then the C operand of
//            the base GEMM, beta = 1, so y is read once by cuBLAS instead of re-read and
//            re-written here)
//   else:    y[t, n] += delta[t, n]            (only tokens with an active expert)
//
// CTA tile: 64 tokens x 128 columns, 8 warps of 16 tokens x 64 columns (grid: ceil(T / 64)
// x ceil(N / 128)). The mma's m16 operand is U (tokens x rank), its n8 operand lora_b rows
// (columns n, rank contiguous), k = rank in steps of 16. U is float32: each value is split
// into hi + lo in the input dtype (u = hi + lo to about 16 mantissa bits) and both halves
// go through the tensor cores, so the expand keeps float32-like accuracy for U; the gate is
// folded into U in float32 before the split (a gate * U beyond the float16 range would
// overflow where PyTorch's float16 would not: accepted, gates are router probabilities
// times alpha / r).
//
// k-permutation for a k16 step: lane q takes the 4 contiguous rank values r0 + 4q .. +3
// (one 8-byte load of a lora_b row, one float4 of a U row): values 0,1 -> slots 2q,2q+1 and
// values 2,3 -> slots 2q+8,2q+9, the same for both operands (see warp_gemm.cuh).
//
// Segments: a warp runs one pass per distinct adapter among its 16 tokens (warp-uniform via
// ballots; one pass in long sequences), and inside a pass only the experts with a non-zero
// gate for one of the pass's tokens.
//
// Tenant isolation. The mma multiplies all 16 token rows of the warp by the same lora_b
// rows, so the rows of tokens that are not active for (pass adapter, expert) -- another
// adapter's tokens, base-only tokens, tokens whose gate for this expert is 0 -- are
// multiplied through with zero U, and 0 x Inf = NaN: an Inf / NaN in that slab would reach
// them. So each (pass, expert) accumulates into its own tile `part`, and a row takes `part`
// into its sum only when it is active for that expert: a select, never a multiplication by
// 0. A token's output therefore depends only on its own adapter's experts with a non-zero
// gate (as in the decode and float32 kernels), whatever the other slabs hold.
#include "cuda/common.cuh"

namespace milora::cuda {
namespace {

constexpr int kExpandTcWarps = 8;
constexpr int kExpandTcThreads = kExpandTcWarps * 32;
constexpr int kExpandTcTokens = 64;
constexpr int kExpandTcCols = 128;
constexpr int kWarpTiles = 8;  // n8 tiles per warp: 64 columns

// U[row][r .. r+3] (float32), zero past R or when the row is not active.
__device__ __forceinline__ float4 load_u4(const float* row, int64_t r, int64_t R, bool on, bool vec) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  if (!on || r >= R) return v;
  if (vec) return load_vec<float4>(row + r);  // R % 4 == 0: r + 4 <= R
  v.x = row[r];
  if (r + 1 < R) v.y = row[r + 1];
  if (r + 2 < R) v.z = row[r + 2];
  if (r + 3 < R) v.w = row[r + 3];
  return v;
}

// lora_b row [r .. r+3] as two packed registers, zero past R.
template <typename scalar_t>
__device__ __forceinline__ uint2 load_b4(const scalar_t* row, int64_t r, int64_t R, bool vec) {
  if (r >= R) return make_uint2(0u, 0u);
  if (vec) return __ldg(reinterpret_cast<const uint2*>(row + r));  // R % 4 == 0: r + 4 <= R
  uint32_t h[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = (r + j < R) ? load_bits16(row + r + j) : 0u;
  return make_uint2(h[0] | (h[1] << 16), h[2] | (h[3] << 16));
}

// u = hi + lo, both rounded to scalar_t.
template <typename scalar_t>
__device__ __forceinline__ void split2(float u, float& hi, float& lo) {
  hi = to_float(from_float<scalar_t>(u));
  lo = u - hi;
}

template <typename scalar_t>
__device__ __forceinline__ void store_pair(scalar_t* y, int64_t t, int64_t col, int64_t N, float v0, float v1,
                                           const scalar_t* bias, bool preinit, bool pair_ok) {
  if (col >= N) return;
  scalar_t* p = y + t * N + col;
  const bool two = col + 1 < N;
  if (preinit) {
    if (bias != nullptr) {
      v0 += to_float(bias[col]);
      if (two) v1 += to_float(bias[col + 1]);
    }
  } else {
    v0 += to_float(p[0]);
    if (two) v1 += to_float(p[1]);
  }
  if (two && pair_ok) {  // N even, col even: 4-byte aligned
    store_vec<uint32_t>(p, pack2<scalar_t>(v0, v1));
  } else {
    p[0] = from_float<scalar_t>(v0);
    if (two) p[1] = from_float<scalar_t>(v1);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kExpandTcThreads) milora_expand_tc_kernel(const LoraArgs a, const scalar_t* bias,
                                                                          scalar_t* y, bool preinit, bool vec_b,
                                                                          bool vec_u) {
  __shared__ Route routes[kExpandTcTokens];
  const int64_t T = a.T, N = a.N, E = a.E, R = a.R;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, q = lane & 3;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kExpandTcTokens;
  if (tid < kExpandTcTokens) {
    const int64_t t = t0 + tid;
    routes[tid] = t < T ? load_route(a.routes, t) : Route{-1, -1};
  }
  __syncthreads();

  const int wm = warp & 3, wn = warp >> 2;
  const int64_t n_base = static_cast<int64_t>(blockIdx.y) * kExpandTcCols + 64 * wn;
  const Route rA = routes[16 * wm + g], rB = routes[16 * wm + g + 8];  // this lane's rows g, g+8
  const int64_t tA = t0 + 16 * wm + g, tB = tA + 8;
  const int32_t my_p = lane < 16 ? routes[16 * wm + lane].p : -1;  // lane i < 16 stands for row i

  float acc[kWarpTiles][4];
#pragma unroll
  for (int j = 0; j < kWarpTiles; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = 0.f;
  bool anyA = false, anyB = false;

  const scalar_t* Bw = static_cast<const scalar_t*>(a.lora_b);
  uint32_t pending = __ballot_sync(kFullMask, my_p >= 0);
  while (pending != 0) {  // warp-uniform
    const int32_t p = __shfl_sync(kFullMask, my_p, __ffs(pending) - 1);
    pending &= ~__ballot_sync(kFullMask, my_p == p);
    const bool inA = rA.p == p, inB = rB.p == p;
    for (int64_t e = 0; e < E; ++e) {
      const float gA = inA ? a.gates[rA.s * E + e] : 0.f;
      const float gB = inB ? a.gates[rB.s * E + e] : 0.f;
      const bool actA = inA && gA != 0.f, actB = inB && gB != 0.f;
      if (!__any_sync(kFullMask, actA || actB)) continue;  // expert off for the whole pass
      anyA |= actA;
      anyB |= actB;
      const float* uA = a.U + (tA * E + e) * R;  // read only when actA (then tA < T)
      const float* uB = a.U + (tB * E + e) * R;
      const scalar_t* slab = Bw + (static_cast<int64_t>(p) * E + e) * N * R;
      float part[kWarpTiles][4];  // this expert's contribution (see "Tenant isolation")
#pragma unroll
      for (int j = 0; j < kWarpTiles; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) part[j][c] = 0.f;
      for (int64_t r0 = 0; r0 < R; r0 += 16) {
        const int64_t r = r0 + 4 * q;
        // The gate is folded into U in float32 (inactive rows are zero-filled, not scaled).
        float4 ua = load_u4(uA, r, R, actA, vec_u);
        float4 ub = load_u4(uB, r, R, actB, vec_u);
        ua.x *= gA, ua.y *= gA, ua.z *= gA, ua.w *= gA;
        ub.x *= gB, ub.y *= gB, ub.z *= gB, ub.w *= gB;
        float ha[4], la[4], hb[4], lb[4];
        split2<scalar_t>(ua.x, ha[0], la[0]);
        split2<scalar_t>(ua.y, ha[1], la[1]);
        split2<scalar_t>(ua.z, ha[2], la[2]);
        split2<scalar_t>(ua.w, ha[3], la[3]);
        split2<scalar_t>(ub.x, hb[0], lb[0]);
        split2<scalar_t>(ub.y, hb[1], lb[1]);
        split2<scalar_t>(ub.z, hb[2], lb[2]);
        split2<scalar_t>(ub.w, hb[3], lb[3]);
        // A regs: (row g, slots 2q..), (row g+8, 2q..), (row g, 2q+8..), (row g+8, 2q+8..)
        const uint32_t h0 = pack2<scalar_t>(ha[0], ha[1]), h1 = pack2<scalar_t>(hb[0], hb[1]);
        const uint32_t h2 = pack2<scalar_t>(ha[2], ha[3]), h3 = pack2<scalar_t>(hb[2], hb[3]);
        const uint32_t l0 = pack2<scalar_t>(la[0], la[1]), l1 = pack2<scalar_t>(lb[0], lb[1]);
        const uint32_t l2 = pack2<scalar_t>(la[2], la[3]), l3 = pack2<scalar_t>(lb[2], lb[3]);
#pragma unroll
        for (int j = 0; j < kWarpTiles; ++j) {
          int64_t n = n_base + 8 * j + g;
          n = n < N ? n : N - 1;  // columns past N: a valid row of lora_b, result dropped
          const uint2 bv = load_b4<scalar_t>(slab + n * R, r, R, vec_b);
          mma16816<scalar_t>(part[j], h0, h1, h2, h3, bv.x, bv.y);
          mma16816<scalar_t>(part[j], l0, l1, l2, l3, bv.x, bv.y);
        }
      }
      // C fragment: part[j][0..1] is row g (token A), part[j][2..3] row g + 8 (token B).
#pragma unroll
      for (int j = 0; j < kWarpTiles; ++j) {
        acc[j][0] += actA ? part[j][0] : 0.f;
        acc[j][1] += actA ? part[j][1] : 0.f;
        acc[j][2] += actB ? part[j][2] : 0.f;
        acc[j][3] += actB ? part[j][3] : 0.f;
      }
    }
  }

  const bool pair_ok = (N % 2) == 0;
  const bool writeA = tA < T && (preinit || anyA), writeB = tB < T && (preinit || anyB);
#pragma unroll
  for (int j = 0; j < kWarpTiles; ++j) {
    const int64_t col = n_base + 8 * j + 2 * q;
    if (writeA) store_pair<scalar_t>(y, tA, col, N, acc[j][0], acc[j][1], bias, preinit, pair_ok);
    if (writeB) store_pair<scalar_t>(y, tB, col, N, acc[j][2], acc[j][3], bias, preinit, pair_ok);
  }
}

template <typename scalar_t>
cudaError_t launch_typed(const LoraArgs& a, const void* bias, void* y, bool preinit, cudaStream_t stream) {
  const bool vec_b = a.R % 4 == 0 && host_aligned(a.lora_b, 8);
  const bool vec_u = a.R % 4 == 0 && host_aligned(a.U, 16);
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(a.T, kExpandTcTokens)),
                  static_cast<unsigned>(ceil_div<int64_t>(a.N, kExpandTcCols)));
  auto* kernel = milora_expand_tc_kernel<scalar_t>;
  const scalar_t* bias_t = static_cast<const scalar_t*>(bias);
  scalar_t* y_t = static_cast<scalar_t*>(y);
  MILORA_LAUNCH_KERNEL(kernel, grid, dim3(kExpandTcThreads), stream, a, bias_t, y_t, preinit, vec_b, vec_u);
  return cudaSuccess;  // launch errors: C10_CUDA_KERNEL_LAUNCH_CHECK in the caller
}

}  // namespace

cudaError_t launch_expand_tc(const LoraArgs& a, const void* bias, void* y, bool preinit, cudaStream_t stream) {
  if (a.T < 1) return cudaSuccess;
  if (a.dtype == DType::kFloat32) return cudaErrorInvalidValue;
  if (a.dtype == DType::kFloat16) return launch_typed<__half>(a, bias, y, preinit, stream);
  return launch_typed<__nv_bfloat16>(a, bias, y, preinit, stream);
}

}  // namespace milora::cuda
