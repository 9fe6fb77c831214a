// SIMT shrink: U[t, e, r] = lora_a[p, e, r, :] . x[t, :] in float32, for the decode path
// (all dtypes) and the float32 path.
//
// Grid: (T tokens, E experts x ceil(R / 16) rank blocks); block: 4 warps x 4 rank rows, the
// lanes striding K with 16-byte loads, then a butterfly reduction: a fixed order, so results
// are bitwise reproducible. When the lora_a rows do not all start on a 16-byte boundary
// (K not a multiple of the vector width, or a misaligned view) each row is read with 16-byte
// loads from its first boundary on, the <= 2 x 7 elements before it and after its last whole
// vector one at a time, and x (aligned rows, padded by the packing) at the same k with two
// aligned loads and a shift: the lora_a stream keeps its 16-byte loads whatever K is. A CTA whose token has no adapter or whose expert has
// gate 0 exits after the routing: no LoRA work. The CTAs of rank block 0 of expert 0 also
// write the token's route, which the expand kernels read, so every kernel sees the same
// sanitised routing (common.cuh: route_token).
#include "cuda/common.cuh"

namespace milora::cuda {
namespace {

constexpr int kShrinkThreads = 128;  // 4 warps
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerCta = 16;

template <typename scalar_t>
struct Vec16;  // 16 bytes of scalar_t, converted to floats
template <>
struct Vec16<float> {
  static constexpr int kSize = 4;
  __device__ static __forceinline__ void unpack(uint4 u, float (&v)[4]) {
    v[0] = __uint_as_float(u.x), v[1] = __uint_as_float(u.y), v[2] = __uint_as_float(u.z), v[3] = __uint_as_float(u.w);
  }
  __device__ static __forceinline__ void load(const float* p, float (&v)[4]) {
    const float4 f = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  }
};
template <typename half_t>
struct Vec16Half {
  static constexpr int kSize = 8;
  __device__ static __forceinline__ void unpack(uint4 u, float (&v)[8]) {
    const float2 a = unpack2<half_t>(u.x), b = unpack2<half_t>(u.y), c = unpack2<half_t>(u.z), d = unpack2<half_t>(u.w);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y, v[4] = c.x, v[5] = c.y, v[6] = d.x, v[7] = d.y;
  }
  __device__ static __forceinline__ void load(const half_t* p, float (&v)[8]) { unpack(ldg16(p), v); }
};
template <>
struct Vec16<__half> : Vec16Half<__half> {};
template <>
struct Vec16<__nv_bfloat16> : Vec16Half<__nv_bfloat16> {};

template <typename scalar_t>
__global__ void __launch_bounds__(kShrinkThreads) milora_shrink_simt_kernel(const LoraArgs a, int rank_blocks,
                                                                          bool prefetch_b, bool vec) {
  // The fused decode kernel, launched next as a programmatic dependent, may start now:
  // it waits for this grid's completion before it reads U or the routes.
  pdl_launch_dependents();

  const int64_t t = blockIdx.x;
  const int64_t e = blockIdx.y / rank_blocks;
  const int rb = static_cast<int>(blockIdx.y % rank_blocks);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t K = a.K, E = a.E, R = a.R;

  const Route rt = route_token_warp(a.idx, t, a.T, lane);  // every warp the same, in few loads
  if (blockIdx.y == 0 && threadIdx.x == 0) store_route(a.routes, t, rt);
  if (rt.p < 0) return;
  const float gate = a.gates[rt.s * E + e];
  if (gate == 0.f) return;  // expert off: U[t, e, :] stays undefined and is never read

  const scalar_t* B = static_cast<const scalar_t*>(a.lora_b);
  if (prefetch_b) {  // this rank block's share of the (p, e) slab of lora_b, 128-byte lines
    const char* slab = reinterpret_cast<const char*>(B + (static_cast<int64_t>(rt.p) * E + e) * a.N * R);
    const int64_t bytes = a.N * R * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t lines = (bytes + 127) / 128;
    const int64_t l_end = lines * (rb + 1) / rank_blocks;
    for (int64_t l = lines * rb / rank_blocks + threadIdx.x; l < l_end; l += kShrinkThreads) {
      prefetch_l2(slab + (l * 128 < bytes ? l * 128 : bytes - 1));
    }
  }

  const scalar_t* xr = static_cast<const scalar_t*>(a.x) + t * a.ldx;  // 16-byte aligned
  const scalar_t* A = static_cast<const scalar_t*>(a.lora_a) + (static_cast<int64_t>(rt.p) * E + e) * R * K;
  const int64_t row0 = static_cast<int64_t>(rb) * kRowsPerCta + warp * kRowsPerWarp;  // this warp's rows
  const scalar_t* ar[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = row0 + i;
    ar[i] = A + (r < R ? r : R - 1) * K;  // rows past R: a valid row, result dropped
  }
  float acc[kRowsPerWarp] = {0.f, 0.f, 0.f, 0.f};
  using V = Vec16<scalar_t>;
  constexpr int W = V::kSize;
  if (vec) {  // every row 16-byte aligned: one x vector serves the 4 rows
#pragma unroll 4
    for (int64_t k = lane * W; k < K; k += 32 * W) {  // K % W == 0: whole vectors only
      float xv[W];
      V::load(xr + k, xv);
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        float av[W];
        V::load(ar[i] + k, av);
#pragma unroll
        for (int j = 0; j < W; ++j) acc[i] = fmaf(av[j], xv[j], acc[i]);
      }
    }
  } else {  // rows at different offsets from a 16-byte boundary: row by row
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t head = head_elems(ar[i]) < K ? head_elems(ar[i]) : K;  // < W elements before the boundary
      const int64_t end = head + (K - head) / W * W;                      // end of the whole vectors
      if (lane < head) acc[i] = fmaf(to_float(ar[i][lane]), to_float(xr[lane]), acc[i]);
      if (end + lane < K) acc[i] = fmaf(to_float(ar[i][end + lane]), to_float(xr[end + lane]), acc[i]);
      // x rows are aligned, so x at k (k = head mod W) lies head elements past a boundary;
      // both of its words lie inside the row's padded length.
      for (int64_t k = head + lane * W; k < end; k += 32 * W) {
        float av[W], xv[W];
        V::load(ar[i] + k, av);
        V::unpack(ldg16_at(xr + k, static_cast<int>(head)), xv);
#pragma unroll
        for (int j = 0; j < W; ++j) acc[i] = fmaf(av[j], xv[j], acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) acc[i] += __shfl_xor_sync(kFullMask, acc[i], off);
  if (lane < kRowsPerWarp) {
    float v = acc[0];
#pragma unroll
    for (int i = 1; i < kRowsPerWarp; ++i) v = lane == i ? acc[i] : v;
    if (row0 + lane < R) a.U[(t * E + e) * R + row0 + lane] = v;
  }
}

template <typename scalar_t>
cudaError_t launch_typed(const LoraArgs& a, bool prefetch_b, cudaStream_t stream) {
  const int rank_blocks = static_cast<int>(ceil_div<int64_t>(a.R, kRowsPerCta));
  constexpr int W = Vec16<scalar_t>::kSize;
  // x: rows 16-byte aligned and padded to whole vectors (lora_args.h packs it so).
  if (!host_aligned(a.x, 16) || a.ldx % W != 0 || a.ldx < a.K || !host_aligned(a.lora_a, sizeof(scalar_t))) {
    return cudaErrorInvalidValue;
  }
  const bool vec = a.K % W == 0 && host_aligned(a.lora_a, 16);
  const dim3 grid(static_cast<unsigned>(a.T), static_cast<unsigned>(a.E * rank_blocks));
  auto* kernel = milora_shrink_simt_kernel<scalar_t>;
  MILORA_LAUNCH_KERNEL(kernel, grid, dim3(kShrinkThreads), stream, a, rank_blocks, prefetch_b, vec);
  return cudaSuccess;  // launch errors: C10_CUDA_KERNEL_LAUNCH_CHECK in the caller
}

}  // namespace

cudaError_t launch_shrink_simt(const LoraArgs& a, bool prefetch_b, cudaStream_t stream) {
  if (a.T < 1) return cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat32: return launch_typed<float>(a, prefetch_b, stream);
    case DType::kFloat16: return launch_typed<__half>(a, prefetch_b, stream);
    default: return launch_typed<__nv_bfloat16>(a, prefetch_b, stream);
  }
}

}  // namespace milora::cuda
