// Device helpers shared by the CUDA kernels of gated_lora_linear: element types, 16-byte
// loads with a scalar fallback, the mma.sync wrapper, token routing with on-device index
// sanitising, and programmatic-dependent-launch controls.
#pragma once

#ifdef MILORA_CUDA_EMULATION
#include "cuda/emulation.h"  // first: it defines __shared__ before the CUDA headers do
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "cuda/launch.h"

namespace milora::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- element types ---------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Two values rounded to T, packed as one 32-bit register (lo in the low half), the operand
// format of mma.sync.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The two 16-bit values of a packed register, as floats.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t v);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<__half2*>(&v));
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}

// A 16-bit element's bits, loaded through the read-only path.
template <typename T>
__device__ __forceinline__ uint32_t load_bits16(const T* p) {
  return static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

// ---- loads -----------------------------------------------------------------------------

// Plain (coherent) vector load / store of a V (float4, int2, uint32_t...) at p, which must
// be sizeof(V)-aligned (the emulator checks it).
template <typename V>
__device__ __forceinline__ V load_vec(const void* p) {
#ifdef MILORA_CUDA_EMULATION
  emu::check_aligned(p, sizeof(V));
  emu::note_load(p, sizeof(V));
#endif
  return *reinterpret_cast<const V*>(p);
}
template <typename V>
__device__ __forceinline__ void store_vec(void* p, V v) {
#ifdef MILORA_CUDA_EMULATION
  emu::check_aligned(p, sizeof(V));
#endif
  *reinterpret_cast<V*>(p) = v;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// 16 bytes through the read-only (non-coherent) path, cached in L1 and L2.
__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// An L2 eviction policy that marks lines first for eviction (sm_80+).
#ifndef MILORA_CUDA_EMULATION
__device__ __forceinline__ uint64_t l2_policy_evict_first() {
  uint64_t pol;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}
#endif

// 16 bytes read once (a weight streamed from HBM): not allocated in L1 and marked first for
// eviction in L2, so that the small operands that are reused (x, lora_a, lora_b) stay there.
__device__ __forceinline__ uint4 ldg16_stream(const void* p) {
#ifdef MILORA_CUDA_EMULATION
  return load_vec<uint4>(p);
#else
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p), "l"(l2_policy_evict_first()));
  return r;
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifdef MILORA_CUDA_EMULATION
  (void)p;
#else
  asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));
#endif
}

// Elements [k, k + 8) of a row of 16-bit values of length K, packed in pairs, zero outside
// [0, K) (k may be negative: a chunk that starts before a row's first 16-byte boundary). One
// 16-byte load when vec (row + k 16-byte aligned whenever k >= 0) and the 8 lie inside the
// row, else scalar loads of the elements that exist.
template <typename T, bool kStream = false>
__device__ __forceinline__ uint4 load8(const T* row, int64_t k, int64_t K, bool vec) {
  static_assert(sizeof(T) == 2, "load8 packs 16-bit elements");
  if (vec && k >= 0 && k + 8 <= K) return kStream ? ldg16_stream(row + k) : ldg16(row + k);
  uint32_t h[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) h[j] = (k + j >= 0 && k + j < K) ? load_bits16(row + k + j) : 0u;
  return make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
}

// Bytes [2 m, 2 m + 16) of the 32 bytes w0:w1 (w0 first), 0 <= m < 8: the 16 bytes that start
// m 16-bit units past a 16-byte boundary. Fixed register indices and selects only (no local
// memory for a run-time m): shift by 4, 2 and 1 registers' worth in turn.
__device__ __forceinline__ uint4 funnel16(uint4 w0, uint4 w1, int m) {
  uint32_t r[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
  if (m & 4) {  // 2 registers
#pragma unroll
    for (int i = 0; i < 6; ++i) r[i] = r[i + 2];
  }
  if (m & 2) {  // 1 register
#pragma unroll
    for (int i = 0; i < 5; ++i) r[i] = r[i + 1];
  }
  if (m & 1) {  // one 16-bit unit
#pragma unroll
    for (int i = 0; i < 4; ++i) r[i] = (r[i] >> 16) | (r[i + 1] << 16);
  }
  return make_uint4(r[0], r[1], r[2], r[3]);
}

// The 16 bytes at p, which lies m elements of T past a 16-byte boundary (m = 0: one aligned
// load; else the two aligned 16-byte words that hold them, shifted). The caller guarantees
// that both words lie inside its buffer (x rows are padded to a multiple of 16 bytes).
// For small operands read at the offset of another (x at the k of a weight row that starts
// off a 16-byte boundary): the second load mostly hits the line the neighbouring lane loaded.
template <typename T>
__device__ __forceinline__ uint4 ldg16_at(const T* p, int m) {
  if (m == 0) return ldg16(p);
  const T* base = p - m;
  return funnel16(ldg16(base), ldg16(base + 16 / sizeof(T)), m * static_cast<int>(sizeof(T)) / 2);
}

// Elements of T from p to the next 16-byte boundary (0 when p is on one); p must be aligned
// to sizeof(T), as every tensor's data is.
template <typename T>
__host__ __device__ __forceinline__ int head_elems(const T* p) {
  return static_cast<int>(((16u - (reinterpret_cast<uintptr_t>(p) & 15u)) & 15u) / sizeof(T));
}

// ---- tensor cores ----------------------------------------------------------------------

// d += a * b for one m16n8k16 tile, float32 accumulation (sm_80+).
// a: row-major 16x16 fragment (4 regs), b: "col" 16x8 fragment (2 regs), see warp_gemm.cuh.
#ifdef MILORA_CUDA_EMULATION
using emu::mma16816;
#else
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif  // MILORA_CUDA_EMULATION

// ---- programmatic dependent launch (sm_90+; no-ops elsewhere) -------------------------

// Lets a grid launched as a programmatic dependent of this one start now.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Waits until the grids this one depends on have completed and their writes are visible.
// Returns at once when the grid was not launched as a programmatic dependent.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// ---- routing: token -> (sequence, adapter), sanitised on the device ------------------
//
// Bounds safety: index values are never trusted. Offsets are clamped to [0, T]; a token t
// belongs to s = the last sequence whose clamped start is <= t (binary search over s in
// [0, S), so only offsets[0 .. S] are read), and only if t < clamped offsets[s + 1]; an
// adapter id outside [0, P) means no LoRA, like -1. For valid indices this is exactly the
// op's contract (empty sequences included); for garbage it yields some in-range route or
// none, never an out-of-bounds access.

__device__ __forceinline__ int64_t load_index(const void* p, int64_t i, bool is64) {
  return is64 ? static_cast<int64_t>(__ldg(static_cast<const long long*>(p) + i))
              : static_cast<int64_t>(__ldg(static_cast<const int*>(p) + i));
}

__device__ __forceinline__ int64_t seq_start(const IndexArgs& ix, int64_t s, int64_t T) {
  const int64_t o = load_index(ix.offsets, s, ix.offsets64);
  return o < 0 ? 0 : (o > T ? T : o);
}

struct Route {
  int32_t s;  // sequence, valid when p >= 0
  int32_t p;  // adapter slot in [0, P), or -1 (no LoRA)
};

// The route of token t once s = the last sequence with clamped start <= t is known (-1: none).
__device__ __forceinline__ Route route_from_seq(const IndexArgs& ix, int64_t t, int64_t T, int64_t s) {
  Route r{-1, -1};
  if (s < 0 || t >= seq_start(ix, s + 1, T)) return r;
  const int64_t p = load_index(ix.ids, s, ix.ids64);
  if (p < 0 || p >= ix.P) return r;
  r.s = static_cast<int32_t>(s);
  r.p = static_cast<int32_t>(p);
  return r;
}

// One thread: binary search.
__device__ __forceinline__ Route route_token(const IndexArgs& ix, int64_t t, int64_t T) {
  int64_t lo = 0, hi = ix.S;  // find the last s in [0, S) with start(s) <= t
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (seq_start(ix, mid, T) <= t) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return route_from_seq(ix, t, T, lo - 1);
}

// A whole warp, one token: each round the 32 lanes probe 32 evenly spaced sequences, so
// S <= 32 costs one round of loads and S <= 1024 two (the binary search: log2 S dependent
// loads). Same result as route_token for valid offsets; in range for any offsets.
__device__ __forceinline__ Route route_token_warp(const IndexArgs& ix, int64_t t, int64_t T, int lane) {
  int64_t lo = 0, hi = ix.S;  // the answer lies in [lo - 1, hi - 1]
  while (lo < hi) {
    const int64_t step = (hi - lo + 31) / 32;
    const int64_t s = lo + lane * step;
    const uint32_t mask = __ballot_sync(kFullMask, s < hi && seq_start(ix, s, T) <= t);
    if (mask == 0) break;  // start(lo) > t: the answer is lo - 1
    const int64_t found = lo + (31 - __clz(static_cast<int>(mask))) * step;  // start(found) <= t
    hi = found + step < hi ? found + step : hi;  // the next probe, if any, had start > t
    lo = found + 1;
  }
  return route_from_seq(ix, t, T, lo - 1);
}

__device__ __forceinline__ Route load_route(const int32_t* routes, int64_t t) {
  const int2 v = load_vec<int2>(routes + 2 * t);
  return Route{v.x, v.y};
}

__device__ __forceinline__ void store_route(int32_t* routes, int64_t t, Route r) {
  store_vec<int2>(routes + 2 * t, make_int2(r.s, r.p));
}

// ---- launching -------------------------------------------------------------------------

// kernel<<<grid, block, 0, stream>>>(args...); `kernel` must be a plain name (a function
// pointer variable for templates). In emulation builds the CPU emulator runs it.
#ifdef MILORA_CUDA_EMULATION
#define MILORA_LAUNCH_KERNEL(kernel, grid, block, stream, ...) \
  ::milora::emu::launch((grid), (block), [&] { kernel(__VA_ARGS__); })
#else
#define MILORA_LAUNCH_KERNEL(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

// ---- small host helpers used by the launchers -----------------------------------------

inline bool host_aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

template <typename T>
inline T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

}  // namespace milora::cuda
